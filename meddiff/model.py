"""A diffusion model as meddiff saves it: a typed, versioned description plus one network per named component.

A model folder holds ``config.json`` (a ``ModelConfig``) and one ``<component>.safetensors`` per network
component (``COMPONENTS``): the ``unet``; for a latent model the ``autoencoder`` (its first stage); for a
label-map model the ``controlnet``. Folders written before components existed hold the UNet as
``model.safetensors`` and no ``format_version``; they load unchanged. The text encoder is a component too, but
its weights stay where the user keeps them: the config names them (``TextEncoderConfig.spec``) and they load on
first use. A first-stage folder (``AutoencoderFolder``) holds an autoencoder alone, for latent models to train on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from meddiff import __version__
from meddiff.diffusion.schedulers import NoiseSchedule
from meddiff.errors import MeddiffError, first_line
from meddiff.files import atomic_path, file_sha256

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
LEGACY_UNET_WEIGHTS = "model.safetensors"  # folders written before components existed
BUNDLED_MODELS = Path(__file__).parent / "models"


def readable_format(version: int, newest: int) -> int:
    """``version`` of a folder's format, or a validation error when a newer meddiff wrote it (this one reads up to
    ``newest``): shared by the model and the adapter folders."""
    if version > newest:
        raise ValueError(f"format_version {version} was written by a newer meddiff (this one reads up to {newest})")
    return version


class UNetConfig(BaseModel):
    """The denoiser backbone: ``meddiff.nets.build_unet`` arguments."""

    model_config = ConfigDict(extra="forbid")

    spatial_dims: Literal[2, 3] = 2
    in_channels: int = 1
    out_channels: int = 1
    channels: list[int] = [32, 64, 64]
    attention_levels: list[bool] = [False, False, True]
    num_res_blocks: int | list[int] = 1
    num_head_channels: int | list[int] = 32
    norm_num_groups: int = 32
    num_class_embeds: int | None = None
    cross_attention_dim: int | None = None
    concat_channels: int = 0
    scalar_channels: int = 0  # input channels holding the model's scalar conditions (ScalarConditioning.as_channels)
    # maisi: MONAI's DiffusionModelUNetMaisi (released MAISI weights); diffusers: a UNet2DConditionModel built from
    # its published config (``diffusers``), from a diffusers pipeline folder (meddiff.nets.diffusers_nets)
    family: Literal["monai", "maisi", "diffusers"] = "monai"
    diffusers: dict | None = None
    include_region_inputs: bool = False  # maisi: the top and bottom body region (RegionConfig)
    include_spacing_input: bool = False  # maisi: the voxel spacing
    # MONAI's further DiffusionModelUNet arguments, at MONAI's defaults; published bundles set some of them
    norm_eps: float = 1e-6
    resblock_updown: bool = False
    transformer_num_layers: int = 1
    upcast_attention: bool = False
    include_fc: bool = True
    use_combined_linear: bool = False

    @property
    def size_multiple(self) -> int:
        """Every spatial side must be a multiple of this: each level below the first halves it."""
        return 2 ** (len(self.channels) - 1)

    def build(self) -> torch.nn.Module:
        if self.family == "diffusers":
            from meddiff.nets.diffusers_nets import DiffusersUNet

            return DiffusersUNet(self.diffusers or {})
        from meddiff.nets import build_unet

        return build_unet(**self.model_dump(exclude={"diffusers"}))


class AutoencoderConfig(BaseModel):
    """The first stage of a latent model: ``meddiff.nets.build_autoencoder`` arguments, the ``scale_factor``
    that brings its latents to unit variance (1 / std of the training latents, as latent diffusion computes
    it) and ``decode_tile``, the latent tile a large sample is decoded in (sliding window), or None: whole."""

    model_config = ConfigDict(extra="forbid")

    spatial_dims: Literal[2, 3] = 2
    in_channels: int = 1
    out_channels: int = 1
    channels: list[int] = [32, 64, 64]
    latent_channels: int = 4
    num_res_blocks: int | list[int] = 1
    attention_levels: list[bool] = [False, False, False]
    norm_num_groups: int = 32
    with_nonlocal_attn: bool = False
    # maisi: MONAI's AutoencoderKlMaisi (released MAISI weights); diffusers: an AutoencoderKL from its config
    family: Literal["monai", "maisi", "diffusers"] = "monai"
    diffusers: dict | None = None
    # MONAI's further AutoencoderKL arguments, at MONAI's defaults; published bundles set some of them
    norm_eps: float = 1e-6
    include_fc: bool = True
    use_combined_linear: bool = False
    maisi_options: dict[str, int | bool] = {}  # AutoencoderKlMaisi's memory options (num_splits, norm_float16, ...)
    scale_factor: float = 1.0
    decode_tile: list[int] | None = None

    @property
    def downsample(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.channels) - 1)

    def build(self) -> torch.nn.Module:
        if self.family == "diffusers":
            from meddiff.nets.diffusers_nets import DiffusersAutoencoder

            return DiffusersAutoencoder(self.diffusers or {})
        from meddiff.nets import build_autoencoder

        return build_autoencoder(**self.model_dump(exclude={"scale_factor", "decode_tile", "diffusers"}))


class ControlNetConfig(BaseModel):
    """A label-map ControlNet on the UNet (``meddiff.nets.build_controlnet``): the label map enters as
    ``conditioning_channels`` channels (``condition``), embedded by ``conditioning_embedding_channels`` (a latent
    model: one halving per autoencoder level); ``structures`` names the labels (0: background). The channels are
    the binary digits of each voxel's label (``label_channels`` of them) and, when ``structure_hu`` ({label: HU},
    0: unlabelled body) is set, one more: the map rendered with each structure's typical HU
    (``meddiff.data.structure_hu``), what the structure looks like, which the digits alone do not say."""

    model_config = ConfigDict(extra="forbid")

    conditioning_channels: int = 8
    conditioning_embedding_channels: list[int] = [16]
    conditioning_scale: float = 1.0
    structures: dict[int, str] = {}
    structure_hu: dict[int, float] = {}

    @model_validator(mode="after")
    def _hu_table(self) -> ControlNetConfig:
        if self.structure_hu and (0 not in self.structure_hu or min(self.structure_hu) < 0):
            raise ValueError("structure_hu needs an entry for label 0 (unlabelled body) and labels >= 0")
        if self.label_channels < 1:
            raise ValueError(f"conditioning_channels {self.conditioning_channels} leaves no channel for the labels' "
                             "binary digits")
        return self

    @property
    def label_channels(self) -> int:
        """The binary digits of each label: every conditioning channel but the HU rendering's."""
        return self.conditioning_channels - (1 if self.structure_hu else 0)

    def condition(self, labels: torch.Tensor, intensity_range: tuple[float, float]) -> torch.Tensor:
        """What the ControlNet sees for integer label maps (N, 1, *spatial), in training and generation alike:
        their binary digits, then with ``structure_hu`` their HU rendering in the model units of
        ``intensity_range``."""
        from meddiff.data.structure_hu import render_hu
        from meddiff.nets import label_bits

        bits = label_bits(labels, self.label_channels)
        if not self.structure_hu:
            return bits
        return torch.cat([bits, render_hu(labels, self.structure_hu, intensity_range).to(bits.dtype)], dim=1)

    def build(self, unet: UNetConfig) -> torch.nn.Module:
        from meddiff.nets import build_controlnet

        return build_controlnet(unet.model_dump(), self.conditioning_channels, self.conditioning_embedding_channels)


class RegionConfig(BaseModel):
    """The body region a MAISI UNet is told it generates: one-hot over (head and neck, thorax, abdomen, pelvis and
    lower body) for the top and the bottom of the volume, as MAISI's ``get_body_region_index_from_mask`` gives."""

    model_config = ConfigDict(extra="forbid")

    top: list[int] = [0, 1, 0, 0]
    bottom: list[int] = [0, 1, 0, 0]


class ScalarConditioning(BaseModel):
    """Named scalar conditions (a brain generator's sex, age, ventricular and brain volume), in this order, each in
    its ``[low, high]`` range, with the value used when none is given. The network takes them as its cross-attention
    context (G, 1, n) (``as_context``) and as n constant channels after its input's (``as_channels``), as the
    model-zoo brain bundle does (``meddiff.nets.conditioned.UNetWithScalars``)."""

    model_config = ConfigDict(extra="forbid")

    names: list[str]
    ranges: list[tuple[float, float]]
    defaults: list[float]
    as_context: bool = True
    as_channels: bool = False

    @model_validator(mode="after")
    def _lengths(self) -> ScalarConditioning:
        if not self.names or not len(self.names) == len(self.ranges) == len(self.defaults) or \
                len(set(self.names)) != len(self.names):
            raise ValueError("scalar conditions need distinct names, one range and one default each")
        if not (self.as_context or self.as_channels):
            raise ValueError("scalar conditions enter the network as context, as channels or both")
        return self

    def values(self, given: dict[str, float] | None) -> list[float]:
        """The values in the model's order: ``given`` by name, the defaults for the rest; one clear line for an
        unknown name or a value outside its range."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.names))
        if unknown:
            raise MeddiffError(f"this model has no condition {', '.join(unknown)}: its conditions are "
                               f"{', '.join(self.names)}")
        values = []
        for name, (low, high), default in zip(self.names, self.ranges, self.defaults, strict=True):
            value = float(given.get(name, default))
            if not low <= value <= high:
                raise MeddiffError(f"condition {name}={value:g} is outside its range {low:g} to {high:g}")
            values.append(value)
        return values


class ImageConfig(BaseModel):
    """What the network's [-1, 1] means: sample ``shape`` and ``spacing`` (mm), ``modality``, and the
    ``intensity_range`` that [-1, 1] maps back to (HU for CT, normalised units for MR)."""

    model_config = ConfigDict(extra="forbid")

    shape: list[int]
    spacing: list[float] | None = None
    modality: str | None = None
    intensity_range: tuple[float, float] = (-1.0, 1.0)


class TextEncoderConfig(BaseModel):
    """The report encoder of a report-conditioned model: a ``meddiff.encoders.load_text_encoder`` spec
    (``component:text_encoder``: the folder's own ``text_encoder/`` and ``tokenizer/``); ``padded``: prompts are
    encoded as Stable Diffusion encodes them (the whole padded sequence, no mask)."""

    model_config = ConfigDict(extra="forbid")

    spec: str
    max_length: int | None = None
    padded: bool = False


class ModelConfig(BaseModel):
    """Everything needed to rebuild and use a model. ``max_train_timestep``: a denoising prior trained on
    low noise levels only (it denoises, it cannot generate); ``task`` "inpaint": a mask-conditioned model
    whose 2 concatenated channels are the masked image and the mask (``meddiff.data.masks``);
    ``denoise_strength`` and ``denoise_tile``: the calibrated share of the noise sigma to remove and the
    tile side ``denoise`` uses; ``inpaint_steps``: the steps a mask-conditioned model fills in when none are
    asked (1: its estimate of the posterior mean, what PSNR and SSIM reward; more steps draw a sharper sample);
    ``inpaint_prefill`` "biharmonic": a 2D mask-conditioned model whose condition holds the region filled by
    biharmonic inpainting instead of 0, and that samples the residual image - prefill (``meddiff.data.masks``);
    ``task`` "upsample": a 2D through-plane super-resolution model whose 1 concatenated channel is a plane of thick
    slices interpolated back (cubic), and that samples the residual thin plane - interpolation
    (``meddiff.data.thick``)."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    meddiff_version: str | None = None
    unet: UNetConfig
    schedule: NoiseSchedule
    image: ImageConfig
    text_encoder: TextEncoderConfig | None = None
    autoencoder: AutoencoderConfig | None = None
    controlnet: ControlNetConfig | None = None
    region: RegionConfig | None = None
    scalars: ScalarConditioning | None = None
    task: Literal["generate", "inpaint", "upsample"] = "generate"
    max_train_timestep: int | None = None
    denoise_strength: float = 1.0
    denoise_tile: list[int] | None = None
    inpaint_steps: int | None = None
    inpaint_prefill: Literal["biharmonic"] | None = None

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        return readable_format(version, FORMAT_VERSION)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.task == "inpaint" and self.unet.concat_channels != 2:
            raise ValueError("an inpainting model takes 2 concatenated channels (the masked image and the mask), "
                             f"not {self.unet.concat_channels}")
        if self.inpaint_prefill is not None and (self.task != "inpaint" or self.unet.spatial_dims != 2):
            raise ValueError("inpaint_prefill is for 2D mask-conditioned models (task inpaint, a 2D unet)")
        if self.task == "upsample" and (self.unet.concat_channels != 1 or self.unet.spatial_dims != 2):
            raise ValueError("an upsampling model is 2D and takes 1 concatenated channel (the interpolated thick "
                             f"slices), not a {self.unet.spatial_dims}D unet with {self.unet.concat_channels}")
        if self.schedule.kind != "ddpm" and (self.task != "generate" or self.max_train_timestep):
            raise ValueError(f"a {self.schedule.kind} model generates only (task generate, no max_train_timestep)")
        if len(self.image.shape) != self.unet.spatial_dims:
            raise ValueError(f"image.shape {self.image.shape} does not match the {self.unet.spatial_dims}D unet")
        autoencoder = self.autoencoder
        if autoencoder is not None:
            if self.task != "generate" or self.max_train_timestep:
                raise ValueError("a latent model generates only (task generate, no max_train_timestep)")
            if autoencoder.spatial_dims != self.unet.spatial_dims or not (
                    self.unet.in_channels == self.unet.out_channels == autoencoder.latent_channels):
                raise ValueError(f"the unet ({self.unet.spatial_dims}D, {self.unet.in_channels} channels) does not "
                                 f"work on the autoencoder's latents ({autoencoder.spatial_dims}D, "
                                 f"{autoencoder.latent_channels} channels)")
            if any(side % autoencoder.downsample for side in self.image.shape):
                raise ValueError(f"image.shape {self.image.shape} is not a multiple of the autoencoder's "
                                 f"down-sampling {autoencoder.downsample}")
        channels = len(self.scalars.names) if self.scalars is not None and self.scalars.as_channels else 0
        if self.unet.scalar_channels != channels:
            raise ValueError(f"unet.scalar_channels {self.unet.scalar_channels} must be {channels}: one per scalar "
                             "condition taken as a channel")
        if self.scalars is not None and self.scalars.as_context and \
                self.unet.cross_attention_dim != len(self.scalars.names):
            raise ValueError(f"scalar conditions as context need unet.cross_attention_dim {len(self.scalars.names)}")
        if self.unet.include_region_inputs and self.region is None:
            raise ValueError("a unet with body-region inputs needs region (top and bottom)")
        if self.unet.include_spacing_input and not self.image.spacing:
            raise ValueError("a unet with a spacing input needs image.spacing")
        if self.controlnet is not None:
            downsample = self.autoencoder.downsample if self.autoencoder else 1
            if 2 ** (len(self.controlnet.conditioning_embedding_channels) - 1) != downsample:
                raise ValueError(f"the controlnet's conditioning embedding must halve the label map "
                                 f"{downsample.bit_length() - 1} times (the image -> sample down-sampling)")
        return self

    def sample_shape(self, image_shape: list[int] | None = None) -> list[int]:
        """Where the diffusion runs for images of ``image_shape`` (default: the training shape): the image
        grid, or for a latent model the latent grid."""
        shape = list(image_shape or self.image.shape)
        return shape if self.autoencoder is None else [side // self.autoencoder.downsample for side in shape]

    @property
    def generates(self) -> bool:
        """False for a denoising prior: it never learnt to start from pure noise."""
        return not self.max_train_timestep


# The network components a model may have: config field -> how to build that network from the model's config.
COMPONENTS: dict[str, Callable[[ModelConfig], torch.nn.Module]] = {
    "unet": lambda config: config.unet.build(),
    "autoencoder": lambda config: config.autoencoder.build(),
    "controlnet": lambda config: config.controlnet.build(config.unet),
}


class DiffusionModel:
    """A ``ModelConfig`` with its networks (by component name) and, for report-conditioned models, the
    report encoder (loaded from its spec on first use). ``weights_sha256`` names the weights in provenance."""

    def __init__(self, config: ModelConfig, networks: dict[str, torch.nn.Module] | None = None, text_encoder=None):
        self.config = config
        self.networks = networks if networks is not None else {
            name: build(config)
            for name, build in COMPONENTS.items()
            if getattr(config, name) is not None
        }
        self._text_encoder = text_encoder
        self.weights_sha256 = ""
        self.folder: Path | None = None  # where the model was loaded from (its text_encoder/ component)
        self.adapter: dict | None = None  # the adapter applied (meddiff.adapters): its name, sha256 and scale

    @property
    def unet(self) -> torch.nn.Module:
        return self.networks["unet"]

    @unet.setter
    def unet(self, network: torch.nn.Module) -> None:
        self.networks["unet"] = network

    @property
    def autoencoder(self) -> torch.nn.Module | None:
        return self.networks.get("autoencoder")

    @property
    def controlnet(self) -> torch.nn.Module | None:
        return self.networks.get("controlnet")

    @property
    def schedule(self) -> NoiseSchedule:
        return self.config.schedule

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def text_encoder(self):
        if self.config.text_encoder is None:
            raise MeddiffError("this model is not report-conditioned: it takes no prompts")
        if self._text_encoder is None:
            from meddiff.encoders import load_text_encoder

            spec = self.config.text_encoder
            self._text_encoder = load_text_encoder(spec.spec, max_length=spec.max_length, padded=spec.padded,
                                                   folder=self.folder)
        return self._text_encoder

    def conditioned_unet(self, items: int, labels: torch.Tensor | None = None,
                         guided: bool = False, scalars: torch.Tensor | None = None) -> torch.nn.Module:
        """The UNet with the conditioning bound that it takes besides class labels, a report and concatenated
        channels (``meddiff.nets.conditioned``): a MAISI UNet's body region and spacing (one row per item) and, for
        a model with a ControlNet, the integer label maps ``labels`` (1 or ``items``, 1, *spatial) as its
        condition (``ControlNetConfig.condition``, as training builds it); ``scalars`` (G, n): the values of a model's
        scalar conditions (``ScalarConditioning``). ``guided``: rows for the doubled batch of classifier-free
        guidance."""
        from meddiff.diffusion.guidance import doubled
        from meddiff.nets.conditioned import ControlledUNet, UNetWithInputs, UNetWithScalars

        rows = doubled if guided else (lambda value: value)
        network, inputs = self.unet, self._unet_inputs(items)
        if scalars is not None:
            spec = self.config.scalars
            network = UNetWithScalars(network, rows(scalars.to(self.device)), spec.as_context, spec.as_channels)
        if inputs:
            network = UNetWithInputs(network, {name: rows(value) for name, value in inputs.items()})
        if labels is not None:
            controlnet = self.config.controlnet
            control = controlnet.condition(labels.to(self.device), self.config.image.intensity_range)
            network = ControlledUNet(network, self.controlnet, rows(control), controlnet.conditioning_scale)
        return network

    def check_labels(self, labels: torch.Tensor | None, shape: list[int] | tuple[int, ...], items: int) -> None:
        """One clear line unless ``labels`` is what this model's label conditioning takes: integer maps
        (1 or ``items``, 1, *shape) of values its ControlNet encodes, given exactly when it has one."""
        controlnet = self.config.controlnet
        if controlnet is not None and labels is None:
            raise MeddiffError("this model is conditioned on a label map: give one "
                               "(meddiff generate --condition labels.nii.gz)")
        if controlnet is None and labels is not None:
            raise MeddiffError("this model takes no label map — leave out --condition, or use a model with a "
                               "ControlNet")
        if labels is None:
            return
        expected = [*shape]
        if labels.ndim != len(expected) + 2 or list(labels.shape[2:]) != expected or labels.shape[1] != 1 or \
                labels.shape[0] not in (1, items):
            raise MeddiffError(f"the label maps have shape {tuple(labels.shape)}; this sample needs "
                               f"(1 or {items}, 1, {', '.join(map(str, expected))})")
        largest = int(labels.max()) if labels.numel() else 0
        if labels.min() < 0 or largest >= 2 ** controlnet.label_channels:
            raise MeddiffError(f"label values must be 0 to {2 ** controlnet.label_channels - 1} for this "
                               f"model, not {int(labels.min())} to {largest}")

    def _unet_inputs(self, items: int) -> dict[str, torch.Tensor]:
        """A MAISI UNet's further inputs, one row per item: the body region (one-hot, top and bottom) and the voxel
        spacing in mm, each times 100 as MAISI feeds them; {} for any other UNet."""
        config, device = self.config, self.device
        inputs = {}
        if config.unet.include_region_inputs:
            for name, value in (("top_region_index_tensor", config.region.top),
                                ("bottom_region_index_tensor", config.region.bottom)):
                inputs[name] = torch.tensor([value], dtype=torch.float32, device=device).expand(items, -1) * 1e2
        if config.unet.include_spacing_input:
            spacing = torch.tensor([config.image.spacing], dtype=torch.float32, device=device)
            inputs["spacing_tensor"] = spacing.expand(items, -1) * 1e2
        return inputs

    def to(self, device: str | torch.device) -> DiffusionModel:
        for network in self.networks.values():
            network.to(device).eval()
        return self

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> DiffusionModel:
        directory = Path(directory)
        remedy = "use a folder written by meddiff export"
        if not (directory / CONFIG_NAME).is_file():
            raise MeddiffError(f"{directory} is not a meddiff model folder (needs {CONFIG_NAME} and the weights) "
                               f"— {remedy}")
        try:
            config = ModelConfig.model_validate_json((directory / CONFIG_NAME).read_bytes())
        except ValidationError as exc:
            if _autoencoder_only(directory):
                raise MeddiffError(f"{directory} holds an autoencoder only (the first stage of a latent model): it "
                                   "cannot generate — train a diffusion model on it (DiffusionModule autoencoder: "
                                   f"{directory})") from None
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            reason = f"{where}: {error['msg']}" if where else error["msg"]
            raise MeddiffError(f"cannot load the model in {directory}: {CONFIG_NAME} is not a meddiff model config "
                               f"({first_line(reason)}) — {remedy}") from None
        except (OSError, MeddiffError) as exc:
            raise MeddiffError(f"cannot load the model in {directory}: {CONFIG_NAME}: {first_line(exc)} "
                               f"— {remedy}") from None
        try:
            model = cls(config)
        except (MeddiffError, ValueError, TypeError, RuntimeError) as exc:
            raise MeddiffError(f"cannot load the model in {directory}: {CONFIG_NAME} describes no buildable network "
                               f"({first_line(exc)}) — {remedy}") from None
        model.folder = directory
        hashes = {name: _load_weights(network, directory, name) for name, network in model.networks.items()}
        from meddiff.encoders.text import COMPONENT

        if config.text_encoder is not None and config.text_encoder.spec.startswith(COMPONENT):
            hashes["text_encoder"] = file_sha256(directory / config.text_encoder.spec.removeprefix(COMPONENT))
        model.weights_sha256 = next(iter(hashes.values())) if len(hashes) == 1 else hashlib.sha256(
            "".join(f"{name} {digest}\n" for name, digest in sorted(hashes.items())).encode()).hexdigest()
        return model.to(device)

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` and one ``<component>.safetensors`` per network into a new (or, with
        ``overwrite``, reused) folder; each file is written whole or not at all."""
        from safetensors.torch import save_file

        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()) and not overwrite:
            raise MeddiffError(f"{directory} is not empty — choose another folder or pass --overwrite "
                               "(overwrite=True from Python)")
        directory.mkdir(parents=True, exist_ok=True)
        for name, network in self.networks.items():
            state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
            with atomic_path(directory / f"{name}.safetensors", overwrite=True) as tmp:
                save_file(state, tmp, metadata={"format": "pt", "meddiff": __version__})
        if self.networks.get("unet") is not None and (directory / LEGACY_UNET_WEIGHTS).is_file():
            (directory / LEGACY_UNET_WEIGHTS).unlink()  # an older export in the reused folder: one set of weights
        config = self.config.model_copy(update={"format_version": FORMAT_VERSION, "meddiff_version": __version__})
        with atomic_path(directory / CONFIG_NAME, overwrite=True) as tmp:
            tmp.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
        return directory


def _load_weights(network: torch.nn.Module, directory: Path, name: str) -> str:
    """Load ``<name>.safetensors`` (for the UNet of an older folder: ``model.safetensors``) into ``network``;
    returns the file's sha256. safetensors holds tensors only: nothing in the file ever runs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from meddiff.weights import check_fit

    path = directory / f"{name}.safetensors"
    if name == "unet" and not path.is_file():
        path = directory / LEGACY_UNET_WEIGHTS
    if not path.is_file():
        raise MeddiffError(f"{directory} is not a meddiff model folder: {CONFIG_NAME} has a {name} but there is no "
                           f"{name}.safetensors — use a folder written by meddiff export")
    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MeddiffError(f"cannot load the model in {directory}: {path.name} is not a readable safetensors file "
                           f"({first_line(exc)}) — use a folder written by meddiff export") from None
    check_fit(network, state, f"the model in {directory}: {path.name} does not fit {CONFIG_NAME}",
              "use the config.json and weights exported together (meddiff export)")
    network.load_state_dict(state)
    return file_sha256(path)


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package (``meddiff/models/<name>/``)."""
    return sorted(p.name for p in BUNDLED_MODELS.iterdir() if (p / CONFIG_NAME).is_file())


def load_model(name_or_dir: str | os.PathLike, device: str | torch.device = "cpu") -> DiffusionModel:
    """A bundled model by name (``"mri-denoise"``) or a model folder (``meddiff export`` / ``save_pretrained``).

    A folder of that name wins over a bundled model, so a user's own ``mri-denoise/`` is never shadowed.
    """
    path = Path(name_or_dir)
    if not path.exists() and str(name_or_dir) in bundled_models():
        path = BUNDLED_MODELS / str(name_or_dir)
    if not path.exists():
        raise MeddiffError(f"no model {name_or_dir!r}: neither a folder nor a bundled model "
                           f"({', '.join(bundled_models())})")
    return DiffusionModel.from_pretrained(path, device=device)


class AutoencoderFolder(BaseModel):
    """The autoencoder part of a model folder's ``config.json``: a first-stage folder (``AutoencoderModule``'s
    export) or a whole latent model, whose autoencoder another latent model may reuse."""

    model_config = ConfigDict(extra="ignore")

    format_version: int = FORMAT_VERSION
    meddiff_version: str | None = None
    autoencoder: AutoencoderConfig
    image: ImageConfig


def _autoencoder_only(directory: Path) -> bool:
    try:
        config = json.loads((directory / CONFIG_NAME).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "autoencoder" in config and "unet" not in config


def save_autoencoder(config: AutoencoderFolder, network: torch.nn.Module, directory: str | os.PathLike,
                     overwrite: bool = False) -> Path:
    """A first-stage folder: ``config.json`` (an ``AutoencoderFolder``) and ``autoencoder.safetensors``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise MeddiffError(f"{directory} is not empty — choose another folder or pass --overwrite "
                           "(overwrite=True from Python)")
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    with atomic_path(directory / "autoencoder.safetensors", overwrite=True) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "meddiff": __version__})
    config = config.model_copy(update={"format_version": FORMAT_VERSION, "meddiff_version": __version__})
    with atomic_path(directory / CONFIG_NAME, overwrite=True) as tmp:
        tmp.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    return directory


def load_autoencoder(directory: str | os.PathLike) -> tuple[AutoencoderFolder, torch.nn.Module]:
    """The autoencoder of a first-stage folder or of a latent model folder, with its weights loaded."""
    directory = Path(directory)
    remedy = "give a folder written by an AutoencoderModule (export_dir) or a latent model folder"
    try:
        config = AutoencoderFolder.model_validate_json((directory / CONFIG_NAME).read_bytes())
    except OSError:
        raise MeddiffError(f"{directory} is not an autoencoder folder (no {CONFIG_NAME}) — {remedy}") from None
    except ValidationError as exc:
        raise MeddiffError(f"{directory}/{CONFIG_NAME} describes no autoencoder ({first_line(exc.errors()[0]['msg'])})"
                           f" — {remedy}") from None
    network = config.autoencoder.build()
    _load_weights(network, directory, "autoencoder")
    return config, network.eval()
