"""Synthetic data at scale: Lightning ``predict`` over item indices, each rank writing its own shard.

Item ``i`` is always sampled with seed ``seed + i``, so a resumed or re-sharded run writes the same
images. Each item is one line in ``manifest.rank<R>.jsonl``, written before its file, plus the file
(written to a temporary and renamed); when all ranks are done, rank 0 merges every shard into
``manifest.jsonl`` (items of earlier runs kept), so an interrupted run resumes by skipping what is
already written. Because the record comes first, every file meddiff puts in the folder is recorded
before it exists: a file the folder's records do not name is someone else's and is never replaced.

Every check runs before the folder is created; the run holds the folder's lock (a second run into
the same folder is refused at once), clears temporaries a killed run left, and on Ctrl-C or SIGTERM
keeps what it finished (merged into ``manifest.jsonl``) and ends with ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from meddiff.data.manifest import Record, write_manifest
from meddiff.errors import MeddiffError, first_line
from meddiff.files import folder_lock, remove_temporaries
from meddiff.image import Image
from meddiff.io import SYNTHETIC_FORMATS as FORMATS
from meddiff.io import save_image
from meddiff.io.dicom_seg import write_seg
from meddiff.io.dicom_write import write_synthetic_dicom
from meddiff.model import DiffusionModel
from meddiff.pipelines.controlnet import check_label_args
from meddiff.pipelines.generate import check_counts, check_sample_args
from meddiff.pipelines.spec import SamplingSpec
from meddiff.training.predict import GenerationModule

MANIFEST = "manifest.jsonl"
MAX_ITEMS = 1_000_000  # items are named sample_000000 .. sample_999999: a larger set goes into several folders


def sample_name(index: int, fmt: str, ndim: int) -> str:
    """File (or, for a 3D DICOM series, folder) name of item ``index``."""
    return f"sample_{index:06d}" + ("" if fmt == "dcm" and ndim == 3 else f".{fmt}")


def labels_name(index: int) -> str:
    """The DICOM SEG of the label map item ``index`` follows (``--format dcm`` with ``--condition``)."""
    return f"sample_{index:06d}_labels.dcm"


def description(provenance: dict, index: int) -> str:
    """What a generated DICOM says about itself (DerivationDescription): model and seed."""
    return f"synthetic image from meddiff model {provenance['weights_sha256'][:16]}, seed {provenance['seed'] + index}"


class ShardWriter(BasePredictionWriter):
    """Writes each image as it is made and appends its record to this rank's shard."""

    def __init__(self, out_dir: Path, fmt: str, provenance: dict):
        super().__init__(write_interval="batch")
        self.out_dir, self.fmt, self.provenance = out_dir, fmt, provenance

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        shard = self.out_dir / f"manifest.rank{trainer.global_rank}.jsonl"
        with open(shard, "a+b") as fh:  # a line cut short by an interruption must not swallow the next record
            if fh.seek(0, os.SEEK_END) > 0:
                fh.seek(-1, os.SEEK_END)  # read only the last byte, not the whole shard
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
        with open(shard, "a", encoding="utf-8") as fh:
            for index, image, prompt in prediction:
                name = sample_name(index, self.fmt, image.array.ndim)
                record = Record(
                    image=name,
                    modality=image.modality or "OT",
                    spacing=[round(s, 6) for s in image.spacing],
                    source="meddiff generate",
                    report=prompt,
                    synthetic=True,
                    provenance={**self.provenance, "seed": self.provenance["seed"] + index, "index": index},
                )
                # the record first: a file appears only once the folder's records claim it (a record
                # without its file is simply made again on resume)
                fh.write(record.model_dump_json(exclude_defaults=True) + "\n")
                fh.flush()
                if self.fmt == "dcm":
                    write_synthetic_dicom(
                        image, self.out_dir / name, description(self.provenance, index), overwrite=True
                    )
                    if getattr(pl_module, "labels", None) is not None:  # the label map it follows, as a SEG of it
                        write_seg(pl_module.labels, self.out_dir / name, self.out_dir / labels_name(index),
                                  names=pl_module.model.config.controlnet.structures, overwrite=True)
                else:
                    save_image(image, self.out_dir / name, overwrite=True)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            merge_shards(self.out_dir)


def run_identity(provenance: dict) -> dict:
    """What makes two records items of one run: the weights (and adapter), the file format, the first seed and the
    sampling spec."""
    keys = ("weights_sha256", "adapter_sha256", "adapter_scale", "format", "condition_sha256",
            *SamplingSpec.model_fields)
    return {**{k: provenance.get(k) for k in keys}, "seed": provenance["seed"] - provenance.get("index", 0)}


def _record_lines(out_dir: Path) -> list[tuple[Path, int, Record | None]]:
    """Every line of the folder's manifest and shards, parsed (None for a line that is not a record)."""
    lines = []
    for path in [out_dir / MANIFEST, *sorted(out_dir.glob("manifest.rank*.jsonl"))]:
        if path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    lines.append((path, number, Record.model_validate_json(line)))
                except ValueError:
                    lines.append((path, number, None))
    return lines


def check_same_run(out_dir: Path, provenance: dict, lines: list[tuple[Path, int, Record | None]]) -> None:
    """Refuse to add to a folder that holds other images or items of a different run
    (``lines``: its ``_record_lines``)."""
    if not lines and any(out_dir.glob("sample_*")):
        raise MeddiffError(f"{out_dir} holds sample files but no {MANIFEST} — choose an empty or new -o folder")
    for path, number, record in lines:
        if record is None:
            if path.name == MANIFEST:
                raise MeddiffError(f"{path} line {number} is not a meddiff record — choose another -o folder")
            continue  # a shard line cut short by an interruption
        if not record.provenance or "index" not in record.provenance:
            raise MeddiffError(f"{path} line {number} is not a meddiff-generated record — choose another -o folder")
        old, new = run_identity(record.provenance), run_identity(provenance)
        changed = [k for k in new if old[k] != new[k]]
        if changed:
            raise MeddiffError(f"{out_dir} holds images of another run (different {', '.join(changed)}) "
                               "— choose another -o folder")


def check_no_foreign_files(out_dir: Path, todo: list[int], fmt: str, ndim: int, provenance: dict,
                           lines: list[tuple[Path, int, Record | None]]) -> None:
    """Refuse to replace a file the folder's records do not claim (a user's own ``sample_000001.nii.gz``).

    meddiff records an item before writing its file, so an unclaimed file is not this run's. One
    exception keeps a resume working after a manifest lost lines: a DICOM whose own description
    says it is exactly this item of this run (same model, same seed) may be made again.
    """
    claimed = {record.image for _, _, record in lines if record is not None}
    for index in todo:
        name = sample_name(index, fmt, ndim)
        path = out_dir / name
        if name in claimed or not (path.exists() or path.is_symlink()):
            continue
        if fmt == "dcm" and _dicom_description(path) == description(provenance, index):
            continue
        raise MeddiffError(f"{path} is not recorded in {out_dir / MANIFEST}: it is not this run's, "
                           "and meddiff would replace it — move it away or choose another -o folder")


def _dicom_description(path: Path) -> str | None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    first = min(path.glob("*.dcm"), default=None) if path.is_dir() else path
    try:
        return str(pydicom.dcmread(first, stop_before_pixels=True).get("DerivationDescription")) if first else None
    except (OSError, InvalidDicomError, ValueError, TypeError):
        return None


def finished_records(out_dir: Path, lines: list[tuple[Path, int, Record | None]] | None = None) -> dict[int, Record]:
    """Records of items already written (merged manifest and leftover shards), by item index; ``lines``: the
    folder's ``_record_lines`` when already read."""
    records: dict[int, Record] = {}
    for _, _, record in _record_lines(out_dir) if lines is None else lines:
        # None: a line cut short by an interruption; no file: killed between its record and its file. Made again.
        if record is not None and record.provenance and (out_dir / record.image).exists():
            records[int(record.provenance["index"])] = record
    return records


def merge_shards(out_dir: Path) -> Path:
    """Fold the shards into ``manifest.jsonl`` (only items whose file exists) and remove them."""
    shards = list(out_dir.glob("manifest.rank*.jsonl"))
    records = finished_records(out_dir)
    path = out_dir / MANIFEST
    if records or path.exists():
        write_manifest([records[i] for i in sorted(records)], path, overwrite=True)
    for shard in shards:
        shard.unlink()
    return path


def generate_to_folder(
    model: DiffusionModel,
    model_id: str,
    spec: SamplingSpec,
    n: int,
    out_dir: str | Path,
    seed: int = 0,
    batch_size: int = 8,
    fmt: str = "nii.gz",
    accelerator: str = "auto",
    devices: int | str = 1,
    prompts: list[str] | None = None,
    labels: Image | None = None,
    condition: dict | None = None,
) -> tuple[Path, int]:
    """Make items ``0..n-1`` that are not already in ``out_dir``; returns the manifest and how many were new.

    ``prompts`` (one per item) condition a report-conditioned model; each record keeps its prompt as
    ``report``, and the model, seed, format and every field of ``spec`` in its provenance. ``labels``: the
    label map a ControlNet model follows (every item on its grid); ``condition`` (its ``condition`` file and
    ``condition_sha256``) goes into each record's provenance.
    """
    from lightning.pytorch.utilities import rank_zero_only

    # 1. every check that needs no folder, so a refused run leaves nothing behind
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MeddiffError(f"{out_dir} is a file — give -o a folder (new, or one of an earlier run to finish)")
    if fmt not in FORMATS:
        raise MeddiffError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    check_counts({"-n": n, "--batch-size": batch_size, "--seed": seed})
    if n > MAX_ITEMS:
        raise MeddiffError(f"-n {n} is more than {MAX_ITEMS} images, the most one folder holds "
                           "(sample_000000 .. sample_999999) — split the set over several -o folders "
                           "(with --seed advanced by the count of the ones before)")
    conditioned = model.config.text_encoder is not None
    if conditioned != (prompts is not None):
        raise MeddiffError(
            "this model is report-conditioned: give --prompt or --prompts"
            if conditioned
            else "this model takes no prompts"
        )
    if prompts is not None and len(prompts) != n:
        raise MeddiffError(f"{len(prompts)} prompts for {n} images: give one prompt per image")
    ndim = len(model.config.image.shape) if labels is None else labels.array.ndim
    if fmt == "png" and ndim != 2:
        raise MeddiffError("--format png holds 2D images; this run makes 3D volumes — use nii.gz or dcm")
    if labels is None:
        spec = check_sample_args(model, spec, range(seed, seed + n), prompts, None, batch_size)
    else:
        spec, _ = check_label_args(model, labels, spec, range(seed, seed + n), batch_size)
    provenance = {
        "model": model_id, "weights_sha256": model.weights_sha256, **spec.model_dump(), "seed": seed, "format": fmt,
        **(condition or {}), **(model.adapter or {}),
    }
    trainer = _trainer(accelerator, devices, ShardWriter(out_dir, fmt, provenance))
    if trainer.world_size > n:  # Lightning's distributed sampler cannot give every process an item
        raise MeddiffError(f"-n {n} is fewer images than the {trainer.world_size} processes of --devices {devices} "
                           "— ask for at least one image per device, or fewer devices")

    # 2. the folder: created, locked (by the launching process; ranks it starts share its lock), checked, cleaned
    created = [p for p in [out_dir, *out_dir.parents] if not p.exists()]
    leader = rank_zero_only.rank == 0
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with folder_lock(out_dir, "meddiff generate run") if leader else contextlib.nullcontext():
            lines = _record_lines(out_dir)  # read once for the three checks below
            check_same_run(out_dir, provenance, lines)
            finished = finished_records(out_dir, lines)
            for index, record in finished.items():
                if prompts is not None and index < n and record.report != prompts[index]:
                    raise MeddiffError(
                        f"{out_dir} holds item {index} made from another prompt — choose another -o folder"
                    )
            done = set(finished)
            check_no_foreign_files(out_dir, [i for i in range(n) if i not in done], fmt, ndim, provenance, lines)
            if leader:
                remove_temporaries(out_dir)  # left by a killed run: its items are made again
            module = GenerationModule(model, spec, seed, done, prompts, labels)
            try:
                _predict(trainer, module, DataLoader(torch.arange(n), batch_size=batch_size))
            except BaseException:
                # keep what was finished, as one manifest (no other rank still writes)
                if leader and trainer.world_size == 1:
                    with contextlib.suppress(Exception):
                        merge_shards(out_dir)
                raise
    finally:
        for folder in created:  # only folders this run made and left empty (a refused or fruitless run)
            try:
                folder.rmdir()
            except OSError:
                break
    return out_dir / MANIFEST, n - len(done & set(range(n)))


def _trainer(accelerator: str, devices: int | str, writer: ShardWriter) -> pl.Trainer:
    """A predict-only Trainer; a device request this machine cannot meet is refused here, before the folder exists."""
    try:
        return pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy="ddp" if devices not in (1, "1") else "auto",
            callbacks=[writer],
            logger=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
    except Exception as exc:  # noqa: BLE001 - Lightning raises several types for a device request it cannot meet
        raise MeddiffError(f"cannot run on --accelerator {accelerator} --devices {devices}: {first_line(exc)} "
                           "— see 'meddiff generate --help'") from None


def _predict(trainer: pl.Trainer, module: GenerationModule, loader: DataLoader) -> None:
    """``trainer.predict``, with Ctrl-C and SIGTERM ending as ``KeyboardInterrupt``.

    Lightning catches ``KeyboardInterrupt`` itself, cleans up, ignores SIGINT from then on and calls
    ``sys.exit(1)``; ``trainer.interrupted`` tells that exit from others, and SIGINT's handler is put back.
    """
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.predict(module, loader, return_predictions=False)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
