"""The "findings" benchmark: does a report-conditioned model draw what the prompt says, and at what cost in diversity?

For each guidance scale gamma, generates ``--samples`` images per prompt and reads their findings
back with the analytic detector (``meddiff.data.findings.detect``). Prompts (ConceptMix-style) state
k = 1, 2, 3 or all 4 of the attributes intensity, size, side, region, always with a lesion count
(1 or 2); "held-out" prompts state the two 4-attribute combinations that never appear in training,
and one prompt reports a normal study. Reported per gamma:

- per-attribute accuracy over the prompts that state the attribute (count over all prompts);
- all-stated-attributes-correct rate (count included) for each prompt set;
- diversity: mean pairwise RMSE between samples of one prompt (model units), and the entropy
  (bits, max 1) of each attribute a 1- or 2-attribute prompt leaves unsaid;
- CLIP score of the samples against their prompts with meddiff's CLIP.

The detector is checked first on the real test split, through the same normalisation and padding
the model trains with, so its accuracy bounds what the generated-image numbers can show.

    python -m bench.findings --model runs/findings_bench/model --clip runs/findings_bench/clip \\
        --data runs/findings_bench/data --out bench/results
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from bench import harness
from meddiff.data.datamodule import ManifestDataModule
from meddiff.data.findings import ATTRIBUTES, HELD_OUT, Finding, detect, report
from meddiff.data.manifest import Manifest
from meddiff.encoders.clip import ClipEncoder
from meddiff.metrics import clip_score
from meddiff.pipelines import load_pipeline

ROWS = slice(3, 68)  # 65 image rows padded to 72 by ResizeWithPadOrCrop: 3 before, 4 after
SETS = ("1-attribute", "2-attribute", "3-attribute", "4-attribute", "held-out", "normal")


def prompt_findings() -> dict[str, list[Finding]]:
    """Each set's findings; counts alternate 1, 2 so both are asked for in every set."""
    sets: dict[str, list[Finding]] = {name: [] for name in SETS}
    names = list(ATTRIBUTES)
    for k in (1, 2, 3, 4):
        for subset in itertools.combinations(names, k):
            for values in itertools.product(*(ATTRIBUTES[a] for a in subset)):
                if k == 4 and values in HELD_OUT:
                    continue
                stated = dict(zip(subset, values, strict=True))
                sets[f"{k}-attribute"].append(Finding(1 + len(sets[f"{k}-attribute"]) % 2, **stated))
    sets["held-out"] = [Finding(count, *combo) for combo in HELD_OUT for count in (1, 2) for _paraphrase in range(2)]
    sets["normal"] = [Finding(0)]
    return sets


def to_detector(x: torch.Tensor) -> np.ndarray:
    """A model-unit sample (1, 72, 72) -> the 65 x 72 slice in [0, 1]-ish units the detector reads."""
    return ((x[0].numpy() + 1.0) / 2.0)[ROWS]


def judge(asked: Finding, found: Finding) -> dict[str, bool]:
    """Which stated attributes (and the count) the generated image shows."""
    marks = {"count": found.count == asked.count}
    for attribute in ATTRIBUTES:
        if getattr(asked, attribute) is not None:
            marks[attribute] = getattr(found, attribute) == getattr(asked, attribute)
    return marks


def entropy_bits(values: list[str]) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def mean_pairwise_rmse(samples: torch.Tensor) -> float:
    flat = samples.flatten(1).double()
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    n = len(flat)
    return float(d.sum() / (n * (n - 1)))


def real_reference(data: Path, clip: ClipEncoder) -> dict:
    """Detector accuracy, CLIP score and same-label diversity of the real test split (the model's normalisation)."""
    manifest = data / "manifest.jsonl"
    loader = ManifestDataModule(str(manifest), spatial_dims=2, patch_size=(72, 72), batch_size=64, num_workers=0)
    loader.setup("test")
    images, reports = [], []
    for batch in loader.test_dataloader():
        images.append(batch["image"])
        reports += list(batch["report"])
    records = Manifest.read(manifest).split("test")
    labels = [Finding(**r.labels) for r in records]
    images = torch.cat(images)
    found = [detect(to_detector(x)) for x in images]
    groups: dict[Finding, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    rmse = [mean_pairwise_rmse(images[idx]) for idx in groups.values() if len(idx) > 1]
    return {"images": len(images),
            "detector_all_correct": float(np.mean([f == t for f, t in zip(found, labels, strict=True)])),
            "detector_held_out_correct": float(np.mean([f == t for f, t in zip(found, labels, strict=True)
                                                        if t.combination in HELD_OUT])),
            "clip_score": clip_score(images, reports, clip)["clip_score"],
            "pairwise_rmse_same_label": float(np.mean(rmse))}


def run_gamma(pipeline, clip: ClipEncoder, sets: dict[str, list[Finding]], gamma: float, samples: int, steps: int,
              scheduler: str, batch: int) -> tuple[dict, dict[str, torch.Tensor]]:
    rng = np.random.default_rng(0)  # the same paraphrases at every gamma
    prompts = [(name, f, report(f, rng)) for name in SETS for f in sets[name]]
    # prompt-major: prompt p's samples are contiguous
    jobs = [(p, s) for p in range(len(prompts)) for s in range(samples)]
    images = torch.empty(len(jobs), 1, 72, 72)
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        x = pipeline.sample([1000 * p + s for p, s in chunk], steps=steps, scheduler=scheduler,
                            prompts=[prompts[p][2] for p, _ in chunk], guidance_scale=gamma)
        images[start:start + len(chunk)] = x.cpu()
    by_prompt = images.view(len(prompts), samples, 1, 72, 72)
    found = [detect(to_detector(x)) for x in images]
    found_by_prompt = [found[p * samples:(p + 1) * samples] for p in range(len(prompts))]
    all_correct: dict[str, list[bool]] = {}
    marks_by_attribute: dict[str, list[bool]] = {}
    rmse, entropy = [], []
    for (name, asked, _), found_here, samples_here in zip(prompts, found_by_prompt, by_prompt, strict=True):
        marks = [judge(asked, f) for f in found_here]
        all_correct.setdefault(name, []).extend(all(m.values()) for m in marks)
        for m in marks:
            for attribute, ok in m.items():
                marks_by_attribute.setdefault(attribute, []).append(ok)
        rmse.append(mean_pairwise_rmse(samples_here))
        if name in ("1-attribute", "2-attribute"):
            lesions = [f for f in found_here if f.count > 0]
            for attribute in ATTRIBUTES:
                if getattr(asked, attribute) is None and len(lesions) > 1:
                    entropy.append(entropy_bits([getattr(f, attribute) for f in lesions]))
    result = {
        "gamma": gamma,
        "sets": {name: float(np.mean(v)) for name, v in all_correct.items()},
        "attribute_accuracy": {a: float(np.mean(v)) for a, v in marks_by_attribute.items()},
        "pairwise_rmse": float(np.mean(rmse)),
        "unstated_entropy_bits": float(np.mean(entropy)) if entropy else None,
        "clip_score": clip_score(images, [prompts[p][2] for p, _ in jobs], clip)["clip_score"],
    }
    grid = {text: samples_here for (_, _, text), samples_here in zip(prompts, by_prompt, strict=True)}
    return result, grid


def plot_curves(results: list[dict], reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gammas = [r["gamma"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("1-attribute", "2-attribute", "3-attribute", "4-attribute", "held-out"):
        left.plot(gammas, [100 * r["sets"][name] for r in results], marker="o", label=name)
    left.axhline(100 * reference["detector_all_correct"], color="grey", ls=":", label="detector on real test")
    left.set(xlabel="guidance scale gamma", ylabel="all stated attributes correct (%)", ylim=(0, 100), title="fidelity")
    left.legend(fontsize=8)
    right.plot(gammas, [r["pairwise_rmse"] for r in results], marker="o", color="C0",
               label="pairwise RMSE, same prompt")
    right.axhline(reference["pairwise_rmse_same_label"], color="C0", ls=":", label="real, same labels")
    right.set(xlabel="guidance scale gamma", ylabel="pairwise RMSE (model units)", title="diversity")
    twin = right.twinx()
    twin.plot(gammas, [r["unstated_entropy_bits"] for r in results], marker="s", color="C3",
              label="unstated-attribute entropy")
    twin.set(ylabel="entropy of unstated attributes (bits)", ylim=(0, 1.05))
    lines = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    right.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grid(grid: dict[str, torch.Tensor], prompts: list[str], gamma: float, path: Path, columns: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(prompts), columns, figsize=(1.5 * columns + 3.5, 1.5 * len(prompts)), squeeze=False)
    for row, text in enumerate(prompts):
        for col in range(columns):
            ax = axes[row, col]
            ax.imshow(to_detector(grid[text][col]).T, cmap="gray", vmin=0, vmax=1.1, origin="lower")
            ax.set_xticks([]), ax.set_yticks([])
        axes[row, 0].set_ylabel(text, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"samples at guidance scale {gamma:g} (patient left on the image left, anterior up)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.REQUIRED,
                            out_help="the folder of the JSON record (findings.json) and the plots")
    parser.add_argument("--model", required=True)
    parser.add_argument("--clip", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--gammas", type=float, nargs="+", default=[0, 1, 2, 4, 7])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--scheduler", default="dpm++2m")
    parser.add_argument("--batch", type=int, default=64)
    return parser


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    pipeline, clip = load_pipeline(args.model), ClipEncoder(args.clip)
    reference = real_reference(args.data, clip)
    print("real test split:", json.dumps(reference))
    sets = prompt_findings()
    results, grids = [], {}
    for gamma in args.gammas:
        with harness.stopwatch() as lap:
            result, grids[gamma] = run_gamma(pipeline, clip, sets, gamma, args.samples, args.steps, args.scheduler,
                                             args.batch)
        result["seconds"] = round(lap.seconds, 1)
        results.append(result)
        print(json.dumps(result))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"reference": reference, "samples_per_prompt": args.samples, "steps": args.steps,
               "scheduler": args.scheduler, "prompts": {name: len(v) for name, v in sets.items()}, "results": results}
    harness.write_result("findings", args, summary, args.out / "findings.json")
    plot_curves(results, reference, args.out / "findings_gamma.png")
    best = max(results, key=lambda r: r["sets"]["2-attribute"])["gamma"]
    texts, shown, offset = list(grids[best]), [], 0
    for name in SETS:  # the first and the middle prompt of each set
        shown += [texts[offset + i] for i in sorted({0, len(sets[name]) // 2})]
        offset += len(sets[name])
    plot_grid(grids[best], shown, best, args.out / "findings_grid.png", columns=min(6, args.samples))
    header = ("| gamma | " + " | ".join(SETS) + " | " + " | ".join(ATTRIBUTES)
              + " | count | pairwise RMSE | unstated entropy (bits) | CLIP score |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        cells = ([f"{100 * r['sets'][s]:.1f} %" for s in SETS]
                 + [f"{100 * r['attribute_accuracy'][a]:.1f} %" for a in (*ATTRIBUTES, "count")])
        print(f"| {r['gamma']:g} | " + " | ".join(cells)
              + f" | {r['pairwise_rmse']:.3f} | {r['unstated_entropy_bits']:.2f} | {r['clip_score']:.1f} |")


if __name__ == "__main__":
    harness.main(run, options)
