"""Concept audit (MONET): which concepts separate two image sets, or a classifier's errors from its successes.

Each image gets a concept logit per concept (``meddiff.metrics.concepts``); for each concept the two sets' logits
are compared by Cohen's d (the ranking), the AUROC of telling A from B by the logit, and a two-sided permutation
test of the difference in means (scipy), with Benjamini-Hochberg q-values over the concepts; the mean presence
probability of each set is reported beside them. The report
is a folder: ``audit.json``, ``scores.csv`` (every image's presence probabilities, images named by set, index and
SHA-256, never by
file name, which can carry a patient's name), one PNG per top concept (its highest- and lowest-scoring images of each
set) and ``audit.html``, one page that opens offline.
"""

from __future__ import annotations

import csv
import html
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import special, stats

from meddiff.errors import MeddiffError
from meddiff.files import file_sha256
from meddiff.metrics.concepts import ConceptEncoder, ConceptSet, concept_scores

MIN_IMAGES = 2  # per set: a spread, so an effect size, needs two
PREDICTION_COLUMNS = ("image", "label", "prediction")


@dataclass(frozen=True)
class ConceptDifference:
    """One concept's comparison of set A against set B: mean presence probabilities, and statistics of logits."""

    concept: str
    prompts: tuple[str, ...]
    mean_a: float
    mean_b: float
    cohens_d: float
    auroc: float
    p_value: float
    q_value: float


@dataclass
class Audit:
    """An audit's inputs and results: ``ranked`` holds the concepts by decreasing ``|cohens_d|``."""

    names: tuple[str, str]
    paths: tuple[list[Path], list[Path]]
    scores: tuple[np.ndarray, np.ndarray]
    concepts: ConceptSet
    encoder: str
    permutations: int
    seed: int
    ranked: list[ConceptDifference]


def check_set_sizes(sizes: dict[str, int]) -> None:
    """Each named set has at least ``MIN_IMAGES`` images; one line naming the first that has not."""
    for name, size in sizes.items():
        if size < MIN_IMAGES:
            raise MeddiffError(f"{name} has {size} image(s); an audit compares sets of at least {MIN_IMAGES} images "
                               "each")


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    return x.mean(axis=axis) - y.mean(axis=axis)


def compare(scores_a: np.ndarray, scores_b: np.ndarray, concepts: ConceptSet, permutations: int = 2000,
            seed: int = 0) -> list[ConceptDifference]:
    """Every concept's difference between the (N_a, C) and (N_b, C) concept logits, ranked by ``|Cohen's d|``."""
    check_set_sizes({"set A": len(scores_a), "set B": len(scores_b)})
    test = stats.permutation_test((scores_a, scores_b), _mean_difference, permutation_type="independent",
                                  vectorized=True, n_resamples=permutations, axis=0,
                                  rng=np.random.default_rng(seed))
    p_values = np.atleast_1d(test.pvalue)
    q_values = stats.false_discovery_control(p_values, method="bh")
    na, nb = len(scores_a), len(scores_b)
    pooled = np.sqrt(((na - 1) * scores_a.var(0, ddof=1) + (nb - 1) * scores_b.var(0, ddof=1)) / (na + nb - 2))
    difference = scores_a.mean(0) - scores_b.mean(0)
    d = np.divide(difference, pooled, out=np.zeros_like(difference), where=pooled > 0)
    auroc = stats.mannwhitneyu(scores_a, scores_b, axis=0).statistic / (na * nb)
    presence_a, presence_b = special.expit(scores_a).mean(0), special.expit(scores_b).mean(0)
    rows = [ConceptDifference(c.name, c.prompts, float(presence_a[k]), float(presence_b[k]),
                              float(d[k]), float(auroc[k]), float(p_values[k]), float(q_values[k]))
            for k, c in enumerate(concepts.concepts)]
    return sorted(rows, key=lambda r: (-abs(r.cohens_d), r.p_value))


def audit(paths_a: list[Path], paths_b: list[Path], concepts: ConceptSet, encoder: ConceptEncoder,
          names: tuple[str, str] = ("A", "B"), permutations: int = 2000, seed: int = 0) -> Audit:
    """Score both sets and compare them (see the module docstring). The sizes are checked before any scoring, and
    both sets are scored in one pass (the concepts' text embeddings computed once)."""
    check_set_sizes({names[0]: len(paths_a), names[1]: len(paths_b)})
    scored = concept_scores(paths_a + paths_b, encoder, concepts, f"scoring {names[0]} and {names[1]}")
    scores = (scored[:len(paths_a)], scored[len(paths_a):])
    ranked = compare(*scores, concepts, permutations, seed)
    return Audit(names, (paths_a, paths_b), scores, concepts, encoder.spec, permutations, seed, ranked)


def split_by_predictions(paths: list[Path], predictions: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """The images a classifier got wrong and those it got right, from a CSV with columns image, label, prediction
    (image paths relative to the CSV's folder, or absolute); the CSV must name exactly the audited images."""
    predictions = Path(predictions)
    try:
        with open(predictions, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
            columns = set(rows[0]) if rows else set()
    except FileNotFoundError:
        raise MeddiffError(f"{predictions}: no such predictions file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MeddiffError(f"{predictions} cannot be read as a CSV ({exc.__class__.__name__})") from None
    missing = [c for c in PREDICTION_COLUMNS if c not in columns]
    if not rows or missing:
        raise MeddiffError(f"{predictions} needs a header and rows with the columns {', '.join(PREDICTION_COLUMNS)}"
                           f"{f' (missing: {chr(44).join(missing)})' if rows else ' (it has no rows)'}")
    known = {p.resolve(): p for p in paths}
    correct: dict[Path, bool] = {}
    for number, row in enumerate(rows, 2):
        path = Path((row["image"] or "").strip())
        path = (path if path.is_absolute() else predictions.parent / path).resolve()
        if path not in known:
            raise MeddiffError(f"{predictions}:{number}: {row['image']!r} is not one of the audited images — the "
                               "CSV must list exactly the images given")
        if path in correct:
            raise MeddiffError(f"{predictions}:{number}: {row['image']!r} is listed twice — one row per image")
        correct[path] = (row["label"] or "").strip() == (row["prediction"] or "").strip()
    unlisted = [p for p in known if p not in correct]
    if unlisted:
        raise MeddiffError(f"{len(unlisted)} audited image(s) have no row in {predictions} (first: "
                           f"{known[unlisted[0]].name}) — the CSV must list exactly the images given")
    return ([known[p] for p, ok in correct.items() if not ok], [known[p] for p, ok in correct.items() if ok])


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40] or "concept"


def _shown(path: Path) -> np.ndarray:
    """A 2D view of an image for the report: itself, or a volume's middle axial slice."""
    from meddiff.data.transforms import slice_axis
    from meddiff.io import load_image

    image = load_image(path)
    array = np.asarray(image.array, dtype=np.float32).squeeze()
    if array.ndim == 3:
        axis = slice_axis(image.affine, "axial")
        array = np.take(array, array.shape[axis] // 2, axis=axis)
    return array


def write_report(result: Audit, out_dir: str | os.PathLike, top: int = 5, examples: int = 6,
                 overwrite: bool = False) -> Path:
    """The report folder (see the module docstring), written all at once (``staged_folder``)."""
    from meddiff.data.staging import staged_folder
    from meddiff.viz import save_grid

    index = {c.name: k for k, c in enumerate(result.concepts.concepts)}
    with staged_folder(out_dir, overwrite=overwrite, last=("audit.html",)) as folder:
        hashes = [[file_sha256(p)[:16] for p in paths] for paths in result.paths]
        with open(folder / "scores.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["set", "index", "sha256_16"] + [c.name for c in result.concepts.concepts])
            for name, scores, digests in zip(result.names, result.scores, hashes, strict=True):
                for i, (row, digest) in enumerate(zip(scores, digests, strict=True)):
                    writer.writerow([name, i, digest] + [f"{v:.6f}" for v in special.expit(row)])
        figures = []
        for rank, row in enumerate(result.ranked[:top], 1):
            k, tiles, shown = index[row.concept], [], {}
            for name, scores, paths in zip(result.names, result.scores, result.paths, strict=True):
                order = np.argsort(-scores[:, k], kind="stable")
                count = min(examples, len(order))
                shown[name] = {"highest": [int(i) for i in order[:count]],
                               "lowest": [int(i) for i in order[::-1][:count]]}
                for which in ("highest", "lowest"):
                    tiles += [_shown(paths[i]) for i in shown[name][which]]
                    tiles += [np.zeros((2, 2), np.float32)] * (examples - count)  # rows stay aligned
            png = f"{rank:02d}_{_slug(row.concept)}.png"
            save_grid(tiles, folder / png, columns=examples)
            figures.append({"rank": rank, "concept": row.concept, "png": png, "images": shown})
        record = {"encoder": result.encoder, "sets": {n: len(p) for n, p in zip(result.names, result.paths,
                                                                                 strict=True)},
                  "reference_prompts": list(result.concepts.reference), "permutations": result.permutations,
                  "seed": result.seed, "ranked": [asdict(r) for r in result.ranked], "figures": figures}
        (folder / "audit.json").write_text(json.dumps(record, indent=2) + "\n")
        (folder / "audit.html").write_text(_html(result, figures))
    return Path(out_dir)


def _html(result: Audit, figures: list[dict]) -> str:
    """One self-contained page (figures by relative name). Written by hand: a table and a few images need no
    template engine."""
    a, b = (html.escape(n) for n in result.names)
    rows = "".join(
        f"<tr><td>{i}</td><td title='{html.escape(' | '.join(r.prompts))}'>{html.escape(r.concept)}</td>"
        f"<td>{r.mean_a:.3f}</td><td>{r.mean_b:.3f}</td><td>{r.cohens_d:+.2f}</td><td>{r.auroc:.2f}</td>"
        f"<td>{r.p_value:.2g}</td><td>{r.q_value:.2g}</td></tr>" for i, r in enumerate(result.ranked, 1))
    panels = "".join(
        f"<h3>{f['rank']}. {html.escape(f['concept'])}</h3><img src='{f['png']}' alt='{html.escape(f['concept'])}'>"
        f"<p>Rows: {a} highest, {a} lowest, {b} highest, {b} lowest scores.</p>" for f in figures)
    counts = ", ".join(f"{html.escape(n)}: {len(p)} images" for n, p in zip(result.names, result.paths, strict=True))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>meddiff concept audit</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:nth-child(2){{text-align:left}}
img{{image-rendering:pixelated;max-width:100%}}</style></head><body>
<h1>Concept audit: {a} against {b}</h1>
<p>{counts}. Encoder: {html.escape(result.encoder)}. Scores: MONET-style concept presence against the reference
prompts ({html.escape(' | '.join(result.concepts.reference))}): the means are presence probabilities, the
statistics are of the logits. Ranked by |Cohen's d|; AUROC of telling {a} from {b} by the logit; p: two-sided
permutation test of the difference in means ({result.permutations} permutations); q: Benjamini-Hochberg over the
concepts.</p>
<table><tr><th>rank</th><th>concept</th><th>mean {a}</th><th>mean {b}</th><th>d</th><th>AUROC</th><th>p</th>
<th>q</th></tr>{rows}</table>
<h2>Top concepts</h2>{panels}
</body></html>
"""
