"""The denoising objective, written once: the forward process, the training target, x0 from a prediction.

With ``abar = alphas_cumprod[t]``: ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``. A network predicts ``eps``,
``x0``, or the velocity ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022). The formulas are
diffusers' ``add_noise`` / ``get_velocity`` (tested equal); they live here so that training and denoising
share one definition with the inverse that turns any prediction back into x0.
"""

from __future__ import annotations

import torch

PREDICTIONS = ("eps", "v", "x0")  # the DDPM family; rectified flow: the flow_* functions


def _per_item(abar: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``abar`` (one value, or one per batch item) shaped to broadcast over ``like``'s items."""
    return torch.as_tensor(abar).to(like.device, like.dtype).reshape(-1, *[1] * (like.ndim - 1))


def noised(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor | float) -> torch.Tensor:
    """The forward process: ``x_t`` from the clean image, the noise and ``abar`` of each item."""
    a = _per_item(abar, x0)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def target(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor | float, kind: str) -> torch.Tensor:
    """What a network of this ``kind`` (eps, v or x0) is trained to predict."""
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    a = _per_item(abar, x0)
    return a**0.5 * noise - (1 - a) ** 0.5 * x0


def predicted_x0(prediction: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor | float, kind: str) -> torch.Tensor:
    """x0 from the network's output at ``x_t``, whatever the network predicts (the inverse of ``target``)."""
    if kind == "x0":
        return prediction
    a = _per_item(abar, xt)
    if kind == "eps":
        return (xt - (1 - a) ** 0.5 * prediction) / a**0.5
    return a**0.5 * xt - (1 - a) ** 0.5 * prediction


def renoised(xs: torch.Tensor, noise: torch.Tensor, abar_from: torch.Tensor | float,
             abar_to: torch.Tensor | float) -> torch.Tensor:
    """The forward process from a less noisy level to a noisier one: ``x_s`` at ``abar_from`` -> ``x_t`` at
    ``abar_to`` (<= ``abar_from``), ``x_t = sqrt(abar_to / abar_from) x_s + sqrt(1 - abar_to / abar_from) eps``."""
    ratio = _per_item(torch.as_tensor(abar_to) / torch.as_tensor(abar_from), xs)
    return ratio**0.5 * xs + (1 - ratio) ** 0.5 * noise


def flow_noised(x0: torch.Tensor, noise: torch.Tensor, share: torch.Tensor | float) -> torch.Tensor:
    """Rectified flow's straight line: ``x_t = (1 - s) x0 + s noise`` at ``s = t / T`` (MONAI's
    ``RFlowScheduler.add_noise``, tested equal)."""
    s = _per_item(share, x0)
    return (1 - s) * x0 + s * noise


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What a rectified-flow network predicts: the velocity ``x0 - noise`` along that line, towards the image."""
    return x0 - noise
