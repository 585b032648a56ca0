"""`diffmix score`: faithfulness and diversity scores of a translated folder, and its strength."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ScoreConfig
from .options import config_from_args, fail, given_values


def run_score(args: argparse.Namespace) -> None:
    from ..bundle import update_bundle_meta
    from ..hub import open_bundle
    from ..reference import bundle_reference_path, load_reference
    from ..scoring import default_clip, format_summary, load_clip, score_folder

    if args.clip_checkpoint is not None and not args.clip_checkpoint.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {args.clip_checkpoint} does not exist")
    if args.set_recommended and not args.bundle:
        fail("--set-recommended needs --bundle")
    bundle = open_bundle(args.bundle) if args.bundle else records_bundle(args.input)
    given = given_values(ScoreConfig, args)
    model, pretrained = default_clip(bundle)
    if "clip_model" in given:   # given: its weights are --clip-pretrained's (default ScoreConfig's)
        model, pretrained = given["clip_model"], ScoreConfig.clip_pretrained
    pretrained = str(args.clip_checkpoint) if args.clip_checkpoint else given.get("clip_pretrained", pretrained)
    config = config_from_args(ScoreConfig, args, clip_model=model, clip_pretrained=pretrained)
    ref_path = args.reference or (bundle_reference_path(bundle) if bundle else None)
    reference = load_reference(ref_path, device=args.device) if ref_path else None
    clip = load_clip(config.clip_model, config.clip_pretrained, device=args.device)
    print(clip.status)
    if reference is None:
        print("no reference classifier (--reference or a bundle with one): P(target), P(source), top1 are null")
    report = score_folder(args.input, reference=reference, clip=clip, config=config, bundle=bundle,
                          superclass=args.superclass, out_dir=args.out, show_progress=not args.quiet)
    for note in report.summary.get("missing_sources", [])[:5]:
        print(f"source image unavailable (no distance/SSIM): {note}")
    if report.summary.get("unknown_to_reference"):
        print(f"classes the reference classifier does not know (their P is null): "
              f"{report.summary['unknown_to_reference'][:10]}")
    print(format_summary(report.summary))
    print("wrote " + ", ".join(str(f) for f in report.files))
    strength = report.summary["recommended_strength"]
    if args.set_recommended and strength is not None:
        update_bundle_meta(bundle.path, recommended_strength=strength)
        print(f"bundle {bundle.path}: recommended_strength = {strength}")


def records_bundle(folder: Path):
    """The one bundle a folder's records name, when it is still there with the same hash; else None
    (saying why). `diffmix score` and `diffmix export` without --bundle take it."""
    from ..bundle import load_bundle
    from ..records import read_jsonl

    index = folder / "records.jsonl"
    if not index.is_file():
        return None
    named = {(r.get("bundle"), r.get("bundle_hash")) for r in read_jsonl(index)}
    if len(named) != 1 or not next(iter(named))[0]:
        if len(named) > 1:
            print(f"the records name {len(named)} bundles; give --bundle")
        return None
    path, digest = next(iter(named))
    try:   # a Hub id the records name is taken from the Hub cache only, never downloaded
        bundle = load_bundle(path) if Path(str(path)).exists() else _cached_hub_bundle(str(path))
    except (ValueError, FileNotFoundError, OSError):
        print(f"the records' bundle {path} is not there (a Hub bundle is used only when already in the Hub "
              "cache); give --bundle")
        return None
    if digest and bundle.hash != digest:
        print(f"the bundle at {path} has changed since these images were made (hash differs); give --bundle "
              "to use it anyway")
        return None
    print(f"bundle: {path} (named in the records)")
    return bundle


def _cached_hub_bundle(repo_id: str):
    """The bundle ``repo_id`` from the local Hub cache (FileNotFoundError when it is not there)."""
    from ..hub import HUB_REPO_ID, pull_bundle

    if not HUB_REPO_ID.match(repo_id):
        raise FileNotFoundError(repo_id)
    return pull_bundle(repo_id, local_only=True)
