"""Audit validity (issue 29): ``meddiff audit`` must find a difference planted in real findings images.

The pool is the findings set's validation and test images (meddiff's CLIP never trained on them), shuffled and cut
in two halves. Set A is the first half as it is; set B is the second half with one attribute removed (every image
showing it dropped) or made three times as frequent (images without it dropped until it is). Every image is scored
once for the 12 concepts of ``bench/findings_concepts.txt``; each planted case is then one ``compare`` of A with B.
The record: the planted concept's rank among the 12, its Cohen's d and q-value, and the concept ranked first; and,
as what bounds it, the encoder's zero-shot accuracy on each attribute (the lesion images of the pool: is the
logit of the true value's concept above the other value's?).

With ``--model`` (the report-conditioned findings model) the audit also runs as a user would run it on a generator:
one sample for each test report (DPM-Solver++ 15 steps, guidance 4) against the real test images of the same reports;
the record lists the concepts it ranks first, with the detector's share of each attribute in both sets as the truth.

    python -m bench.audit --clip runs/findings_bench/clip --data runs/findings_bench/data \\
        [--model runs/findings_bench/model]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench import harness
from meddiff.data.findings import ATTRIBUTES
from meddiff.data.manifest import Manifest
from meddiff.metrics.audit import compare
from meddiff.metrics.concepts import concept_scores, load_concept_encoder, read_concepts

CONCEPTS = Path(__file__).with_name("findings_concepts.txt")


def shows(labels: dict, concept: str) -> bool:
    """Whether an image with these labels shows the concept (the truth the audit is checked against)."""
    count = labels.get("count", 0)
    if concept == "two lesions":
        return count == 2
    if concept == "one lesion":
        return count == 1
    words = concept.split()
    return count > 0 and all(w in (labels.get(a) for a in ("intensity", "size", "side", "region")) for w in words)


PLANTED = [("removed", c) for c in ("hyperintense", "hypointense", "large", "small", "left", "two lesions")] + [
    ("tripled", c) for c in ("left anterior", "right posterior")]


def planted(b: list[int], labels: list[dict], kind: str, concept: str, frequency: float,
            rng: np.random.Generator) -> list[int]:
    """Set B: ``b`` without the concept's images, or with images lacking it dropped until it is three times as
    frequent as ``frequency`` (its share in A)."""
    with_it = [i for i in b if shows(labels[i], concept)]
    without = [i for i in b if not shows(labels[i], concept)]
    if kind == "removed":
        return without
    keep = int(round(len(with_it) * (1 - 3 * frequency) / (3 * frequency)))
    return with_it + list(rng.choice(without, size=min(keep, len(without)), replace=False))


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.results_file("audit"), seed=0)
    parser.add_argument("--clip", required=True, help="meddiff's CLIP exported for the findings set (or an "
                                                      "open_clip folder)")
    parser.add_argument("--data", required=True, type=Path, help="a findings set (meddiff manifest findings)")
    parser.add_argument("--permutations", type=int, default=2000)
    parser.add_argument("--model", help="also audit this findings generator against the real test images")
    return parser


def generator_audit(args: argparse.Namespace, manifest: Manifest, concepts, encoder) -> dict:
    """The generator's samples for the test reports against the real test images (see the module docstring)."""
    import tempfile

    from bench.findings import to_detector
    from meddiff.data.findings import MM_PER_PIXEL, detect
    from meddiff.image import Image
    from meddiff.io import save_image
    from meddiff.metrics.audit import audit
    from meddiff.pipelines import load_pipeline

    records = manifest.split("test")
    pipeline = load_pipeline(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        fake, found_fake = [], []
        for start in range(0, len(records), 50):
            chunk = records[start:start + 50]
            x = pipeline.sample(list(range(start, start + len(chunk))), steps=15, scheduler="dpm++2m",
                                prompts=[r.report for r in chunk], guidance_scale=4.0).cpu()
            for i, sample in enumerate(x):
                image = to_detector(sample)
                found_fake.append(detect(image))
                fake.append(Path(tmp) / f"{start + i:04d}.nii.gz")
                save_image(Image(image, np.diag([MM_PER_PIXEL] * 3 + [1.0]), "MR"), fake[-1])
        real = [manifest.resolve(r.image) for r in records]
        result = audit(fake, real, concepts, encoder, ("synthetic", "real"), args.permutations, args.seed)
    truth = {"synthetic": {}, "real": {}}
    real_labels = [r.labels for r in records]
    fake_labels = [{"count": f.count, "intensity": f.intensity, "size": f.size, "side": f.side, "region": f.region}
                   for f in found_fake]
    for name, labels in (("synthetic", fake_labels), ("real", real_labels)):
        for concept in [c.name for c in concepts.concepts]:
            truth[name][concept] = float(np.mean([shows(label, concept) for label in labels]))
    ranked = [{"concept": r.concept, "cohens_d": r.cohens_d, "q_value": r.q_value,
               "share_synthetic": truth["synthetic"][r.concept], "share_real": truth["real"][r.concept]}
              for r in result.ranked]
    for row in ranked[:5]:
        print(f"| {row['concept']} | {row['cohens_d']:+.2f} | {row['q_value']:.2g} | "
              f"{100 * row['share_synthetic']:.0f} % | {100 * row['share_real']:.0f} % |")
    return {"images": len(records), "ranked": ranked}


def run(args: argparse.Namespace) -> None:
    manifest = Manifest.read(args.data / "manifest.jsonl")
    records = manifest.split("val") + manifest.split("test")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(records))
    half = len(order) // 2
    a, b = list(order[:half]), list(order[half:])
    labels = [r.labels for r in records]
    concepts = read_concepts(CONCEPTS)
    encoder = load_concept_encoder(args.clip)
    with harness.stopwatch() as lap:
        scores = concept_scores([manifest.resolve(r.image) for r in records], encoder, concepts)
    names = [c.name for c in concepts.concepts]
    rows = []
    for kind, concept in PLANTED:
        frequency = float(np.mean([shows(labels[i], concept) for i in a]))
        chosen = planted(b, labels, kind, concept, frequency, rng)
        ranked = compare(scores[a], scores[chosen], concepts, args.permutations, args.seed)
        rank = [r.concept for r in ranked].index(concept) + 1
        row = ranked[rank - 1]
        rows.append({"planted": f"{concept} {kind}", "concept": concept, "frequency_a": frequency,
                     "frequency_b": float(np.mean([shows(labels[i], concept) for i in chosen])),
                     "images_a": len(a), "images_b": len(chosen), "rank": rank, "cohens_d": row.cohens_d,
                     "auroc": row.auroc, "q_value": row.q_value, "first": ranked[0].concept,
                     "second": ranked[1].concept})
        print(f"| {concept} {kind} | {100 * frequency:.0f} % -> {100 * rows[-1]['frequency_b']:.0f} % | {rank} of "
              f"{len(names)} | {row.cohens_d:+.2f} | {row.auroc:.2f} | {row.q_value:.2g} | {ranked[0].concept} |")
    lesions = [i for i, label in enumerate(labels) if label.get("count")]
    zero_shot = {}
    for attribute, (x, y) in ATTRIBUTES.items():
        says_x = scores[lesions, names.index(x)] > scores[lesions, names.index(y)]
        zero_shot[attribute] = float(np.mean(says_x == np.array([labels[i][attribute] == x for i in lesions])))
    print("zero-shot accuracy on the lesion images:", json.dumps(zero_shot))
    results = {"encoder": encoder.spec, "concepts": names, "pool": len(records),
               "seconds_scoring": round(lap.seconds, 1), "cases": rows, "zero_shot_accuracy": zero_shot}
    if args.model:
        results["generator"] = generator_audit(args, manifest, concepts, encoder)
    harness.write_result("audit", args, results, args.out)
    print(f"first in {sum(r['rank'] == 1 for r in rows)} of {len(rows)} planted cases; wrote {args.out}")


if __name__ == "__main__":
    harness.main(run, options)
