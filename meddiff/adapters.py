"""Few-shot adapters of a trained model: the adapter folder, and applying or merging one into a loaded model.

An adapter folder holds ``adapter_config.json`` (an ``AdapterConfig``: the kind, its shape, the base model's
name and ``weights_sha256``) and ``adapter.safetensors`` (its tensors alone; never a pickle), so it is a small
fraction of the model it adapts and works only with that model: ``apply_adapter`` refuses any other base.

Two kinds, both built with peft:

- ``lora``: low-rank updates (Hu et al. 2021) of the UNet's attention projections and res-block convolutions
  (``UNET_TARGETS``; peft's ``LoraModel``), optionally of the text encoder's attention too (``TEXT_TARGETS``).
  Its tensors are peft's adapter state dict, keyed ``unet.<name>`` / ``text_encoder.<name>``. A scale s weighs
  the update (0: the base model exactly; 1: as trained); ``merge_adapter`` bakes it into the UNet's weights.
- ``textual_inversion``: one new token of the report encoder (Gal et al. 2022); its tensor ``token_embedding``
  (1, width) is the token's row, added to the tokenizer and the embedding table on load (``add_token``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from meddiff import __version__
from meddiff.errors import MeddiffError, first_line
from meddiff.files import UMASK, file_sha256, staged_folder
from meddiff.model import readable_format

FORMAT_VERSION = 1
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter.safetensors"
ADAPTER = "default"  # peft's adapter name: one adapter per network
TOKEN_EMBEDDING = "token_embedding"
# MONAI DiffusionModelUNet module names: attention projections, res-block convolutions (the Conv inside MONAI's
# Convolution block)
UNET_TARGETS = r".*\.(to_q|to_k|to_v|out_proj)|.*\.(resnets\.\d+|resnet_[12])\.conv[12]\.conv"
TEXT_TARGETS = r".*\.(query|key|value|q_proj|k_proj|v_proj)"  # BERT-like and CLIP text towers' attention
MAX_SCALE = 4.0  # beyond it the update outweighs what the base learnt several-fold: no longer an adaptation
TOKEN_PATTERN = re.compile(r"[^\s]{1,50}")
REMEDY = "give a folder that meddiff fit (LoRAModule / TextualInversionModule export_dir) or meddiff export wrote"


class AdapterConfig(BaseModel):
    """What ``adapter_config.json`` says: the ``kind``, LoRA's ``rank``, ``alpha`` and ``target_modules`` (a peft
    regex per network), a textual inversion's ``token``, the base model's ``base`` name and ``base_weights_sha256``
    (``DiffusionModel.weights_sha256``), and the adapter's ``parameters`` count."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    meddiff_version: str | None = None
    kind: Literal["lora", "textual_inversion"]
    base: str
    base_weights_sha256: str
    rank: int | None = None
    alpha: float | None = None
    target_modules: dict[Literal["unet", "text_encoder"], str] = {}
    token: str | None = None
    parameters: int = 0

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        return readable_format(version, FORMAT_VERSION)

    @field_validator("base_weights_sha256")
    @classmethod
    def _digest(cls, digest: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("base_weights_sha256 must be a sha256 hex digest")
        return digest

    @model_validator(mode="after")
    def _shape(self) -> AdapterConfig:
        if self.kind == "lora":
            if not self.rank or self.rank < 1 or not self.alpha or self.alpha <= 0 or "unet" not in self.target_modules:
                raise ValueError("a lora adapter needs rank >= 1, alpha > 0 and the unet's target_modules")
        else:
            check_token(self.token)
        return self


def check_token(token: str | None) -> str:
    """A textual-inversion token: one word of visible characters, e.g. ``<finding>``."""
    if not isinstance(token, str) or not TOKEN_PATTERN.fullmatch(token):
        raise ValueError(f"the token must be one word of 1 to 50 visible characters, e.g. <finding>, not {token!r}")
    return token


@dataclass(frozen=True)
class Adapter:
    """An adapter folder as read: its config, tensors, the folder's name and sha256 (of its files' bytes)."""

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    name: str
    sha256: str

    def of(self, network: str) -> dict[str, torch.Tensor]:
        """The tensors of one network (``unet``, ``text_encoder``), without the network's prefix."""
        prefix = f"{network}."
        return {k.removeprefix(prefix): v for k, v in self.tensors.items() if k.startswith(prefix)}

    @property
    def provenance(self) -> dict:
        return {"adapter": self.name, "adapter_sha256": self.sha256}


def save_adapter(directory: str | os.PathLike, config: AdapterConfig, tensors: dict[str, torch.Tensor],
                 overwrite: bool = False) -> Path:
    """Write the adapter folder whole (staged, then renamed): ``adapter.safetensors`` and ``adapter_config.json``
    with ``parameters`` counted from ``tensors``."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    config = config.model_copy(update={"format_version": FORMAT_VERSION, "meddiff_version": __version__,
                                       "parameters": sum(v.numel() for v in state.values())})
    with staged_folder(directory, overwrite, lambda name: name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)) as stage:
        save_file(state, stage / ADAPTER_WEIGHTS, metadata={"format": "pt", "meddiff": __version__})
        os.chmod(stage / ADAPTER_WEIGHTS, 0o666 & ~UMASK)  # safetensors writes 0600; outputs get the usual mode
        (stage / ADAPTER_CONFIG).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    return Path(directory)


def read_adapter(directory: str | os.PathLike) -> Adapter:
    """The adapter in ``directory``, checked: a readable config, a safetensors file (never a pickle) holding the
    tensors the config's kind needs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise MeddiffError(f"the adapter {directory} is not a folder — {REMEDY}")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        found = f"it holds {', '.join(pickles)}, pickled tensors meddiff never unpickles" if pickles else \
            f"there is no {ADAPTER_WEIGHTS}"
        raise MeddiffError(f"the adapter {directory} is not a meddiff adapter folder: {found} — {REMEDY}")
    try:
        config = AdapterConfig.model_validate_json((directory / ADAPTER_CONFIG).read_bytes())
    except OSError as exc:
        raise MeddiffError(f"cannot read the adapter {directory}: {ADAPTER_CONFIG}: {exc.strerror or exc} "
                           f"— {REMEDY}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise MeddiffError(f"the adapter {directory}: {ADAPTER_CONFIG} is not an adapter config "
                           f"({first_line(f'{where}: ' * bool(where) + error['msg'])}) — {REMEDY}") from None
    try:
        tensors = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MeddiffError(f"the adapter {directory}: {ADAPTER_WEIGHTS} is not a readable safetensors file "
                           f"({first_line(exc)}); meddiff never unpickles weights — {REMEDY}") from None
    if not all(torch.is_floating_point(v) and torch.isfinite(v).all() for v in tensors.values()) or not tensors:
        raise MeddiffError(f"the adapter {directory}: {ADAPTER_WEIGHTS} holds no tensors, or values that are not "
                           f"finite numbers — {REMEDY}")
    if config.kind == "textual_inversion" and (set(tensors) != {TOKEN_EMBEDDING} or
                                               tensors[TOKEN_EMBEDDING].ndim != 2):
        raise MeddiffError(f"the adapter {directory}: a textual inversion holds one tensor {TOKEN_EMBEDDING} "
                           f"(1, width), not {', '.join(sorted(tensors))} — {REMEDY}")
    return Adapter(config, tensors, directory.resolve().name, file_sha256(directory))


def inject_lora(network: torch.nn.Module, rank: int, alpha: float, targets: str):
    """peft's ``LoraModel`` over ``network`` (changed in place: the target layers become LoRA layers; only their
    adapter weights require gradients); returns the tuner, whose ``merge_and_unload`` merges them."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    try:
        return LoraModel(network, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), ADAPTER)
    except ValueError as exc:  # peft: no module matches the targets, or a layer type it cannot adapt
        raise MeddiffError(f"cannot put LoRA on this network with target_modules {targets!r}: {first_line(exc)} "
                           "— choose target_modules that name its Linear/Conv layers") from None


def peft_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights peft put into ``network`` (LoRA or trainable tokens; its adapter name removed from the
    keys)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(network, adapter_name=ADAPTER)


def set_lora_scale(network: torch.nn.Module, scale: float) -> None:
    """Weigh every LoRA update of ``network`` by ``scale`` (peft: scaling = scale * alpha / rank)."""
    from peft.tuners.lora import LoraLayer

    for layer in network.modules():
        if isinstance(layer, LoraLayer):
            layer.set_scale(ADAPTER, scale)


def add_token(encoder, token: str, initializer: str | None = None) -> int:
    """Add ``token`` to a Hugging Face report encoder (``HFTextEncoder``): the tokenizer learns it as one token and
    the embedding table grows by a row, set to the mean embedding of ``initializer``'s tokens (or, without one,
    of the whole vocabulary); returns its id."""
    tokenizer, model = getattr(encoder, "tokenizer", None), getattr(encoder, "model", None)
    if tokenizer is None or not hasattr(model, "resize_token_embeddings"):
        raise MeddiffError("textual inversion needs a Hugging Face report encoder (hf:, component: or a meddiff CLIP "
                           "folder), not this one")
    try:
        check_token(token)
    except ValueError as exc:
        raise MeddiffError(f"{exc} — give the token as one word, e.g. token: <finding>") from None
    if token in tokenizer.get_vocab() or tokenizer.add_tokens([token]) != 1:
        raise MeddiffError(f"the report encoder's tokenizer already has the token {token} — choose a new token, "
                           "e.g. <finding>")
    table = model.get_input_embeddings().weight
    if initializer:
        ids = tokenizer(initializer, add_special_tokens=False)["input_ids"]
        if not ids or all(i == tokenizer.unk_token_id for i in ids):
            raise MeddiffError(f"the initializer {initializer!r} is not in the report encoder's vocabulary — give a "
                               "word its reports use")
        start = table[ids].detach().mean(dim=0)
    else:
        start = table.detach().mean(dim=0)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    index = tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        model.get_input_embeddings().weight[index] = start
    getattr(encoder, "_cache", {}).clear()  # encodings of texts with the token's characters are stale now
    return index


def check_scale(scale: float, adapter: Adapter) -> float:
    """The scale a LoRA adapter is applied at: finite, 0 to ``MAX_SCALE``; a textual inversion takes none (1)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or \
            not 0.0 <= scale <= MAX_SCALE:
        raise MeddiffError(f"--adapter-scale must be a number from 0 (the base model) to {MAX_SCALE:g} (1: as "
                           f"trained), not {scale}")
    if adapter.config.kind == "textual_inversion" and scale != 1.0:
        raise MeddiffError("a textual-inversion adapter has no scale: it adds a token — leave out --adapter-scale")
    return float(scale)


def check_base(model, adapter: Adapter, where: str) -> None:
    """The adapter was trained on this very model (its weights' sha256), and the model has no adapter yet."""
    if getattr(model, "adapter", None):
        raise MeddiffError(f"this model already has the adapter {model.adapter['adapter']} — load the base model "
                           "again to apply another")
    expected = adapter.config.base_weights_sha256
    if expected != model.weights_sha256:
        raise MeddiffError(f"the adapter {where} was trained on another base model ({adapter.config.base}, weights "
                           f"{expected[:12]}), not this one (weights {model.weights_sha256[:12] or 'unsaved'}) — use "
                           f"it with --model {adapter.config.base}")


def _load_lora(network: torch.nn.Module, adapter: Adapter, part: str, where: str):
    from meddiff.weights import mismatch

    config = adapter.config
    tuner = inject_lora(network, config.rank, config.alpha, config.target_modules[part])
    expected, given = {k: tuple(v.shape) for k, v in peft_state(network).items()}, adapter.of(part)
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [(k, tuple(given[k].shape), expected[k]) for k in expected if k in given
                and tuple(given[k].shape) != expected[k]]
    if missing or unexpected or reshaped:
        raise MeddiffError(f"the adapter {where} does not fit the model's {part}: "
                           f"{mismatch(missing, unexpected, reshaped)} — {REMEDY}")
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(network, given, adapter_name=ADAPTER)
    return tuner


def apply_adapter(model, directory: str | os.PathLike, scale: float = 1.0):
    """Apply the adapter in ``directory`` to ``model`` (a ``DiffusionModel``, changed in place and returned) at
    ``scale``, after checking it was trained on this model; ``model.adapter`` then records it (name, sha256, scale)
    for the provenance of what the model makes."""
    adapter = read_adapter(directory)
    scale = check_scale(scale, adapter)
    check_base(model, adapter, str(directory))
    config = adapter.config
    if config.kind == "textual_inversion":
        encoder = model.text_encoder  # one clear line for a model without a report encoder
        vector, width = adapter.tensors[TOKEN_EMBEDDING], getattr(encoder, "dim", None)
        if vector.shape != (1, width):
            raise MeddiffError(f"the adapter {directory} holds a token embedding of shape {list(vector.shape)}; this "
                               f"model's report encoder takes [1, {width}] — {REMEDY}")
        index = add_token(encoder, config.token)
        table = encoder.model.get_input_embeddings().weight
        with torch.no_grad():
            table[index] = vector[0].to(table)
    else:
        for part in config.target_modules:
            network = model.unet if part == "unet" else model.text_encoder.model
            _load_lora(network, adapter, part, str(directory))
            set_lora_scale(network, scale)
            network.to(model.device)
        if "text_encoder" in config.target_modules:
            model.text_encoder._cache.clear()
    model.adapter = {**adapter.provenance, "adapter_scale": scale}
    return model


def merge_adapter(model, directory: str | os.PathLike):
    """``model`` with the LoRA adapter in ``directory`` merged into its UNet's weights (scale 1): a plain model
    (``save_pretrained`` writes a full folder) whose outputs are those of the base with the adapter."""
    adapter = read_adapter(directory)
    check_base(model, adapter, str(directory))
    if adapter.config.kind != "lora" or set(adapter.config.target_modules) != {"unet"}:
        raise MeddiffError(f"the adapter {directory} changes the report encoder ({adapter.config.kind}), which a "
                           "model folder names but does not hold — use it as an adapter: meddiff generate --adapter")
    model.unet = _load_lora(model.unet, adapter, "unet", str(directory)).merge_and_unload()
    return model
