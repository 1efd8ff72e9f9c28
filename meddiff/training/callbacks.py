"""Training callbacks: sample grids of the EMA model, written as PNG and sent to the loggers; the record of a run
(steps, wall time, device) that a model card is written from."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from meddiff.errors import MeddiffError
from meddiff.pipelines.generate import sample
from meddiff.pipelines.spec import SamplingSpec
from meddiff.viz import save_grid


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, sample ``n`` images with the EMA weights.

    The grid goes to ``<log dir>/samples/step_XXXXXXX.png`` and, with a WandbLogger, to the run.
    3D samples are shown by their middle slice along the last axis. Fixed seeds make grids from
    different steps comparable. A report-conditioned model (one with a text encoder) samples image
    ``i`` from prompt ``i`` (cycled): ``prompts`` if given, else the distinct reports of the data
    module's validation split (its training split when there is none), fixed for the whole run;
    ``guidance_scale`` > 1 applies classifier-free guidance.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        n: int = 8,
        steps: int = 25,
        scheduler: str | None = None,
        prompts: list[str] | None = None,
        guidance_scale: float = 1.0,
    ):
        self.every_n_steps = every_n_steps
        self.n = n
        self.steps = steps
        self.scheduler = scheduler
        self.prompts = list(prompts) if prompts else None
        self.guidance_scale = guidance_scale
        self.grid_prompts: list[str] | None = None  # what the grids use, set at fit start

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if getattr(module.hparams, "max_train_timestep", None):
            raise MeddiffError("SampleGrid samples from pure noise, which a model with max_train_timestep "
                               "(a denoising prior) cannot do: remove the callback")
        unet = module.unet_config() if hasattr(module, "unet_config") else None
        if unet is not None and unet.concat_channels:
            raise MeddiffError("SampleGrid samples from pure noise, which a model with a concatenated condition "
                               "(concat_key) cannot do: remove the callback")
        if getattr(module, "text_encoder", None) is not None:
            prompts = self.prompts or self.data_reports(trainer)
            if not prompts:
                raise MeddiffError(
                    "SampleGrid needs prompts for a report-conditioned model and the data has no reports"
                    " — give them with init_args.prompts: [...] in the callback's config"
                )
            self.grid_prompts = [prompts[i % len(prompts)] for i in range(self.n)]

    def groups(self, module: pl.LightningModule) -> list[tuple[SamplingSpec, list[int], list[str] | None]]:
        """(spec, seeds, prompts) per class (items cycle through the classes), or one group for all items."""
        classes = (module.unet_config().num_class_embeds if hasattr(module, "unet_config") else None) or 0
        guidance = self.guidance_scale if self.grid_prompts is not None else None
        groups = []
        for label in range(classes) if classes else [None]:
            seeds = [i for i in range(self.n) if label is None or i % classes == label]
            prompts = None if self.grid_prompts is None else [self.grid_prompts[i] for i in seeds]
            spec = SamplingSpec(scheduler=self.scheduler, steps=self.steps, class_label=label, guidance_scale=guidance)
            if seeds:
                groups.append((spec, seeds, prompts))
        return groups

    @staticmethod
    def data_reports(trainer: pl.Trainer) -> list[str]:
        """The data module's validation reports, else its training reports (a ManifestDataModule's ``reports``)."""
        reports = getattr(trainer.datamodule, "reports", None)
        if not callable(reports):
            return []
        return reports("val") or reports("train")

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps:
            return
        model = module.diffusion_model(ema=True)
        was_training = model.unet.training
        model.unet.eval()
        x = torch.cat([sample(model, spec, seeds, prompts) for spec, seeds, prompts in self.groups(module)])
        model.unet.train(was_training)
        slices = [item[0, ..., item.shape[-1] // 2] if item.ndim == 4 else item[0] for item in x.float().cpu()]
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        path = save_grid([s.numpy() for s in slices], out_dir / f"step_{step:07d}.png", window=(-1.0, 1.0))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], step=step)


class RunRecord(pl.Callback):
    """Writes ``path`` (JSON) when training ends: optimizer steps, wall seconds, device, precision, items per
    step, the last training loss and whether a step or time limit stopped it, so what made a model is
    recorded by the run itself (``make models`` writes the model card from it)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.started = 0.0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        loss = trainer.callback_metrics.get("train/loss")
        device = module.device
        record = {
            "steps": trainer.global_step,
            "seconds": round(time.perf_counter() - self.started, 1),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "devices": trainer.world_size,
            "precision": str(trainer.precision),
            "batch_size": getattr(trainer.train_dataloader, "batch_size", None),
            "last_loss": None if loss is None else round(float(loss), 5),
            "stopped_by": "steps" if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps else "time",
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(record, indent=1) + "\n")
