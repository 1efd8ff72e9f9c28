"""Through-plane super-resolution of thick-slice volumes: ``upsample``.

The output grid keeps the input's in-plane grid and puts slices every ``spacing`` mm (or ``factor`` times as many)
from the first acquired slice to the last along the slice axis (the thickest voxel side); its affine is the input's
with that axis's step scaled, so every new slice's position is exact, and an acquired slice the grid contains keeps
the input's values bit for bit. The methods:

- ``cubic``: a cubic spline through the slices along the slice axis (``meddiff.data.thick.through_plane``).
- ``self``: SMORE-style (``meddiff.training.smore``): a small network trained for a few CPU minutes on the scan's
  own in-plane planes, made thick as the slices are, then applied to the planes that cross the slices.
- ``model``: a conditional diffusion model (``task`` "upsample", trained by ``meddiff fit`` with
  ``meddiff.data.thick.RandThickSlicesd``) that samples the residual over the cubic interpolation, on the planes
  that cross the slices (in square voxels of the new slice spacing); 1 step is its estimate of the posterior mean.
- ``auto``: each learned method and cubic restore held-out in-plane planes, resampled to the voxel size of the
  planes crossing the slices and made thick the same way (the scan's own resolution, hidden and measured; a CT's
  padding left out); the best is used, and the report says which and by how much.

Every learned method adds a residual to the cubic interpolation on the output grid: the two families of planes that
contain the slice axis each give one, and their mean is added. Planes go to the networks in batches (and a plane
larger than a diffusion model's training shape in tiles), so memory is the volume and one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import scipy.ndimage
import torch
from pydantic import BaseModel, ConfigDict, model_validator
from tqdm.auto import tqdm

from meddiff.data.thick import slab_average, through_plane
from meddiff.data.transforms import CT_MODALITIES, NormalizeIntensityd, from_model_range, to_model_range
from meddiff.diffusion.sampling import concatenated, sample_loop
from meddiff.diffusion.tiling import pad_to, tiled_function
from meddiff.errors import MeddiffError
from meddiff.image import Image
from meddiff.model import DiffusionModel
from meddiff.pipelines.generate import CT_RANGE, initial_noise, model_function
from meddiff.pipelines.spec import SamplingSpec, spec_from
from meddiff.pipelines.volumes import MODALITY_FAMILIES, slice_axis

DEFAULT_MODELS = {"MR": "mri-upsample", "CT": "ct-upsample"}  # the bundled model of each modality
CT_WINDOW = (-1000.0, 1000.0)
HELD_OUT = np.s_[2::4]  # the acquired slices auto's check holds out of self's training and scores methods on
IN_PLANE_TOLERANCE = 0.01  # in-plane voxel sides further apart than 1 % are anisotropic: refused
Restorer = Callable[[np.ndarray, tuple[float, float]], np.ndarray]


class UpsampleSpec(BaseModel):
    """How to upsample, as one frozen object (it travels from the CLI into the output's provenance).

    ``spacing`` (mm) or ``factor`` sets the new slice spacing (neither: the in-plane voxel size, isotropic voxels);
    ``thickness`` (mm): the acquired slices' thickness (None: the scan's SliceThickness, else its slice spacing);
    ``steps`` and ``seed``: the diffusion model's sampling; ``self_steps``: the per-scan network's training steps.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    spacing: float | None = None
    factor: float | None = None
    method: Literal["auto", "model", "self", "cubic"] = "auto"
    thickness: float | None = None
    steps: int = 1
    seed: int = 0
    self_steps: int = 1000

    MAX_FACTOR: ClassVar[float] = 16.0  # beyond 16 slices per acquired one nothing is left to learn from
    MAX_STEPS: ClassVar[int] = 1000
    MAX_SELF_STEPS: ClassVar[int] = 100_000

    @model_validator(mode="after")
    def _in_range(self) -> UpsampleSpec:
        if self.spacing is not None and self.factor is not None:
            raise MeddiffError("give --spacing or --factor, not both")
        if self.factor is not None and not (math.isfinite(self.factor) and 1.0 < self.factor <= self.MAX_FACTOR):
            raise MeddiffError(f"--factor must be a number above 1 and at most {self.MAX_FACTOR:g} (new slices per "
                               f"acquired slice), not {self.factor:g}")
        for name, value in (("--spacing", self.spacing), ("--thickness", self.thickness)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise MeddiffError(f"{name} must be a positive number of mm, not {value:g}")
        if not 1 <= self.steps <= self.MAX_STEPS or not 1 <= self.self_steps <= self.MAX_SELF_STEPS:
            raise MeddiffError(f"--steps must be 1 to {self.MAX_STEPS} and --self-steps 1 to {self.MAX_SELF_STEPS}, "
                               f"not {self.steps} and {self.self_steps}")
        if not 0 <= self.seed < 2**32:
            raise MeddiffError(f"--seed must be a whole number from 0 to {2**32 - 1}, not {self.seed}")
        return self


@dataclass(frozen=True)
class Grid:
    """Where the output's slices lie: ``axis`` of the input, the input's slice spacing and in-plane voxel size (mm),
    the output's slice spacing, the input slices' positions in output voxels, the output's slice count and affine."""

    axis: int
    slice_spacing: float
    in_plane: float
    spacing: float
    positions: np.ndarray
    size: int
    affine: np.ndarray

    @property
    def factor(self) -> float:
        return self.slice_spacing / self.spacing


@dataclass
class UpsampleReport:
    """What ``upsample`` did: the method used and, for ``auto``, the check's PSNR (dB) of each method on the scan's
    held-out in-plane planes."""

    method: str
    factor: float
    spacing: float
    thickness: float
    check_psnr: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        text = (f"{self.method}: {self.factor:.3g}x through-plane, slices every {self.spacing:.4g} mm "
                f"(acquired {self.thickness:.4g} mm thick)")
        if self.check_psnr:
            scores = ", ".join(f"{name} {value:.2f} dB" for name, value in self.check_psnr.items())
            text += f"; chosen on held-out in-plane planes: {scores}"
        return text


def default_model(modality: str | None) -> str | None:
    """The bundled upsampling model of the image's modality family, or None where there is none."""
    return DEFAULT_MODELS.get(MODALITY_FAMILIES.get((modality or "").upper(), ""))


def output_grid(image: Image, spec: UpsampleSpec) -> Grid:
    """The output's grid, or one clear line why this volume cannot be upsampled so."""
    shape = image.array.shape
    if len(shape) != 3 or 1 in shape:
        raise MeddiffError(f"upsample adds slices to a 3D volume; this image has shape {shape} — give a volume of "
                           "thick slices (NIfTI, MHA or a DICOM series)")
    axis = slice_axis(image)
    spacing = image.spacing
    in_plane = [spacing[a] for a in range(3) if a != axis]
    if abs(in_plane[0] - in_plane[1]) > IN_PLANE_TOLERANCE * max(in_plane):
        raise MeddiffError(f"the in-plane voxels are anisotropic ({in_plane[0]:.4g} x {in_plane[1]:.4g} mm): "
                           "upsample learns from in-plane detail and needs square in-plane voxels — resample the "
                           "slices to square voxels first")
    slice_spacing, pixel = float(spacing[axis]), float(np.mean(in_plane))
    target = spec.spacing or (slice_spacing / spec.factor if spec.factor else pixel)
    factor = slice_spacing / target
    if factor <= 1.0 + 1e-6:
        raise MeddiffError(f"the new slice spacing {target:.4g} mm is not finer than the acquired {slice_spacing:.4g} "
                           "mm: give a smaller --spacing or a --factor above 1")
    if factor > UpsampleSpec.MAX_FACTOR + 1e-6:
        raise MeddiffError(f"{factor:.3g} new slices per acquired slice is beyond {UpsampleSpec.MAX_FACTOR:g}: "
                           f"give --spacing of at least {slice_spacing / UpsampleSpec.MAX_FACTOR:.3g} mm")
    count = shape[axis]
    size = int(math.floor((count - 1) * factor + 1e-6)) + 1
    affine = image.affine.copy()
    affine[:3, axis] *= target / slice_spacing
    return Grid(axis, slice_spacing, pixel, target, np.arange(count) * factor, size, affine)


def _window(image: Image, model: DiffusionModel | None) -> tuple[float, float]:
    """Physical values mapped to -1 and +1: a CT window (the model's, else -1000..1000 HU), else meddiff's MR
    normalisation of the scan's own percentiles (what the training transforms did)."""
    if (image.modality or "").upper() in CT_MODALITIES or (model and (model.config.image.modality or "") == "CT"):
        return tuple(model.config.image.intensity_range) if model else CT_WINDOW
    return NormalizeIntensityd("image").intensity_range(torch.as_tensor(image.array), image.modality or "MR")


def upsample(image: Image, spec: UpsampleSpec | None = None, model: DiffusionModel | None = None,
             batch_size: int = 8, progress: bool = True, **fields) -> tuple[Image, UpsampleReport]:
    """``image`` with new slices between its own (see the module docstring), and what was done. Options are an
    ``UpsampleSpec`` or its fields as keywords: ``upsample(volume, factor=4, method="self")``."""
    spec = spec or spec_from(UpsampleSpec, **fields)
    image.check_finite()
    grid = output_grid(image, spec)
    if spec.method == "model" and model is None:
        raise MeddiffError("--method model needs a model: give --model NAME|DIR (no bundled upsampling model for "
                           f"modality {image.modality or 'unknown'})")
    if model is not None:
        check_upsampling_model(model)
    thickness = spec.thickness or _slice_thickness(image) or grid.slice_spacing
    low, high = _window(image, model)
    thick = np.moveaxis(to_model_range(image.array.astype(np.float32), low, high), grid.axis, -1)
    cubic = through_plane(thick, 2, grid.positions, grid.size)
    report = UpsampleReport(spec.method, grid.factor, grid.spacing, thickness)
    restorers = {}
    if spec.method in ("self", "auto"):
        planes = np.moveaxis(thick, -1, 0)
        held_out = planes[HELD_OUT] if spec.method == "auto" and len(planes) >= 4 else planes[:0]
        trained_on = np.delete(planes, HELD_OUT, axis=0) if len(held_out) else planes
        restorers["self"] = _self_restorer(trained_on, grid, thickness, spec, progress)
    if spec.method in ("model", "auto") and model is not None:
        restorers["model"] = _model_restorer(model, spec, batch_size)
    if spec.method == "auto":  # under 4 slices nothing can be held out: the classical answer
        valid = _not_padding(np.moveaxis(image.array, grid.axis, 0)[HELD_OUT], image.modality)
        report.check_psnr = _check(restorers, held_out, valid, grid, thickness) if len(held_out) else {}
        report.method = max(report.check_psnr, key=report.check_psnr.get) if len(held_out) else "cubic"
    result = cubic
    if report.method != "cubic":
        result = cubic + _volume_residual(restorers[report.method], cubic, grid, batch_size, progress)
    physical = from_model_range(result, low, high)
    if (image.modality or "").upper() in CT_MODALITIES:
        physical = np.clip(physical, *CT_RANGE)
    if np.array_equal(image.array, np.round(image.array)):  # integers stay integers (DICOM stores them exactly)
        physical = np.round(physical)
    physical = physical.astype(np.float32)
    source = np.moveaxis(image.array, grid.axis, -1)
    for j, position in enumerate(grid.positions):  # acquired slices the grid contains: the input's own values
        if abs(position - round(position)) < 1e-6:
            physical[..., int(round(position))] = source[..., j]
    meta = {k: v for k, v in image.meta.items() if k != "SliceThickness"}  # it no longer describes the slices
    return Image(np.moveaxis(physical, -1, grid.axis), grid.affine, image.modality, meta), report


def check_upsampling_model(model: DiffusionModel) -> None:
    """Refuse a model that is not a 2D super-resolution model (``task`` "upsample")."""
    if model.config.task != "upsample":
        raise MeddiffError(f"this model's task is {model.config.task}, not upsample: give a super-resolution model "
                           "(task upsample, e.g. mri-upsample or ct-upsample), or use --method self or cubic")


def _slice_thickness(image: Image) -> float | None:
    try:
        value = float(image.meta.get("SliceThickness") or 0)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _self_restorer(planes: np.ndarray, grid: Grid, thickness: float, spec: UpsampleSpec, progress: bool) -> Restorer:
    """The per-scan network trained on ``planes`` (the in-plane planes, N x H x W), as a restorer of planes whose
    last axis crosses the slices. It works in voxels, on planes as they come: trained to undo slices
    ``grid.factor`` voxels apart (and ``thickness / grid.spacing`` thick), which the planes crossing the slices have
    in voxels of the output grid (SMORE's assumption that detail looks alike at the in-plane and the new
    through-plane voxel size; exact for the default, isotropic output)."""
    from meddiff.training import smore

    with tqdm(total=spec.self_steps, desc="upsample: training on the scan", unit="step", delay=2.0,
              disable=not progress) as bar:
        net = smore.train(planes, grid.factor, thickness / grid.spacing, spec.self_steps, spec.seed,
                          on_step=bar.update)
    return lambda blurred, spacing: smore.residual(net, blurred.astype(np.float32))


def _model_restorer(model: DiffusionModel, spec: UpsampleSpec, batch_size: int) -> Restorer:
    """The diffusion model as a restorer: the residual sampled for each plane, conditioned on it (plane ``i`` of a
    call uses seed ``spec.seed + i``). It works in voxels as the per-scan network does: a plane's first axis is
    resized to square voxels of the second's (the new slice spacing), the residual resized back."""
    config = model.config
    sampling = SamplingSpec(scheduler="ddim", steps=spec.steps).checked(config)
    multiple = config.unet.size_multiple

    def residual(blurred: torch.Tensor) -> torch.Tensor:
        padded = [-(-n // multiple) * multiple for n in blurred.shape[2:]]
        out = torch.empty_like(blurred)
        for start in range(0, len(blurred), batch_size):
            condition = pad_to(blurred[start:start + batch_size], padded).to(model.device)
            function = model_function(model, sampling, 1)
            if any(p > t for p, t in zip(padded, config.image.shape, strict=True)):
                function = tiled_function(function, config.image.shape, multiple, batch_size)
            sampler = model.schedule.scheduler(sampling.scheduler)
            sampler.register_to_config(timestep_spacing="trailing")  # 1 step: the posterior-mean estimate
            sampler.set_timesteps(sampling.steps)
            noise, generators = initial_noise(model, [spec.seed + start + i for i in range(len(condition))], padded)
            x = sample_loop(concatenated(function, condition), noise, sampler, generator=generators)
            out[start:start + batch_size] = x[:, :, :blurred.shape[2], :blurred.shape[3]].float().cpu()
        return out

    @torch.inference_mode()
    def restore(blurred: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
        x = torch.from_numpy(blurred.astype(np.float32))[:, None]
        rows = max(1, round(x.shape[2] * spacing[0] / spacing[1]))
        if rows == x.shape[2]:
            return residual(x)[:, 0].numpy()
        square = torch.nn.functional.interpolate(x, size=(rows, x.shape[3]), mode="bilinear", align_corners=False,
                                                 antialias=True)
        back = torch.nn.functional.interpolate(residual(square), size=x.shape[2:], mode="bilinear",
                                               align_corners=False)
        return back[:, 0].numpy()

    return restore


def _volume_residual(restore: Restorer, cubic: np.ndarray, grid: Grid, batch_size: int, progress: bool) -> np.ndarray:
    """The mean of the residuals of the two families of planes that contain the slice axis (``cubic`` is
    (A, B, N), the slice axis last)."""
    total = np.zeros_like(cubic)
    spacing = (grid.in_plane, grid.spacing)
    chunk = max(batch_size, 1)
    with tqdm(total=cubic.shape[0] + cubic.shape[1], desc="upsample", unit="plane", delay=2.0,
              disable=not progress) as bar:
        for family in (0, 1):
            planes = cubic if family == 0 else cubic.transpose(1, 0, 2)
            target = total if family == 0 else total.transpose(1, 0, 2)  # a view: writes land in ``total``
            for start in range(0, len(planes), chunk):
                target[start:start + chunk] += restore(planes[start:start + chunk], spacing)
                bar.update(min(chunk, len(planes) - start))
    return total / 2


def _not_padding(planes: np.ndarray, modality: str | None) -> np.ndarray:
    """Where ``planes`` hold the scan rather than a CT scanner's padding outside its field of view (values below
    -1024 HU, which no tissue has and which the output clips away); everything for other modalities."""
    if (modality or "").upper() in CT_MODALITIES:
        return planes >= CT_RANGE[0]
    return np.ones(planes.shape, bool)


def _as_crossing_planes(planes: np.ndarray, grid: Grid) -> np.ndarray:
    """In-plane ``planes`` (N x A x B) with axis B resampled from the in-plane voxel size to the new slice spacing:
    planes like those that cross the slices in the output (A at the in-plane size, B at the new spacing)."""
    columns = max(2, round(planes.shape[2] * grid.in_plane / grid.spacing))
    if columns == planes.shape[2]:
        return planes
    x = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[:, None]
    return torch.nn.functional.interpolate(x, size=(planes.shape[1], columns), mode="bilinear", align_corners=False,
                                           antialias=True)[:, 0].numpy()


def _check(restorers: dict[str, Restorer], held_out: np.ndarray, valid: np.ndarray, grid: Grid,
           thickness: float) -> dict[str, float]:
    """PSNR (dB, over the model range of 2) of cubic and each restorer on ``held_out`` in-plane planes, on the
    voxels between the slices where ``valid`` (not padding).

    Each plane is first made a plane like those crossing the slices (one axis resampled to the new slice spacing),
    then thick along that axis as the scan's slices are (slices ``grid.factor`` voxels apart): so every method
    restores it at the voxel size, the slice distance and the thickness it meets when applied."""
    truth = _as_crossing_planes(held_out, grid)
    kept = _as_crossing_planes(scipy.ndimage.binary_erosion(valid, np.ones((1, 3, 3), bool)).astype(np.float32),
                               grid) > 0.999  # a voxel next to padding is blended with it once resampled
    spacing, width = grid.factor, thickness / grid.spacing  # in voxels, as the planes crossing the slices have them
    centres = np.arange(0.0, truth.shape[2] - 0.5, spacing)
    blurred = through_plane(slab_average(truth, 2, centres, width), 2, centres, truth.shape[2])
    between = np.ones(truth.shape[2], bool)
    between[np.round(centres).astype(int)] = False
    between[int(centres[-1]) + 1:] = False  # beyond the last slice is extrapolation, not the task
    scored = kept & between

    def psnr(restored: np.ndarray) -> float:
        error = float(np.mean((restored[scored] - truth[scored]) ** 2)) if scored.any() else 0.0
        return float(10 * np.log10(4.0 / max(error, 1e-12)))

    scores = {"cubic": psnr(blurred)}
    for name, restore in restorers.items():
        scores[name] = psnr(blurred + restore(blurred, (grid.in_plane, grid.spacing)))
    return scores
