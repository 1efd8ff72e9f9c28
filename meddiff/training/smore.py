"""Self-supervised through-plane super-resolution (SMORE, Zhao et al. 2020): a small network trained on the scan
itself, in a few CPU minutes, with no training set.

A thick-slice scan is sharp within its slices and blurred across them. Its in-plane planes, made thick along one
in-plane axis exactly as the scanner made the slices (``meddiff.data.thick``), and interpolated back, are pairs
of (blurred, sharp) images with the blur the through-plane direction has; a network that learns to undo it there
is then applied to the planes that cross the slices. The network is MONAI's 2D UNet predicting the residual over
the cubic interpolation (so an untrained network returns the classical answer), trained with an L1 loss as SMORE
was; patches are cut after the whole plane is made thick, so no patch edge looks like a slice edge.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.networks.nets import UNet

from meddiff.data.thick import slab_average, through_plane
from meddiff.diffusion.tiling import pad_to

PATCH = 64  # the side of the training patches, in voxels
MULTIPLE = 4  # the network halves twice: sides are padded to a multiple of 4


def network() -> torch.nn.Module:
    """The per-scan network: MONAI's UNet of 3 levels (about 0.2 M parameters) whose last layer starts at zero, so
    training starts from the cubic interpolation. Without residual units: MONAI's top residual unit normalises its
    one output channel to unit variance, which a residual near zero must not be."""
    net = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 64, 128), strides=(2, 2))
    last = [m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return net


def thick_pair(plane: np.ndarray, spacing: float, thickness: float, phase: float) -> np.ndarray:
    """``plane`` (H, W) made thick along its last axis and interpolated back (the network's input)."""
    centres = np.arange(phase, plane.shape[1] - 0.5, spacing)
    return through_plane(slab_average(plane, 1, centres, thickness), 1, centres, plane.shape[1])


def train(planes: np.ndarray, spacing: float, thickness: float, steps: int, seed: int = 0, batch_size: int = 16,
          on_step: Callable[[int], None] | None = None) -> torch.nn.Module:
    """A network trained on ``planes`` (N, H, W; model units, sharp along both axes) to undo slices every
    ``spacing`` voxels, ``thickness`` voxels thick, along the last axis of what it is given. Each patch comes from a
    random plane, turned by 90 degrees half of the time (either in-plane axis is made thick) and flipped some, at a
    random slice phase; it is made thick with a margin of slices on both sides, so its edges are not slice edges."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = network()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(steps, 1))
    margin = int(np.ceil(3 * spacing + thickness))  # the cubic spline's reach, and a slab's half width
    net.train()
    for _ in range(steps):
        inputs, targets = [], []
        for _ in range(batch_size):
            plane = planes[rng.integers(len(planes))]
            plane = plane if rng.random() < 0.5 else plane.T
            plane = plane[:, ::-1] if rng.random() < 0.5 else plane
            rows, columns = _window(plane.shape, rng)
            wide = slice(max(columns.start - margin, 0), min(columns.stop + margin, plane.shape[1]))
            block = np.ascontiguousarray(plane[rows, wide], dtype=np.float32)
            blurred = thick_pair(block, spacing, thickness, rng.uniform(0.0, min(spacing, block.shape[1] - 1)))
            inner = slice(columns.start - wide.start, columns.stop - wide.start)
            inputs.append(blurred[:, inner])
            targets.append(block[:, inner])
        x, y = _batch(inputs), _batch(targets)
        loss = torch.nn.functional.l1_loss(x + net(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if on_step is not None:
            on_step(1)
    return net.eval()


def _window(shape: tuple[int, int], rng: np.random.Generator) -> tuple[slice, slice]:
    corner = [int(rng.integers(0, max(n - PATCH, 0) + 1)) for n in shape]
    return tuple(slice(c, min(c + PATCH, n)) for c, n in zip(corner, shape, strict=True))


def _batch(patches: list[np.ndarray]) -> torch.Tensor:
    """Patches (a plane smaller than ``PATCH`` gives a smaller one) padded to one shape, as (B, 1, P, P)."""
    return torch.cat([pad_to(torch.from_numpy(p)[None, None], (PATCH, PATCH)) for p in patches])


@torch.inference_mode()
def residual(net: torch.nn.Module, blurred: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """What ``net`` adds to each interpolated plane of ``blurred`` (N, H, W), the thick axis last."""
    out = np.empty_like(blurred, dtype=np.float32)
    height, width = blurred.shape[1:]
    padded = [-(-n // MULTIPLE) * MULTIPLE for n in (height, width)]
    for start in range(0, len(blurred), batch_size):
        x = pad_to(torch.from_numpy(np.ascontiguousarray(blurred[start:start + batch_size], np.float32))[:, None],
                   padded)
        out[start:start + batch_size] = net(x)[:, 0, :height, :width].numpy()
    return out
