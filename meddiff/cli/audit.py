"""``meddiff audit A B --concepts FILE -o REPORT``: which named concepts separate two image sets (MONET-style), or with
``--predictions`` a classifier's errors from its successes.

torch loads inside ``run``, so ``meddiff --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from meddiff.data.staging import check_set_folder
from meddiff.errors import MeddiffError

MAX_PERMUTATIONS = 1_000_000


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("audit", help="name the concepts (CLIP concept scores) that separate two image sets, "
                                            "or a classifier's errors from its successes")
    p.add_argument("sets", nargs="+", metavar="SET",
                   help="two image sets A B (manifest, folder with manifest.jsonl, or folder of images); with "
                        "--predictions one: the classified images")
    p.add_argument("--concepts", required=True,
                   help="text file, one concept per line: 'NAME: prompt | prompt ...'; 'reference: prompt | ...' "
                        "sets the reference prompts")
    p.add_argument("--encoder", default="biomedclip",
                   help="biomedclip (local files, as evaluate finds them), a folder (meddiff CLIP export or "
                        "open_clip files), local-dir:PATH or hf-hub:REPO")
    p.add_argument("--predictions", help="CSV with columns image, label, prediction for every image of the one SET: "
                                         "the audit compares the errors (A) with the successes (B)")
    p.add_argument("--split", help="only this split of each set that is a manifest (e.g. test)")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), help="what to call the two sets in the report "
                                                                "(default A B; errors successes with --predictions)")
    p.add_argument("-o", "--out", required=True, help="report folder (new or empty): audit.json, audit.html, PNGs")
    p.add_argument("--top", type=int, default=5, help="concepts to show with example images (default 5)")
    p.add_argument("--examples", type=int, default=6, help="images per row of each concept's figure (default 6)")
    p.add_argument("--permutations", type=int, default=2000, help="permutations per test (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def _check(args) -> None:
    expected = 1 if args.predictions else 2
    if len(args.sets) != expected:
        raise MeddiffError(f"give {'one image set with --predictions' if args.predictions else 'two image sets A B'}"
                           f", not {len(args.sets)}")
    for name, value, low, high in (("--top", args.top, 0, 1000), ("--examples", args.examples, 1, 50),
                                   ("--permutations", args.permutations, 99, MAX_PERMUTATIONS)):
        if not low <= value <= high:
            raise MeddiffError(f"{name} must be from {low} to {high}, not {value}")
    check_set_folder(args.out, args.overwrite)  # before the scoring, which takes a while


def _paths(source: str, split: str | None) -> list[Path]:
    """A set's images: ``split`` selects within a manifest; a folder of images has no splits and is taken whole."""
    from meddiff.metrics.evaluate import image_paths

    manifest = Path(source).suffix in (".jsonl", ".json") or (Path(source) / "manifest.jsonl").is_file()
    return image_paths(source, split if manifest else None)


def run(args) -> None:
    from meddiff.metrics.audit import audit, split_by_predictions, write_report
    from meddiff.metrics.concepts import load_concept_encoder, read_concepts

    _check(args)
    concepts = read_concepts(args.concepts)
    if args.predictions:
        a, b = split_by_predictions(_paths(args.sets[0], args.split), args.predictions)
        names = tuple(args.names or ("errors", "successes"))
    else:
        a, b = _paths(args.sets[0], args.split), _paths(args.sets[1], args.split)
        names = tuple(args.names or ("A", "B"))
    if names[0] == names[1]:
        raise MeddiffError(f"--names gives both sets the name {names[0]!r} — give two names")
    encoder = load_concept_encoder(args.encoder)
    result = audit(a, b, concepts, encoder, names, args.permutations, args.seed)
    write_report(result, args.out, args.top, args.examples, args.overwrite)
    width = max(len(r.concept) for r in result.ranked[:10])
    print(f"{'concept':<{width}}  mean {names[0]:>8}  mean {names[1]:>8}      d  AUROC        q")
    for row in result.ranked[:10]:
        print(f"{row.concept:<{width}}  {row.mean_a:>13.3f}  {row.mean_b:>13.3f}  {row.cohens_d:+.2f}  "
              f"{row.auroc:5.2f}  {row.q_value:7.2g}")
    print(f"wrote {Path(args.out) / 'audit.html'} ({len(result.ranked)} concepts; audit.json, scores.csv, "
          f"{min(args.top, len(result.ranked))} figures)")
