"""`diffmix import-diffmix`, `space`, `push` and `pull`: bundles in and out (the authors' format, the Hub)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .options import fail


def run_import(args: argparse.Namespace) -> None:
    from ..authors import import_diffmix

    bundle = import_diffmix(args.embeddings, args.lora, base_model=args.base, base_revision=args.revision,
                            superclass=args.superclass, out_dir=args.out, resolution=args.resolution)
    print(f"wrote bundle {bundle.path}: {len(bundle.classes)} classes, base {bundle.base_model}")


def run_space(args: argparse.Namespace) -> None:
    from ..hub import write_space

    out = write_space(args.out, args.bundle, title=args.title, hardware=args.hardware)
    print(f"wrote the Space folder {out}; push it with the two commands in {out / 'README.md'}")


def run_push(args: argparse.Namespace) -> None:
    import tempfile

    from ..hub import build_push_folder, open_bundle, push_bundle

    if args.dry_run and args.folder is None:
        fail("--dry-run needs --folder (where the upload folder is built for you to inspect)")
    bundle = open_bundle(args.bundle)
    with tempfile.TemporaryDirectory(prefix="diffmix-push-") as tmp:
        samples = None if args.no_samples else args.samples
        if samples is None and not args.no_samples:
            from ..demo.world import translation_grid
            from ..records import save_png

            samples = save_png(translation_grid(bundle, show_progress=True), Path(tmp) / "samples.png")
        folder = build_push_folder(bundle, args.folder or Path(tmp) / "upload", args.repo, license=args.license,
                                   license_name=args.license_name, license_link=args.license_link, samples=samples)
        if args.dry_run:
            print(f"built {folder} (model card {folder / 'README.md'}); nothing uploaded (--dry-run)")
            return
        push_bundle(folder, args.repo, private=args.private)
    print(f"pushed {args.bundle} to https://huggingface.co/{args.repo}")


def run_pull(args: argparse.Namespace) -> None:
    from ..hub import pull_bundle, unlisted_files

    bundle = pull_bundle(args.repo, revision=args.revision)
    extra = unlisted_files(bundle)
    print(f"{args.repo}: {bundle.num_classes} classes, every file adapter.json lists matches its sha256; "
          f"bundle folder {bundle.path}")
    if extra:
        print(f"not covered by adapter.json (no hash; diffmix neither reads nor publishes them): "
              f"{', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}")
