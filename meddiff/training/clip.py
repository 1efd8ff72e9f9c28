"""``ClipModule``: trains meddiff's own CLIP (``meddiff.encoders.clip``) on manifest image-report pairs.

The loss is CLIP's symmetric cross-entropy over in-batch pairs with a learnt temperature (Radford et al.
2021), open_clip's ``ClipLoss``. The WordPiece vocabulary is learnt from the training split's reports
(tokenizers). At the end of training the module writes ``export_dir``, which ``ClipEncoder`` and
``load_text_encoder`` read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

from meddiff.encoders.clip import CLIP_CONFIG, IMAGE_WEIGHTS, TEXT_DIR, JointEmbedding
from meddiff.errors import MeddiffError


def train_tokenizer(reports: list[str], vocab_size: int, max_length: int):
    """A lower-casing WordPiece tokenizer learnt from ``reports`` (BERT's special tokens)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(reports, vocab_size=vocab_size, min_frequency=1)
    return BertTokenizerFast(vocab=wordpiece.get_vocab(), model_max_length=max_length)


def recall_at_k(similarity: torch.Tensor, texts: list[str], k: int) -> tuple[float, float]:
    """Image->text and text->image recall@k; identical report texts count as the same answer."""
    same = torch.tensor([[a == b for b in texts] for a in texts])
    top_i2t = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
    top_t2i = similarity.t().topk(min(k, similarity.shape[0]), dim=1).indices
    i2t = same.gather(1, top_i2t).any(dim=1).float().mean()
    t2i = same.gather(1, top_t2i).any(dim=1).float().mean()
    return float(i2t), float(t2i)


class ClipModule(JointEmbedding, pl.LightningModule):
    """Contrastive image-report training; ``manifest``'s training reports define the vocabulary."""

    def __init__(
        self,
        manifest: str,
        export_dir: str | None = None,
        embed_dim: int = 128,
        text_width: int = 128,
        text_layers: int = 2,
        text_heads: int = 4,
        vocab_size: int = 2000,
        max_length: int = 64,
        lr: float = 5e-4,
        report_key: str = "report",
    ):
        super().__init__()
        from transformers import BertConfig, BertModel

        from meddiff.data.manifest import Manifest

        self.save_hyperparameters()
        reports = [r.report or "" for r in Manifest.read(manifest).split("train")]
        if not any(reports):
            raise MeddiffError(f"{manifest} has no reports in its 'train' split to learn a vocabulary from")
        self.tokenizer = train_tokenizer(reports, vocab_size, max_length)
        config = BertConfig(vocab_size=len(self.tokenizer), hidden_size=text_width, num_hidden_layers=text_layers,
                            num_attention_heads=text_heads, intermediate_size=4 * text_width,
                            max_position_embeddings=max_length)
        self.text = BertModel(config)  # with its (unused) pooler, so the exported folder loads as a plain BertModel
        self._add_image_tower_and_projections(embed_dim, text_width)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        from open_clip import ClipLoss

        self.clip_loss = ClipLoss()  # no parameters: checkpoints are unchanged
        self._val: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, text = self.embed_image(batch["image"]), self.embed_text(batch[self.hparams.report_key])
        loss = self.clip_loss(image, text, self.logit_scale.exp().clamp(max=100))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(image))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        reports = list(batch[self.hparams.report_key])
        self._val.append((self.embed_image(batch["image"]).cpu(), self.embed_text(reports).cpu(), reports))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        images, texts = torch.cat([v[0] for v in self._val]), torch.cat([v[1] for v in self._val])
        reports = [r for v in self._val for r in v[2]]
        self._val.clear()
        for k in (1, 5):
            i2t, t2i = recall_at_k(images @ texts.t(), reports, k)
            self.log(f"val/image_to_text_R@{k}", i2t)
            self.log(f"val/text_to_image_R@{k}", t2i)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.global_rank == 0:
            self.save_pretrained(self.hparams.export_dir)

    def save_pretrained(self, directory: str | Path) -> Path:
        """``text/`` (Hugging Face model + tokenizer), ``image.safetensors`` and ``clip.json``."""
        directory = Path(directory)
        self.text.save_pretrained(directory / TEXT_DIR)
        self.tokenizer.save_pretrained(directory / TEXT_DIR)
        image_state = {f"image.{k}": v for k, v in self.image.state_dict().items()}
        image_state.update({f"image_proj.{k}": v for k, v in self.image_proj.state_dict().items()})
        image_state.update({f"text_proj.{k}": v for k, v in self.text_proj.state_dict().items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in image_state.items()}, directory / IMAGE_WEIGHTS)
        config = {k: v for k, v in self.hparams.items() if k not in ("manifest", "export_dir")}
        (directory / CLIP_CONFIG).write_text(
            json.dumps({**config, "logit_scale": float(self.logit_scale.detach().exp())}, indent=2) + "\n"
        )
        return directory
