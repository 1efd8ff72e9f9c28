"""Masks and label maps as DICOM Segmentation objects (highdicom), read and written on a DICOM series' grid.

A label map becomes one binary segment per label, referencing the series it was drawn on (or generated with);
each segment's ``SegmentLabel`` is the structure's name and its ``TrackingID`` keeps the integer label
(``meddiff label N``), so reading gives back the same map. Reading any SEG gives the label map on the
segmentation's own geometry: the segment number where no meddiff label was kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meddiff import __version__
from meddiff.errors import MeddiffError
from meddiff.image import Image
from meddiff.io.itk import LPS_TO_RAS

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_TRACKING = "meddiff label "


def write_seg(labels: Image, source: str | Path, out: str | Path, names: dict[int, str] | None = None,
              overwrite: bool = False) -> Path:
    """The integer label map ``labels`` (on the grid of the DICOM ``source`` series) as one SEG file ``out``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from meddiff.io.dicom import source_slices
    from meddiff.io.dicom_write import planes_on_source_grid

    values = labels.array
    if not np.array_equal(values, np.round(values)) or values.min() < 0:
        raise MeddiffError("a SEG holds masks or label maps: whole numbers >= 0, not probabilities")
    slices = source_slices(Path(source))
    planes = np.concatenate([planes_on_source_grid(labels, header, source) for _, header in slices]).astype(np.int64)
    present = [int(v) for v in np.unique(planes) if v > 0]
    if not present:
        raise MeddiffError("the mask or label map is empty: nothing to write as SEG")
    segment_of = np.zeros(int(planes.max()) + 1, np.uint16)
    segment_of[present] = np.arange(1, len(present) + 1)
    algorithm = hd.AlgorithmIdentificationSequence(name="meddiff", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=(names or {}).get(value, f"label {value}")[:64],
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=generate_uid(), tracking_id=f"{_TRACKING}{value}")
        for number, value in enumerate(present, start=1)
    ]
    sources = [header for _, header in slices]  # highdicom takes the references and geometry from the headers
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=segment_of[planes], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(),
        series_number=2000 + int(sources[0].get("SeriesNumber") or 0), sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="meddiff", manufacturer_model_name="meddiff", software_versions=__version__,
        device_serial_number="none", series_description="meddiff labels", omit_empty_frames=False)
    from meddiff.outputs import locked_atomic_path

    with locked_atomic_path(out, overwrite) as tmp:
        seg.save_as(tmp)
    return Path(out)


def is_seg(header) -> bool:
    return str(header.get("SOPClassUID", "")) == SEG_CLASS


def read_seg(path: str | Path) -> Image:
    """A SEG file as an integer label map (float32 array, RAS affine) on the segmentation's grid."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
        volume = seg.get_volume(combine_segments=True, relabel=False, skip_overlap_checks=True)
    except Exception as exc:  # noqa: BLE001 - highdicom raises many kinds for a SEG it cannot place
        raise MeddiffError(f"cannot read the segmentation {path}: {str(exc).splitlines()[0][:200]}") from None
    numbers = np.zeros(max(seg.segment_numbers) + 1, np.float32)
    for number in seg.segment_numbers:
        tracking = str(seg.get_segment_description(number).get("TrackingID", ""))
        numbers[number] = int(tracking[len(_TRACKING):]) if tracking.startswith(_TRACKING) else number
    array = numbers[np.asarray(volume.array, dtype=np.int64)]  # (slices, rows, columns)
    affine = np.asarray(volume.affine, dtype=np.float64)  # LPS mm from (slice, row, column) indices
    # meddiff's voxel order is (column, row, slice) in RAS
    reorder = np.zeros((4, 4))
    reorder[0, 2] = reorder[1, 1] = reorder[2, 0] = reorder[3, 3] = 1.0
    ras = np.diag([*LPS_TO_RAS.diagonal(), 1.0]) @ affine @ reorder
    array = np.transpose(array, (2, 1, 0))
    if array.shape[2] == 1:
        array = array[:, :, 0]
    return Image(array, ras, modality="SEG")
