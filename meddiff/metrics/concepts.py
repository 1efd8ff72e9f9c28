"""Concept scores: how strongly a CLIP sees each named concept in each image (MONET, Kim et al., Nature Medicine 2024).

A concept is a name and a prompt ensemble ("hyperintense lesion: a bright lesion | a hyperintense focus"); its text
embedding is the normalised mean of its prompts' embeddings, as CLIP's zero-shot classifiers average templates. As
MONET does, a concept's score is not the raw image-text similarity, which varies with the image's overall look, but
its similarity against reference prompts that describe the image type without the concept ("a brain MRI slice"):
the presence probability ``sigmoid(logit)`` of the concept against the reference, with the logit
``scale * (cos(image, concept) - cos(image, reference))`` and the encoder's own logit scale. The audit's statistics
use the logit: with CLIP's scale (14 to 100) the probability saturates near 0 or 1, which hides every difference but
presence against absence. A volume is scored as 2.5D slices (evenly spaced along each anatomical plane, as
``evaluate`` does) and its logit is the mean over them.

Encoders: BiomedCLIP (or any open_clip model) from local files, whose images are prepared as ``evaluate`` prepares
them (``OpenCLIPEncoder.image_batch``), or meddiff's own CLIP (``meddiff fit --config configs/clip_findings.yaml``),
whose images are normalised by modality and padded to a square with the empty value, as its training data were.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from meddiff.errors import MeddiffError
from meddiff.image import Image

MAX_CONCEPTS = 1000
MAX_PROMPT_CHARS = 300
DEFAULT_REFERENCE = ("a medical image", "a radiology image")
SLICES_PER_PLANE = 4  # 2.5D: slices per anatomical plane of a volume
_NAME = re.compile(r"^([^:|]{1,100}):(.*)$")


@dataclass(frozen=True)
class Concept:
    """A named concept and the prompts whose mean embedding stands for it."""

    name: str
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class ConceptSet:
    """The concepts of an audit and the reference prompts their scores are measured against."""

    concepts: tuple[Concept, ...]
    reference: tuple[str, ...] = DEFAULT_REFERENCE


def read_concepts(path: str | os.PathLike) -> ConceptSet:
    """Concepts from a text file, one per line: ``NAME: prompt | prompt ...`` (or a bare prompt, its own name);
    ``reference: prompt | ...`` sets the reference prompts; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MeddiffError(f"{path}: no such concepts file — give a text file with one concept per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MeddiffError(f"{path} cannot be read as UTF-8 text ({exc.__class__.__name__}) — give a text file "
                           "with one concept per line") from None
    concepts: dict[str, tuple[int, Concept]] = {}
    reference = DEFAULT_REFERENCE
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _NAME.match(line)
        name, body = (match.group(1).strip(), match.group(2)) if match else (line, line)
        prompts = tuple(p.strip() for p in body.split("|") if p.strip())
        where = f"{path}:{number}"
        if not prompts:
            raise MeddiffError(f"{where}: concept {name!r} has no prompt — write 'NAME: prompt | prompt'")
        long = [p for p in prompts if len(p) > MAX_PROMPT_CHARS]
        if long:
            raise MeddiffError(f"{where}: a prompt of {len(long[0])} characters is too long (at most "
                               f"{MAX_PROMPT_CHARS}; a CLIP reads a short phrase) — shorten it")
        if name.lower() == "reference":
            reference = prompts
            continue
        if name.lower() in concepts:
            raise MeddiffError(f"{where}: concept {name!r} is already defined on line {concepts[name.lower()][0]} "
                               "— give each concept once (put more prompts on its line, separated by '|')")
        concepts[name.lower()] = (number, Concept(name, prompts))
        if len(concepts) > MAX_CONCEPTS:
            raise MeddiffError(f"{path} has more than {MAX_CONCEPTS} concepts — split the audit")
    if not concepts:
        raise MeddiffError(f"{path} names no concepts — write one per line, 'NAME: prompt | prompt'")
    return ConceptSet(tuple(c for _, c in concepts.values()), reference)


class ConceptEncoder:
    """A CLIP as the audit uses it: unit text and image embeddings, its logit scale and its text length limit."""

    def __init__(self, spec: str, encoder, own: bool):
        self.spec, self.encoder, self.own = spec, encoder, own
        if own:
            self.scale = float(encoder.config.get("logit_scale", 100.0))
            self.max_tokens = int(encoder.config.get("max_length", 64))
            self.tokenizer = encoder.tokenizer
        else:
            self.scale = float(encoder.clip.logit_scale.exp())
            self.max_tokens, self.tokenizer = encoder.max_length, encoder.tokenizer

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Refuse a prompt the text tower would truncate: its meaning would silently change."""
        for prompt in prompts:
            count = len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
            if count > self.max_tokens:
                raise MeddiffError(f"the prompt {prompt[:60]!r}... has {count} tokens; {self.spec} reads at most "
                                   f"{self.max_tokens} — shorten it")

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.encoder.encode_text(list(texts)).double(), dim=-1)

    @torch.inference_mode()
    def embed_images(self, planes: Sequence[np.ndarray], modality: str | None) -> torch.Tensor:
        """Unit embeddings of 2D arrays (one image's slices share its ``modality``)."""
        if self.own:
            return F.normalize(self.encoder.encode_image(own_clip_batch(planes, modality)).double(), dim=-1)
        return F.normalize(self.encoder.encode_image(list(planes)).double(), dim=-1)


def own_clip_batch(planes: Sequence[np.ndarray], modality: str | None) -> torch.Tensor:
    """2D arrays as meddiff's own CLIP trained on them: normalised by modality to [-1, 1] (``NormalizeIntensityd``)
    and padded to a square with -1, the empty value ``ManifestDataModule`` pads with."""
    from monai.transforms import ResizeWithPadOrCrop

    from meddiff.data.transforms import NormalizeIntensityd, to_model_range

    side = max(max(p.shape) for p in planes)
    pad = ResizeWithPadOrCrop((side, side), constant_values=-1.0)
    out = []
    for plane in planes:
        x = torch.as_tensor(np.asarray(plane, dtype=np.float32))
        low, high = NormalizeIntensityd("image").intensity_range(x, modality)
        out.append(torch.as_tensor(pad(to_model_range(x, low, high)[None])))
    return torch.stack(out).float()


def load_concept_encoder(spec: str | os.PathLike) -> ConceptEncoder:
    """``biomedclip`` (found as ``evaluate --features biomedclip`` finds it), ``hf-hub:REPO``, ``local-dir:PATH``,
    an open_clip folder, or a folder exported by meddiff's own CLIP training (``clip.json``)."""
    from meddiff.encoders.clip import CLIP_CONFIG, ClipEncoder
    from meddiff.encoders.openclip import load_open_clip
    from meddiff.metrics.features import biomedclip_spec

    spec = str(spec)
    if spec == "biomedclip":
        spec = biomedclip_spec(None)
    elif (Path(spec) / CLIP_CONFIG).is_file():
        return ConceptEncoder(spec, ClipEncoder(spec), own=True)
    elif not spec.startswith(("hf-hub:", "local-dir:")):
        if not Path(spec).is_dir():
            raise MeddiffError(f"--encoder {spec}: give biomedclip, a folder (meddiff CLIP export or open_clip "
                               "files), local-dir:PATH or hf-hub:REPO")
        spec = f"local-dir:{spec}"
    return ConceptEncoder(spec, load_open_clip(spec), own=False)


def image_planes(image: Image, slices: int = SLICES_PER_PLANE) -> list[np.ndarray]:
    """A 2D image as itself; a volume as ``slices`` evenly spaced slices along each anatomical plane (2.5D)."""
    from meddiff.metrics.features import volume_planes

    array = np.asarray(image.array, dtype=np.float32).squeeze()
    if array.ndim == 2:
        return [array]
    if array.ndim != 3:
        raise MeddiffError(f"the audit scores 2D images and 3D volumes; this image has shape {image.array.shape}")
    return [plane for stack in volume_planes(array, image.affine, slices).values() for plane in stack]


def concept_embeddings(encoder: ConceptEncoder, concepts: ConceptSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, E) unit concept embeddings (prompt-ensemble means) and the (E,) unit reference embedding."""
    encoder.check_prompts([p for c in concepts.concepts for p in c.prompts] + list(concepts.reference))
    means = [encoder.embed_texts(c.prompts).mean(0) for c in concepts.concepts]
    return F.normalize(torch.stack(means), dim=-1), F.normalize(encoder.embed_texts(concepts.reference).mean(0), dim=0)


def concept_scores(paths: Sequence[Path], encoder: ConceptEncoder, concepts: ConceptSet,
                   desc: str = "concept scores") -> np.ndarray:
    """(N, C) concept logits of the images at ``paths`` (see the module docstring; ``sigmoid`` gives presence)."""
    from meddiff.io import load_image

    texts, reference = concept_embeddings(encoder, concepts)
    out = np.empty((len(paths), len(concepts.concepts)))
    for n, path in enumerate(tqdm(paths, desc=f"{desc} ({encoder.spec})", unit="image")):
        image = load_image(path)
        images = encoder.embed_images(image_planes(image), image.modality)
        margin = images @ texts.t() - (images @ reference)[:, None]
        out[n] = (encoder.scale * margin).mean(0).numpy()
    return out
