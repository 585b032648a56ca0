"""`diffmix demo build|evaluate|grid` and `selftest`: the embedded demo world, and a machine check."""
from __future__ import annotations

import argparse
import json

from ..config import DemoWorldConfig, SelftestConfig
from ..paths import DEMO_ASSETS, DEMO_BUNDLE
from .options import config_from_args, fail


def run_demo_build(args: argparse.Namespace) -> None:
    from ..demo.world import build_world, quick_config

    bundle = build_world(args.out, quick_config() if args.quick else DemoWorldConfig(), assets=args.assets,
                         show_progress=not args.quiet, data_only=args.data_only)
    if bundle is None:
        print(f"demo dataset ready: {args.out / 'data' / 'birds'}")
        return
    print(f"demo world ready: bundle {bundle.path} on base {bundle.base_model}; "
          f"recommended strength {bundle.meta.get('recommended_strength')}")


def run_demo_evaluate(args: argparse.Namespace) -> None:
    from ..demo.world import SHIPPED_BIRDS, evaluate_world
    from ..hub import open_bundle
    from ..records import write_text_atomic
    from ..scoring import default_clip, load_clip

    if args.per_class < 1:
        fail("--per-class must be >= 1")
    bundle = open_bundle(args.bundle or DEMO_BUNDLE)
    model, pretrained = default_clip(bundle)
    clip = load_clip(args.clip_model if args.clip_model is not None else model,
                     args.clip_pretrained if args.clip_pretrained is not None else pretrained)
    if not clip.available and clip.name:
        print(clip.status)
    result = evaluate_world(bundle, args.data or DEMO_ASSETS / SHIPPED_BIRDS, strengths=tuple(args.strength),
                            per_class=args.per_class, guidance_scale=args.guidance, num_inference_steps=args.steps,
                            seed=args.seed, base=args.base, clip=clip, show_progress=not args.quiet)
    if args.json:
        write_text_atomic(args.json, json.dumps({"rows": result["rows"], "records": result["records"],
                                                 "clip": result["clip"]}, indent=1) + "\n")


def run_demo_grid(args: argparse.Namespace) -> None:
    from ..demo.world import translation_grid
    from ..records import save_png

    pairs = None
    if args.pair:
        bad = [p for p in args.pair if p.count(":") != 1]
        if bad:
            fail(f"--pair takes SOURCE:TARGET, got {bad}")
        pairs = [tuple(p.split(":")) for p in args.pair]
    grid = translation_grid(args.bundle, pairs, strengths=tuple(args.strength), seed=args.seed, show_progress=True)
    save_png(grid, args.out)
    print(f"wrote {args.out} ({grid.width} x {grid.height})")


def run_selftest(args: argparse.Namespace) -> None:
    from ..selftest import selftest

    ok, _ = selftest(config_from_args(SelftestConfig, args), work=args.work)
    if not ok:
        raise SystemExit(1)
