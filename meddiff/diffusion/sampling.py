"""The sampling loop, once: a model function, a diffusers sampler, and per-step hooks.

A *model function* maps ``(x_t, t)`` to the network's prediction at ``x_t``; conditioning (class labels, a
report context, concatenated channels) is bound into it by ``unet_function`` (a ControlNet or further network
inputs are bound into the network itself: ``meddiff.nets.conditioned``), and wrappers change what it
computes without the loop knowing: classifier-free guidance (``diffusion.guidance``), tiles
(``diffusion.tiling``). A *hook* is called after every step with ``(position, t, x)`` and returns the new
``x``: RePaint's paste-and-resample (``diffusion.repaint``) is one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from meddiff.nets.conditioned import repeat_rows

ModelFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Hook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def unet_function(unet: torch.nn.Module, class_labels: torch.Tensor | None = None, context: torch.Tensor | None = None,
                  concat: torch.Tensor | None = None) -> ModelFunction:
    """The network as a model function, with its conditioning bound: ``class_labels`` (G,), ``context``
    (G, tokens, dim) for cross-attention and ``concat`` (G, C, *spatial) appended to the input's channels.
    Conditioning the network takes in other ways (a ControlNet, MAISI's region and spacing inputs) is bound into
    ``unet`` itself by a wrapper of ``meddiff.nets.conditioned``.

    A batch of N rows takes each of the G conditioning rows for N / G consecutive rows: one row per item,
    one row for every tile of an image, or [unconditional, conditional] for a guided batch of two halves.
    """

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        model_input = x if concat is None else torch.cat([x, repeat_rows(concat, n).to(x.dtype)], dim=1)
        return unet(model_input, timesteps=t.to(x.device).expand(n), class_labels=repeat_rows(class_labels, n),
                    context=repeat_rows(context, n))

    return predict


def concatenated(model: ModelFunction, condition: torch.Tensor) -> ModelFunction:
    """``model`` on ``x`` with ``condition`` (B, C, *spatial) appended to its channels: for a network that
    takes its condition with the image (a mask-conditioned inpainting model). Around a tiled ``model`` the
    condition is tiled with the image."""
    return lambda x, t: model(torch.cat([x, condition.to(x.dtype)], dim=1), t)


def sample_loop(model: ModelFunction, x: torch.Tensor, sampler: SchedulerMixin,
                timesteps: Sequence[torch.Tensor] | None = None,
                generator: torch.Generator | list[torch.Generator] | None = None,
                hooks: Sequence[Hook] = (), from_noise: bool = True) -> torch.Tensor:
    """Run ``sampler`` (``set_timesteps`` already called) from ``x`` over ``timesteps`` (default: the
    sampler's own): scale the input, predict, step, then each hook. The short, unrolled loop of diffusers'
    pipelines; ``generator`` (one per item) feeds stochastic samplers, as diffusers passes it to ``step``.
    ``from_noise``: ``x`` is unit Gaussian noise, scaled here by the sampler's ``init_noise_sigma`` (as diffusers'
    pipelines do); False: ``x`` is already a sample at the first timestep (a scan's noise level when denoising).
    """
    extra = {"generator": generator} if "generator" in inspect.signature(sampler.step).parameters else {}
    plan = sampler.timesteps if timesteps is None else timesteps
    if from_noise:
        x = x * sampler.init_noise_sigma
    for position, t in enumerate(plan):
        prediction = model(sampler.scale_model_input(x, t), t)
        x = sampler.step(prediction, t, x, **extra).prev_sample
        for hook in hooks:
            x = hook(position, t, x)
    return x
