"""``meddiff manifest build|validate|samples|drr|findings``: JSONL manifests of images, reports and splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from meddiff.cli.bounds import SEED_HELP, SEED_MAX, check_output_folder, check_range, check_seed
from meddiff.data.build import build_records
from meddiff.data.manifest import Manifest, write_manifest
from meddiff.data.samples import SAMPLES, write_samples
from meddiff.errors import MeddiffError

MAX_PER_SLAB = 1000  # meddiff.data.drr.MAX_PER_SLAB (not imported here: scipy loads slowly)
MAX_PER_SPLIT = 100_000  # findings images per split (file names hold 5 digits)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("manifest", help="build, validate or write sample manifests")
    sub = p.add_subparsers(dest="manifest_command", metavar="ACTION", required=True)

    b = sub.add_parser("build", help="one record per image file or DICOM series under DIR")
    b.add_argument("folder", metavar="DIR")
    b.add_argument("-o", "--output", required=True, metavar="FILE", help="manifest to write (.jsonl)")
    b.add_argument("--reports", metavar="CSV", help="CSV with columns image,report (path, file name or stem)")
    b.add_argument("--split-by", choices=("patient", "random"), default="patient")
    b.add_argument("--val-fraction", type=float, default=0.1)
    b.add_argument("--test-fraction", type=float, default=0.1)
    b.add_argument("--salt", help="secret salt of the patient hash (default: random each run)")
    b.add_argument("--seed", type=int, default=0, help=f"seed of --split-by random, 0 .. {SEED_MAX}")
    b.add_argument("--modality", help="modality of non-DICOM files (MR, CT, CR, DX, ...)")
    b.add_argument("--subject-pattern", metavar="REGEX",
                   help="regex whose first group is the subject, for non-DICOM files")
    b.add_argument("--source", help="dataset name recorded in each record (default: DIR's name)")
    b.add_argument("--include", metavar="GLOB", help="only files whose path under DIR matches, e.g. '*_t1.nii.gz'")
    b.add_argument("--allow-ids-in-paths", action="store_true",
                   help="accept DICOM patient IDs in folder names (public pseudonymised data only)")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=run_build)

    v = sub.add_parser("validate", help="check schema, files, and with --deep every image")
    v.add_argument("manifest", metavar="FILE")
    v.add_argument("--deep", action="store_true",
                   help="also load every image and mask (finite, shapes agree) and compare contents across splits")
    v.add_argument("--allow-shared-subjects", action="store_true",
                   help="accept one subject in several splits (a deliberate --split-by random)")
    v.set_defaults(func=run_validate)

    s = sub.add_parser("samples", help="write the offline real sample set (NIfTI) and its manifest")
    s.add_argument("-o", "--output", required=True, metavar="DIR")
    s.add_argument("--only", nargs="+", choices=[x.name for x in SAMPLES], help="write only these samples")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=run_samples)

    d = sub.add_parser("drr", help="write an offline radiograph set: DRRs of the chest CT's training slabs at "
                                   "varied poses and exposures")
    d.add_argument("-o", "--output", required=True, metavar="DIR")
    d.add_argument("--per-slab", type=int, default=8,
                   help=f"radiographs per training slab (2 slabs), 1 .. {MAX_PER_SLAB} (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=run_drr)

    f = sub.add_parser("findings",
                       help="write the 'findings' set: MRI slices with simulated lesions, "
                            "reports and held-out combinations")
    f.add_argument("-o", "--output", required=True, metavar="DIR")
    f.add_argument("--train", type=int, default=400, help=f"training images, 0 .. {MAX_PER_SPLIT}")
    f.add_argument("--val", type=int, default=40, help=f"validation images, 0 .. {MAX_PER_SPLIT}")
    f.add_argument("--test", type=int, default=80,
                   help=f"test images, 0 .. {MAX_PER_SPLIT}; includes the held-out attribute combinations")
    f.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    f.add_argument("--overwrite", action="store_true")
    f.set_defaults(func=run_findings)


def run_build(args) -> None:
    check_seed(args.seed)
    out = Path(args.output)
    if out.is_dir():
        raise MeddiffError(f"{out} is a folder — give the manifest's file name (.jsonl)")
    if out.exists() and not args.overwrite:  # refused before the folder is scanned, not after
        raise MeddiffError(f"{out} already exists — choose another output or pass --overwrite")
    records = build_records(
        args.folder,
        manifest_dir=out.parent,
        modality=args.modality,
        reports_csv=args.reports,
        split_by=args.split_by,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        salt=args.salt,
        seed=args.seed,
        subject_pattern=args.subject_pattern,
        source=args.source,
        allow_ids_in_paths=args.allow_ids_in_paths,
        include=args.include,
    )
    write_manifest(records, out, overwrite=args.overwrite)
    print(f"wrote {out}: {len(records)} records, {_split_counts(records)}")


def run_validate(args) -> None:
    manifest = Manifest.read(args.manifest)
    manifest.check_files()
    manifest.check_splits(content=args.deep, shared_subjects=args.allow_shared_subjects)
    if args.deep:
        manifest.check_images()
    print(f"{args.manifest}: {len(manifest.records)} valid records, {_split_counts(manifest.records)}")


def run_findings(args) -> None:
    from meddiff.data.findings import write_findings_dataset

    if min(args.train, args.val, args.test) < 0:
        raise MeddiffError("--train, --val and --test must not be negative — give 0 or more images per split")
    for flag, count in (("--train", args.train), ("--val", args.val), ("--test", args.test)):
        check_range(count, flag, 0, MAX_PER_SPLIT,
                    f"give {flag} at most {MAX_PER_SPLIT} (a larger set: several -o folders with other --seed)")
    check_seed(args.seed)
    check_output_folder(args.output, what="the findings set")
    path = write_findings_dataset(args.output, {"train": args.train, "val": args.val, "test": args.test},
                                  seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {path}: {_split_counts(Manifest.read(path).records)}")


def run_drr(args) -> None:
    from meddiff.data.drr import write_drr_set

    check_range(args.per_slab, "--per-slab", 1, MAX_PER_SLAB,
                f"give --per-slab from 1 to {MAX_PER_SLAB} (more: several -o folders with other --seed)")
    check_seed(args.seed)
    check_output_folder(args.output, what="the radiographs")
    path = write_drr_set(args.output, args.per_slab, args.seed, overwrite=args.overwrite, progress=True)
    print(f"wrote {path}")


def run_samples(args) -> None:
    check_output_folder(args.output, what="the sample set")
    path = write_samples(args.output, names=args.only, overwrite=args.overwrite)
    print(f"wrote {path}: {_split_counts(Manifest.read(path).records)}")


def _split_counts(records) -> str:
    counts = Counter(r.split or "unsplit" for r in records)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
