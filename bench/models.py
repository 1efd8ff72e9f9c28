"""Retrain the bundled models from their recipes in ``configs/`` (``make models``) and install those that score
at least as well as the shipped ones (``make models-install``).

For each model: every stage's config through ``meddiff fit`` (the budget the config states, or ``--minutes`` per
model shared by its stages; on ``--device``), ``meddiff export --dtype float16`` into ``OUT/NAME/model``, the
model's benchmark run on the new and on the shipped model side by side (the same numbers as BENCHMARKS.md's
tables), and the model card written from the run. ``OUT/summary.json`` holds every model's record. Nothing here
sets a hyperparameter: the recipe is the config; a run only says where it goes, how long it may take and on what
device (a CPU run computes in float32 with the data loaded in the training process).

    python -m bench.models --models mri-inpaint --minutes 2       # make models MODELS=mri-inpaint MINUTES=2
    python -m bench.models --device cuda                          # make models DEVICE=cuda: the GPU run
    python -m bench.models --install --out runs/models            # make models-install OUT=runs/models
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench import harness

MODELS_DIR = Path("meddiff/models")


@dataclass(frozen=True)
class Stage:
    """One ``meddiff fit`` of a model's recipe; ``inputs`` maps a config key to the earlier stage whose exported
    folder it takes, ``share`` is its part of the model's time budget."""

    config: str
    share: float = 1.0
    inputs: dict[str, str] = field(default_factory=dict)
    needs_samples: bool = False  # a ManifestDataModule recipe on the offline sample set

    @property
    def name(self) -> str:
        return Path(self.config).stem


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    benchmark: Callable[[str, Path], dict]  # (model folder, folder for panels) -> metrics
    headline: str  # the metric install compares
    higher_is_better: bool
    benchmark_text: str  # what the benchmark measures, for the card


def inpaint_benchmark(modality: str) -> Callable[[str, Path], dict]:
    def run(model: str, folder: Path) -> dict:
        from bench.inpaint import model_scores

        return model_scores(model, modality, folder / f"inpaint_{modality.lower()}.png")

    return run


def denoise_benchmark(model: str, folder: Path) -> dict:
    """Foreground PSNR of the default denoising at 3, 5 and 9 % Rician noise (seed = level) on each image of
    ``bench.denoise``; the headline is the validation slice's mean (the independent images tune nothing)."""
    import numpy as np

    from bench.denoise import held_out
    from meddiff import Image
    from meddiff.data.synthetic import rician_noise
    from meddiff.metrics import foreground_mask, psnr
    from meddiff.pipelines import load_pipeline

    pipeline = load_pipeline(model)
    out = {}
    for n, (name, clean) in enumerate(held_out().items()):
        clean = clean.astype(np.float32)
        mask, peak = foreground_mask(clean), float(clean.max())
        values = []
        for level in (3, 5, 9):
            noisy = rician_noise(clean, level / 100 * peak, np.random.default_rng(level))
            made = pipeline.denoise(Image(noisy, np.eye(4), "MR"), progress=False).array
            values.append(psnr(clean, made, peak, mask))
            out[f"psnr_{name.split()[0]}_{level}"] = round(values[-1], 2)
        out["validation_psnr_mean" if n == 0 else f"psnr_mean_{name.split()[0]}"] = round(float(np.mean(values)), 2)
    return out


def generator_benchmark(model: str, folder: Path) -> dict:
    from bench.bundled_generators import mri

    with tempfile.TemporaryDirectory(dir=folder) as slices:  # the slices meddiff evaluate reads, then gone
        result = mri(Path(slices), 64, model=model)
    keys = ("fid", "precision", "recall", "density", "coverage", "memorization_median_ratio")
    return {**{key: round(result["mean"][key], 3) for key in keys}, "frd": round(result["frd"], 2),
            "seconds": result["seconds"]}


def controlnet_benchmark(model: str, folder: Path) -> dict:
    from bench.controlnet_ct import fidelity

    result = fidelity(model, samples=2, steps=30, png=folder / "controlnet_ct.png")
    out = {f"{group}_hu_error": round(row["mean_error"], 1) for group, row in result["structures"].items()}
    keys = ("goal_structures_mean_abs_error", "goal_mean_within_30_hu", "at_floor", "real_at_floor", "frd")
    return {**out, **{key: result[key] for key in keys}}


def upsample_benchmark(volume: str) -> Callable[[str, Path], dict]:
    """PSNR (dB) on the removed slices of ``bench.upsample``'s ``volume`` made thick at each of its factors, the model
    beside cubic interpolation; the headline is the model's mean."""

    def run(model: str, folder: Path) -> dict:
        from bench.upsample import model_rows

        rows = model_rows(model, volume)
        out = {f"psnr_{row['method']}_{row['factor']}x": round(row["psnr_db"], 2) for row in rows}
        out["psnr_mean"] = round(sum(r["psnr_db"] for r in rows if r["method"] == "model") / (len(rows) / 2), 2)
        return out

    return run


RECIPES = {
    "mri-denoise": Recipe((Stage("configs/mri_denoise_2d.yaml"),), denoise_benchmark, "validation_psnr_mean", True,
                          "foreground PSNR (dB) after `meddiff denoise` at 3/5/9 % Rician noise"),
    "mri-inpaint": Recipe((Stage("configs/mri_inpaint_2d.yaml"),), inpaint_benchmark("MR"), "psnr_mean", True,
                          "BraTS local-synthesis PSNR (dB) inside 1/5/15 % masks of the held-out T1 slice"),
    "ct-inpaint": Recipe((Stage("configs/ct_inpaint_2d.yaml"),), inpaint_benchmark("CT"), "psnr_mean", True,
                         "BraTS local-synthesis PSNR (dB) inside 1/5/15 % masks of three held-out chest CT slices"),
    "mri-upsample": Recipe((Stage("configs/mri_upsample_2d.yaml"),), upsample_benchmark("example4d EPI"),
                           "psnr_mean", True, "PSNR (dB) of the removed slices of a brain EPI made 2x and 4x thick"),
    "ct-upsample": Recipe((Stage("configs/ct_upsample_2d.yaml"),), upsample_benchmark("chest CT test slab"),
                          "psnr_mean", True, "PSNR (dB) of the removed slices of the held-out chest CT slab made 5 "
                          "and 10 mm thick"),
    "mri-t1-2d": Recipe((Stage("configs/mri_generator_2d.yaml"),), generator_benchmark, "fid", False,
                        "FID (meddiff_mri features) of 64 generated slices against held-out MNI152 slices"),
    "ct-chest-2d": Recipe(
        (Stage("configs/ct_autoencoder_2d.yaml", 0.45, needs_samples=True),
         Stage("configs/ct_latent_2d.yaml", 0.25, {"model.autoencoder": "ct_autoencoder_2d",
                                                   "data.latents": "ct_autoencoder_2d"}, needs_samples=True),
         Stage("configs/ct_controlnet_2d.yaml", 0.30, {"model.base": "ct_latent_2d"}, needs_samples=True)),
        controlnet_benchmark, "goal_structures_mean_abs_error", False,
        "mean HU error of generated against real CT per structure on the held-out slab's label map"),
}


def overlay(stage: Stage, folder: Path, exports: dict[str, Path], args: argparse.Namespace,
            samples: Path | None) -> dict:
    """The second config of a stage's ``meddiff fit``: where its run goes, its time and device, its inputs."""
    trainer = {
        "default_root_dir": str(folder),
        "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder)}}],
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(folder / "checkpoints"), "every_n_train_steps": 1000, "save_last": True}},
            {"class_path": "meddiff.training.callbacks.RunRecord", "init_args": {"path": str(folder / "run.json")}},
        ],
        "accelerator": "gpu" if args.device == "cuda" else "cpu",
        "enable_progress_bar": False,
    }
    if args.device == "cpu":
        trainer["precision"] = "32-true"
    if args.minutes:
        seconds = int(args.minutes * 60 * stage.share)
        trainer["max_time"] = f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    model = {"export_dir": str(folder / "model")}
    data: dict = {"num_workers": 0} if args.device == "cpu" else {}
    if yaml.safe_load(Path(stage.config).read_text())["data"]["class_path"].endswith("SliceArrayDataModule"):
        data["cache"] = args.cache
    for key, source in stage.inputs.items():
        part, name = key.split(".")
        (model if part == "model" else data)[name] = str(exports[source])
    if samples is not None:
        data["manifest"] = str(samples / "manifest.jsonl")
        if stage.name == "ct_controlnet_2d":
            model["structures"] = str(samples / "chest_ct_structures.json")
            model["structure_hu"] = str(samples / "chest_ct_structure_hu.json")
    return {"trainer": trainer, "model": {"init_args": model}, "data": {"init_args": data}}


def meddiff(arguments: list[str], log: Path, threads: int | None) -> None:
    """``meddiff ARGUMENTS`` in a process of its own (a fit's memory is freed when it ends), output to ``log``."""
    env = dict(os.environ, WANDB_MODE="offline")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "a") as fh:
        code = subprocess.call([sys.executable, "-m", "meddiff.cli.main", *arguments], stdout=fh,
                               stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"meddiff {arguments[0]} failed ({log}): {tail[0]}")


def train(name: str, recipe: Recipe, out: Path, args: argparse.Namespace) -> tuple[Path, list[dict]]:
    """Every stage of ``recipe`` and the float16 export; the model folder and the stages' run records."""
    exports: dict[str, Path] = {}
    records = []
    samples = None
    out.mkdir(parents=True, exist_ok=True)
    if any(stage.needs_samples for stage in recipe.stages):
        samples = out.parent / "samples"
        if not (samples / "manifest.jsonl").exists():
            meddiff(["manifest", "samples", "-o", str(samples)], out / "samples.log", args.threads)
    for stage in recipe.stages:
        folder = out / stage.name
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "run.yaml"
        config.write_text(yaml.safe_dump(overlay(stage, folder, exports, args, samples), sort_keys=False))
        print(f"{name}: meddiff fit --config {stage.config} --config {config}", flush=True)
        meddiff(["fit", "--config", stage.config, "--config", str(config)], folder / "fit.log", args.threads)
        exports[stage.name] = folder / "model"
        records.append({"config": stage.config, **json.loads((folder / "run.json").read_text())})
    model = out / "model"
    meddiff(["export", str(exports[recipe.stages[-1].name]), str(model), "--dtype", "float16", "--overwrite"],
            out / "export.log", args.threads)
    return model, records


def card(name: str, recipe: Recipe, records: list[dict], new: dict, shipped: dict | None, device: str) -> str:
    """The model card, from the recipes' own descriptions (their header comments) and the run's records: data,
    training, metrics and limits, as every bundled model's card has them."""
    lines = [f"# Model card: `{name}`", "", "Written by `make models` from the run that made these weights.", ""]
    for stage, record in zip(recipe.stages, records, strict=True):
        header = [line[2:] for line in Path(stage.config).read_text().splitlines() if line.startswith("# ")]
        lines += [f"## Recipe: `{stage.config}`", "", "**Data** and method (the recipe's own description):", "",
                  *header, "",
                  f"**Training**: {record['steps']} steps in {record['seconds']:.0f} s on {record['device']} "
                  f"({record['precision']}, batch {record['batch_size']}, stopped by its {record['stopped_by']} "
                  f"limit), last training loss {record['last_loss']}; EMA weights, exported in float16.", ""]
    lines += ["## Benchmark", "", f"**Metrics**: {recipe.benchmark_text} (`python -m bench.models`, on {device}).",
              "", "| metric | this model |" + (" shipped before |" if shipped else ""),
              "|---|---|" + ("---|" if shipped else "")]
    for key, value in new.items():
        lines.append(f"| {key} | {value} |" + (f" {shipped.get(key, '-')} |" if shipped else ""))
    classical = [(key.removeprefix("best_classical_psnr_"), new[key.removeprefix("best_classical_")] - value)
                 for key, value in new.items() if key.startswith("best_classical_")]
    if classical:
        lines += ["", "Against the best classical fill on the same masks (dB): "
                  + ", ".join(f"{size} {gap:+.2f}" for size, gap in classical) + "."]
    seconds = sum(record["seconds"] for record in records)
    lines += ["", f"Install decision on `{recipe.headline}` ({'higher' if recipe.higher_is_better else 'lower'} is "
              "better): `make models-install`.", "",
              f"**Limits**: trained for {seconds / 60:.0f} minutes on {device} from the small offline sources above, "
              "and measured only by the benchmark above, on held-out data of the same sources; a research model, "
              "not validated for any clinical use. BENCHMARKS.md (\"Bundled model recipes\") states the goals each "
              "benchmark has and the gaps left.", "",
              "Reproduce: `make models MODELS=" + name + "` (add `DEVICE=cuda` on a GPU, `MINUTES=N` for a budget)."]
    return "\n".join(lines) + "\n"


def not_worse(recipe: Recipe, new: dict, shipped: dict | None) -> bool:
    if not shipped or recipe.headline not in shipped:
        return True
    if recipe.higher_is_better:
        return new[recipe.headline] >= shipped[recipe.headline]
    return new[recipe.headline] <= shipped[recipe.headline]


def build(args: argparse.Namespace) -> None:
    out = Path(args.out)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in args.models:
        recipe = RECIPES[name]
        folder = out / name
        started = time.perf_counter()
        try:
            if args.train:
                model, records = train(name, recipe, folder, args)
            else:  # benchmark again what an earlier run (on this machine or a GPU one) made
                model = folder / "model"
                records = [json.loads((folder / stage.name / "run.json").read_text()) | {"config": stage.config}
                           for stage in recipe.stages]
            new = recipe.benchmark(str(model), folder)
            shipped = None
            if args.compare and (MODELS_DIR / name).exists():  # a new model has nothing shipped to beat
                (folder / "shipped").mkdir(exist_ok=True)  # the shipped model's panels
                shipped = recipe.benchmark(str(MODELS_DIR / name), folder / "shipped")
        except RuntimeError as exc:
            print(f"{name}: {exc}", flush=True)
            summary[name] = {"error": str(exc)}
            continue
        (model / "README.md").write_text(card(name, recipe, records, new, shipped, args.device))
        wall = round(time.perf_counter() - started, 1)
        run = ({"minutes": args.minutes, "device": args.device, "wall_seconds": wall} if args.train
               else {key: summary.get(name, {}).get(key) for key in ("minutes", "device", "wall_seconds")})
        summary[name] = {"stages": records, **run, "headline": recipe.headline,
                         "higher_is_better": recipe.higher_is_better, "new": new, "shipped": shipped,
                         "not_worse": not_worse(recipe, new, shipped)}
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{name}: {recipe.headline} {new[recipe.headline]} (shipped: "
              f"{shipped.get(recipe.headline) if shipped else '-'})", flush=True)
    harness.write_result("models", args, summary, out / "models.json")


def install(args: argparse.Namespace) -> None:
    """Copy each listed model of ``OUT`` whose benchmark is not worse than the shipped one's into meddiff/models."""
    out = Path(args.out)
    summary = json.loads((out / "summary.json").read_text())
    for name, entry in summary.items():
        if name not in args.models:
            continue
        if "new" not in entry:
            print(f"{name}: not installed — its run failed: {entry.get('error')}")
            continue
        key, new, shipped = entry["headline"], entry["new"], entry["shipped"]
        compared = f"{key} {new[key]} against the shipped {shipped.get(key) if shipped else '(not measured)'}"
        if not entry["not_worse"]:
            print(f"{name}: kept the shipped model — {compared}")
            continue
        target = MODELS_DIR / name
        staged = target.with_name(f".{name}.installing")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(out / name / "model", staged)
        old = target.with_name(f".{name}.replaced")
        if target.exists():
            target.rename(old)
        staged.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        print(f"{name}: installed — {compared}")


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out="runs/models", out_help="the runs, model folders and summary.json "
                            "(default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--minutes", type=float, help="time budget per model (default: the configs' own)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the training processes")
    parser.add_argument("--cache", default="runs/data", help="the training arrays' folder (meddiff.data.arrays; "
                        "carry it to a GPU machine, which has no MRI packages)")
    parser.add_argument("--no-train", dest="train", action="store_false",
                        help="benchmark OUT's models of an earlier run again, without training")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip benchmarking the shipped models")
    parser.add_argument("--install", action="store_true", help="copy OUT's models that are not worse into "
                        "meddiff/models (make models-install)")
    return parser


def run(args: argparse.Namespace) -> None:
    install(args) if args.install else build(args)


if __name__ == "__main__":
    harness.main(run, options)
