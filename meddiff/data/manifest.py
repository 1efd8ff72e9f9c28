"""JSONL manifests: one record per image, validated with line- and field-precise errors.

Paths in a record are relative to the manifest's folder, absolute, or start with ``$MEDDIFF_DATA``
(expanded from the environment), so a manifest can travel separately from the data it describes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meddiff.errors import MeddiffError
from meddiff.files import atomic_path
from meddiff.io import load_image

SPLITS = ("train", "val", "test")
DATA_ROOT_ENV = "MEDDIFF_DATA"


class Record(BaseModel):
    """One image of a manifest (see data_manifests/README.md for the meaning of each field)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1)
    mask: str | None = None
    series: str | None = None
    modality: str = Field(min_length=1)
    split: Literal["train", "val", "test"] | None = None
    report: str | None = None
    labels: dict[str, Any] = Field(default_factory=dict)
    spacing: list[float] | None = None
    source: str | None = None
    subject: str | None = None
    synthetic: bool = False
    provenance: dict[str, Any] | None = None

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) not in (2, 3) or any(v <= 0 for v in value)):
            raise ValueError("must be 2 or 3 positive numbers (mm)")
        return value

    @field_validator("modality")
    @classmethod
    def _upper_modality(cls, value: str) -> str:
        return value.upper()


class Manifest:
    """Records read from a JSONL file, with paths resolved against the file's folder."""

    def __init__(self, records: list[Record], root: Path, lines: list[int] | None = None):
        self.records = records
        self.root = root
        self.lines = lines or list(range(1, len(records) + 1))  # file line of each record, for messages

    @classmethod
    def read(cls, path: str | os.PathLike) -> Manifest:
        path = Path(path)
        if not path.is_file():
            raise MeddiffError(f"manifest {path} does not exist")
        records, lines = [], []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    records.append(parse_record(line, number, path))
                    lines.append(number)
        if not records:
            raise MeddiffError(f"manifest {path} holds no records")
        return cls(records, path.parent.resolve(), lines)

    def resolve(self, relative: str) -> Path:
        """Absolute path of a record's ``image`` or ``mask``."""
        if relative.startswith("$"):
            if DATA_ROOT_ENV not in os.environ and relative.split("/")[0].strip("${}") == DATA_ROOT_ENV:
                raise MeddiffError(f"{relative} uses ${DATA_ROOT_ENV}, which is not set — export it to your data root")
            relative = os.path.expandvars(relative)
        path = Path(relative)
        return path if path.is_absolute() else self.root / path

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def check_files(self) -> None:
        """Every image and mask named exists; the error names the first missing one's line."""
        for number, record in zip(self.lines, self.records, strict=True):
            for key in ("image", "mask"):
                value = getattr(record, key)
                if value is not None and not self.resolve(value).exists():
                    raise MeddiffError(f"line {number}: field '{key}': file not found: {self.resolve(value)}")

    def check_splits(self, content: bool = False, shared_subjects: bool = False) -> None:
        """No split leak: an image (same file, or with ``content`` the same bytes) or a subject in two splits.

        The error names both records by line. ``content`` reads every file (a copy under another name
        is the same image); without it only the paths are compared. ``shared_subjects`` accepts one
        subject in several splits (a deliberate ``manifest build --split-by random``).
        """
        from meddiff.files import file_sha256

        seen: dict[tuple, tuple[int, Record]] = {}
        for number, record in zip(self.lines, self.records, strict=True):
            if record.split is None:
                continue
            path = self.resolve(record.image).resolve()
            keys = [("image", str(path), record.series)]
            if content and path.exists():
                keys.append(("content", file_sha256(path), record.series))
            if record.subject is not None and not shared_subjects:
                keys.append(("subject", record.subject))
            for key in keys:
                first = seen.setdefault(key, (number, record))
                line, other = first
                if other.split == record.split:
                    continue
                what = {"image": "name the same image", "content": "hold identical images",
                        "subject": f"belong to one subject ({record.subject})"}[key[0]]
                fix = ("keep each subject in one split, or pass --allow-shared-subjects if that is intended"
                       if key[0] == "subject" else "keep each image in one split")
                raise MeddiffError(f"split leak: line {line} ({other.image}, {other.split}) "
                                   f"and line {number} ({record.image}, {record.split}) {what} — {fix}")

    def check_images(self) -> None:
        """Load every image (and mask): readable, finite, and masks shaped like their images."""
        for number, record in zip(self.lines, self.records, strict=True):
            try:
                image = load_image(self.resolve(record.image), series=record.series)
                if record.mask is not None:
                    mask = load_image(self.resolve(record.mask))
                    if mask.array.shape != image.array.shape:
                        raise MeddiffError(
                            f"mask shape {mask.array.shape} differs from image shape {image.array.shape}"
                        )
            except MeddiffError as exc:
                raise MeddiffError(f"line {number} ({record.image}): {exc}") from None


def parse_record(line: str, number: int, path: Path | str = "manifest") -> Record:
    """One JSONL line -> Record, or an error naming the line and the field."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MeddiffError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise MeddiffError(f"{path} line {number}: a record must be a JSON object")
    try:
        return Record.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(record)"
        raise MeddiffError(f"{path} line {number}: field '{field}': {err['msg']}") from None


def write_manifest(records: list[Record], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write records as JSONL (unset optional fields left out), atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(record.model_dump_json(exclude_defaults=True) + "\n")
    return Path(path)
