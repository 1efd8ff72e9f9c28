"""Per-scan self-supervised adaptation of a denoising prior: Recorrupted-to-Recorrupted (Pang et al., CVPR 2021).

A prior learnt from a few brains fits the texture of other scans poorly, and no clean image of the scan exists to
fine-tune on. R2R makes training pairs from the noisy scan alone: with ``z`` drawn at the scan's own noise level,
``y + alpha z`` (input) and ``y - z / alpha`` (target) carry noises that are uncorrelated (independent for Gaussian
noise), so the expected loss ``|f(y + alpha z) - (y - z / alpha)|^2`` is the loss against the clean image plus a
constant. The input stays a noisy image of the kind the network learnt (noise ``sqrt(1 + alpha^2)`` sigma, seen at
its matching timestep), unlike blind-spot masking (Noise2Self), which changed what the network sees and did not
help (BENCHMARKS.md).

Magnitude MR noise is Gaussian only where the signal stands a few sigma above the floor (Gudbjartsson and Patz
1995): the loss counts voxels whose local mean is at least 3 sigma (``noise_level.bright_threshold``, higher for
several coils). Held out: every fifth plane of a
volume, every fourth tile of a single plane; training never sees their voxels, so the network cannot lower the
held-out loss by memorising the scan's noise. Early stopping keeps the best step on the held-out loss at the
strength the denoising will use, and the adapted network is kept only when that loss is below the prior's. The
network trains at that strength too (measured on seven noisy slices: at strength 1 it lost 0.4-0.5 dB on the
validation slice, at the denoising's own strength it gained there), so training, check and use share one
operating point.

Written by hand: no library ships R2R for a pretrained diffusion network (the authors' code trains a DnCNN).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from meddiff.diffusion.denoise import matched_x0
from meddiff.diffusion.schedulers import NoiseSchedule

ALPHA = 0.5  # the recorruption ratio of the R2R paper's experiments: the input's noise is 1.118 sigma
LEARNING_RATE = 1e-5  # chosen on the validation slice; 2e-4 broke the prior within 60 steps
BATCH = 8
HELD_OUT_TILES = 24  # at most: the check runs every CHECK_EVERY steps and must stay cheap
HELD_OUT_DRAWS = 2
CHECK_EVERY = 10
MAX_TILE = 64


@dataclass(frozen=True)
class Adaptation:
    """What adapting did: ``steps`` run, the ``best_step`` kept (0: the prior), the held-out R2R loss of the prior
    and of the kept network, ``kept`` (whether the adapted network denoises), the wall time, why it was skipped
    when it was, and the noise ``sigma`` (image units) it adapted at, which the denoising should use."""

    steps: int
    best_step: int
    held_out_before: float | None
    held_out_after: float | None
    kept: bool
    seconds: float
    skipped: str = ""
    sigma: float | None = None

    def describe(self) -> str:
        """One line for the terminal and the provenance."""
        if self.skipped:
            return f"not adapted: {self.skipped}"
        change = f"held-out R2R loss {self.held_out_before:.4g} -> {self.held_out_after:.4g}"
        if not self.kept:
            return f"adaptation did not lower the held-out loss in {self.steps} steps: the prior is used as is"
        return f"adapted to this scan (R2R, step {self.best_step} of {self.steps}; {change}; {self.seconds:.0f} s)"


def tile_side(planes: torch.Tensor, multiple: int) -> int:
    """The side of the square tiles adaptation trains on: up to ``MAX_TILE``, at least four tiles to a single
    plane (one to hold out), a multiple of what the UNet's levels halve."""
    side = min(planes.shape[1:]) // (2 if planes.shape[0] == 1 else 1)
    return max(multiple, min(MAX_TILE, side) // multiple * multiple)


def split_tiles(planes: torch.Tensor, weight: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) tiles of (N, H, W) ``planes`` as (K, 2, side, side): image and loss weight. Held out:
    every fifth plane (from five planes on), else every fourth tile; tiles without a weighted voxel are dropped."""
    n, h, w = planes.shape
    tiles, held = [], []
    for p in range(n):
        for k, (i, j) in enumerate((i, j) for i in range(0, h - side + 1, side) for j in range(0, w - side + 1, side)):
            tiles.append(torch.stack([planes[p, i : i + side, j : j + side], weight[p, i : i + side, j : j + side]]))
            held.append(p % 5 == 2 if n >= 5 else k % 4 == 3)
    stacked, held = torch.stack(tiles), torch.tensor(held)
    useful = stacked[:, 1].sum(dim=(1, 2)) > 0
    training, held_out = stacked[useful & ~held], stacked[useful & held]
    if len(held_out) > HELD_OUT_TILES:
        held_out = held_out[np.linspace(0, len(held_out) - 1, HELD_OUT_TILES).round().astype(int)]
    return training, held_out


def r2r_loss(unet: torch.nn.Module, schedule: NoiseSchedule, tiles: torch.Tensor, sigma: float, strength: float,
             generator: torch.Generator) -> torch.Tensor:
    """The weighted R2R loss of ``unet`` on (K, 2, side, side) tiles with noise ``sigma`` (model units), the network
    asked to remove ``strength`` times the recorrupted input's noise."""
    image, weight = tiles[:, :1], tiles[:, 1:]
    z = torch.randn(image.shape, generator=generator, device=image.device) * sigma
    estimate = matched_x0(unet, schedule, image + ALPHA * z, strength * sigma * (1 + ALPHA**2) ** 0.5)
    return ((estimate - (image - z / ALPHA)) ** 2 * weight).sum() / weight.sum()


def held_out_loss(unet: torch.nn.Module, schedule: NoiseSchedule, tiles: torch.Tensor, sigma: float,
                  strength: float) -> float:
    """The R2R loss on the held-out tiles, on the same noise draws for every network compared."""
    with torch.no_grad():
        return float(np.mean([r2r_loss(unet, schedule, tiles, sigma, strength,
                                       torch.Generator(tiles.device).manual_seed(draw)).item()
                              for draw in range(HELD_OUT_DRAWS)]))


def adapt_unet(unet: torch.nn.Module, schedule: NoiseSchedule, planes: torch.Tensor, sigma: float,
               bright: torch.Tensor, strength: float, steps: int, multiple: int,
               seed: int = 0) -> tuple[torch.nn.Module, Adaptation]:
    """A copy of ``unet`` fine-tuned by R2R on (N, H, W) ``planes`` (model units, noise ``sigma``) where ``bright``
    holds, or ``unet`` itself when that does not lower the held-out loss at ``strength``."""
    started = time.perf_counter()
    with torch.inference_mode(False):  # the planes may come from inference mode; training needs plain tensors
        planes, bright = planes.clone(), bright.clone()
        training, held_out = split_tiles(planes, bright.to(planes.dtype), tile_side(planes, multiple))
        if not len(training) or not len(held_out):
            return unet, Adaptation(0, 0, None, None, False, time.perf_counter() - started,
                                    "too little tissue well above the noise floor to adapt on")
        before = held_out_loss(unet, schedule, held_out, sigma, strength)
        best = (before, 0, None)
        tuned = copy.deepcopy(unet).train()
        optimizer = torch.optim.Adam(tuned.parameters(), lr=LEARNING_RATE)
        generator = torch.Generator(planes.device).manual_seed(seed)
        with torch.enable_grad():
            for step in range(1, steps + 1):
                batch = training[torch.randint(len(training), (BATCH,), generator=generator, device=planes.device)]
                batch = torch.rot90(batch, int(torch.randint(4, (1,), generator=generator)), dims=(2, 3))
                loss = r2r_loss(tuned, schedule, batch, sigma, strength, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if step % CHECK_EVERY == 0 or step == steps:
                    checked = held_out_loss(tuned.eval(), schedule, held_out, sigma, strength)
                    tuned.train()
                    if checked < best[0]:
                        best = (checked, step, copy.deepcopy(tuned.state_dict()))
        seconds = time.perf_counter() - started
        if best[2] is None:
            return unet, Adaptation(steps, 0, before, before, False, seconds)
        tuned.load_state_dict(best[2])
        return tuned.eval(), Adaptation(steps, best[1], before, best[0], True, seconds)
