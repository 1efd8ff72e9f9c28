"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper of a model function, and the doubled batch it runs."""

from __future__ import annotations

import torch

from meddiff.diffusion.sampling import ModelFunction


def doubled(rows: torch.Tensor | None) -> torch.Tensor | None:
    """Per-item conditioning rows for the guided batch: the same rows for the unconditional and the conditional
    half (only the report context differs between the halves)."""
    return None if rows is None else torch.cat([rows, rows])


def classifier_free_guidance(both: ModelFunction, scale: float) -> ModelFunction:
    """``uncond + scale * (cond - uncond)``, where ``both`` evaluates a doubled batch whose first half
    is conditioned on the unconditional (empty or negative) report and whose second half on the prompts
    (its other conditioning rows ``doubled``); the two halves run in one network call."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = both(torch.cat([x, x]), t).chunk(2)
        return uncond + scale * (cond - uncond)

    return guided
