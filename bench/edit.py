"""The editing benchmark (issue 28): SDEdit of held-out normal slices of the findings set toward a stated finding.

Each test slice with a "normal" report is edited (``pipeline.edit``, DDIM) toward one lesion with all four
attributes (the seen combinations, shuffled, in turn; prompt from ``findings.report``) at each strength, with the
quadrant the finding names (side x region) as the mask, the rest kept bit for bit, and without a mask. Per strength
and mode: success (the analytic detector reads count 1 and every asked attribute), PSNR to the input outside the
quadrant (window units, range 1), the share of edits whose outside is bit-identical, and the CLIP score toward the
prompt (meddiff's CLIP). Strength 0 is the input itself: the detector's false-positive rate and its CLIP score.
Images are scored in the units of ``bench.findings`` (the input's training window, padded to the model's shape).
The panel beside the JSON: input, edits at three strengths, and the middle one minus the input.

    python -m bench.edit --model runs/findings_bench/model --clip runs/findings_bench/clip \\
        --data runs/findings_bench/data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from monai.transforms import ResizeWithPadOrCrop
from scipy import ndimage

from bench import harness
from bench.findings import judge, prompt_findings, to_detector
from meddiff.data.findings import ATTRIBUTES, Finding, detect, report
from meddiff.data.manifest import Manifest
from meddiff.data.transforms import to_model_range
from meddiff.encoders.clip import ClipEncoder
from meddiff.image import Image
from meddiff.io import load_image
from meddiff.metrics import clip_score
from meddiff.metrics.paired import psnr
from meddiff.pipelines import load_pipeline
from meddiff.pipelines.volumes import intensity_window
from meddiff.viz import save_panel

PANEL_ROWS = 4
SCHEDULER = "ddim"  # a masked edit needs a sampler RePaint can renoise for (ddpm or ddim)


@dataclasses.dataclass
class Case:
    """One normal test slice, the finding it is edited toward and how it is scored."""

    name: str
    image: Image
    asked: Finding
    prompt: str
    window: tuple[float, float]  # the input's training window, used for the input and all its edits
    quadrant: np.ndarray  # where the finding is asked for: the mask, and "inside" for PSNR


def model_units(array: np.ndarray, window: tuple[float, float], shape) -> torch.Tensor:
    """(1, *shape) in model units as ``ManifestDataModule`` gives it: windowed, padded with -1 (empty)."""
    x = to_model_range(torch.as_tensor(np.asarray(array, np.float32))[None], *window)
    return ResizeWithPadOrCrop(spatial_size=tuple(shape), constant_values=-1.0)(x).as_tensor()


def quadrant(units: np.ndarray, finding: Finding) -> np.ndarray:
    """The side x region quadrant of ``finding``, split as ``detect`` splits it (middle column, brain's centre)."""
    ii, jj = np.meshgrid(np.arange(units.shape[0]), np.arange(units.shape[1]), indexing="ij")
    half, mid_j = units.shape[0] // 2, ndimage.center_of_mass(units > 0.25)[1]
    side = ii < half if finding.side == "left" else ii > half
    region = jj > mid_j if finding.region == "anterior" else jj <= mid_j
    return side & region


def cases(data: Path, pipeline, count: int, seed: int) -> list[Case]:
    """The first ``count`` normal slices of the test split, each with its target finding and prompt."""
    manifest = Manifest.read(data / "manifest.jsonl")
    normal = [r for r in manifest.split("test") if Finding(**r.labels).count == 0][:count]
    if not normal:
        raise SystemExit(f"{data} has no normal slices in its test split")
    targets = [dataclasses.replace(f, count=1) for f in prompt_findings()["4-attribute"]]  # seen combinations
    rng = np.random.default_rng(seed)
    targets = [targets[k] for k in rng.permutation(len(targets))]  # the first few already vary every attribute
    shape = pipeline.config.image.shape
    result = []
    for i, record in enumerate(normal):
        image = load_image(manifest.resolve(record.image))
        window = intensity_window(pipeline.config, image.array)
        asked = targets[i % len(targets)]
        units = to_detector(model_units(image.array, window, shape))
        result.append(Case(record.image, image, asked, report(asked, rng), window, quadrant(units, asked)))
    return result


def score(items: list[Case], edits: list[list[np.ndarray]], clip: ClipEncoder, shape) -> dict:
    """Success, per-attribute accuracy, PSNR outside the quadrant, bit-identical outside, CLIP score."""
    marks, outside_psnr, identical, tensors, prompts = [], [], [], [], []
    for case, arrays in zip(items, edits, strict=True):
        reference = to_detector(model_units(case.image.array, case.window, shape))
        for array in arrays:
            x = model_units(array, case.window, shape)
            marks.append(judge(case.asked, detect(to_detector(x))))
            identical.append(bool(np.array_equal(array[~case.quadrant], case.image.array[~case.quadrant])))
            outside_psnr.append(psnr(reference, to_detector(x), 1.0, ~case.quadrant))
            tensors.append(x)
            prompts.append(case.prompt)
    finite = [p for p in outside_psnr if np.isfinite(p)]
    return {"success": float(np.mean([all(m.values()) for m in marks])),
            "attribute_accuracy": {a: float(np.mean([m[a] for m in marks])) for a in ("count", *ATTRIBUTES)},
            "psnr_outside_db": float(np.mean(finite)) if finite else None,  # None: every outside bit-identical
            "outside_identical": float(np.mean(identical)),
            "clip_score": clip_score(tensors, prompts, clip)["clip_score"],
            "edits": len(marks)}


def edit_all(pipeline, items: list[Case], strength: float, masked: bool, args) -> list[list[np.ndarray]]:
    """``args.samples`` edits of every case; the same seeds at every strength and in both modes."""
    return [[e.array for e in pipeline.edit(case.image, strength=strength, prompt=case.prompt,
                                            guidance_scale=args.guidance_scale, mask=case.quadrant if masked else None,
                                            seed=args.seed + i * args.samples, samples=args.samples,
                                            steps=args.steps, scheduler=SCHEDULER, progress=False)]
            for i, case in enumerate(items)]


def short(finding: Finding) -> str:
    """``2 hyper large L ant``: a finding in a caption's width."""
    if finding.count == 0:
        return "normal"
    return (f"{finding.count} {finding.intensity.removesuffix('intense')} {finding.size} {finding.side[0].upper()} "
            f"{finding.region[:4].rstrip('e')}")


def write_panel(items: list[Case], strengths: list[float], edits: dict[float, list[list[np.ndarray]]], mode: str,
                shape, path: Path) -> None:
    """Per example: input, edits at three strengths (first sample), the middle one minus the input; anterior up."""
    shown = [strengths[i] for i in sorted({round(k) for k in np.linspace(0, len(strengths) - 1, 3)})]
    middle = shown[len(shown) // 2]
    tiles = []
    for n, case in enumerate(items[:PANEL_ROWS]):
        units = {s: to_detector(model_units(edits[s][n][0], case.window, shape)) for s in shown}
        source = to_detector(model_units(case.image.array, case.window, shape))
        tiles.append((source[:, ::-1], f"input\nasked: {short(case.asked)}", (0.0, 1.1)))
        for s in shown:
            found = detect(units[s])
            ok = all(judge(case.asked, found).values())
            tiles.append((units[s][:, ::-1], f"strength {s:g}: {'success' if ok else 'miss'}\nread: {short(found)}",
                          (0.0, 1.1)))
        tiles.append(((units[middle] - source)[:, ::-1], f"strength {middle:g} - input\n(-0.6 .. 0.6)", (-0.6, 0.6)))
    save_panel(tiles, path, f"SDEdit toward a stated finding ({mode} edits; patient left on the image left, "
               "anterior up)", columns=len(shown) + 2)


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.results_file("edit"), device="cpu", seed=0,
                            out_help="the JSON record; the panel goes beside it as NAME_panel.png "
                                     "(default: %(default)s)")
    parser.add_argument("--model", required=True, help="a report-conditioned findings model folder")
    parser.add_argument("--clip", required=True, help="meddiff's CLIP exported for the findings set")
    parser.add_argument("--data", required=True, type=Path, help="a findings set (meddiff manifest findings)")
    parser.add_argument("--images", type=int, default=40, help="normal test slices edited (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=2, help="edits per slice and strength (default: %(default)s)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of a full edit (default: %(default)s)")
    parser.add_argument("--no-mask", action="store_true", help="only unmasked edits (default: masked and unmasked)")
    return parser


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    pipeline, clip = load_pipeline(args.model, args.device), ClipEncoder(args.clip)
    shape = pipeline.config.image.shape
    items = cases(args.data, pipeline, args.images, args.seed)
    baseline = score(items, [[c.image.array] for c in items], clip, shape)
    inputs = [to_detector(model_units(c.image.array, c.window, shape)) for c in items]
    baseline = {"strength": 0.0, "success": baseline["success"],
                "false_positive": float(np.mean([detect(u).count > 0 for u in inputs])),
                "clip_score": baseline["clip_score"], "images": len(items)}
    print("inputs:", json.dumps(baseline))
    modes = ["unmasked"] if args.no_mask else ["masked", "unmasked"]
    rows: dict[str, list[dict]] = {mode: [] for mode in modes}
    edits: dict[str, dict[float, list[list[np.ndarray]]]] = {mode: {} for mode in modes}
    for mode in modes:
        for strength in args.strengths:
            with harness.stopwatch(sync=harness.device_sync(args.device)) as lap:
                edits[mode][strength] = edit_all(pipeline, items, strength, mode == "masked", args)
            row = {"strength": strength, **score(items, edits[mode][strength], clip, shape),
                   "seconds_per_edit": round(lap.seconds / (len(items) * args.samples), 3)}
            rows[mode].append(row)
            print(mode, json.dumps(row))
    results = {"images": len(items), "samples": args.samples, "steps": args.steps, "scheduler": SCHEDULER,
               "guidance_scale": args.guidance_scale,
               "prompts": [{"image": c.name, "asked": dataclasses.asdict(c.asked), "prompt": c.prompt} for c in items],
               "baseline": baseline, "modes": rows}
    harness.write_result("edit", args, results, args.out)
    panel = args.out.with_name(f"{args.out.stem}_panel.png")
    write_panel(items, args.strengths, edits[modes[0]], modes[0], shape, panel)
    print(f"wrote {args.out} and {panel}")
    print("| mode | strength | success | count | " + " | ".join(ATTRIBUTES)
          + " | PSNR outside (dB) | outside identical | CLIP score |")
    print("|---" * 11 + "|")
    false_positive = f"false positives {100 * baseline['false_positive']:.1f} %"
    print(f"| input | 0 | {100 * baseline['success']:.1f} % ({false_positive}) |" + " |" * 7
          + f" {baseline['clip_score']:.1f} |")
    for mode in modes:
        for r in rows[mode]:
            accuracy = " | ".join(f"{100 * r['attribute_accuracy'][a]:.1f} %" for a in ("count", *ATTRIBUTES))
            shown = "-" if r["psnr_outside_db"] is None else f"{r['psnr_outside_db']:.1f}"
            print(f"| {mode} | {r['strength']:g} | {100 * r['success']:.1f} % | {accuracy} | {shown} | "
                  f"{100 * r['outside_identical']:.0f} % | {r['clip_score']:.1f} |")


if __name__ == "__main__":
    harness.main(run, options)
