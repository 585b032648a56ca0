"""`diffmix split` and `export`: a dataset's split file, a generated folder in training layouts."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import split_config_from_args
from .score import records_bundle


def run_split(args: argparse.Namespace) -> None:
    from ..data import default_split_path, read_dataset, resolve_splits, split_subset

    dataset = read_dataset(args.data, strict=args.strict, max_pixels=args.max_pixels, show_progress=not args.quiet)
    splits = resolve_splits(dataset, args.split_file, split_config_from_args(args))
    counts = {name: split_subset(dataset, splits, name).counts() for name in splits}
    kept = ", official train/test split kept" if dataset.official is not None else ""
    print(f"{len(dataset.items)} images, {len(dataset.classes)} classes, {len(dataset.skipped)} skipped "
          f"(layout: {dataset.layout}{kept})")
    for path, reason in dataset.skipped[:20]:
        print(f"  skipped {path}: {reason}")
    width = max(len(c) for c in dataset.classes)
    print(f"{'class':<{width}}  " + "  ".join(f"{n:>5}" for n in counts))
    for i, c in enumerate(dataset.classes):
        print(f"{c:<{width}}  " + "  ".join(f"{counts[n][i]:>5}" for n in counts))
    print(f"split file: {args.split_file or default_split_path(dataset)}")


def run_export(args: argparse.Namespace) -> None:
    from ..export import export_records, parse_formats, read_generated_folder
    from ..synthesize import PLAN_FILE, merge, read_plan

    formats = parse_formats(args.format)
    planned = (args.source / PLAN_FILE).is_file()
    if planned and args.out is None:
        m = merge(args.source, export=formats, show_progress=not args.quiet, overwrite=args.overwrite)
        print(f"exported {m['kept']} image(s) ({', '.join(formats)}) to {args.source / 'export'}")
        return
    classes = read_plan(args.source).classes if planned else None
    sealed = []
    bundle = None
    if args.bundle:
        from ..hub import open_bundle

        bundle = open_bundle(args.bundle)
    elif classes is None:   # the bundle the records name, as `diffmix score` finds it
        bundle = records_bundle(args.source)
        if bundle is None:
            print("no bundle: the imagefolder rows get no label / soft_label_vector and no dataset card "
                  "(give --bundle)")
    if bundle is not None:
        base = [bundle.base_model] if Path(bundle.base_model).is_dir() else []   # a local base: sealed too
        classes, sealed = bundle.classes, [bundle.path, *base]
    out = export_records(read_generated_folder(args.source), args.out or args.source / "export", formats,
                         classes=classes, show_progress=not args.quiet, overwrite=args.overwrite,
                         protect=(args.source,), sealed=sealed)
    print(f"exported ({', '.join(formats)}) to {out}")
