"""``DiffusionModule``: the denoising-diffusion training objective around a MONAI UNet, with EMA."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, is_dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.optim.swa_utils import AveragedModel

from meddiff.data.latents import LATENT_KEY, fingerprint
from meddiff.data.masks import PREFILLS, inpaint_condition
from meddiff.diffusion import latent
from meddiff.diffusion.schedulers import NoiseSchedule
from meddiff.errors import MeddiffError, first_line
from meddiff.model import DiffusionModel, ImageConfig, ModelConfig, UNetConfig, load_autoencoder
from meddiff.pipelines import DiffusionPipeline
from meddiff.training.migrate import nested_arguments

KIND = "diffusion"  # what ``meddiff export`` reads from a checkpoint to rebuild this module


class SeededEMATraining(pl.LightningModule):
    """What the diffusion-loss modules share: each step's noise from a generator seeded by (seed, step, batch,
    rank), the loss logged, and the EMA (``self.ema``) of the trained network (the attribute ``trained`` names)
    updated right after each optimizer step, before checkpoint callbacks run."""

    trained = "unet"

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """Seeded by (seed, step, batch, rank): micro-batches of an accumulated step draw differently."""
        seed = (self.hparams.seed * 1_000_003 + self.global_step * 1_009 + batch_idx * 7_919 + self.global_rank) % 2**63
        return torch.Generator(self.device).manual_seed(seed)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self.step_generator(batch_idx))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(getattr(self, self.trained))


@dataclass(frozen=True)
class Conditioning:
    """What conditions the UNet besides the noised image, by batch key: ``class_key`` names a batch entry of
    integer labels (with ``unet.num_class_embeds``); ``concat_key`` a batch entry concatenated to the input
    channels (with ``unet.concat_channels``); ``text_encoder`` (a ``load_text_encoder`` spec) encodes
    ``batch[report_key]`` for cross-attention, each report replaced by the empty one with probability
    ``condition_dropout`` so the network also learns the unconditional model classifier-free guidance needs.
    ``prefill`` "biharmonic" (a 2D inpainting model): the condition holds the region filled by biharmonic
    inpainting (``RandInpaintMaskd(prefill="biharmonic")`` makes it) and the model learns the residual image -
    prefill, so it starts where the classical fill ends; saved as the model's ``inpaint_prefill``."""

    class_key: str = "label"
    concat_key: str | None = None
    text_encoder: str | None = None
    report_key: str = "report"
    condition_dropout: float = 0.1
    prefill: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.condition_dropout < 1.0:
            raise MeddiffError(f"condition_dropout must be in [0, 1), got {self.condition_dropout}")
        if self.prefill is not None and self.prefill not in PREFILLS:
            raise MeddiffError(f"conditioning.prefill must be one of {list(PREFILLS)} or null, not {self.prefill!r}")


@dataclass(frozen=True)
class Inference:
    """What the exported model does by default, so the recipe that trains a bundled model also sets how it is
    used: ``denoise_strength`` (the fraction of a scan's estimated noise ``meddiff denoise`` removes),
    ``denoise_tile`` (the tiles denoising runs on), ``inpaint_steps`` (a mask-conditioned model's steps; 1 is
    the network's estimate of the posterior mean from pure noise)."""

    denoise_strength: float = 1.0
    denoise_tile: list[int] | None = None
    inpaint_steps: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.denoise_strength <= 2.0 or (self.inpaint_steps is not None and self.inpaint_steps < 1):
            raise MeddiffError(f"inference: denoise_strength must be in (0, 2] and inpaint_steps at least 1, not "
                               f"{self.denoise_strength} and {self.inpaint_steps}")


def typed(cls, value, name: str):
    """``value`` as a ``cls`` (a pydantic model of ``meddiff.model`` or a dataclass): given so, or as the plain
    dict a checkpoint's hyperparameters or a YAML hold."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise MeddiffError(f"{name} must be a {cls.__name__} or a mapping of its fields, not {value!r}")
    try:
        return cls(**value) if is_dataclass(cls) else cls.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise MeddiffError(f"{name}.{where}: {first_line(error['msg'])}") from None
    except TypeError as exc:
        raise MeddiffError(f"{name}: {first_line(exc)}") from None


def plain_hyperparameters(module: pl.LightningModule, **values) -> None:
    """Store the typed arguments ``values`` as plain values in ``module``'s hyperparameters, so checkpoints hold
    tensors and plain values only (``weights_only`` loads them) and ``meddiff export`` rebuilds from them."""
    plain = {name: asdict(value) if is_dataclass(value) else value.model_dump(mode="json")
             for name, value in values.items()}
    module._hparams.update(plain)
    module._hparams_initial.update(copy.deepcopy(plain))


DEFAULT_UNET = UNetConfig()
DEFAULT_SCHEDULE = NoiseSchedule()
DEFAULT_IMAGE = ImageConfig(shape=[64, 64], modality="MR")
DEFAULT_CONDITIONING = Conditioning()
DEFAULT_INFERENCE = Inference()


class DiffusionModule(SeededEMATraining):
    """Trains ``unet`` (a ``UNetConfig``) to predict eps, v or x0 from noised images (Ho et al. 2020) under
    ``schedule`` (a ``NoiseSchedule``: kind "ddpm" or "rflow", rectified flow; beta schedule, start and end,
    prediction). The arguments are the typed descriptions of ``meddiff.model`` plus the training-only ones, so a
    LightningCLI YAML (``model.init_args.unet.channels``, ``model.init_args.schedule.beta_end``, ...) and the
    checkpoint hold the whole recipe; the flat arguments of older configs and checkpoints map onto them with
    ``meddiff.training.migrate.nested_arguments`` (``DiffusionModule.from_flat``). The UNet's ``in_channels``,
    ``out_channels`` and ``cross_attention_dim`` follow from the autoencoder and the text encoder.

    ``conditioning`` (``Conditioning``) names the batch entries of class labels, concatenated channels (``task``
    "inpaint": the masked image and the mask, so ``meddiff inpaint`` fills with the model itself instead of
    RePaint) and reports. Noise and timesteps of each step come from a generator seeded by (``seed``, step,
    batch, rank), so after a resume the noise is what an uninterrupted run would draw; ``ManifestDataModule``
    replays data order and random crops, so a run resumed with ``--ckpt_path last`` ends with the weights of an
    uninterrupted one. ``image`` (``ImageConfig``: shape, spacing, modality, intensity_range) travels into the
    exported pipeline so generated images come back in physical units. ``max_train_timestep`` limits
    training to the low-noise timesteps ``[0, max)``: a denoising prior (``meddiff denoise`` only
    starts from the noise level of a scan) spends its whole capacity there but cannot generate.
    An inpainting model's loss weighs voxels outside the mask (the last condition channel) by
    ``outside_mask_weight``: the region to fill is what it must learn, outside it the input is kept anyway.
    With ``conditioning.prefill`` it learns x0 = image - prefill (the condition's first channel), the residual;
    ``task`` "upsample" (a through-plane super-resolution model, ``meddiff upsample``) likewise learns
    image - condition, the thin slice minus its thick slices interpolated back (``meddiff.data.thick``).
    ``valid_key`` names a batch entry that is 0 where the image holds no data (a CT's padding outside the
    scanner's field of view): those voxels never enter the loss. ``autoencoder`` (a first-stage folder,
    ``AutoencoderModule``'s ``export_dir``, or a latent model folder) makes a latent model: the frozen encoder
    maps each batch to latents (posterior mean x the scale factor computed from the first batch), or the data
    brings them cached (``ManifestDataModule``'s ``latents``, the same folder), and the UNet learns those; the
    exported folder holds both networks and ``meddiff generate`` decodes.
    ``inference`` (``Inference``) is how the exported model is used by default (denoising strength and tiles,
    inpainting steps).
    ``export_dir``: where the model folder (EMA weights, as ``meddiff export`` writes it) goes when training ends.
    ``init_from`` (a model folder or a bundled model's name) starts the UNet and its EMA from that model's weights:
    fine-tuning. Its UNet must be the one this config builds; a checkpoint resumed with ``--ckpt_path`` wins.
    """

    def __init__(
        self,
        unet: UNetConfig = DEFAULT_UNET,
        schedule: NoiseSchedule = DEFAULT_SCHEDULE,
        image: ImageConfig = DEFAULT_IMAGE,
        conditioning: Conditioning = DEFAULT_CONDITIONING,
        task: str = "generate",
        inference: Inference = DEFAULT_INFERENCE,
        outside_mask_weight: float = 1.0,
        valid_key: str | None = None,
        max_train_timestep: int | None = None,
        autoencoder: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        export_dir: str | None = None,
        init_from: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        unet, image = typed(UNetConfig, unet, "unet"), typed(ImageConfig, image, "image")
        schedule = typed(NoiseSchedule, schedule, "schedule")
        conditioning = typed(Conditioning, conditioning, "conditioning")
        inference = typed(Inference, inference, "inference")
        if (unet.concat_channels > 0) != (conditioning.concat_key is not None):
            raise MeddiffError("unet.concat_channels and conditioning.concat_key go together: set both or neither")
        if task not in ("generate", "inpaint", "upsample"):
            raise MeddiffError(f"task must be generate, inpaint or upsample, not {task!r}")
        if task == "upsample" and (unet.concat_channels != 1 or unet.spatial_dims != 2):
            raise MeddiffError("task upsample is a 2D model with unet.concat_channels 1 (the thick slices "
                               "interpolated back: conditioning.concat_key upsample_condition, made by "
                               "meddiff.data.thick.RandThickSlicesd)")
        if task == "inpaint" and unet.concat_channels != 2:
            raise MeddiffError("task inpaint takes unet.concat_channels 2 (the masked image and the mask: "
                               "conditioning.concat_key inpaint_condition, made by "
                               "meddiff.data.masks.RandInpaintMaskd)")
        if conditioning.prefill is not None and (task != "inpaint" or unet.spatial_dims != 2):
            raise MeddiffError("conditioning.prefill is for 2D inpainting models (task inpaint, unet.spatial_dims 2)")
        if not 0.0 <= outside_mask_weight <= 1.0 or (outside_mask_weight != 1.0 and task != "inpaint"):
            raise MeddiffError(f"outside_mask_weight must be in [0, 1] and needs task inpaint, "
                               f"not {outside_mask_weight}")
        if len(image.shape) != unet.spatial_dims:
            raise MeddiffError(f"image.shape {list(image.shape)} must have {unet.spatial_dims} entries")
        if max_train_timestep is not None and not 0 < max_train_timestep <= schedule.num_train_timesteps:
            raise MeddiffError(f"max_train_timestep {max_train_timestep} must be in "
                               f"1..{schedule.num_train_timesteps}")
        self.save_hyperparameters()
        plain_hyperparameters(self, unet=unet, schedule=schedule, image=image, conditioning=conditioning,
                              inference=inference)
        self.unet_spec, self.image, self.conditioning, self.inference = unet, image, conditioning, inference
        self.text_encoder = None
        if conditioning.text_encoder is not None:
            from meddiff.encoders import load_text_encoder

            # frozen and kept out of the module tree: checkpoints hold the UNet, not a copy of the text model
            object.__setattr__(self, "text_encoder", load_text_encoder(conditioning.text_encoder))
        self.autoencoder_folder = None
        if autoencoder is not None:
            self._attach_autoencoder(autoencoder)
        self.unet = self.unet_config().build()
        if init_from is not None:
            self._start_from(init_from)
        self.schedule = schedule
        self.ema = AveragedModel(self.unet, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)  # updated by averaging, never by gradients (and ignored by DDP)
        self.condition_checked = False  # an inpainting model checks the data's condition on its first batch

    @classmethod
    def from_flat(cls, **flat) -> DiffusionModule:
        """The module from the flat arguments of older configs and checkpoints (``channels=...,
        image_shape=..., beta_schedule=...``), through ``meddiff.training.migrate.nested_arguments``."""
        return cls(**nested_arguments(flat, KIND))

    def _attach_autoencoder(self, directory: str) -> None:
        """The frozen first stage of a latent model, from its folder; the UNet then works on its latents."""
        hp = self.hparams
        if hp.task != "generate" or self.conditioning.concat_key or hp.valid_key or hp.max_train_timestep:
            raise MeddiffError("a latent model (autoencoder) generates only: no task inpaint, conditioning.concat_key,"
                               " valid_key or max_train_timestep")
        folder, network = load_autoencoder(directory)
        if folder.autoencoder.spatial_dims != self.unet_spec.spatial_dims or any(
                side % folder.autoencoder.downsample for side in self.image.shape):
            raise MeddiffError(f"the autoencoder in {directory} is {folder.autoencoder.spatial_dims}D and halves "
                               f"{len(folder.autoencoder.channels) - 1} times; image.shape {list(self.image.shape)} "
                               "does not fit it")
        self.autoencoder_folder = folder
        self.autoencoder = network.requires_grad_(False)
        self.autoencoder_fingerprint = fingerprint(network)
        # 1 / std of the training latents, from the first training batch (0: not yet known); kept in checkpoints
        self.register_buffer("latent_scale", torch.zeros(()))

    def _start_from(self, name_or_dir: str) -> None:
        """The UNet's weights from a trained model whose UNet is the one this config builds."""
        from meddiff.model import load_model

        start = load_model(name_or_dir)
        if start.config.unet != self.unet_config():
            ours, theirs = self.unet_config().model_dump(), start.config.unet.model_dump()
            differ = ", ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in ours if ours[k] != theirs[k])
            raise MeddiffError(f"init_from {name_or_dir}: its UNet is not the one this config builds ({differ})")
        self.unet.load_state_dict({k: v.float() for k, v in start.unet.state_dict().items()})

    @property
    def latent_channels(self) -> int:
        return 1 if self.autoencoder_folder is None else self.autoencoder_folder.autoencoder.latent_channels

    def unet_config(self) -> UNetConfig:
        """``unet`` with the channels the autoencoder's latents and the text encoder's width make."""
        return self.unet_spec.model_copy(update={
            "in_channels": self.latent_channels,
            "out_channels": self.latent_channels,
            "cross_attention_dim": self.text_encoder.dim if self.text_encoder is not None else None,
        })

    def model_config(self) -> ModelConfig:
        """The description of the model this module trains, as ``meddiff export`` saves it."""
        hp = self.hparams
        limited = hp.max_train_timestep is not None and hp.max_train_timestep < self.schedule.num_train_timesteps
        return ModelConfig(
            unet=self.unet_config(),
            schedule=self.schedule,
            image=self.image,
            text_encoder=(
                None
                if self.text_encoder is None
                else {"spec": self.conditioning.text_encoder, "max_length": self.text_encoder.max_length}
            ),
            max_train_timestep=hp.max_train_timestep if limited else None,
            task=hp.task,
            **asdict(self.inference),
            inpaint_prefill=self.conditioning.prefill,
            autoencoder=None if self.autoencoder_folder is None else self.autoencoder_folder.autoencoder.model_copy(
                update={"scale_factor": float(self.latent_scale)}),
        )

    def diffusion_model(self, ema: bool = True) -> DiffusionModel:
        """The model sharing this module's (EMA) weights, for sampling during or after training."""
        networks = {"unet": self.ema.module if ema else self.unet}
        if self.autoencoder_folder is not None:
            networks["autoencoder"] = self.autoencoder
        return DiffusionModel(self.model_config(), networks, text_encoder=self.text_encoder)

    def pipeline(self, ema: bool = True) -> DiffusionPipeline:
        """Every task over this module's (EMA) weights."""
        return DiffusionPipeline(self.diffusion_model(ema))

    def loss(self, batch: dict, generator: torch.Generator, unet: torch.nn.Module | None = None) -> torch.Tensor:
        x0 = batch["image"]
        if self.autoencoder_folder is not None:
            x0 = self.latents(batch, float(self.latent_scale))
        if self.conditioning.prefill is not None or self.hparams.task == "upsample":
            # the residual: what the classical answer (the condition's channel 0: a fill, an interpolation) misses
            x0 = x0 - batch[self.conditioning.concat_key][:, :1].to(x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = self.schedule.draw_timesteps(x0.shape[0], generator, x0.device, self.hparams.max_train_timestep)
        xt, target = self.schedule.noised_and_target(x0, noise, t)
        conditioning = self.conditioning
        if conditioning.concat_key:
            xt = torch.cat([xt, batch[conditioning.concat_key]], dim=1)
        labels = batch[conditioning.class_key].long() if self.unet_spec.num_class_embeds else None
        context = None
        if self.text_encoder is not None:
            reports = list(batch[conditioning.report_key])
            dropped = torch.rand(len(reports), generator=generator, device=x0.device) < conditioning.condition_dropout
            reports = ["" if drop else report for report, drop in zip(reports, dropped.tolist(), strict=True)]
            context = self.text_encoder.context(reports).to(x0.device, x0.dtype)
        prediction = (unet or self.unet)(xt, timesteps=t, class_labels=labels, context=context)
        weight = self.loss_weight(batch)
        if weight is None:
            return F.mse_loss(prediction.float(), target.float())
        squared = (prediction.float() - target.float()) ** 2 * weight
        return squared.sum() / (weight.expand_as(squared).sum() + 1e-8)

    def loss_weight(self, batch: dict) -> torch.Tensor | None:
        """Per-voxel loss weights (N, 1, *spatial), or None for a plain mean."""
        hp = self.hparams
        weight = None
        if hp.task == "inpaint" and hp.outside_mask_weight != 1.0:
            mask = batch[self.conditioning.concat_key][:, -1:].float()
            weight = mask + hp.outside_mask_weight * (1 - mask)
        if hp.valid_key is not None:
            valid = batch[hp.valid_key].float()
            weight = valid if weight is None else weight * valid
        return weight

    def latents(self, batch: dict, scale: float) -> torch.Tensor:
        """The batch's images as scaled latents: encoded here, or cached by the data (``ManifestDataModule``'s
        ``latents``), which must come from this model's autoencoder."""
        if LATENT_KEY not in batch:
            return latent.encode(self.autoencoder, batch["image"], scale)
        if any(source != self.autoencoder_fingerprint for source in batch[LATENT_KEY]):
            raise MeddiffError(f"the data's cached latents come from another autoencoder than model.autoencoder "
                               f"({self.hparams.autoencoder}): give data.latents the same folder")
        return batch["image"] * scale

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """A latent model's scale factor, once, from its first training batch (rank 0's, for every rank); an
        inpainting model's check of the data's condition, once, on its first training batch."""
        if self.hparams.task == "inpaint" and not self.condition_checked:
            self.check_condition(batch)
            self.condition_checked = True
        if self.autoencoder_folder is not None and float(self.latent_scale) == 0.0:
            factor = latent.scale_factor(self.latents(batch, 1.0))
            self.latent_scale.fill_(self.trainer.strategy.broadcast(factor) if self._trainer else factor)

    def check_condition(self, batch: dict) -> None:
        """That the data builds the condition this model takes (``conditioning.prefill``: the data's
        ``RandInpaintMaskd`` must have the same ``prefill``), recomputed for the batch's first item: a mismatch
        would train a network ``meddiff inpaint`` then feeds another condition."""
        key, prefill = self.conditioning.concat_key, self.conditioning.prefill
        condition = batch[key][:1].float()
        expected = inpaint_condition(batch["image"][:1].float(), condition[:, 1:], channel_dim=1, prefill=prefill)
        if not torch.allclose(condition, expected, atol=1e-4):
            raise MeddiffError(f"the data's {key} is not the condition this model takes (conditioning.prefill "
                               f"{prefill or 'null'}): give the data's meddiff.data.masks.RandInpaintMaskd prefill: "
                               f"{prefill or 'null'}")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        size = batch["image"].shape[0]
        if self.autoencoder_folder is not None and float(self.latent_scale) == 0.0:
            return  # the sanity check before training: no scale factor yet
        with torch.no_grad():  # the same noise every epoch, for the raw and the EMA weights
            for name, unet in (("val/loss", self.unet), ("val/loss_ema", self.ema.module)):
                generator = torch.Generator(self.device).manual_seed(self.hparams.seed + batch_idx)
                self.log(name, self.loss(batch, generator, unet), prog_bar=name == "val/loss", sync_dist=True,
                         batch_size=size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["meddiff_module"] = KIND

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.global_rank == 0:
            self.diffusion_model().save_pretrained(self.hparams.export_dir, overwrite=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def ema_with_warmup(decay: float):
    """EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates.

    torch's ``get_ema_multi_avg_fn`` uses a fixed decay, so early random weights linger in the
    average for thousands of steps and shrink the EMA model's outputs (diffusers' EMAModel warms up
    the same way).
    """

    @torch.no_grad()
    def update(ema_params, current_params, num_averaged) -> None:
        n = int(num_averaged)
        effective = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(ema_params, current_params, 1.0 - effective)

    return update
