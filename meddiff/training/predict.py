"""``GenerationModule``: a model under Lightning's ``predict`` loop, so generation runs on any devices (DDP)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from meddiff.image import Image
from meddiff.model import DiffusionModel
from meddiff.pipelines.controlnet import generate_from_labels
from meddiff.pipelines.generate import sample, to_image
from meddiff.pipelines.spec import SamplingSpec


class GenerationModule(pl.LightningModule):
    """``predict_step`` samples the batch's item indices not in ``done``; item ``i`` uses seed ``seed + i``
    and ``prompts[i]`` (a ControlNet model: the label map ``labels``). Returns (index, image, prompt) per item."""

    def __init__(self, model: DiffusionModel, spec: SamplingSpec, seed: int, done: set[int],
                 prompts: list[str] | None = None, labels: Image | None = None):
        super().__init__()
        self.model, self.spec, self.seed, self.done, self.prompts = model, spec, seed, done, prompts
        self.labels = labels
        self.networks = torch.nn.ModuleDict(model.networks)  # registered, so Lightning moves them to the device

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[tuple[int, Any, str | None]]:
        indices = [int(i) for i in batch if int(i) not in self.done]
        if not indices:
            return []
        if self.labels is not None:
            # a label map's slices are sampled in batches for minutes: their own bar, not only the item count
            return [(i, generate_from_labels(self.model, self.labels, self.spec, 1, self.seed + i, progress=True)[0],
                     None) for i in indices]
        prompts = None if self.prompts is None else [self.prompts[i] for i in indices]
        x = sample(self.model, self.spec, [self.seed + i for i in indices], prompts)
        return [(i, to_image(self.model, item), None if prompts is None else prompts[k])
                for k, (i, item) in enumerate(zip(indices, x, strict=True))]
