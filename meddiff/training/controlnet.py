"""``ControlNetModule``: a label-map ControlNet trained on a frozen base model (Zhang et al. 2023; MAISI's
ControlNet on organ label maps).

The base model folder (pixel or latent, DDPM family or rectified flow) stays as it is; the ControlNet starts as
a copy of the base UNet's encoder (MONAI ``copy_model_state``) with zero-initialised output convolutions, so
training starts from the base model's own samples. Each batch's integer label map (``labels_key``, the
manifest record's ``mask``) enters as the binary digits of its labels (``meddiff.nets.label_bits``) and, given
``structure_hu`` (a JSON file ``{label: HU}``, e.g. the sample set's ``chest_ct_structure_hu.json``: each structure's
median HU over the training CT), as one more channel, the map rendered in HU (``meddiff.data.structure_hu``), built
by ``ControlNetConfig.condition`` as generation builds it; the loss is the base model's own objective.
``structures`` (a JSON file ``{label: name}``, e.g. the sample set's ``chest_ct_structures.json``) names the labels
in the exported model. At the end of training the module writes ``export_dir`` (the base model plus the
ControlNet's EMA weights and both tables), which ``meddiff generate --condition`` uses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from meddiff.diffusion import latent
from meddiff.errors import MeddiffError, first_line
from meddiff.model import ControlNetConfig, DiffusionModel, ModelConfig, load_model
from meddiff.nets.controlnet import bits_needed
from meddiff.training.module import SeededEMATraining, ema_with_warmup

KIND = "controlnet"  # what ``meddiff export`` reads from a checkpoint to rebuild this module


def read_structures(path: str | None) -> dict[int, str]:
    """``{label: name}`` from a JSON file (label keys as strings or numbers), or {} without one."""
    if path is None:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
        structures = {int(label): str(name) for label, name in raw.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise MeddiffError(f"cannot read the structure names in {path}: {exc} — give a JSON object "
                           '{"1": "spleen", ...}') from None
    if any(label <= 0 for label in structures):
        raise MeddiffError(f"{path}: structure labels must be >= 1 (0 is the background)")
    return structures


def read_structure_hu(path: str | None) -> dict[int, float]:
    """``{label: HU}`` from a JSON file (label keys as strings or numbers; 0: unlabelled body), or {} without one."""
    if path is None:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
        table = {int(label): float(hu) for label, hu in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise MeddiffError(f"cannot read the structure HU table in {path}: {exc} — give a JSON object "
                           '{"0": -54.0, "1": 175.0, ...} (meddiff manifest samples writes chest_ct_structure_hu.json)'
                           ) from None
    if 0 not in table or min(table) < 0:
        raise MeddiffError(f"{path}: the structure HU table needs label 0 (unlabelled body) and labels >= 0")
    return table


class ControlNetModule(SeededEMATraining):
    """Trains a ControlNet for the model in ``base``. ``conditioning_channels``: binary digits per label (default:
    enough for the largest named structure, else 8; the HU rendering of ``structure_hu`` adds one channel);
    ``conditioning_embedding_channels``: the condition's embedding (default: 16 channels, doubling once per halving
    the model needs: a latent model's down-sampling)."""

    trained = "controlnet"

    def __init__(
        self,
        base: str,
        structures: str | None = None,
        structure_hu: str | None = None,
        labels_key: str = "mask",
        conditioning_channels: int | None = None,
        conditioning_embedding_channels: Sequence[int] | None = None,
        conditioning_scale: float = 1.0,
        lr: float = 1e-4,
        ema_decay: float = 0.999,
        export_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        names, table = read_structures(structures), read_structure_hu(structure_hu)
        model = load_model(base)
        downsample = model.config.autoencoder.downsample if model.config.autoencoder else 1
        if model.config.controlnet is not None or model.config.task != "generate" or model.config.text_encoder:
            raise MeddiffError(f"the base model in {base} must be an unconditional generator (no ControlNet, "
                               "inpainting task or text encoder)")
        embedding = list(conditioning_embedding_channels or [16 * 2**i for i in range(downsample.bit_length())])
        bits = conditioning_channels or (bits_needed(max(names)) if names else 8)
        self.control_config = ControlNetConfig(
            conditioning_channels=bits + (1 if table else 0), conditioning_embedding_channels=embedding,
            conditioning_scale=conditioning_scale, structures=names, structure_hu=table)
        try:  # validated: the embedding must bring the label map to the grid the UNet runs on
            self.base_config = ModelConfig.model_validate({**model.config.model_dump(mode="json"),
                                                           "controlnet": self.control_config.model_dump(mode="json")})
        except ValueError as exc:
            raise MeddiffError(f"this ControlNet does not fit the model in {base}: "
                               f"{first_line(exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc)}") from None
        from monai.networks.utils import copy_model_state

        self.unet = model.unet.requires_grad_(False)
        self.autoencoder = None if model.autoencoder is None else model.autoencoder.requires_grad_(False)
        self.controlnet = self.control_config.build(model.config.unet)
        copy_model_state(self.controlnet, self.unet.state_dict())  # the encoder's weights; the rest stays zero
        self.ema = AveragedModel(self.controlnet, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.schedule = model.config.schedule

    def diffusion_model(self, ema: bool = True) -> DiffusionModel:
        """The base model with this ControlNet (EMA weights), as ``meddiff export`` saves it."""
        networks = {"unet": self.unet, "controlnet": self.ema.module if ema else self.controlnet}
        if self.autoencoder is not None:
            networks["autoencoder"] = self.autoencoder
        return DiffusionModel(self.base_config, networks)

    def loss(self, batch: dict, generator: torch.Generator, controlnet: torch.nn.Module | None = None):
        x0, labels = batch["image"], batch.get(self.hparams.labels_key)
        if labels is None:
            raise MeddiffError(f"the batch holds no {self.hparams.labels_key!r}: give records with a label map "
                               "(the manifest's mask)")
        control = self.control_config.condition(labels.round(), self.base_config.image.intensity_range)
        if self.autoencoder is not None:
            x0 = latent.encode(self.autoencoder, x0, self.base_config.autoencoder.scale_factor)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = self.schedule.draw_timesteps(x0.shape[0], generator, x0.device)
        xt, target = self.schedule.noised_and_target(x0, noise, t)
        down, middle = (controlnet or self.controlnet)(xt, t, control, self.control_config.conditioning_scale)
        prediction = self.unet(xt, timesteps=t, down_block_additional_residuals=down,
                               mid_block_additional_residual=middle)
        return F.mse_loss(prediction.float(), target.float())

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with torch.no_grad():
            generator = torch.Generator(self.device).manual_seed(self.hparams.seed + batch_idx)
            self.log("val/loss_ema", self.loss(batch, generator, self.ema.module), sync_dist=True,
                     batch_size=batch["image"].shape[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.controlnet.parameters(), lr=self.hparams.lr)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["meddiff_module"] = KIND

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.global_rank == 0:
            self.diffusion_model().save_pretrained(self.hparams.export_dir, overwrite=True)
