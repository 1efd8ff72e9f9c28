"""Feature extractors for distribution metrics, by name, with the preprocessing each one expects.

ImageNet Inception features judge medical images poorly; all but ``inception_v3`` are trained on medical images:

- ``radimagenet_resnet50``: RadImageNet's ResNet-50 (1.35 M radiology images), the network MAISI uses
  for its 2.5D FID. 2D; volumes give slices along the three planes. Preprocessing: robust min-max to
  [0, 1] (0.5-99.5th percentile), resize to 224x224, grey to three channels, BGR order minus the
  channel means [0.406, 0.456, 0.485] (RadImageNet's Keras-derived convention); global average pool.
- ``medicalnet_resnet10`` / ``medicalnet_resnet50``: Tencent MedicalNet 3D ResNets (23 datasets), as
  MONAI builds them. 3D. Preprocessing: shift to a zero minimum, z-score over the non-zero voxels
  (MedicalNet's normalisation), resize to 128^3; global average pool.
- ``xrv_densenet121``: torchxrayvision's DenseNet-121 trained on eight chest X-ray datasets
  (RoentGen's evaluation network), as MONAI's DenseNet121. 2D. Preprocessing: robust min-max, then
  torchxrayvision's range [-1024, 1024], centre crop to a square, resize to 224x224; features: ReLU
  and global average pool of the last dense block (torchxrayvision's ``features2``, 1024 values).
- ``biomedclip``: BiomedCLIP's image tower (a ViT-B/16 trained with PubMedBERT on 15 M PubMed figure-caption
  pairs), through open_clip; features: its projected image embedding (512 values, not normalised). 2D,
  2.5D for volumes. Preprocessing: robust min-max to [0, 1], 8 bits, then open_clip's evaluation
  transform for the model: bicubic resize of the short side to 224, centre crop to 224x224, grey
  replicated to three channels, CLIP's mean [0.481, 0.458, 0.408] and std [0.269, 0.261, 0.276].
  Weights: a folder in open_clip's format or a pre-filled Hugging Face cache (``meddiff.encoders.openclip``).
- ``inception_v3``: the TensorFlow FID Inception-v3 (ImageNet) as torch-fidelity ports it, through
  torchmetrics' ``NoTrainInceptionV3``, the network ``torchmetrics.image.fid.FrechetInceptionDistance``
  runs, so features (2048 values, pool3) match torchmetrics' FID on the same 8-bit images. For numbers
  comparable with ImageNet-FID literature, not for medical judgement. 2D, 2.5D for volumes.
  Preprocessing: robust min-max to [0, 1], to 8 bits as torchmetrics does (``(x * 255).byte()``), grey
  to three channels; the network resizes to 299x299 itself (bilinear, antialiased: torchmetrics' default).
- ``meddiff_mri``: the bottleneck of the bundled ``mri-denoise`` UNet at a low-noise timestep,
  global average pool (128 values). 2D, MRI; ships with meddiff, so it works with no downloads.

Pretrained weights cannot be downloaded here: each loader takes a local file (``weights=``), or
finds it by name under ``$MEDDIFF_WEIGHTS`` or ``~/.cache/meddiff/weights``, and otherwise says
exactly which file to put where. Nothing in a weights file runs: files are read with torch's weights-only
unpickler (``meddiff.weights``), torchxrayvision's whole pickled release models as inert module trees
whose tensors alone are kept, and a file holding any other object is refused in one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meddiff.errors import MeddiffError
from meddiff.image import Image

PLANES = ("sagittal", "coronal", "axial")
FEATURES_VERSION = 1  # bump when preprocessing changes, so cached features are not reused


@dataclass(frozen=True)
class WeightsFile:
    file_name: str
    source: str


WEIGHTS = {
    "radimagenet_resnet50": WeightsFile("RadImageNet-ResNet50.pt",
                                        "the RadImageNet PyTorch release (BMEII-AI/RadImageNet), ResNet50.pt"),
    "medicalnet_resnet10": WeightsFile("resnet_10_23dataset.pth",
                                       "Tencent MedicalNet (Hugging Face TencentMedicalNet/MedicalNet-Resnet10)"),
    "medicalnet_resnet50": WeightsFile("resnet_50_23dataset.pth",
                                       "Tencent MedicalNet (Hugging Face TencentMedicalNet/MedicalNet-Resnet50)"),
    "inception_v3": WeightsFile(
        "weights-inception-2015-12-05-6726825d.pth",
        "torch-fidelity's v0.2.0 release (toshas/torch-fidelity; torchmetrics' FrechetInceptionDistance keeps the same "
        "file in ~/.cache/torch/hub/checkpoints/, where meddiff also looks)",
    ),
    "xrv_densenet121": WeightsFile(
        "xrv-densenet121-res224-all.pt",
        "torchxrayvision: torch.save(xrv.models.DenseNet(weights='densenet121-res224-all').state_dict(), "
        "'xrv-densenet121-res224-all.pt'), or its release file "
        "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt renamed",
    ),
}


def weights_dir() -> Path:
    return Path(os.environ.get("MEDDIFF_WEIGHTS", Path.home() / ".cache" / "meddiff" / "weights"))


def find_weights(name: str, weights: str | os.PathLike | None, also: Path | None = None) -> Path:
    """The weights file of extractor ``name``: the given path, or its file name in ``weights_dir()``
    (or in the folder ``also``, where the file's own package caches it)."""
    spec = WEIGHTS[name]
    path = Path(weights) if weights is not None else weights_dir() / spec.file_name
    if weights is None and not path.is_file() and also is not None and (also / spec.file_name).is_file():
        path = also / spec.file_name
    if not path.is_file():
        raise MeddiffError(
            f"{name} needs pretrained weights that cannot be downloaded here: get {spec.file_name} from {spec.source} "
            f"and put it at {weights_dir() / spec.file_name} (or set MEDDIFF_WEIGHTS to its folder, "
            "or pass --weights PATH)"
        )
    return path


def _state_dict(path: Path, pickled_module_from: str | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, unwrapped from ``{"state_dict": ...}`` and DataParallel's ``module.`` prefix.

    Read with torch's weights-only unpickler: nothing in the file runs (``meddiff.weights.torch_load``).
    ``pickled_module_from``: a package whose release files are whole pickled modules (torchxrayvision); such a
    file's module classes are read as inert attribute holders and only its tensors are kept, so the package
    need not even be installed.
    """
    from meddiff.weights import PickledModule, module_tensors, torch_load

    state = torch_load(path, "weights", modules_from=(f"{pickled_module_from}.",) if pickled_module_from else ())
    if isinstance(state, PickledModule):
        state = module_tensors(state)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MeddiffError(f"{path} holds no state dict (a mapping of names to tensors) "
                           "— save one with torch.save(model.state_dict(), PATH)")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


# RadImageNet's PyTorch release wraps torchvision's ResNet-50 children in nn.Sequential ("backbone.N").
_RADIMAGENET_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _radimagenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            child, _, rest = key.removeprefix("backbone.").partition(".")
            key = f"{_RADIMAGENET_CHILDREN.get(child, child)}.{rest}"
        if not key.startswith("fc."):
            renamed[key] = value
    return renamed


def _xrv_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchxrayvision/torchvision DenseNet names -> MONAI's (dense layers sit in a ``layers`` block); no classifier."""
    import re

    return {re.sub(r"(denselayer\d+)\.", r"\1.layers.", k): v for k, v in state.items()
            if not k.startswith("classifier.")}


def _load(network: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    from meddiff.weights import check_fit

    check_fit(network, state, f"{path} does not fit this network",
              "pass the extractor's own weights file (see --features)")
    network.load_state_dict(state, strict=True)
    return network.eval()


def volume_planes(array: np.ndarray, affine: np.ndarray, slices: int) -> dict[str, np.ndarray]:
    """2.5D views of a volume: ``slices`` evenly spaced slices (the ends left out) along each anatomical plane, as
    MAISI does, stacked per plane."""
    from meddiff.data.transforms import slice_axis

    views = {}
    for plane in PLANES:
        axis = slice_axis(affine, plane)
        picks = np.linspace(0, array.shape[axis] - 1, min(slices, array.shape[axis]) + 2).round().astype(int)[1:-1]
        views[plane] = np.stack([np.take(array, i, axis=axis) for i in picks])
    return views


class Extractor:
    """``features(image)`` -> {view: (n, D) array}: view '2d' for 2D images, one per plane ('sagittal',
    'coronal', 'axial') for volumes under a 2D network, '3d' for a 3D network."""

    def __init__(self, name: str, network: Callable[[torch.Tensor], torch.Tensor], spatial_dims: int, prepare,
                 weights_id: str, slices: int = 8):
        self.name, self.network, self.spatial_dims, self.prepare = name, network, spatial_dims, prepare
        self.weights_id = weights_id
        self.slices = slices

    @property
    def identity(self) -> str:
        """Extractor, weights, slices per plane and preprocessing version: the feature cache's key."""
        return f"{self.name}-{self.weights_id}-s{self.slices}-v{FEATURES_VERSION}"

    @torch.inference_mode()
    def features(self, image: Image) -> dict[str, np.ndarray]:
        array = np.asarray(image.array, dtype=np.float32).squeeze()
        if array.ndim not in (2, 3):
            raise MeddiffError(f"{self.name} takes 2D images or 3D volumes, got shape {image.array.shape}")
        if self.spatial_dims == 3:
            if array.ndim != 3:
                raise MeddiffError(f"{self.name} is a 3D network; the image is 2D")
            return {"3d": self._run(array[None])}
        if array.ndim == 2:
            return {"2d": self._run(array[None])}
        return {plane: self._run(stack) for plane, stack in volume_planes(array, image.affine, self.slices).items()}

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = self.prepare(torch.from_numpy(batch))
        return self.network(x).reshape(x.shape[0], -1).double().numpy()


def _robust_unit(x: torch.Tensor) -> torch.Tensor:
    """Each item to [0, 1] between its 0.5th and 99.5th percentiles."""
    flat = x.reshape(x.shape[0], -1)
    low, high = torch.quantile(flat, 0.005, dim=1), torch.quantile(flat, 0.995, dim=1)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return ((x - low.view(shape)) / (high - low).clamp_min(1e-6).view(shape)).clamp(0, 1)


def _radimagenet_prepare(x: torch.Tensor) -> torch.Tensor:
    x = F.interpolate(_robust_unit(x)[:, None], size=(224, 224), mode="bilinear", align_corners=False)
    mean_bgr = torch.tensor([0.406, 0.456, 0.485]).view(1, 3, 1, 1)
    return x.repeat(1, 3, 1, 1) - mean_bgr


def _medicalnet_prepare(x: torch.Tensor) -> torch.Tensor:
    x = x - x.amin(dim=(1, 2, 3), keepdim=True)
    out = []
    for volume in x:
        inside = volume[volume > 0]
        mean, std = ((inside.mean(), inside.std().clamp_min(1e-6)) if inside.numel() > 1
                     else (volume.mean(), volume.std().clamp_min(1e-6)))
        out.append((volume - mean) / std)
    return F.interpolate(torch.stack(out)[:, None], size=(128, 128, 128), mode="trilinear", align_corners=False)


def medicalnet_resnet(depth: int, spatial_dims: int, **kwargs) -> torch.nn.Module:
    from monai.networks.nets import resnet10, resnet50

    return {10: resnet10, 50: resnet50}[depth](spatial_dims=spatial_dims, feed_forward=False, **kwargs)


def _xrv_prepare(x: torch.Tensor) -> torch.Tensor:
    x = _robust_unit(x) * 2048.0 - 1024.0
    side = min(x.shape[-2:])
    top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
    x = x[:, top : top + side, left : left + side]
    return F.interpolate(x[:, None], size=(224, 224), mode="bilinear", align_corners=False)


def _xrv(weights) -> Extractor:
    from monai.networks.nets import DenseNet121

    path = find_weights("xrv_densenet121", weights)
    # the file first: fail fast
    state = {k.removeprefix("features."): v for k, v in _xrv_keys(_state_dict(path, "torchxrayvision")).items()}
    features = _load(DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).features, state, path)

    def network(x: torch.Tensor) -> torch.Tensor:
        return F.relu(features(x)).mean(dim=(2, 3))

    return Extractor("xrv_densenet121", network, 2, _xrv_prepare, _file_id(path))


def _file_id(path: Path) -> str:
    from meddiff.files import file_sha256

    return file_sha256(path)[:16]


def _radimagenet(weights) -> Extractor:
    path = find_weights("radimagenet_resnet50", weights)
    state = _radimagenet_keys(_state_dict(path))  # the file first: fail fast
    network = _load(medicalnet_resnet(50, 2, n_input_channels=3), state, path)
    return Extractor("radimagenet_resnet50", network, 2, _radimagenet_prepare, _file_id(path))


def radimagenet_trunk(weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """RadImageNet's ResNet-50 up to its last feature map (no pooling), frozen, from the local weights file: the
    network of a perceptual loss in radiology (MONAI's ``PerceptualLoss(network_type="radimagenet_resnet50")``
    uses the same one, fetched from torch hub, which is not reachable here)."""
    path = find_weights("radimagenet_resnet50", weights)
    resnet = _load(medicalnet_resnet(50, 2, n_input_channels=3), _radimagenet_keys(_state_dict(path)), path)
    layers = [resnet.conv1, resnet.bn1, resnet.act, resnet.maxpool, resnet.layer1, resnet.layer2, resnet.layer3,
              resnet.layer4]
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


def _medicalnet(depth: int):
    def load(weights) -> Extractor:
        name = f"medicalnet_resnet{depth}"
        path = find_weights(name, weights)
        state = _state_dict(path)  # the file first: fail fast
        network = medicalnet_resnet(depth, 3, n_input_channels=1, shortcut_type="B", bias_downsample=False)
        return Extractor(name, _load(network, state, path), 3, _medicalnet_prepare, _file_id(path))

    return load


def _meddiff_mri(weights) -> Extractor:
    from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

    from meddiff.data.transforms import NormalizeIntensityd, to_model_range
    from meddiff.model import load_model

    model = load_model(weights or "mri-denoise")
    unet = model.unet
    timestep = 10  # a little noise: the features of a clean image, as the denoiser sees it

    def network(x: torch.Tensor) -> torch.Tensor:
        """The UNet's encoder half only (time embedding, input conv, down blocks, middle block)."""
        t = get_timestep_embedding(torch.full((x.shape[0],), timestep), unet.block_out_channels[0]).to(x.dtype)
        emb = unet.time_embed(t)
        h = unet.conv_in(x)
        for block in unet.down_blocks:
            h, _ = block(hidden_states=h, temb=emb, context=None)
        return unet.middle_block(hidden_states=h, temb=emb, context=None).mean(dim=(2, 3))

    def prepare(x: torch.Tensor) -> torch.Tensor:
        items = []
        for item in x:
            low, high = NormalizeIntensityd("image").intensity_range(item, "MR")
            items.append(torch.from_numpy(to_model_range(item.numpy(), low, high)))
        x = torch.stack(items)[:, None]
        multiple = 2 ** (len(unet.block_out_channels) - 1)
        return F.pad(x, (0, (-x.shape[-1]) % multiple, 0, (-x.shape[-2]) % multiple), mode="replicate")

    return Extractor("meddiff_mri", network, 2, prepare, model.weights_sha256[:16])


def _to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """Robust min-max, then 8 bits as torchmetrics' FID makes them from [0, 1] floats, grey to three channels."""
    return (_robust_unit(x)[:, None] * 255).byte().repeat(1, 3, 1, 1)


def _inception(weights) -> Extractor:
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = find_weights("inception_v3", weights, also=Path(torch.hub.get_dir()) / "checkpoints")
    import io

    # torch-fidelity unpickles its weights file in full (weights_only=False): it gets, in memory, only the tensors
    # read safely here, never the user's file itself
    tensors = io.BytesIO()
    torch.save(_state_dict(path), tensors)
    tensors.seek(0)
    try:
        network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=tensors)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise MeddiffError(f"{path} does not fit torch-fidelity's Inception-v3: {first}") from None
    return Extractor("inception_v3", network, 2, _to_uint8_rgb, _file_id(path))


BIOMEDCLIP_FOLDER = "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def biomedclip_spec(weights: str | os.PathLike | None) -> str:
    """The open_clip spec of the ``biomedclip`` extractor: ``weights`` (a spec, or a folder in open_clip's
    format), else ``weights_dir()/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224/``, else the Hugging Face cache."""
    from meddiff.encoders.openclip import BIOMEDCLIP, cached_file, hub_cache_dir

    if weights is not None:
        weights = str(weights)
        if weights.startswith(("hf-hub:", "local-dir:")):
            return weights
        if Path(weights).is_dir():
            return f"local-dir:{weights}"
        raise MeddiffError("biomedclip --weights takes a folder in open_clip's format (open_clip_config.json, "
                           f"open_clip_pytorch_model.bin), local-dir:PATH or hf-hub:REPO; {weights} is none of them")
    folder = weights_dir() / BIOMEDCLIP_FOLDER
    if folder.is_dir():
        return f"local-dir:{folder}"
    if cached_file(BIOMEDCLIP, "open_clip_config.json") is not None:
        return f"hf-hub:{BIOMEDCLIP}"
    raise MeddiffError(
        "biomedclip needs BiomedCLIP's files, which cannot be downloaded here: "
        "put open_clip_config.json and open_clip_pytorch_model.bin "
        f"(Hugging Face repo {BIOMEDCLIP}) "
        f"with config.json and vocab.txt of microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract in {folder}, "
        f"or fill the Hugging Face cache {hub_cache_dir()} with both repos (README: Using BiomedCLIP offline), "
        "or pass --weights"
    )


def _biomedclip(weights) -> Extractor:
    from meddiff.encoders.openclip import load_open_clip

    encoder = load_open_clip(biomedclip_spec(weights))
    return Extractor("biomedclip", encoder.clip.encode_image, 2, encoder.image_batch, _file_id(encoder.weights))


EXTRACTORS: dict[str, Callable[..., Extractor]] = {
    "radimagenet_resnet50": _radimagenet,
    "medicalnet_resnet10": _medicalnet(10),
    "medicalnet_resnet50": _medicalnet(50),
    "xrv_densenet121": _xrv,
    "meddiff_mri": _meddiff_mri,
    "biomedclip": _biomedclip,
    "inception_v3": _inception,
}


def load_extractor(name: str, weights: str | os.PathLike | None = None) -> Extractor:
    if name not in EXTRACTORS:
        raise MeddiffError(f"unknown feature extractor {name!r} — available: {', '.join(sorted(EXTRACTORS))}")
    return EXTRACTORS[name](weights)
