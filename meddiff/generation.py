"""Synthetic data at scale: Lightning ``predict`` over item indices, each rank writing its own shard.

Item ``i`` is always sampled with seed ``seed + i``, so a resumed or re-sharded run writes the same
images. Each finished item is one file plus one line in ``manifest.rank<R>.jsonl``; when all ranks
are done, rank 0 merges every shard into ``manifest.jsonl`` (items of earlier runs kept), so an
interrupted run resumes by skipping what is already written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from meddiff.data.manifest import Record, write_manifest
from meddiff.errors import MeddiffError
from meddiff.io import SYNTHETIC_FORMATS as FORMATS
from meddiff.io import save_image
from meddiff.io.dicom_write import write_synthetic_dicom
from meddiff.pipeline import DiffusionPipeline

MANIFEST = "manifest.jsonl"


class GenerationModule(pl.LightningModule):
    """Wraps a pipeline so Lightning can place it on devices; ``predict_step`` samples a batch of indices."""

    def __init__(self, pipeline: DiffusionPipeline, steps: int, scheduler: str, seed: int, class_label: int | None, done: set[int],
                 prompts: list[str] | None = None, guidance_scale: float = 1.0, negative_prompt: str = ""):
        super().__init__()
        self.pipeline = pipeline
        self.unet = pipeline.unet  # registered, so Lightning moves it to the device
        self.steps, self.scheduler, self.seed, self.class_label, self.done = steps, scheduler, seed, class_label, done
        self.prompts, self.guidance_scale, self.negative_prompt = prompts, guidance_scale, negative_prompt

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[tuple[int, Any]]:
        indices = [int(i) for i in batch if int(i) not in self.done]
        if not indices:
            return []
        labels = None if self.class_label is None else torch.full((len(indices),), self.class_label)
        prompts = None if self.prompts is None else [self.prompts[i] for i in indices]
        x = self.pipeline.sample([self.seed + i for i in indices], steps=self.steps, scheduler=self.scheduler, class_labels=labels,
                                 prompts=prompts, guidance_scale=self.guidance_scale, negative_prompt=self.negative_prompt)
        return [(i, self.pipeline.to_image(item), None if prompts is None else prompts[k]) for k, (i, item) in enumerate(zip(indices, x))]


class ShardWriter(BasePredictionWriter):
    """Writes each image as it is made and appends its record to this rank's shard."""

    def __init__(self, out_dir: Path, fmt: str, provenance: dict):
        super().__init__(write_interval="batch")
        self.out_dir, self.fmt, self.provenance = out_dir, fmt, provenance

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        shard = self.out_dir / f"manifest.rank{trainer.global_rank}.jsonl"
        with open(shard, "a+b") as fh:  # a line cut short by an interruption must not swallow the next record
            if fh.seek(0, os.SEEK_END) > 0:
                fh.seek(-1, os.SEEK_END)  # read only the last byte, not the whole shard
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
        with open(shard, "a", encoding="utf-8") as fh:
            for index, image, prompt in prediction:
                name = f"sample_{index:06d}" + ("" if self.fmt == "dcm" and image.array.ndim == 3 else f".{self.fmt}")
                description = f"synthetic image from meddiff model {self.provenance['weights_sha256'][:16]}, seed {self.provenance['seed'] + index}"
                if self.fmt == "dcm":
                    write_synthetic_dicom(image, self.out_dir / name, description, overwrite=True)
                else:
                    save_image(image, self.out_dir / name, overwrite=True)
                record = Record(
                    image=name,
                    modality=image.modality or "OT",
                    spacing=[round(s, 6) for s in image.spacing],
                    source="meddiff generate",
                    report=prompt,
                    synthetic=True,
                    provenance={**self.provenance, "seed": self.provenance["seed"] + index, "index": index},
                )
                fh.write(record.model_dump_json(exclude_defaults=True) + "\n")
                fh.flush()

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            merge_shards(self.out_dir)


RUN_KEYS = ("weights_sha256", "scheduler", "steps", "class_label", "format", "guidance_scale", "negative_prompt")


def check_same_run(out_dir: Path, provenance: dict) -> None:
    """Refuse to add to a folder that holds other images or items of a different run."""
    lines = []
    for path in [out_dir / MANIFEST, *sorted(out_dir.glob("manifest.rank*.jsonl"))]:
        if path.is_file():
            lines += [(path, n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)]
    if not lines and any(out_dir.glob("sample_*")):
        raise MeddiffError(f"{out_dir} holds sample files but no {MANIFEST} — choose an empty or new -o folder")
    for path, number, line in lines:
        try:
            record = Record.model_validate_json(line)
        except ValueError:
            if path.name == MANIFEST:
                raise MeddiffError(f"{path} line {number} is not a meddiff record — choose another -o folder") from None
            continue  # a shard line cut short by an interruption
        if not record.provenance or "index" not in record.provenance:
            raise MeddiffError(f"{path} line {number} is not a meddiff-generated record — choose another -o folder")
        old = {k: record.provenance.get(k) for k in RUN_KEYS}
        old["seed"] = record.provenance["seed"] - record.provenance["index"]
        new = {**{k: provenance.get(k) for k in RUN_KEYS}, "seed": provenance["seed"]}
        changed = [k for k in new if old[k] != new[k]]
        if changed:
            raise MeddiffError(f"{out_dir} holds images of another run (different {', '.join(changed)}) — choose another -o folder")


def finished_records(out_dir: Path) -> dict[int, Record]:
    """Records of items already written (merged manifest and leftover shards), by item index."""
    records: dict[int, Record] = {}
    sources = [out_dir / MANIFEST] if (out_dir / MANIFEST).is_file() else []
    for path in [*sources, *sorted(out_dir.glob("manifest.rank*.jsonl"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            try:
                record = Record.model_validate_json(line)
            except ValueError:
                continue  # a line cut short by an interruption: that item is simply made again
            if record.provenance and (out_dir / record.image).exists():
                records[int(record.provenance["index"])] = record
    return records


def merge_shards(out_dir: Path) -> Path:
    records = finished_records(out_dir)
    path = write_manifest([records[i] for i in sorted(records)], out_dir / MANIFEST, overwrite=True)
    for shard in out_dir.glob("manifest.rank*.jsonl"):
        shard.unlink()
    return path


def generate_to_folder(
    pipeline: DiffusionPipeline,
    model_id: str,
    n: int,
    out_dir: str | Path,
    steps: int = 50,
    scheduler: str = "ddim",
    seed: int = 0,
    batch_size: int = 8,
    fmt: str = "nii.gz",
    class_label: int | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    prompts: list[str] | None = None,
    guidance_scale: float = 1.0,
    negative_prompt: str = "",
) -> tuple[Path, int]:
    """Make items ``0..n-1`` that are not already in ``out_dir``; returns the manifest and how many were new.

    ``prompts`` (one per item) condition a report-conditioned model; each record keeps its prompt as
    ``report`` and the run's ``guidance_scale`` and ``negative_prompt`` in its provenance.
    """
    if fmt not in FORMATS:
        raise MeddiffError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if n < 1 or batch_size < 1 or steps < 1:
        raise MeddiffError("-n, --batch-size and --steps must be positive")
    pipeline.schedule.sampler(scheduler)  # unknown names fail here, before any work
    conditioned = "text_encoder" in pipeline.config
    if conditioned != (prompts is not None):
        raise MeddiffError("this model is report-conditioned: give --prompt or --prompts" if conditioned else "this model takes no prompts")
    if prompts is not None and len(prompts) != n:
        raise MeddiffError(f"{len(prompts)} prompts for {n} images: give one prompt per image")
    if fmt == "png" and len(pipeline.config["image"]["shape"]) != 2:
        raise MeddiffError("--format png holds 2D images; this model makes 3D volumes — use nii.gz or dcm")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    provenance = {
        "model": model_id,
        "weights_sha256": pipeline.config.get("weights_sha256", ""),
        "scheduler": scheduler,
        "steps": steps,
        "seed": seed,
        "class_label": class_label,
        "format": fmt,
        "guidance_scale": guidance_scale if prompts is not None else None,
        "negative_prompt": negative_prompt if prompts is not None else None,
    }
    check_same_run(out_dir, provenance)
    finished = finished_records(out_dir)
    for index, record in finished.items():
        if prompts is not None and index < n and record.report != prompts[index]:
            raise MeddiffError(f"{out_dir} holds item {index} made from another prompt — choose another -o folder")
    done = set(finished)
    module = GenerationModule(pipeline, steps, scheduler, seed, class_label, done, prompts, guidance_scale, negative_prompt)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp" if devices not in (1, "1") else "auto",
        callbacks=[ShardWriter(out_dir, fmt, provenance)],
        logger=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    indices = torch.arange(n)
    trainer.predict(module, DataLoader(indices, batch_size=batch_size), return_predictions=False)
    return out_dir / MANIFEST, n - len(done & set(range(n)))
