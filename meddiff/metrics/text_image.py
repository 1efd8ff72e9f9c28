"""CLIP score: agreement of images with their reports in a CLIP encoder's joint embedding space."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from meddiff.errors import MeddiffError


class ImageTextEncoder(Protocol):
    """What ``clip_score`` needs from an encoder (meddiff's own CLIP, BiomedCLIP through open_clip, ...)."""

    def encode_image(self, images: Sequence) -> torch.Tensor: ...

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor: ...


@torch.inference_mode()
def clip_score(images: Sequence, reports: Sequence[str], encoder: ImageTextEncoder) -> dict[str, float | list[float]]:
    """Mean of ``100 * max(cos(image, report), 0)`` over pairs (Hessel et al. 2021, torchmetrics' scaling)."""
    if len(images) != len(reports) or len(images) == 0:
        raise MeddiffError(f"clip_score needs one report per image: {len(images)} images, {len(reports)} reports")
    image_emb = torch.nn.functional.normalize(encoder.encode_image(images).double(), dim=-1)
    text_emb = torch.nn.functional.normalize(encoder.encode_text(list(reports)).double(), dim=-1)
    per_item = (100 * (image_emb * text_emb).sum(dim=-1).clamp_min(0)).tolist()
    return {"clip_score": float(np.mean(per_item)), "per_item": per_item}
