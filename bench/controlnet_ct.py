"""Fidelity of a label-map CT model on the held-out slab: does the generated CT follow the map?

Generates ``--samples`` CTs from the label map of ``chest_ct_test`` (slices 48-67, never trained on) and compares
them with the real slab in HU, on the map's grid (0.70 x 0.70 x 2.5 mm):

- per structure (lungs: every lobe; liver; heart; aorta; vertebrae; ribs; back muscle: autochthon left and right;
  fat: unlabelled body voxels whose real HU is -190..-30), the mean and standard deviation of HU, generated
  against real;
- agreement between the map and a HU-threshold segmentation of the output: lungs = below -400 HU inside the body
  (largest region above -500 HU, holes filled), bone = above 200 HU, Dice against the map's lung lobes and its
  bones (vertebrae, ribs, sternum, scapulae, clavicles, humeri). The same thresholds on the real CT give the
  agreement the map itself allows (its labels are TotalSegmentator's, not thresholds). The contrast-filled heart
  and vessels (the map's cardiac group) are left out of the bone segmentation: they are as bright as bone;
- FRD (frd-score) between generated and real axial slices, each as a PNG-free NIfTI slice.

    python -m bench.controlnet_ct runs/ct_controlnet_2d/model --samples 2 --steps 30 \\
        --out bench/results/controlnet_ct.json --png bench/results/controlnet_ct.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench import harness
from meddiff.data.masks import body_mask
from meddiff.data.samples import CHEST_CT_SLABS, chest_ct_slab, chest_ct_structures
from meddiff.pipelines import load_pipeline

GROUPS = {
    "lungs": lambda name: name.startswith("lung_"),
    "liver": lambda name: name == "liver",
    "heart": lambda name: name == "heart",
    "aorta": lambda name: name == "aorta",
    "vertebrae": lambda name: name.startswith("vertebrae_"),
    "ribs": lambda name: name.startswith("rib_"),
    "muscle": lambda name: name.startswith("autochthon_"),
}
BONES = ("vertebrae_", "rib_", "sternum", "scapula_", "clavicula_", "humerus_")
CARDIAC = ("heart", "aorta", "pulmonary_vein", "inferior_vena_cava", "superior_vena_cava", "brachiocephalic_trunk",
           "brachiocephalic_vein_left", "brachiocephalic_vein_right", "subclavian_artery_left",
           "subclavian_artery_right", "common_carotid_artery_left", "common_carotid_artery_right",
           "atrial_appendage_left", "portal_vein_and_splenic_vein")


def group_mask(labels: np.ndarray, names: dict[int, str], keep) -> np.ndarray:
    return np.isin(labels, [label for label, name in names.items() if keep(name)])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def threshold_segmentation(hu: np.ndarray, vessels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lungs (below -400 HU inside the body) and bone (above 200 HU outside the map's contrast-filled heart and
    vessels, which a contrast-enhanced CT shows as bright as bone), slice by slice."""
    body = np.stack([body_mask(hu[:, :, k], -500.0) for k in range(hu.shape[2])], axis=2)
    return body & (hu < -400), (hu > 200) & ~vessels


def frd(real: np.ndarray, fakes: list[np.ndarray], spacing) -> float:
    """FRD between the real slab's axial slices and every generated slab's."""
    from meddiff.metrics.evaluate import frechet_radiomics_distance_of_slices

    def slices(volume: np.ndarray) -> list[np.ndarray]:
        return [volume[:, :, k] for k in range(volume.shape[2])]

    return frechet_radiomics_distance_of_slices(slices(real), [s for fake in fakes for s in slices(fake)], spacing)


def panel(labels: np.ndarray, fake: np.ndarray, real: np.ndarray, path: Path) -> None:
    """A PNG grid: label map / generated / real for a few axial slices (window -1000..1000 HU)."""
    from PIL import Image as Picture

    def grey(hu: np.ndarray) -> np.ndarray:
        return (np.clip((hu + 1000) / 2000, 0, 1) * 255).astype(np.uint8)

    def colour(lab: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(0)
        table = rng.integers(40, 255, size=(256, 3), dtype=np.uint8)
        table[0] = 0
        return table[lab]

    rows = []
    for k in np.linspace(2, labels.shape[2] - 3, 3).round().astype(int):
        cells = [colour(labels[:, :, k]), *(np.repeat(grey(v[:, :, k])[..., None], 3, axis=2) for v in (fake, real))]
        rows.append(np.concatenate([np.rot90(c) for c in cells], axis=1))
    Picture.fromarray(np.concatenate(rows, axis=0)).resize((3 * 256, len(rows) * 256)).save(path)


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=None, seed=0)
    parser.add_argument("model")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--png", type=Path, help="the panel: label map / generated / real")
    parser.add_argument("--slab", default="chest_ct_test", choices=list(CHEST_CT_SLABS),
                        help="a training slab shows how well the model follows maps it has seen")
    return parser


def fidelity(model: str, samples: int = 2, steps: int = 30, seed: int = 0, slab: str = "chest_ct_test",
             png: Path | None = None) -> dict:
    """Generated against real HU per structure, threshold-segmentation Dice, FRD, and the share of voxels inside
    the field of view at the physical range's floor (-1024 HU), generated and real."""
    start, stop, _ = CHEST_CT_SLABS[slab]
    real = chest_ct_slab(start, stop)()
    labels = chest_ct_slab(start, stop, "mask.nii.gz")()
    names = chest_ct_structures()
    pipeline = load_pipeline(model)
    with harness.stopwatch() as lap:
        fakes = [image.array for image in pipeline.generate(samples, steps=steps, seed=seed, labels=labels,
                                                            progress=False)]
    hu, lab = real.array.astype(np.float32), labels.array.astype(np.int64)
    inside = hu > -1500  # the field of view
    masks = {group: group_mask(lab, names, keep) & inside for group, keep in GROUPS.items()}
    masks["fat"] = (lab == 0) & inside & (hu > -190) & (hu < -30) & np.stack(
        [body_mask(hu[:, :, k], -500.0) for k in range(hu.shape[2])], axis=2)
    table = {}
    for group, mask in masks.items():
        generated = np.concatenate([fake[mask] for fake in fakes])
        table[group] = {"voxels": int(mask.sum()), "real_mean": float(hu[mask].mean()),
                        "real_std": float(hu[mask].std()), "generated_mean": float(generated.mean()),
                        "generated_std": float(generated.std()),
                        "mean_error": float(generated.mean() - hu[mask].mean())}
    lungs_map = masks["lungs"]
    bone_map = np.isin(lab, [label for label, name in names.items() if name.startswith(BONES)]) & inside
    vessels = np.isin(lab, [label for label, name in names.items() if name in CARDIAC])
    real_lungs, real_bone = threshold_segmentation(np.where(inside, hu, -1000), vessels)
    dices = {"real": {"lungs": dice(real_lungs, lungs_map), "bone": dice(real_bone, bone_map)}}
    for i, fake in enumerate(fakes):
        fake_lungs, fake_bone = threshold_segmentation(np.where(inside, fake, -1000), vessels)
        dices[f"generated_{i}"] = {"lungs": dice(fake_lungs, lungs_map), "bone": dice(fake_bone, bone_map)}
    goal = ("lungs", "liver", "muscle", "fat")
    if png:
        panel(lab, fakes[0], hu, png)
    return {
        "model": model, "slab": slab, "samples": samples, "steps": steps, "seconds": round(lap.seconds, 1),
        "structures": table, "dice": dices,
        "frd": frd(np.where(inside, hu, -1000), [np.where(inside, f, -1000) for f in fakes], real.spacing),
        "goal_structures_mean_abs_error": float(np.mean([abs(table[g]["mean_error"]) for g in goal])),
        "goal_mean_within_30_hu": all(abs(table[g]["mean_error"]) <= 30 for g in goal),
        # generated CT is clipped to the physical range: a model that still learnt the scanner's padding piles
        # voxels up at its floor, -1024 HU (real air inside the field of view lies near -1000)
        "at_floor": float(np.mean([(fake[inside] <= -1023.5).mean() for fake in fakes])),
        "real_at_floor": float((hu[inside] <= -1023.5).mean()),
    }


def run(args: argparse.Namespace) -> None:
    result = fidelity(args.model, args.samples, args.steps, args.seed, args.slab, args.png)
    print(json.dumps(result, indent=1))
    if args.out:
        harness.write_result("controlnet_ct", args, result, args.out)


if __name__ == "__main__":
    harness.main(run, options)
