"""meddiff's own CLIP: a small image tower and text tower trained contrastively on manifest image-report pairs
(``meddiff.training.clip.ClipModule``); this module loads and uses an exported one.

For report conditioning where no pretrained biomedical encoder is available (or none fits the
data): ``meddiff fit --config configs/clip_findings.yaml`` trains it, and at the end of training it
writes ``export_dir`` with the text tower as a Hugging Face folder (``text/``, so
``load_text_encoder(export_dir)`` gives report-conditioning context) and the image tower for CLIP
scores. The loss is CLIP's symmetric cross-entropy over in-batch pairs with a learnt temperature
(Radford et al. 2021), open_clip's ``ClipLoss``. The WordPiece vocabulary is learnt from the training
split's reports (tokenizers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from meddiff.errors import MeddiffError, first_line

TEXT_DIR, IMAGE_WEIGHTS, CLIP_CONFIG = "text", "image.safetensors", "clip.json"


class JointEmbedding:
    """The towers' layout and the joint embeddings: one definition for training (``ClipModule``) and scoring
    (``ClipEncoder``), so an exported CLIP embeds exactly as the trained one did."""

    def _add_image_tower_and_projections(self, embed_dim: int, text_width: int) -> None:
        from monai.networks.nets import resnet10

        self.image = resnet10(spatial_dims=2, n_input_channels=1, feed_forward=False)
        self.image_proj = torch.nn.Linear(512, embed_dim)
        self.text_proj = torch.nn.Linear(text_width, embed_dim)

    def embed_text(self, reports: list[str]) -> torch.Tensor:
        batch = self.tokenizer(list(reports), padding=True, truncation=True, return_tensors="pt").to(
            self.image_proj.weight.device
        )
        return F.normalize(self.text_proj(self.text(**batch).last_hidden_state[:, 0]), dim=-1)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image(images)), dim=-1)


class ClipEncoder(JointEmbedding, torch.nn.Module):
    """An exported meddiff CLIP for scoring: ``encode_image`` / ``encode_text`` give unit-norm joint
    embeddings.

    Images are what the model trained on: (B, 1, H, W) tensors (or a sequence of (1, H, W) arrays) in
    model units, i.e. normalised like ``ManifestDataModule`` does (``to_model_range``). Serves
    ``meddiff.metrics.clip_score``.
    """

    def __init__(self, directory: str | Path):
        super().__init__()
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from meddiff.encoders.text import load_hf
        from meddiff.weights import check_fit

        directory = Path(directory)
        if not (directory / CLIP_CONFIG).is_file() or not (directory / IMAGE_WEIGHTS).is_file():
            raise MeddiffError(f"{directory} is not an exported meddiff CLIP: "
                               f"it needs {CLIP_CONFIG}, {IMAGE_WEIGHTS} and {TEXT_DIR}/")
        config = json.loads((directory / CLIP_CONFIG).read_text())
        self.config = config  # embed_dim, max_length, the trained logit_scale, ...
        self._add_image_tower_and_projections(config["embed_dim"], config["text_width"])
        try:  # safetensors: tensors only, nothing in the file runs
            state = load_file(directory / IMAGE_WEIGHTS)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise MeddiffError(f"{directory / IMAGE_WEIGHTS} is not a readable safetensors file ({first_line(exc)}) "
                               "— export the CLIP again") from None
        # every tensor the file must hold (the text tower is loaded from its own folder below)
        check_fit(self, state, f"{directory / IMAGE_WEIGHTS} does not fit {CLIP_CONFIG}",
                  "use the files of one export together")
        self.load_state_dict(state)
        self.tokenizer, self.text = load_hf(directory / TEXT_DIR, "the CLIP's text tower")
        self.eval().requires_grad_(False)

    @torch.inference_mode()
    def encode_image(self, images) -> torch.Tensor:
        batch = (
            images
            if torch.is_tensor(images)
            else torch.stack([torch.as_tensor(i, dtype=torch.float32) for i in images])
        )
        return self.embed_image(batch.float())

    @torch.inference_mode()
    def encode_text(self, texts) -> torch.Tensor:
        return self.embed_text(list(texts))
