"""`diffmix finetune`, `train-reference`, `train` and `experiment`: the training stages."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ClassifyConfig, FinetuneConfig, ReferenceConfig, SplitConfig, with_recipe
from .options import config_from_args, fail, given_values, split_config_from_args


def run_finetune(args: argparse.Namespace) -> None:
    from ..finetune import finetune

    bundle = finetune(args.data, args.base, args.out, config_from_args(FinetuneConfig, args),
                      revision=args.revision, split_file=args.split_file, split_config=split_config_from_args(args),
                      resume=args.resume, overwrite=args.overwrite, strict=args.strict, max_pixels=args.max_pixels,
                      show_progress=not args.quiet, stop_after=args.stop_after)
    if bundle is None:
        print(f"stopped; no checkpoint yet in {args.out}")
    else:
        print(f"bundle {bundle.path}: {bundle.num_classes} classes, {bundle.meta['steps']} steps")


def run_train_reference(args: argparse.Namespace) -> None:
    from ..data import read_dataset
    from ..reference import attach_reference, train_reference

    config = config_from_args(ReferenceConfig, args)
    given = split_config_from_args(args)
    dataset = read_dataset(args.data, strict=args.strict, max_pixels=args.max_pixels, show_progress=not args.quiet)
    out = train_reference(dataset, args.out, config, split_file=args.split_file,
                          split_config=SplitConfig(**given) if given else None, device=args.device,
                          show_progress=not args.quiet)
    meta = json.loads((out / "reference.json").read_text())
    print(f"wrote {out}: {meta['model_name']} ({meta['pretrained_from']}), {len(meta['classes'])} classes, "
          f"val accuracy {meta['val_accuracy']:.3f} (chance {meta['chance_accuracy']:.3f}, "
          f"best epoch {meta['best_epoch']})")
    if args.attach:
        bundle = attach_reference(args.attach, out)
        print(f"attached to bundle {bundle.path} ({bundle.meta['reference_classifier']})")


def run_train(args: argparse.Namespace) -> None:
    from ..classify import format_report, train_classifier
    from ..data import read_dataset

    config = config_from_args(ClassifyConfig, args, base=with_recipe(given_values(ClassifyConfig, args)))
    dataset = read_dataset(args.data, strict=args.strict, max_pixels=args.max_pixels, show_progress=not args.quiet)
    report = train_classifier(dataset, args.out, config, synthetic=args.synthetic, split_file=args.split_file,
                              split_config=split_config_from_args(args), device=args.device,
                              show_progress=not args.quiet)
    print(format_report(report))
    print(f"wrote {args.out / 'report.json'} and the best-validation checkpoint {args.out / 'model.safetensors'}")


def run_experiment_command(args: argparse.Namespace) -> None:
    from ..experiment import describe_runs, load_experiment, pool_reports, recompute_report, run_experiment

    config = load_experiment(args.config, quick=args.quick, data=args.data, bundle=args.bundle,
                             ti_bundle=args.ti_bundle, base=args.base, out=args.out, report_dir=args.report_dir,
                             seeds=args.seeds, threads=args.threads)
    if args.dry_run:
        print("\n".join(describe_runs(config)))
        return
    if args.pool and not args.report_only:
        fail("--pool goes with --report-only (it trains nothing)")
    if args.report_only:
        own = Path(config.report_dir or config.out) / f"{config.name}.json"
        result = (pool_reports([own, *args.pool], own.with_name(f"{config.name}_pooled")) if args.pool
                  else recompute_report(own))
    else:
        result = run_experiment(config, device=args.device, show_progress=not args.quiet)
    print(result["files"]["markdown"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(f) for f in result["files"].values()))
