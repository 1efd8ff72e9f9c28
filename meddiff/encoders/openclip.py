"""BiomedCLIP, or any open_clip model with a Hugging Face text tower, from local files only.

Specs (open_clip's own schemas):

- ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``: the model in a pre-filled Hugging
  Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), found with
  cache look-ups only: nothing is ever downloaded, whatever ``HF_HUB_OFFLINE`` says.
- ``local-dir:PATH``: open_clip's folder format, ``open_clip_config.json`` plus
  ``open_clip_pytorch_model.bin`` (or ``open_clip_model.safetensors``).

BiomedCLIP's text tower is a BERT named in its config (``text_cfg.hf_model_name``,
``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract``) whose config and tokenizer open_clip fetches
from the hub by that name (open_clip issues #724 and #772). meddiff resolves the name to a local folder
first and hands open_clip that folder instead: the name itself when it is a folder, else the model's
own folder when it holds the BERT's ``config.json`` and tokenizer files, else that BERT's snapshot in the
Hugging Face cache. The BERT weights are not needed: the CLIP checkpoint holds the text tower's weights.

``OpenCLIPEncoder`` is a ``HFTextEncoder`` over the text tower's transformer (token states for
cross-attention, text-hash cache, truncation warning), plus ``encode_text`` / ``encode_image`` in the
joint embedding space for ``meddiff.metrics.clip_score`` and the ``biomedclip`` feature extractor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meddiff.encoders.text import HFTextEncoder
from meddiff.errors import MeddiffError, first_line

BIOMEDCLIP = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
CONFIG_NAME = "open_clip_config.json"
# the checkpoint names open_clip's local-dir loader prefers, in its order
WEIGHTS_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # either one makes a BERT tokenizer


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (huggingface_hub reads it once,
    at import), with huggingface_hub's precedence."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of ``repo_id``'s main revision in the hub cache, or None: a file-system look-up only."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir())
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def _cache_folder(repo_id: str) -> Path:
    return hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"


@dataclass(frozen=True)
class OpenCLIPFiles:
    """Where a spec's files are: the model folder, its config, its weights and the text tower's folder."""

    folder: Path
    config: dict
    weights: Path
    text_dir: Path


def _weights_in(folder: Path) -> Path | None:
    return next((folder / name for name in WEIGHTS_NAMES if (folder / name).is_file()), None)


def _is_text_dir(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in TOKENIZER_FILES)


def resolve(spec: str) -> OpenCLIPFiles:
    """The local files of ``spec`` (``hf-hub:REPO`` or ``local-dir:PATH``); one-line MeddiffError naming the
    missing files and where they go."""
    if spec.startswith("local-dir:"):
        folder = Path(spec.removeprefix("local-dir:")).expanduser()
        if not folder.is_dir():
            raise MeddiffError(f"{spec}: no such folder — give the folder holding {CONFIG_NAME} "
                               f"and {WEIGHTS_NAMES[-1]}")
        if not (folder / CONFIG_NAME).is_file():
            raise MeddiffError(f"{spec}: {folder / CONFIG_NAME} is missing — copy the model's {CONFIG_NAME} there (for "
                               f"BiomedCLIP: from the Hugging Face repo {BIOMEDCLIP})")
        weights = _weights_in(folder)
        if weights is None:
            raise MeddiffError(f"{spec}: no weights in {folder} — "
                               f"copy the model's {WEIGHTS_NAMES[-1]} (or {WEIGHTS_NAMES[0]}) there")
    elif spec.startswith("hf-hub:"):
        repo_id = spec.removeprefix("hf-hub:")
        config_path = cached_file(repo_id, CONFIG_NAME)
        if config_path is None:
            raise MeddiffError(
                f"{spec} is not in the Hugging Face cache {hub_cache_dir()} and meddiff never downloads — fill the "
                f"cache where there is network (`hf download {repo_id} {CONFIG_NAME} {WEIGHTS_NAMES[-1]}`) and copy "
                f"{_cache_folder(repo_id).name}/ into it (or set HF_HUB_CACHE / HF_HOME), or use local-dir:PATH"
            )
        folder = config_path.parent
        weights = next((p for p in (cached_file(repo_id, name) for name in WEIGHTS_NAMES) if p is not None), None)
        if weights is None:
            raise MeddiffError(
                f"{spec}: {WEIGHTS_NAMES[-1]} is not in the Hugging Face cache next to {config_path} — fill it with "
                f"`hf download {repo_id} {WEIGHTS_NAMES[-1]}` where there is network and copy the cache folder here"
            )
    else:
        raise MeddiffError(f"unknown open_clip spec {spec!r}: use hf-hub:REPO (pre-filled Hugging Face cache) "
                           "or local-dir:PATH")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        text_cfg = config["model_cfg"]["text_cfg"]
    except (ValueError, KeyError, TypeError):
        raise MeddiffError(f"{folder / CONFIG_NAME} is not an open_clip config (no model_cfg.text_cfg)") from None
    name = text_cfg.get("hf_model_name")
    if not name:
        raise MeddiffError(f"{spec} has no Hugging Face text tower (text_cfg.hf_model_name): "
                           "meddiff's report encoders need one, as BiomedCLIP has")
    return OpenCLIPFiles(folder, config, weights, _text_dir(spec, name, folder))


def _text_dir(spec: str, name: str, folder: Path) -> Path:
    """The local folder with the text tower's config.json and tokenizer files (see the module docstring)."""
    candidates = [Path(name).expanduser(), folder]
    in_cache = cached_file(name, "config.json")
    if in_cache is not None:
        candidates.append(in_cache.parent)
    for candidate in candidates:
        if candidate.is_dir() and _is_text_dir(candidate):
            return candidate
    raise MeddiffError(
        f"{spec}: the text tower {name!r} needs its config.json and tokenizer (vocab.txt, or tokenizer.json), "
        f"which open_clip would download — put them in {folder}, or in the Hugging Face cache ({_cache_folder(name)}, "
        f"filled elsewhere with `hf download {name} config.json vocab.txt`)"
    )


class OpenCLIPEncoder(HFTextEncoder):
    """A frozen open_clip model: report context from its text tower's token states (``encode``,
    ``context``), and CLIP embeddings (``encode_text``, ``encode_image``)."""

    def __init__(self, spec: str, clip: torch.nn.Module, tokenizer, weights: Path, max_length: int | None = None):
        super().__init__(spec, tokenizer.tokenizer, clip.text.transformer, max_length or tokenizer.context_length)
        self.clip = clip.eval().requires_grad_(False)
        self.clip_tokenizer = tokenizer
        self.weights = weights
        from open_clip import get_model_preprocess_cfg
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.preprocess_cfg = PreprocessCfg(**get_model_preprocess_cfg(clip))
        self.transform = image_transform_v2(self.preprocess_cfg, is_train=False)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings (B, E), not normalised; long texts are truncated with a warning."""
        texts = ["" if t is None else str(t) for t in texts]
        self.warn_if_truncated(texts)
        device = next(self.clip.parameters()).device
        return self.clip.encode_text(
            self.clip_tokenizer(texts, context_length=self.max_length).to(device)).float().cpu()

    def image_batch(self, images: torch.Tensor | Sequence) -> torch.Tensor:
        """2D images (any intensities) -> the image tower's input (B, 3, S, S).

        Each image goes to [0, 1] between its 0.5th and 99.5th percentiles and to 8 bits (BiomedCLIP was
        trained on 8-bit figures), then through open_clip's own evaluation transform for this model:
        bicubic resize of the short side to the model's size (224 for BiomedCLIP), centre crop, grey
        replicated to RGB, normalised with the model's mean/std (CLIP's for BiomedCLIP).
        """
        from PIL import Image as PILImage

        tensors = []
        for image in images:
            array = np.asarray(getattr(image, "array", image), dtype=np.float32).squeeze()
            if array.ndim != 2:
                raise MeddiffError(f"{self.spec} takes 2D images, got shape {array.shape}")
            low, high = np.percentile(array, [0.5, 99.5])
            unit = np.clip((array - low) / max(high - low, 1e-6), 0, 1)
            # meddiff arrays are (i, j) voxel axes; PIL wants rows first: transpose so the picture is upright
            pil = PILImage.fromarray(np.round(unit.T * 255).astype(np.uint8))  # 8-bit grey ("L")
            tensors.append(self.transform(pil))
        return torch.stack(tensors)

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor | Sequence) -> torch.Tensor:
        """CLIP image embeddings (B, E) of 2D images (``meddiff.Image``, arrays), not normalised."""
        device = next(self.clip.parameters()).device
        return self.clip.encode_image(self.image_batch(images).to(device)).float().cpu()


def load_open_clip(spec: str, max_length: int | None = None, device: str | torch.device = "cpu") -> OpenCLIPEncoder:
    """An ``OpenCLIPEncoder`` from ``hf-hub:REPO`` or ``local-dir:PATH``, loaded from local files only."""
    import pickle
    import warnings

    import open_clip
    from open_clip.tokenizer import HFTokenizer

    from meddiff.encoders.text import refuse_custom_code
    from meddiff.weights import refused

    files = resolve(spec)
    refuse_custom_code(str(files.text_dir))  # open_clip reads the text tower's config through transformers
    text_cfg = dict(files.config["model_cfg"]["text_cfg"])
    local_text = {"hf_model_name": str(files.text_dir), "hf_tokenizer_name": str(files.text_dir),
                  "hf_model_pretrained": False}
    try:
        # local-dir: open_clip reads the config and the checkpoint from the folder (a cache snapshot for hf-hub:);
        # the text_cfg override points its Hugging Face text tower at the local folder instead of the hub name.
        # weights_only=True (open_clip's default, made explicit): a .bin goes through torch's weights-only
        # unpickler, so nothing in it runs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on a pickle protocol it is refusing anyway
            clip = open_clip.create_model(f"local-dir:{files.folder}", device=device, require_pretrained=True,
                                          weights_only=True, text_cfg={**text_cfg, **local_text})
        tokenizer = HFTokenizer(str(files.text_dir), context_length=text_cfg.get("context_length", 77),
                                **text_cfg.get("tokenizer_kwargs", {}))
    except pickle.UnpicklingError as exc:
        raise MeddiffError(refused(exc, f"{spec}: {files.weights.name}",
                                   f"put the model's tensors in {WEIGHTS_NAMES[0]} instead "
                                   "(safetensors.torch.save_file(state_dict, PATH))")) from None
    except Exception as exc:  # noqa: BLE001 - an unreadable or mismatched file, whatever open_clip raises: one line
        raise MeddiffError(f"cannot load {spec} from {files.folder}: {first_line(exc)}") from None
    return OpenCLIPEncoder(spec, clip, tokenizer, files.weights, max_length)
