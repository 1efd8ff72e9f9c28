"""Few-shot adapters of a trained model: ``LoRAModule`` and ``TextualInversionModule``.

Each wraps a ``DiffusionModule`` built from the base model's own description and weights (``base``: a bundled
model's name or a model folder), so the loss is the base's objective with its conditioning (``DiffusionModule.loss``:
class labels, concatenated channels, reports, latents) on K images of a manifest (``ManifestDataModule``). The base
stays frozen; only the adapter's parameters train (peft), with the seeded noise and the EMA of
``SeededEMATraining`` (over the adapted networks). At the end of training ``export_dir`` gets the adapter folder
(``meddiff.adapters``: ``adapter_config.json`` + ``adapter.safetensors``, from the EMA weights) and its size is
printed; ``meddiff export CKPT OUT`` writes the same folder from a checkpoint.
"""

from __future__ import annotations

import contextvars
import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from meddiff.adapters import (
    ADAPTER,
    TEXT_TARGETS,
    TOKEN_EMBEDDING,
    UNET_TARGETS,
    AdapterConfig,
    add_token,
    inject_lora,
    peft_state,
    save_adapter,
)
from meddiff.errors import MeddiffError
from meddiff.model import DiffusionModel, UNetConfig, load_model
from meddiff.training.module import (
    DEFAULT_CONDITIONING,
    Conditioning,
    DiffusionModule,
    Inference,
    SeededEMATraining,
    ema_with_warmup,
    plain_hyperparameters,
    typed,
)


class TrainableContext:
    """The report encoder as ``DiffusionModule.loss`` calls it, but with gradients (its ``context`` runs in inference
    mode and caches): what lets the loss reach the text model's adapter."""

    def __init__(self, encoder):
        self.encoder, self.dim, self.max_length = encoder, encoder.dim, encoder.max_length

    def context(self, reports: list[str]) -> torch.Tensor:
        return self.encoder.trainable_context(reports)


class AdapterModule(SeededEMATraining):
    """What both adapter kinds share: the wrapped ``DiffusionModule`` of the frozen base (``diffusion``), the text
    model when the adapter reaches into it (``text_model``), the EMA of the adapted networks, and the export."""

    trained = "adapted"
    kind = ""

    def _wrap(self, base: str, conditioning: Conditioning) -> None:
        """``self.diffusion``: a DiffusionModule whose networks are the base model's, frozen."""
        model = load_model(base)
        config = model.config
        unet = config.unet
        if config.controlnet or config.scalars or unet.include_region_inputs or unet.include_spacing_input:
            raise MeddiffError(f"the base model {base} takes a ControlNet, scalar or body-region inputs, which adapter "
                               "training does not feed — adapt a model DiffusionModule trains")
        conditioning = replace(typed(Conditioning, conditioning, "conditioning"), text_encoder=None,
                               prefill=config.inpaint_prefill)
        # built in an empty context: while LightningCLI instantiates this module, a context variable hands the
        # hyperparameters it parsed (ours) to every save_hyperparameters call, the wrapped module's too
        self.diffusion = contextvars.Context().run(
            DiffusionModule, unet=config.unet, schedule=config.schedule, image=config.image, conditioning=conditioning,
            task=config.task, max_train_timestep=config.max_train_timestep, seed=self.hparams.seed,
            inference=Inference(config.denoise_strength, config.denoise_tile, config.inpaint_steps),
            autoencoder=str(model.folder) if config.autoencoder else None)
        self.diffusion.unet = model.unet.requires_grad_(False)  # the base's own weights, not a rebuilt copy
        del self.diffusion.ema  # the EMA here is the adapter's (``adapted``), not a copy of the frozen base
        if config.autoencoder is not None:
            self.diffusion.latent_scale.fill_(config.autoencoder.scale_factor)
        text_encoder = model.text_encoder if config.text_encoder else None
        object.__setattr__(self.diffusion, "text_encoder", text_encoder)  # frozen: out of the module tree
        self.base_model, self.base_name = model, Path(base).name
        self.text_model = None

    def _train_text_model(self) -> None:
        """The report encoder's model joins the module tree (its adapter trains, checkpoints hold it) and the loss
        encodes reports with gradients."""
        encoder = self.diffusion.text_encoder
        self.text_model = encoder.model
        object.__setattr__(self.diffusion, "text_encoder", TrainableContext(encoder))

    def _start_ema(self, decay: float) -> None:
        # parameters only: the adapted networks' buffers never train (and a text model's are integer ids)
        self.ema = AveragedModel(self.adapted, multi_avg_fn=ema_with_warmup(decay), use_buffers=False)
        self.ema.requires_grad_(False)

    def unet_config(self) -> UNetConfig:
        """The base's UNet (what ``SampleGrid`` asks of a module)."""
        return self.base_model.config.unet

    @property
    def text_encoder(self):
        """The base's report encoder as the loss uses it, or None (what ``SampleGrid`` asks of a module)."""
        return self.diffusion.text_encoder

    @property
    def adapted(self) -> nn.ModuleDict:
        """The networks the adapter changes, by the name its tensors carry."""
        networks = {"unet": self.diffusion.unet}
        if self.text_model is not None:
            networks["text_encoder"] = self.text_model
        return nn.ModuleDict(networks)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return self.diffusion.loss(batch, generator)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self.diffusion.on_train_batch_start(batch, batch_idx)  # an inpainting base checks the data's condition

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with torch.no_grad():
            generator = torch.Generator(self.device).manual_seed(self.hparams.seed + batch_idx)
            self.log("val/loss", self.loss(batch, generator), prog_bar=True, sync_dist=True,
                     batch_size=batch["image"].shape[0])

    def configure_optimizers(self):
        trainable = [p for p in self.adapted.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.hparams.lr, weight_decay=0.0)

    def diffusion_model(self, ema: bool = True) -> DiffusionModel:
        """The base model with this adapter (EMA weights), for sampling during training (``SampleGrid``)."""
        from meddiff.encoders.text import HFTextEncoder

        networks = self.ema.module if ema else self.adapted
        model = DiffusionModel(self.base_model.config, {**self.base_model.networks, "unet": networks["unet"]})
        if self.text_model is not None:
            encoder = self.diffusion.text_encoder.encoder
            text = networks["text_encoder"] if ema else copy.deepcopy(self.text_model)  # HFTextEncoder freezes it
            model._text_encoder = HFTextEncoder(encoder.spec, encoder.tokenizer, text, encoder.max_length,
                                                encoder.padded)
        elif self.diffusion.text_encoder is not None:
            model._text_encoder = self.diffusion.text_encoder
        return model

    def adapter_tensors(self, networks: nn.ModuleDict) -> dict[str, torch.Tensor]:
        """The adapter's tensors, keyed as ``meddiff.adapters`` reads them."""
        raise NotImplementedError

    def adapter_config(self) -> AdapterConfig:
        raise NotImplementedError

    def save_adapter(self, directory: str, ema: bool = True, overwrite: bool = False) -> Path:
        """Write the adapter folder and print its size beside the base model's."""
        out = save_adapter(directory, self.adapter_config(), self.adapter_tensors(self.ema.module if ema else
                                                                                  self.adapted), overwrite)
        written = AdapterConfig.model_validate_json((out / "adapter_config.json").read_bytes())
        size = sum(p.stat().st_size for p in out.iterdir())
        folder = self.base_model.folder
        base = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder else 0
        print(f"wrote adapter {out} ({self.kind}, {written.parameters:,} parameters, {size:,} bytes; the base model's "
              f"weights: {base:,} bytes)")
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["meddiff_module"] = self.kind

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.global_rank == 0:
            self.save_adapter(self.hparams.export_dir, overwrite=True)


class LoRAModule(AdapterModule):
    """LoRA of rank ``rank`` (``alpha``: its scale numerator, default ``rank``) on the base UNet's modules that
    ``target_modules`` (a peft regex; default: attention projections and res-block convolutions) names; with
    ``text_encoder`` also on the report encoder's attention (``text_target_modules``) of a report-conditioned
    base. ``conditioning``: the batch keys of the base's conditions (``Conditioning``; its text encoder is the
    base's)."""

    kind = "lora"

    def __init__(
        self,
        base: str,
        rank: int = 4,
        alpha: float | None = None,
        target_modules: str = UNET_TARGETS,
        text_encoder: bool = False,
        text_target_modules: str = TEXT_TARGETS,
        conditioning: Conditioning = DEFAULT_CONDITIONING,
        lr: float = 1e-3,
        ema_decay: float = 0.99,
        export_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or (alpha is not None and alpha <= 0):
            raise MeddiffError(f"rank must be a whole number >= 1 and alpha > 0, not {rank} and {alpha}")
        self.save_hyperparameters()
        conditioning = typed(Conditioning, conditioning, "conditioning")
        plain_hyperparameters(self, conditioning=conditioning)
        self._wrap(base, conditioning)
        self.alpha = float(alpha or rank)
        self.targets = {"unet": target_modules}
        inject_lora(self.diffusion.unet, rank, self.alpha, target_modules)
        if text_encoder:
            if self.diffusion.text_encoder is None:
                raise MeddiffError(f"text_encoder: the base model {base} is not report-conditioned — leave it false")
            inject_lora(self.diffusion.text_encoder.model, rank, self.alpha, text_target_modules)
            self.targets["text_encoder"] = text_target_modules
            self._train_text_model()
        self._start_ema(ema_decay)

    def adapter_tensors(self, networks: nn.ModuleDict) -> dict[str, torch.Tensor]:
        return {f"{part}.{key}": value for part in self.targets for key, value in peft_state(networks[part]).items()}

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(kind="lora", base=self.base_name, base_weights_sha256=self.base_model.weights_sha256,
                             rank=self.hparams.rank, alpha=self.alpha, target_modules=self.targets)


class TextualInversionModule(AdapterModule):
    """Learns one new token (``token``, e.g. ``<finding>``) of a report-conditioned base's report encoder from K
    images whose reports contain it: the token joins the tokenizer, its embedding row starts at the mean embedding
    of ``initializer`` (a word; default: the whole vocabulary's mean) and only that row trains (peft's
    ``TrainableTokens``); the UNet and the rest of the encoder stay as they are."""

    kind = "textual_inversion"

    def __init__(
        self,
        base: str,
        token: str = "<finding>",
        initializer: str | None = None,
        conditioning: Conditioning = DEFAULT_CONDITIONING,
        lr: float = 5e-3,
        ema_decay: float = 0.99,
        export_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        conditioning = typed(Conditioning, conditioning, "conditioning")
        plain_hyperparameters(self, conditioning=conditioning)
        self._wrap(base, conditioning)
        encoder = self.diffusion.text_encoder
        if encoder is None:
            raise MeddiffError(f"textual inversion needs a report-conditioned base model; {base} takes no reports")
        from peft import TrainableTokensConfig, inject_adapter_in_model

        index = add_token(encoder, token, initializer)
        table = encoder.model.get_input_embeddings()
        self.table_name = next(name for name, module in encoder.model.named_modules() if module is table)
        inject_adapter_in_model(TrainableTokensConfig(target_modules=[self.table_name], token_indices=[index]),
                                encoder.model, ADAPTER)
        self._train_text_model()
        self._start_ema(ema_decay)
        self.reports_with_token = 0

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        reports = batch.get(self.hparams.conditioning["report_key"]) or []
        self.reports_with_token += sum(self.hparams.token in str(report) for report in reports)

    def on_train_end(self) -> None:
        if not self.reports_with_token:
            raise MeddiffError(f"no training report contained the token {self.hparams.token}, so nothing was learnt "
                               "— write it into the reports of the K images (e.g. 'A <finding> in the left region.')")
        super().on_train_end()

    def adapter_tensors(self, networks: nn.ModuleDict) -> dict[str, torch.Tensor]:
        (row,) = peft_state(networks["text_encoder"]).values()  # peft's trainable_tokens_delta: the token's row
        return {TOKEN_EMBEDDING: row}

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(kind="textual_inversion", base=self.base_name,
                             base_weights_sha256=self.base_model.weights_sha256, token=self.hparams.token)
