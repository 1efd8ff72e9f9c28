"""``DiffusionModule``: the denoising-diffusion training objective around a MONAI UNet, with EMA."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from meddiff.data.latents import LATENT_KEY, fingerprint
from meddiff.diffusion import latent
from meddiff.diffusion.schedulers import NoiseSchedule
from meddiff.errors import MeddiffError
from meddiff.model import DiffusionModel, ModelConfig, load_autoencoder
from meddiff.nets import build_unet
from meddiff.pipelines import DiffusionPipeline

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


class DiffusionModule(SeededEMATraining):
    """Trains ``build_unet(...)`` to predict eps, v or x0 from noised images (Ho et al. 2020).

    Every argument is a plain value so a LightningCLI YAML (and the checkpoint) holds the whole
    recipe. ``class_key`` names a batch entry of integer labels (class conditioning); ``concat_key``
    names a batch entry concatenated to the input channels (``task`` "inpaint": the masked image and the mask,
    so ``meddiff inpaint`` fills with the model itself instead of RePaint). Noise and timesteps of each step come
    from a generator seeded by (``seed``, step, batch, rank), so after a resume the noise is what an
    uninterrupted run would draw; ``ManifestDataModule`` replays data order and random crops, so a
    run resumed with ``--ckpt_path last`` ends with the weights of an uninterrupted one. ``image_shape``,
    ``image_spacing``, ``modality`` and ``intensity_range`` travel into the exported pipeline so
    generated images come back in physical units. ``text_encoder``
    (``load_text_encoder`` spec) conditions the UNet on ``batch[report_key]`` through cross-attention;
    with probability ``condition_dropout`` a report is replaced by the empty report, so the same
    network also learns the unconditional model that classifier-free guidance needs. ``max_train_timestep`` limits
    training to the low-noise timesteps ``[0, max)``: a denoising prior (``meddiff denoise`` only
    starts from the noise level of a scan) spends its whole capacity there but cannot generate.
    An inpainting model's loss weighs voxels outside the mask (the last condition channel) by
    ``outside_mask_weight``: the region to fill is what it must learn, outside it the input is kept anyway.
    ``valid_key`` names a batch entry that is 0 where the image holds no data (a CT's padding outside the
    scanner's field of view): those voxels never enter the loss. ``autoencoder`` (a first-stage folder,
    ``AutoencoderModule``'s ``export_dir``, or a latent model folder) makes a latent model: the frozen encoder
    maps each batch to latents (posterior mean x the scale factor computed from the first batch), or the data
    brings them cached (``ManifestDataModule``'s ``latents``, the same folder), and the UNet learns those; the
    exported folder holds both networks and ``meddiff generate`` decodes. ``schedule``
    "rflow" trains rectified flow (``meddiff.diffusion.schedulers``) instead of a DDPM-family schedule.
    ``export_dir``: where the model folder (EMA weights, as ``meddiff export`` writes it) goes when training ends.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True),
        num_res_blocks: int = 1,
        num_head_channels: int = 32,
        norm_num_groups: int = 32,
        num_class_embeds: int | None = None,
        class_key: str = "label",
        concat_channels: int = 0,
        concat_key: str | None = None,
        task: str = "generate",
        outside_mask_weight: float = 1.0,
        valid_key: str | None = None,
        autoencoder: str | None = None,
        text_encoder: str | None = None,
        report_key: str = "report",
        condition_dropout: float = 0.1,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        prediction: str = "eps",
        schedule: str = "ddpm",
        timestep_sampling: str = "uniform",
        max_train_timestep: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        image_shape: Sequence[int] = (64, 64),
        image_spacing: Sequence[float] | None = None,
        modality: str = "MR",
        intensity_range: Sequence[float] = (-1.0, 1.0),
        export_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if (concat_channels > 0) != (concat_key is not None):
            raise MeddiffError("concat_channels and concat_key go together: set both or neither")
        if task not in ("generate", "inpaint"):
            raise MeddiffError(f"task must be generate or inpaint, not {task!r}")
        if task == "inpaint" and concat_channels != 2:
            raise MeddiffError("task inpaint takes concat_channels 2 (the masked image and the mask: "
                               "concat_key inpaint_condition, made by meddiff.data.masks.RandInpaintMaskd)")
        if not 0.0 <= outside_mask_weight <= 1.0 or (outside_mask_weight != 1.0 and task != "inpaint"):
            raise MeddiffError(f"outside_mask_weight must be in [0, 1] and needs task inpaint, "
                               f"not {outside_mask_weight}")
        if len(image_shape) != spatial_dims:
            raise MeddiffError(f"image_shape {list(image_shape)} must have {spatial_dims} entries")
        if max_train_timestep is not None and not 0 < max_train_timestep <= num_train_timesteps:
            raise MeddiffError(f"max_train_timestep {max_train_timestep} must be in 1..{num_train_timesteps}")
        if not 0.0 <= condition_dropout < 1.0:
            raise MeddiffError(f"condition_dropout must be in [0, 1), got {condition_dropout}")
        self.save_hyperparameters()
        self.text_encoder = None
        if text_encoder is not None:
            from meddiff.encoders import load_text_encoder

            # frozen and kept out of the module tree: checkpoints hold the UNet, not a copy of the text model
            object.__setattr__(self, "text_encoder", load_text_encoder(text_encoder))
        self.autoencoder_folder = None
        if autoencoder is not None:
            self._attach_autoencoder(autoencoder)
        self.unet = build_unet(**self.unet_config())
        self.schedule = NoiseSchedule(num_train_timesteps, beta_schedule, prediction, schedule, timestep_sampling)
        self.ema = AveragedModel(self.unet, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)  # updated by averaging, never by gradients (and ignored by DDP)

    def _attach_autoencoder(self, directory: str) -> None:
        """The frozen first stage of a latent model, from its folder; the UNet then works on its latents."""
        hp = self.hparams
        if hp.task != "generate" or hp.concat_key or hp.valid_key or hp.max_train_timestep:
            raise MeddiffError("a latent model (autoencoder) generates only: no task inpaint, concat_key, valid_key "
                               "or max_train_timestep")
        folder, network = load_autoencoder(directory)
        if folder.autoencoder.spatial_dims != hp.spatial_dims or any(
                side % folder.autoencoder.downsample for side in hp.image_shape):
            raise MeddiffError(f"the autoencoder in {directory} is {folder.autoencoder.spatial_dims}D and halves "
                               f"{len(folder.autoencoder.channels) - 1} times; image_shape {list(hp.image_shape)} "
                               "does not fit it")
        self.autoencoder_folder = folder
        self.autoencoder = network.requires_grad_(False)
        self.autoencoder_fingerprint = fingerprint(network)
        # 1 / std of the training latents, from the first training batch (0: not yet known); kept in checkpoints
        self.register_buffer("latent_scale", torch.zeros(()))

    @property
    def latent_channels(self) -> int:
        return 1 if self.autoencoder_folder is None else self.autoencoder_folder.autoencoder.latent_channels

    def unet_config(self) -> dict:
        hp = self.hparams
        return {
            "spatial_dims": hp.spatial_dims,
            "channels": list(hp.channels),
            "attention_levels": list(hp.attention_levels),
            "num_res_blocks": hp.num_res_blocks,
            "num_head_channels": hp.num_head_channels,
            "norm_num_groups": hp.norm_num_groups,
            "num_class_embeds": hp.num_class_embeds,
            "concat_channels": hp.concat_channels,
            "in_channels": self.latent_channels,
            "out_channels": self.latent_channels,
            "cross_attention_dim": self.text_encoder.dim if self.text_encoder is not None else None,
        }

    def model_config(self) -> ModelConfig:
        """The description of the model this module trains, as ``meddiff export`` saves it."""
        hp = self.hparams
        limited = hp.max_train_timestep is not None and hp.max_train_timestep < hp.num_train_timesteps
        return ModelConfig(
            unet=self.unet_config(),
            schedule=self.schedule,
            image={"shape": list(hp.image_shape),
                   "spacing": None if hp.image_spacing is None else list(hp.image_spacing),
                   "modality": hp.modality, "intensity_range": tuple(hp.intensity_range)},
            text_encoder=(
                None
                if self.text_encoder is None
                else {"spec": hp.text_encoder, "max_length": self.text_encoder.max_length}
            ),
            max_train_timestep=hp.max_train_timestep if limited else None,
            task=hp.task,
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
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = self.schedule.draw_timesteps(x0.shape[0], generator, x0.device, self.hparams.max_train_timestep)
        xt, target = self.schedule.noised_and_target(x0, noise, t)
        if self.hparams.concat_key:
            xt = torch.cat([xt, batch[self.hparams.concat_key]], dim=1)
        labels = batch[self.hparams.class_key].long() if self.hparams.num_class_embeds else None
        context = None
        if self.text_encoder is not None:
            reports = list(batch[self.hparams.report_key])
            dropped = torch.rand(len(reports), generator=generator, device=x0.device) < self.hparams.condition_dropout
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
            mask = batch[hp.concat_key][:, -1:].float()
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
        """A latent model's scale factor, once, from its first training batch (rank 0's, for every rank)."""
        if self.autoencoder_folder is not None and float(self.latent_scale) == 0.0:
            factor = latent.scale_factor(self.latents(batch, 1.0))
            self.latent_scale.fill_(self.trainer.strategy.broadcast(factor) if self._trainer else factor)

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
