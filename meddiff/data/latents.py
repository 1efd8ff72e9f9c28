"""Cached latents: a latent model's frozen first stage applied once per volume, in the data pipeline.

``ManifestDataModule(latents=DIR)`` puts ``EncodeLatentd`` after loading, normalising and resampling (the
deterministic part MONAI's ``CacheDataset`` keeps), so each volume is encoded once and training draws its slices
and crops from the kept latents instead of running the encoder at every step (MAISI, too, trains its diffusion
model on latents encoded beforehand). A 2D autoencoder encodes every slice with enough foreground along the slice
axis; a 3D one the whole volume. The latents are unscaled (``DiffusionModule`` applies the scale factor) and
carry the autoencoder's fingerprint in ``latent``, so a model refuses latents of another first stage.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Transform

from meddiff.data.transforms import SliceVolumed, slice_axis
from meddiff.diffusion import latent
from meddiff.errors import MeddiffError

LATENT_KEY = "latent"


def fingerprint(network: torch.nn.Module) -> str:
    """A short digest of a network's weights: which first stage made a latent."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class EncodeLatentd(Transform):
    """``image`` (model units, channel-first) -> its unscaled latents, on a grid ``downsample`` times coarser.

    Sides are padded with the empty value -1 at their far end to a multiple of the down-sampling and to at least
    ``min_size`` (image voxels), so crops of the training shape never pad in latent space. A 2D autoencoder on a
    volume keeps only slices with ``min_foreground`` (as ``SliceVolumed`` judges it) along ``axis``; the slice
    axis keeps its length in the latent. ``mask`` is dropped: latent models take no masks.
    """

    def __init__(self, autoencoder: str, axis: int | str = "axial", min_foreground: float = 0.05,
                 min_size: Sequence[int] | None = None, batch_size: int = 16):
        from meddiff.model import load_autoencoder

        self.folder, self.network = load_autoencoder(autoencoder)
        self.factor = self.folder.autoencoder.downsample
        self.spatial_dims = self.folder.autoencoder.spatial_dims
        self.fingerprint = fingerprint(self.network)
        self.slicer = SliceVolumed("image", axis=axis, min_foreground=min_foreground, random=False)
        self.min_size = list(min_size) if min_size is not None else None
        self.batch_size = batch_size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d.pop("mask", None)
        image = d["image"]
        affine = image.affine.clone().double() if isinstance(image, MetaTensor) else torch.eye(4, dtype=torch.double)
        spatial = image.ndim - 1
        if self.spatial_dims == 3 and spatial != 3:
            raise MeddiffError(f"{_name(image)}: a 3D autoencoder encodes volumes, not {spatial}D images")
        if self.spatial_dims == 2 and spatial == 3:
            axis = slice_axis(affine.numpy(), self.slicer.axis)
            kept = self.slicer.kept_indices(image, axis)
            if not kept:
                raise MeddiffError(f"{_name(image)}: no slice has enough foreground")
            slices = torch.movedim(torch.as_tensor(image)[0], axis, 0)[kept][:, None]
            codes = torch.movedim(self.encode(slices), 0, -1)  # (C, h, w, slices)
            codes = torch.movedim(codes, -1, axis + 1)
            scaled = [a for a in range(3) if a != axis]
        else:
            codes = self.encode(torch.as_tensor(image)[None])[0]
            scaled = list(range(spatial))
        affine[:3, scaled] *= self.factor
        meta = {k: v for k, v in getattr(image, "meta", {}).items() if k not in ("affine", "spatial_shape")}
        d["image"] = MetaTensor(codes, affine=affine, meta=meta)
        d[LATENT_KEY] = self.fingerprint
        return d

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Unscaled latents of a batch of (N, 1, *spatial) images, ``batch_size`` at a time."""
        images = images.float()
        sides = images.shape[2:]
        wanted = [max(math.ceil(side / self.factor) * self.factor, floor)
                  for side, floor in zip(sides, self.min_size or [0] * len(sides), strict=True)]
        pad = [amount for side, target in zip(reversed(sides), reversed(wanted), strict=True)
               for amount in (0, target - side)]
        images = F.pad(images, pad, value=-1.0)
        return torch.cat([latent.encode(self.network, chunk, 1.0) for chunk in images.split(self.batch_size)])


def _name(image) -> str:
    return str(getattr(image, "meta", {}).get("filename_or_obj", "image"))
