"""A published model read into meddiff: the model, where it came from, and its card; written as one model folder.

The folder is staged beside its destination and renamed into place only when complete, so a refused or interrupted
import leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from meddiff.errors import MeddiffError
from meddiff.files import staged_folder
from meddiff.model import CONFIG_NAME, LEGACY_UNET_WEIGHTS, DiffusionModel

CARD_NAME = "README.md"


@dataclass
class Imported:
    """``model`` with its weights; ``sampling``: how its publisher samples it (``scheduler``, ``steps``, and for a
    text-conditioned model ``guidance_scale``); ``notes``: where meddiff's use differs from the publisher's."""

    model: DiffusionModel
    kind: str
    source: Path
    name: str
    version: str
    licence: str
    sampling: dict
    notes: list[str] = field(default_factory=list)
    folders: dict[str, Path] = field(default_factory=dict)  # component folders copied as they are (text_encoder/)

    def card(self, folder: str) -> str:
        config = self.model.config
        networks = ", ".join(f"{name} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters)"
                             for name, net in self.model.networks.items())
        image = config.image
        generate = (f"meddiff generate --model {folder} -o samples -n 4 --scheduler {self.sampling['scheduler']} "
                    f"--steps {self.sampling['steps']}")
        scalars = config.scalars
        if scalars is not None:
            generate += " --condition-values " + ",".join(f"{n}={v:g}" for n, v in zip(scalars.names, scalars.defaults,
                                                                                        strict=True))
        if "guidance_scale" in self.sampling:
            generate += f" --guidance-scale {self.sampling['guidance_scale']:g} --prompt TEXT"
        lines = [
            f"# Model card: `{self.name}`{f' {self.version}' if self.version else ''} (imported)",
            "",
            f"Imported by `meddiff import` from the {self.kind} `{self.source.name}`; the networks and weights are its "
            "publisher's, unchanged (stored as safetensors).",
            "",
            f"- **Licence**: {self.licence} — the publisher's terms apply to these weights; read them before use.",
            f"- **Networks**: {networks}.",
            f"- **Image**: {' x '.join(map(str, image.shape))}"
            f"{f' at {image.spacing} mm' if image.spacing else ''}, modality {image.modality or 'not stated'}; values "
            "are what the network makes (the publisher's intensity scale).",
            f"- **Sample as published**: `{generate}`.",
            *(["- **Conditions** (`--condition-values`, in this order): "
               + "; ".join(f"`{n}` in {lo:g}..{hi:g} (default {d:g})" for n, (lo, hi), d in
                           zip(scalars.names, scalars.ranges, scalars.defaults, strict=True))
               + "; meanings and normalisation as the publisher's documentation states them."] if scalars else []),
            *[f"- **Note**: {note}" for note in self.notes],
            "",
        ]
        return "\n".join(lines)

    def writes(self, name: str) -> bool:
        """Whether ``name`` is an entry ``save`` writes (what ``--overwrite`` may replace)."""
        return name in {CONFIG_NAME, CARD_NAME, LEGACY_UNET_WEIGHTS, *self.folders} or name.endswith(".safetensors")

    def save(self, out: str | os.PathLike, overwrite: bool = False, dtype=None) -> Path:
        """The model folder (config.json, one safetensors per network, the card) at ``out``, written whole."""
        if dtype is not None:
            for network in self.model.networks.values():
                network.to(dtype)
        with staged_folder(out, overwrite, self.writes) as stage:
            self.model.save_pretrained(stage)
            for name, folder in self.folders.items():
                shutil.copytree(folder, stage / name)
            (stage / CARD_NAME).write_text(self.card(Path(out).name))
        return Path(out)


def licence_file_line(folder: Path) -> str | None:
    """The first line of ``folder``'s LICENSE file (its licence's name), or None without one."""
    path = folder / "LICENSE"
    if path.is_file():
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[0]
    return None


def read_published(source: str | os.PathLike, text_encoder: str | os.PathLike | None = None) -> Imported:
    """A MAISI bundle, a MONAI model-zoo bundle or a diffusers pipeline folder, by what the folder holds;
    ``text_encoder``: the CLIP text model's folder a bundle names but does not hold (``bundle.load_bundle``)."""
    from meddiff.hub import bundle, maisi, pipeline_folder

    source = Path(source)
    if not source.is_dir():
        raise MeddiffError(f"{source} is not a folder — give a MONAI bundle folder (configs/inference.json, models/) "
                           "or a diffusers pipeline folder (model_index.json)")
    if pipeline_folder.is_pipeline_folder(source):
        return pipeline_folder.load_pipeline_folder(source)
    if maisi.is_maisi_bundle(source):
        return maisi.imported(source)
    if bundle.bundle_config_path(source) is not None:
        return bundle.load_bundle(source, text_encoder)
    raise MeddiffError(f"{source} is neither a MONAI bundle folder (configs/inference.json) nor a diffusers pipeline "
                       "folder (model_index.json) — give the folder as downloaded")
