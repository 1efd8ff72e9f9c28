"""The sampling loop, once: a model function, a diffusers sampler, and per-step hooks.

A *model function* maps ``(x_t, t)`` to the network's prediction at ``x_t``; conditioning (class labels, a
report context, concatenated channels) is bound into it by ``unet_function``, and wrappers change what it
computes without the loop knowing: classifier-free guidance (``diffusion.guidance``), tiles
(``diffusion.tiling``). A *hook* is called after every step with ``(position, t, x)`` and returns the new
``x``: RePaint's paste-and-resample (``diffusion.repaint``) is one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

ModelFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Hook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def unet_function(unet: torch.nn.Module, class_labels: torch.Tensor | None = None, context: torch.Tensor | None = None,
                  concat: torch.Tensor | None = None, controlnet: torch.nn.Module | None = None,
                  control: torch.Tensor | None = None, control_scale: float = 1.0,
                  inputs: dict[str, torch.Tensor] | None = None) -> ModelFunction:
    """The UNet as a model function, with its conditioning bound: ``class_labels`` (G,), ``context``
    (G, tokens, dim) for cross-attention, ``concat`` (B, C, *spatial) appended to the input's channels, and a
    ``controlnet`` whose residuals for the ``control`` image (G, C, *spatial), times ``control_scale``, are
    added to the UNet's skip connections; ``inputs``: further per-row keyword inputs (G, ...) of the network
    (a MAISI UNet's body region and spacing).

    A batch of N rows takes each of the G conditioning rows for N / G consecutive rows: one row per item,
    one row for every tile of an image, or [unconditional, conditional] for a guided batch of two halves.
    """

    def rows(condition: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if condition is None or condition.shape[0] == n:
            return condition
        if n % condition.shape[0]:
            raise ValueError(f"{condition.shape[0]} conditioning rows for a batch of {n}")
        return condition.repeat_interleave(n // condition.shape[0], dim=0)

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        model_input = x if concat is None else torch.cat([x, rows(concat, n).to(x.dtype)], dim=1)
        timesteps, labels, ctx = t.to(x.device).expand(n), rows(class_labels, n), rows(context, n)
        residuals = {name: rows(value, n) for name, value in (inputs or {}).items()}
        if controlnet is not None:
            down, middle = controlnet(model_input, timesteps, rows(control, n).to(x.dtype), control_scale,
                                      context=ctx, class_labels=labels)
            residuals.update(down_block_additional_residuals=down, mid_block_additional_residual=middle)
        return unet(model_input, timesteps=timesteps, class_labels=labels, context=ctx, **residuals)

    return predict


def concatenated(model: ModelFunction, condition: torch.Tensor) -> ModelFunction:
    """``model`` on ``x`` with ``condition`` (B, C, *spatial) appended to its channels: for a network that
    takes its condition with the image (a mask-conditioned inpainting model). Around a tiled ``model`` the
    condition is tiled with the image."""
    return lambda x, t: model(torch.cat([x, condition.to(x.dtype)], dim=1), t)


def sample_loop(model: ModelFunction, x: torch.Tensor, sampler: SchedulerMixin,
                timesteps: Sequence[torch.Tensor] | None = None,
                generator: torch.Generator | list[torch.Generator] | None = None,
                hooks: Sequence[Hook] = ()) -> torch.Tensor:
    """Run ``sampler`` (``set_timesteps`` already called) from ``x`` over ``timesteps`` (default: the
    sampler's own): scale the input, predict, step, then each hook. The short, unrolled loop of diffusers'
    pipelines; ``generator`` (one per item) feeds stochastic samplers, as diffusers passes it to ``step``.
    """
    extra = {"generator": generator} if "generator" in inspect.signature(sampler.step).parameters else {}
    plan = sampler.timesteps if timesteps is None else timesteps
    for position, t in enumerate(plan):
        prediction = model(sampler.scale_model_input(x, t), t)
        x = sampler.step(prediction, t, x, **extra).prev_sample
        for hook in hooks:
            x = hook(position, t, x)
    return x
