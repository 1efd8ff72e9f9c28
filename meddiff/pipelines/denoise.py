"""Denoising a magnitude MR image with a diffusion prior: noise-level matching (``diffusion.denoise``) on
tiles, the Rician floor removed where the image shows it, geometry, units and metadata of the input kept."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from meddiff.data.transforms import NormalizeIntensityd
from meddiff.diffusion.across_volumes import predict_from_other_volumes
from meddiff.diffusion.adapt import Adaptation, adapt_unet
from meddiff.diffusion.denoise import denoise_tensor
from meddiff.diffusion.noise_level import NoiseEstimate, bright_threshold, estimate_scan_noise
from meddiff.diffusion.noise_map import check_noise_map, estimate_noise_map
from meddiff.diffusion.quality import denoise_report
from meddiff.diffusion.rician import correct_rician_bias, floor_sigma
from meddiff.diffusion.tiling import tile_geometry, tiled
from meddiff.errors import MeddiffError
from meddiff.image import Image
from meddiff.model import DiffusionModel
from meddiff.pipelines.spec import DenoiseSpec, check_adapt_steps
from meddiff.pipelines.volumes import slice_axis

# a slice side below this has too few voxels for a noise estimate or a UNet's levels
MIN_DENOISE_SIDE = 8
EXPLAINED = 1.1  # --across-volumes: a fit residual within this of the noise alone means the others explain a volume


@torch.inference_mode()
def denoise(model: DiffusionModel, image: Image, spec: DenoiseSpec | None = None, mask: np.ndarray | None = None,
            batch_size: int = 8, progress: bool = True, noise_map: np.ndarray | None = None) -> Image:
    """Denoise a magnitude MR ``image`` as ``spec`` says; geometry, units and metadata of the input are kept.

    The noise sigma (image units) is estimated from the image unless the spec gives it. The model is asked to
    remove ``strength * noise_sigma``: a prior learnt from a few brains over-smooths the texture of other scans,
    and a strength below 1 (the model's ``denoise_strength``, chosen on held-out validation data) undoes that.
    ``mask`` (the image's shape): only voxels inside it change.

    The network only ever sees tiles of the spec's ``tile`` (default: the model's ``denoise_tile``, else its
    training shape), ``batch_size`` tiles per call, overlapping by a quarter and blended with Gaussian
    weights (MONAI sliding-window inference): memory stays flat in the image size and time grows
    with the number of pixels, whatever the image. A 2D model runs slice by slice across a
    singleton axis (a 2D image stored as a volume) or else the thickest voxel axis; a 3D model
    tiles the volume. 4D images are denoised volume by volume. ``progress``: a progress bar
    (tiles) when denoising takes more than a moment. ``rician_correction``: remove the Rician noise
    floor of magnitude MR from the result (``meddiff.diffusion.rician``; noncentral chi for the spec's ``coils``):
    with the given sigma, or with an estimated one only where the image's background and bright tissue agree on it
    (``floor_sigma``).

    Noise that varies across the image: ``noise_map`` (the noise sigma per voxel, image units, the image's shape or
    one volume's for 4D) or the spec's ``local_noise`` (a map estimated from the image:
    ``diffusion.noise_map``). Each tile is then matched to its own noise, the mean of the map over the tile, and the
    floor is removed with the map. A 4D series with the spec's ``across_volumes``: each volume is predicted from the
    others first (``denoise_across_volumes``).
    """
    check_denoiser(model)
    spec = (spec or DenoiseSpec()).checked(model.config)
    check_image(image)
    if mask is not None and np.shape(mask) not in (image.array.shape, image.array.shape[:3]):
        raise MeddiffError(f"the mask has shape {np.shape(mask)}, the image {image.array.shape}")
    if spec.across_volumes:
        return denoise_across_volumes(model, image, spec, mask, batch_size, progress, noise_map)
    if image.array.ndim == 4:
        volumes = [
            denoise(model, Image(image.array[..., v], image.affine, image.modality), spec,
                    None if mask is None else (mask if np.ndim(mask) == 3 else mask[..., v]), batch_size,
                    progress, None if noise_map is None or np.ndim(noise_map) == 3 else noise_map[..., v]).array
            for v in range(image.array.shape[3])
        ]
        return Image(np.stack(volumes, axis=-1), image.affine, image.modality, dict(image.meta))
    axis = slice_axis(image)
    plane = [n for a, n in enumerate(image.array.shape) if a != axis]
    if min(plane) < MIN_DENOISE_SIDE:
        raise MeddiffError(f"the image is too small to denoise: {' x '.join(map(str, image.array.shape))} voxels "
                           f"(each side of a slice needs at least {MIN_DENOISE_SIDE})")
    noise = estimate_scan_noise(image.array, coils=spec.coils) if spec.noise_sigma is None else None
    sigma = check_sigma(float(spec.noise_sigma) if noise is None else noise.sigma)
    local = local_noise(image, spec, noise_map, noise)
    y, low, high = model_units(image.array, model.device)
    sigma_n = 2.0 * spec.strength * sigma / (high - low)
    sigma_map = (None if local is None
                 else torch.tensor(local, device=model.device).mul_(2.0 * spec.strength / (high - low)))

    def run(x: torch.Tensor) -> torch.Tensor:
        # with a noise map the tiles carry it as a second channel: each tile is matched to its own mean noise
        tile_sigma = sigma_n if x.shape[1] == 1 else x[:, 1:].flatten(1).mean(1)
        return denoise_tensor(model.unet, model.schedule, x[:, :1], tile_sigma, spec.steps, spec.samples,
                              spec.seed, model.config.max_train_timestep)

    tiles = Tiles(model, spec.tile, batch_size, progress)
    if model.config.unet.spatial_dims == 3:
        if y.ndim != 3:
            raise MeddiffError(f"this 3D model denoises volumes; the image has shape {tuple(y.shape)}")
        out = tiles.volume(y, run, sigma_map)
    elif y.ndim == 2:
        out = tiles.planes(y[None], run, None if sigma_map is None else sigma_map[None])[0]
    else:
        out = torch.movedim(tiles.planes(torch.movedim(y, axis, 0), run,
                                         None if sigma_map is None else torch.movedim(sigma_map, axis, 0)), 0, axis)
    del y, sigma_map
    array = out.float().cpu().add_(1.0).mul_((high - low) / 2.0).add_(low).numpy()  # from_model_range, in place
    floor = sigma if noise is None else floor_sigma(noise, spec.coils)
    if local is not None and (noise_map is not None or floor is not None):  # a given map is trusted as a given sigma
        floor = local
    array = correct_rician_bias(array, floor, image, spec.rician_correction, spec.coils)
    if mask is not None:
        array = np.where(np.asarray(mask, dtype=bool), array, image.array).astype(np.float32)
    return Image(array, image.affine, image.modality, dict(image.meta))


def denoise_across_volumes(model: DiffusionModel, image: Image, spec: DenoiseSpec, mask: np.ndarray | None,
                           batch_size: int, progress: bool, noise_map: np.ndarray | None) -> Image:
    """A 4D series denoised volume by volume with the other volumes as context (``diffusion.across_volumes``):
    each volume's prediction from the others, whose noise is the volume's sigma times the weights' norm, is
    denoised at that noise; a volume whose fit leaves more than ``EXPLAINED`` times the noise it should is denoised
    alone. The floor is removed with the volume's own sigma, as ``denoise`` removes it."""
    if noise_map is not None or spec.local_noise:
        raise MeddiffError("--across-volumes takes one noise sigma per volume: leave out --noise-map")
    prediction, gain, residual = predict_from_other_volumes(image.array, spec.seed)
    inner = spec.model_copy(update={"across_volumes": False, "rician_correction": False})
    volumes = []
    for v in range(image.array.shape[3]):
        volume = Image(image.array[..., v], image.affine, image.modality)
        noise = estimate_scan_noise(volume.array, coils=spec.coils) if spec.noise_sigma is None else None
        sigma = float(spec.noise_sigma) if noise is None else noise.sigma
        if residual[v] <= EXPLAINED * sigma * np.hypot(1.0, gain[v]):  # the others explain its signal
            out = denoise(model, Image(prediction[..., v], image.affine, image.modality),
                          inner.model_copy(update={"noise_sigma": max(sigma * float(gain[v]), 1e-12)}), None,
                          batch_size, progress).array
        else:  # not predictable from the others: the volume alone, as without --across-volumes
            out = denoise(model, volume, inner.model_copy(update={"noise_sigma": sigma}), None, batch_size,
                          progress).array
        floor = sigma if noise is None else floor_sigma(noise, spec.coils)
        out = correct_rician_bias(out, floor, volume, spec.rician_correction, spec.coils)
        if mask is not None:
            out = np.where(np.asarray(mask if np.ndim(mask) == 3 else mask[..., v], dtype=bool), out, volume.array)
        volumes.append(np.asarray(out, dtype=np.float32))
    return Image(np.stack(volumes, axis=-1), image.affine, image.modality, dict(image.meta))


def local_noise(image: Image, spec: DenoiseSpec, noise_map: np.ndarray | None,
                scan: NoiseEstimate | None = None) -> np.ndarray | None:
    """The noise map to denoise ``image`` with: the given one (checked), one estimated (the spec's ``local_noise``;
    from ``scan``, the image's own noise estimate, where the caller has it), or None for one sigma."""
    if noise_map is None and not spec.local_noise:
        return None
    if spec.steps > 1:
        raise MeddiffError("a noise map works with --steps 1 (the posterior-mean estimate): leave out --steps")
    if noise_map is not None:
        if spec.noise_sigma is not None:
            raise MeddiffError("give --noise-sigma or --noise-map, not both")
        return check_noise_map(noise_map, image.array.shape)
    return estimate_noise_map(image.array, spec.coils, scan=scan)


def check_image(image: Image) -> None:
    """One line when ``image`` cannot be denoised: NaN or infinite values, or no contrast at all."""
    image.check_finite()
    if np.ptp(image.array) == 0:
        raise MeddiffError("the image is constant (for example all zero): there is nothing to denoise")


def check_sigma(sigma: float) -> float:
    """``sigma``, or one line when there is no noise to remove."""
    if not sigma > 0:
        raise MeddiffError("no noise found in the image (estimated sigma 0): nothing to denoise, or give --noise-sigma")
    return sigma


def check_denoiser(model: DiffusionModel) -> None:
    """One line when ``model`` cannot denoise: a latent model, or one outside the DDPM family."""
    if model.config.autoencoder is not None:
        raise MeddiffError("this is a latent model: it generates images but cannot denoise them — use a pixel-space "
                           "model such as mri-denoise")
    if model.schedule.kind != "ddpm":
        raise MeddiffError(f"denoising matches the scan's noise to a DDPM timestep; this is a {model.schedule.kind} "
                           "model — use a DDPM-family model such as mri-denoise")


def model_units(array: np.ndarray, device: torch.device) -> tuple[torch.Tensor, float, float]:
    """``array`` in the model's [-1, 1] units as one float32 tensor, with the intensity range that maps there."""
    low, high = NormalizeIntensityd("image").intensity_range(torch.from_numpy(array), "MR")
    # to_model_range in place on one float32 copy: a long volume is not copied once per operator
    y = torch.tensor(array, dtype=torch.float32, device=device).sub_(low).mul_(2.0 / (high - low)).sub_(1.0)
    return y, low, high


def adapt(model: DiffusionModel, image: Image, spec: DenoiseSpec | None = None,
          steps: int = DenoiseSpec.ADAPT_STEPS) -> tuple[DiffusionModel, Adaptation]:
    """``model`` with its UNet adapted to ``image`` by ``steps`` of Recorrupted-to-Recorrupted fine-tuning
    (``diffusion.adapt``), or ``model`` itself when that does not lower the loss on held-out planes or tiles of the
    scan at the spec's strength; and what adapting did. The noise the network is adapted at: the spec's sigma, else
    the scan's tissue sigma (``adaptation_sigma``). A 4D image adapts on its first volume. Then, where it was kept,
    ``denoise(adapted, image, spec with noise_sigma=adaptation.sigma)``: the network was adapted at that noise."""
    check_denoiser(model)
    spec = (spec or DenoiseSpec()).checked(model.config)
    if model.config.unet.spatial_dims != 2:
        raise MeddiffError("--adapt works with 2D denoising models (a 3D model would train on 3D patches: not built)")
    check_adapt_steps(steps)
    volume = Image(image.array[..., 0] if image.array.ndim == 4 else image.array, image.affine, image.modality)
    check_image(volume)
    sigma = check_sigma(float(spec.noise_sigma) if spec.noise_sigma is not None
                        else adaptation_sigma(volume.array, spec.coils))
    planes = volume.array[None] if volume.array.ndim == 2 else np.moveaxis(volume.array, slice_axis(volume), 0)
    bright = ndimage.uniform_filter(planes, size=(1, 3, 3), mode="reflect") >= bright_threshold(spec.coils) * sigma
    y, low, high = model_units(np.ascontiguousarray(planes), model.device)
    unet, adaptation = adapt_unet(model.unet, model.schedule, y, 2.0 * sigma / (high - low),
                                  torch.from_numpy(bright).to(model.device), spec.strength, steps,
                                  model.config.unet.size_multiple, spec.seed)
    adapted = DiffusionModel(model.config, {**model.networks, "unet": unet})
    adapted.weights_sha256 = model.weights_sha256
    return adapted, dataclasses.replace(adaptation, sigma=sigma)


def spec_after(adaptation: Adaptation, spec: DenoiseSpec, noise_map: np.ndarray | None = None) -> DenoiseSpec:
    """The spec to denoise with after ``adapt``: at the sigma the network adapted at, where the adaptation was kept
    and ``spec`` would have estimated one sigma for the whole image (a given sigma or a noise map stays)."""
    if not adaptation.kept or spec.noise_sigma is not None or spec.local_noise or noise_map is not None:
        return spec
    return spec.model_copy(update={"noise_sigma": adaptation.sigma})


def adaptation_sigma(array: np.ndarray, coils: int = 1) -> float:
    """The noise to recorrupt with: the Gaussian sigma of bright tissue where the scan has it. R2R's pairs are
    unbiased only at the true sigma, and its loss counts the bright voxels this sigma is measured on; the
    background's Rayleigh sigma takes dark tissue for air in a crop (measured 1.3-1.7 times the added noise on a
    shoulder crop, where adapting with it lost 1-4 dB and with the tissue's gained 0.3-0.4 dB)."""
    noise = estimate_scan_noise(array, coils=coils)
    return noise.sigma if noise.tissue is None else noise.tissue


def report(model: DiffusionModel, image: Image, denoised: Image, spec: DenoiseSpec | None = None,
           mask: np.ndarray | None = None) -> dict:
    """The no-reference quality report (``diffusion.quality.denoise_report``) of ``denoised``, which
    ``denoise(model, image, spec, mask)`` returned: with the spec's noise sigma and strength (the model's own
    filled in), in the planes a 2D model denoised."""
    spec = (spec or DenoiseSpec()).checked(model.config)
    volume = image if image.array.ndim < 4 else Image(image.array[..., 0], image.affine, image.modality)
    return denoise_report(image.array, denoised.array, spec.noise_sigma, spec.strength, slice_axis(volume), mask,
                          spec.coils)


class Tiles:
    """Denoising on tiles of the spec's ``tile``, with one progress bar."""

    def __init__(self, model: DiffusionModel, tile: tuple[int, ...], batch_size: int, progress: bool):
        self.tile = list(tile)
        self.multiple = model.config.unet.size_multiple
        self.batch_size, self.progress = batch_size, progress

    def count(self, spatial) -> int:
        return tile_geometry(spatial, self.tile, self.multiple)[2]

    def volume(self, y: torch.Tensor, run, sigma_map: torch.Tensor | None = None) -> torch.Tensor:
        """A 3D model over one (D, H, W) volume (with a noise map of its shape: a second channel)."""
        x = y[None, None] if sigma_map is None else torch.stack([y, sigma_map])[None]
        with tqdm(total=self.count(y.shape), desc="denoise", unit="tile", delay=2.0, disable=not self.progress) as bar:
            return tiled(run, x, self.tile, self.multiple, self.batch_size, bar.update)[0, 0]

    def planes(self, planes: torch.Tensor, run, sigma_map: torch.Tensor | None = None) -> torch.Tensor:
        """A 2D model over (N, H, W) planes (with a noise map of their shape: a second channel); as many planes per
        call as ``batch_size`` tiles hold, written into one output tensor, so memory does not grow with the number
        of planes."""
        count = self.count(planes.shape[1:])
        per_call = max(1, self.batch_size // count)
        out = torch.empty(planes.shape, dtype=torch.float32, device=planes.device)
        with tqdm(total=count * planes.shape[0], desc="denoise", unit="tile", delay=2.0,
                  disable=not self.progress) as bar:
            for start in range(0, planes.shape[0], per_call):
                stop = min(start + per_call, planes.shape[0])
                x = (planes[start:stop, None] if sigma_map is None
                     else torch.stack([planes[start:stop], sigma_map[start:stop]], dim=1))
                out[start:stop] = tiled(run, x, self.tile, self.multiple, self.batch_size, bar.update)[:, 0]
        return out
