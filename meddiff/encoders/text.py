"""Frozen text encoders that turn radiology reports into cross-attention context.

``load_text_encoder("hf:NAME_OR_PATH")`` loads any Hugging Face text model (CXR-BERT, BiomedBERT,
ClinicalBERT, ...) through transformers, from a local folder or a pre-filled Hugging Face cache:
nothing is downloaded. ``hf-hub:REPO`` / ``local-dir:PATH`` load an open_clip model with a Hugging Face
text tower (BiomedCLIP) the same way (``meddiff.encoders.openclip``). ``encode(reports)`` returns the
token states (cross-attention context), the padding mask and a pooled embedding (the first token's
state, BERT's [CLS]). Embeddings are cached by text hash, so a training loop that sees the same reports
every epoch runs the encoder once each.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from meddiff.errors import MeddiffError, first_line

logger = logging.getLogger(__name__)


@dataclass
class TextEncoding:
    """``tokens`` (B, L, D) token states, ``mask`` (B, L) True at real tokens, ``pooled`` (B, D)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class HFTextEncoder(torch.nn.Module):
    """A frozen transformers text model with its tokenizer; long reports are truncated with a warning.

    ``padded``: prompts are encoded as Stable Diffusion (and MONAI's CXR generator) encode them: padded to
    ``max_length`` and run without an attention mask, the context being every position's state, padding included.
    """

    def __init__(self, spec: str, tokenizer, model, max_length: int | None = None, padded: bool = False):
        super().__init__()
        self.spec, self.tokenizer, self.model = spec, tokenizer, model.eval().requires_grad_(False)
        self.padded = padded
        limit = getattr(model.config, "max_position_embeddings", None) or 512
        self.max_length = min(max_length or tokenizer.model_max_length, limit)
        self.dim = model.config.hidden_size
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def encode(self, reports: list[str]) -> TextEncoding:
        reports = ["" if r is None else str(r) for r in reports]
        keys = [hashlib.sha256(r.encode("utf-8")).hexdigest() for r in reports]
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if missing:
            text_of = dict(zip(keys, reports, strict=True))
            self._encode_into_cache(missing, [text_of[k] for k in missing])
        states = [self._cache[k] for k in keys]
        length = max(s[0].shape[0] for s in states)
        tokens = torch.zeros(len(states), length, self.dim)
        mask = torch.zeros(len(states), length, dtype=torch.bool)
        for i, (state, _) in enumerate(states):
            tokens[i, : state.shape[0]] = state
            mask[i, : state.shape[0]] = True
        return TextEncoding(tokens, mask, torch.stack([s[1] for s in states]))

    def context(self, reports: list[str]) -> torch.Tensor:
        """Cross-attention context: token states zero-padded to ``max_length``, so a report's
        conditioning never depends on the other reports in its batch (the UNet's attention has no mask)."""
        if self.padded:
            return self._padded_states(reports)
        encoding = self.encode(reports)
        return torch.nn.functional.pad(encoding.tokens, (0, 0, 0, self.max_length - encoding.tokens.shape[1]))

    def trainable_context(self, reports: list[str]) -> torch.Tensor:
        """``context`` with gradients and no cache, for training adapters of the text model
        (``meddiff.training.adapters``): the same states, zero after each report's tokens unless ``padded``."""
        reports = ["" if r is None else str(r) for r in reports]
        batch = self.tokenizer(reports, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(next(self.model.parameters()).device)
        if self.padded:
            return self.model(batch.input_ids)[0].float()
        states = self.model(**batch).last_hidden_state.float()
        return states * batch["attention_mask"][..., None].to(states.dtype)

    @torch.inference_mode()
    def _padded_states(self, reports: list[str]) -> torch.Tensor:
        self.warn_if_truncated(reports)
        ids = self.tokenizer(["" if r is None else str(r) for r in reports], padding="max_length",
                             max_length=self.max_length, truncation=True, return_tensors="pt").input_ids
        device = next(self.model.parameters()).device
        return self.model(ids.to(device))[0].float()

    def warn_if_truncated(self, texts: list[str]) -> None:
        full = self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        cut = sum(len(ids) > self.max_length for ids in full)
        if cut:
            logger.warning("%d report(s) longer than %d tokens were truncated for %s", cut, self.max_length, self.spec)

    def _encode_into_cache(self, keys: list[str], texts: list[str]) -> None:
        self.warn_if_truncated(texts)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        hidden = self.model(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state.float().cpu()
        for key, states, attention in zip(keys, hidden, batch["attention_mask"].bool(), strict=True):
            self._cache[key] = (states[attention].clone(), states[0].clone())


def load_hf(name: str | os.PathLike, what: str = "the text model", tokenizer_from: str | os.PathLike | None = None):
    """``(tokenizer, model)`` of a transformers text model from a local folder or the Hugging Face cache.

    Nothing is downloaded and nothing in the files runs: no custom code (``trust_remote_code=False``: a
    config's ``auto_map`` is refused), and a ``pytorch_model.bin`` goes through torch's weights-only
    unpickler (``weights_only=True``, transformers' default, made explicit), so a pickled payload is refused.
    ``tokenizer_from``: where the tokenizer is, when not beside the model (a pipeline folder's ``tokenizer/``).
    """
    import pickle
    import warnings

    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise MeddiffError("hf: text encoders need transformers: pip install transformers") from None
    from meddiff.weights import refused

    name = str(name)
    where = "folder" if Path(name).exists() else "Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME)"
    refuse_custom_code(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on a pickle protocol it is refusing anyway
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from or name), local_files_only=True,
                                                      trust_remote_code=False)
            model = AutoModel.from_pretrained(name, local_files_only=True, trust_remote_code=False, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MeddiffError(refused(exc, f"{what} {name!r}",
                                   "save the model as model.safetensors (model.save_pretrained(FOLDER)) "
                                   "and remove pytorch_model.bin")) from None
    except (OSError, ValueError) as exc:
        raise MeddiffError(
            f"cannot load {what} {name!r} from the {where}: {first_line(exc)} — meddiff never downloads: "
            "copy the model folder (config.json, weights, tokenizer files) here, "
            f"or fill the cache with `hf download {name}` elsewhere"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a damaged or mismatched file, whatever transformers raises: one line
        raise MeddiffError(f"cannot load {what} {name!r} from the {where}: {first_line(exc)} — copy the model folder "
                           "again, unchanged") from None
    return tokenizer, model


def refuse_custom_code(name: str) -> None:
    """A folder whose config.json asks for its own Python code (``auto_map``): refused by name, before transformers
    would prompt for it."""
    import json

    config = Path(name) / "config.json"
    try:
        auto_map = config.is_file() and "auto_map" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return  # transformers says what is wrong with it
    if auto_map:
        raise MeddiffError(f"{config} asks to run the model's own Python code (auto_map), which meddiff never does "
                           "— use a model that transformers implements (BERT, ...), saved without custom code")


def _hf_encoder(name: str, max_length: int | None, padded: bool = False) -> HFTextEncoder:
    tokenizer, model = load_hf(name)
    return HFTextEncoder(f"hf:{name}", tokenizer, model, max_length, padded)


COMPONENT = "component:"  # a text encoder stored in the model folder itself


def load_text_encoder(spec: str | os.PathLike, max_length: int | None = None, padded: bool = False,
                      folder: str | os.PathLike | None = None) -> HFTextEncoder:
    """A text encoder from ``spec``: ``hf:NAME_OR_PATH`` (transformers; local folder or pre-filled cache),
    ``hf-hub:REPO`` or ``local-dir:PATH`` (an open_clip model such as BiomedCLIP, ``meddiff.encoders.openclip``;
    pre-filled Hugging Face cache or open_clip's folder format), a folder of meddiff's own CLIP
    (``meddiff.encoders.clip``; its text tower), or ``component:text_encoder``: the model ``folder``'s own
    ``text_encoder/`` with its ``tokenizer/`` (an imported pipeline's CLIP text model). ``padded``: encode as Stable
    Diffusion does (``HFTextEncoder``)."""
    spec = str(spec)
    if spec.startswith(COMPONENT):
        if folder is None:
            raise MeddiffError(f"{spec} is part of a model folder: load the model with its folder")
        model, tokenizer = Path(folder) / spec.removeprefix(COMPONENT), Path(folder) / "tokenizer"
        if not model.is_dir() or not tokenizer.is_dir():
            raise MeddiffError(f"the model in {folder} is missing its {model.name}/ or tokenizer/ folder — import it "
                               "again (meddiff import)")
        tokenizer_model = load_hf(model, "the text encoder", tokenizer_from=tokenizer)
        return HFTextEncoder(spec, *tokenizer_model, max_length, padded)
    if spec.startswith(("hf-hub:", "local-dir:")):
        from meddiff.encoders.openclip import load_open_clip

        return load_open_clip(spec, max_length)
    if spec.startswith("hf:"):
        return _hf_encoder(spec.removeprefix("hf:"), max_length, padded)
    if (Path(spec) / "clip.json").is_file():
        encoder = _hf_encoder(str(Path(spec) / "text"), max_length)
        encoder.spec = spec
        return encoder
    raise MeddiffError(
        f"unknown text encoder {spec!r}: use hf:NAME_OR_PATH (a transformers model in a folder or the Hugging Face "
        "cache), hf-hub:REPO or local-dir:PATH (an open_clip model such as BiomedCLIP), or a meddiff CLIP folder"
    )
