"""``AutoencoderModule``: the first stage of a latent model, MONAI ``AutoencoderKL`` trained as latent diffusion
and MAISI train theirs.

Loss: L1 reconstruction + ``kl_weight`` x the KL divergence of the posterior from N(0, 1) + (after
``adversarial_start`` batches) ``adversarial_weight`` x a least-squares patch-adversarial term from a MONAI
``PatchDiscriminator``, and with ``perceptual_weight`` > 0 a perceptual term: the distance between unit-normalised
RadImageNet ResNet-50 feature maps of the image and its reconstruction (MONAI's RadImageNet perceptual loss), the
network read from its local weights file (``perceptual_weights``, or where ``meddiff evaluate`` finds it); a 3D
autoencoder gets it on its axial slices.
Two optimizers (Lightning manual optimisation), so ``trainer.max_steps`` counts the autoencoder's and the
discriminator's steps (two per batch once the discriminator has started). At the end of training the module
writes ``export_dir`` (``meddiff.model.save_autoencoder``), the folder a ``DiffusionModule(autoencoder=...)`` trains on.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss

from meddiff.errors import MeddiffError
from meddiff.model import AutoencoderConfig, AutoencoderFolder, ImageConfig, save_autoencoder
from meddiff.nets import build_discriminator
from meddiff.training.migrate import nested_arguments
from meddiff.training.module import plain_hyperparameters, typed

KIND = "autoencoder"  # what ``meddiff export`` reads from a checkpoint to rebuild this module


DEFAULT_AUTOENCODER = AutoencoderConfig()
DEFAULT_IMAGE = ImageConfig(shape=[64, 64], modality="CT")


class AutoencoderModule(pl.LightningModule):
    """Trains ``autoencoder`` (an ``AutoencoderConfig``; no ``attention_levels`` means none at every level,
    ``scale_factor`` is the latent model's to compute); the typed arguments and the training-only ones hold the
    whole recipe in the YAML (``model.init_args.autoencoder.channels``, ...). ``image`` (``ImageConfig``)
    describes what the latent model trained on this autoencoder will generate. Older flat arguments map onto
    these with ``meddiff.training.migrate.nested_arguments`` (``AutoencoderModule.from_flat``)."""

    def __init__(
        self,
        autoencoder: AutoencoderConfig = DEFAULT_AUTOENCODER,
        image: ImageConfig = DEFAULT_IMAGE,
        kl_weight: float = 1e-6,
        adversarial_weight: float = 0.01,
        adversarial_start: int = 0,
        perceptual_weight: float = 0.0,
        perceptual_weights: str | None = None,
        discriminator_channels: int = 32,
        discriminator_layers: int = 3,
        lr: float = 1e-4,
        discriminator_lr: float = 5e-4,
        export_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        config, image = typed(AutoencoderConfig, autoencoder, "autoencoder"), typed(ImageConfig, image, "image")
        if not any(config.attention_levels) and len(config.attention_levels) != len(config.channels):  # none: per level
            config = config.model_copy(update={"attention_levels": [False] * len(config.channels)})
        if len(image.shape) != config.spatial_dims:
            raise MeddiffError(f"image.shape {list(image.shape)} must have {config.spatial_dims} entries")
        if kl_weight < 0 or adversarial_weight < 0 or adversarial_start < 0 or perceptual_weight < 0:
            raise MeddiffError("kl_weight, adversarial_weight, adversarial_start and perceptual_weight must be >= 0")
        self.save_hyperparameters()
        plain_hyperparameters(self, autoencoder=config, image=image)
        self.automatic_optimization = False
        self.config, self.image = config, image
        self.autoencoder = self.config.build()
        self.discriminator = build_discriminator(config.spatial_dims, discriminator_channels, discriminator_layers)
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")  # no parameters, no state
        self.perceptual_network = None
        if perceptual_weight > 0:
            from meddiff.metrics.features import radimagenet_trunk

            # frozen and kept out of the module tree: checkpoints hold the autoencoder, not a copy of ResNet-50
            object.__setattr__(self, "perceptual_network", radimagenet_trunk(perceptual_weights))

    def perceptual(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Mean squared distance between channel-normalised feature maps (LPIPS without learnt weights, as
        MONAI's ``RadImageNetPerceptualSimilarity``), model units [-1, 1] -> [0, 1], BGR mean removed."""
        network = self.perceptual_network.to(x.device)
        if x.ndim == 5:  # a volume: its axial slices
            recon, x = (v.movedim(-1, 1).flatten(0, 1) for v in (recon, x))
        mean = torch.tensor([0.406, 0.456, 0.485], device=x.device).view(1, 3, 1, 1)

        def features(v: torch.Tensor) -> torch.Tensor:
            out = network(((v.float() + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1) - mean)
            return out / (out.norm(dim=1, keepdim=True) + 1e-10)

        return (features(recon) - features(x)).pow(2).sum(dim=1).mean()

    @classmethod
    def from_flat(cls, **flat) -> AutoencoderModule:
        """The module from the flat arguments of older configs and checkpoints (``channels=...,
        image_shape=...``), through ``meddiff.training.migrate.nested_arguments``."""
        return cls(**nested_arguments(flat, KIND))

    def folder_config(self) -> AutoencoderFolder:
        return AutoencoderFolder(autoencoder=self.config, image=self.image)

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """The reconstruction of ``x`` from a posterior sample (the mean without ``generator``), mean and sigma."""
        mean, sigma = self.autoencoder.encode(x)
        z = mean if generator is None else mean + sigma * torch.randn(
            mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.autoencoder.decode(z), mean, sigma

    @staticmethod
    def kl(mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, sigma^2) || N(0, 1)) summed over a latent, averaged over the batch."""
        per_voxel = mean.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1
        return 0.5 * per_voxel.flatten(1).sum(dim=1).mean()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        opt_ae, opt_d = self.optimizers()
        x = batch["image"]
        seed = (hp.seed * 1_000_003 + int(self.batches_seen) * 1_009 + self.global_rank) % 2**63
        recon, mean, sigma = self.reconstruct(x, torch.Generator(x.device).manual_seed(seed))
        l1 = F.l1_loss(recon.float(), x.float())
        kl = self.kl(mean.float(), sigma.float())
        loss = l1 + hp.kl_weight * kl
        if self.perceptual_network is not None:
            perceptual = self.perceptual(recon, x)
            loss = loss + hp.perceptual_weight * perceptual
            self.log("train/perceptual", perceptual, batch_size=x.shape[0])
        adversarial = hp.adversarial_weight > 0 and int(self.batches_seen) >= hp.adversarial_start
        adv = self.adversarial_loss
        if adversarial:
            fooled = adv(self.discriminator(recon.float())[-1], target_is_real=True, for_discriminator=False)
            loss = loss + hp.adversarial_weight * fooled
            self.log("train/generator", fooled, batch_size=x.shape[0])
        opt_ae.zero_grad()
        self.manual_backward(loss)
        opt_ae.step()
        if adversarial:
            fake = adv(self.discriminator(recon.detach().float())[-1], target_is_real=False, for_discriminator=True)
            real = adv(self.discriminator(x.float())[-1], target_is_real=True, for_discriminator=True)
            loss_d = hp.adversarial_weight * 0.5 * (fake + real)
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
            self.log("train/discriminator", loss_d, batch_size=x.shape[0])
        self.batches_seen += 1
        self.log("train/l1", l1, prog_bar=True, batch_size=x.shape[0])
        self.log("train/kl", kl, batch_size=x.shape[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        with torch.no_grad():
            recon, _, _ = self.reconstruct(x)
        low, high = self.image.intensity_range
        error = (recon.float() - x.float()).abs() * (high - low) / 2  # model units -> physical units
        self.log("val/l1", F.l1_loss(recon.float(), x.float()), prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        self.log("val/mae", error.mean(), sync_dist=True, batch_size=x.shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        return (torch.optim.AdamW(self.autoencoder.parameters(), lr=hp.lr),
                torch.optim.AdamW(self.discriminator.parameters(), lr=hp.discriminator_lr))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["meddiff_module"] = KIND

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.global_rank == 0:
            self.save_pretrained(self.hparams.export_dir, overwrite=True)

    def save_pretrained(self, directory, overwrite: bool = False):
        """The first-stage folder: ``config.json`` and ``autoencoder.safetensors``."""
        return save_autoencoder(self.folder_config(), self.autoencoder, directory, overwrite=overwrite)
