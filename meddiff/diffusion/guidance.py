"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper of a model function."""

from __future__ import annotations

import torch

from meddiff.diffusion.sampling import ModelFunction


def classifier_free_guidance(both: ModelFunction, scale: float) -> ModelFunction:
    """``uncond + scale * (cond - uncond)``, where ``both`` evaluates a doubled batch whose first half
    is conditioned on the unconditional (empty or negative) report and whose second half on the prompts;
    the two halves run in one network call."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = both(torch.cat([x, x]), t).chunk(2)
        return uncond + scale * (cond - uncond)

    return guided
