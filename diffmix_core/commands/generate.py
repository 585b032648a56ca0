"""`diffmix translate`, `synthesize` and `calibrate`: images from a bundle (or a base model)."""
from __future__ import annotations

import argparse
import dataclasses

from ..config import (CalibrateConfig, DiffIIConfig, ScoreConfig, SynthesizeConfig, Thresholds, TranslateConfig,
                      check_seed, get_strategy)
from .options import config_from_args, fail, given_values, pipeline_config, profile_values, split_config_from_args


def run_translate(args: argparse.Namespace) -> None:
    from ..apply import load_pipeline_for
    from ..data import load_image
    from ..hub import open_bundle
    from ..jobs import RANDOM_SEED, make_jobs, resolve_seeds
    from ..records import write_translations
    from ..translate import Source, check_strength, count_jobs, translate

    bundle = open_bundle(args.bundle) if args.bundle else None
    profile, settings_from = profile_values(args, bundle, (TranslateConfig,), strength=args.strength)
    # -1: a random seed, recorded; other values are checked below with the request's numbers
    args.seed = [resolve_seeds([seed])[0] if seed == RANDOM_SEED else seed for seed in args.seed]
    config = config_from_args(TranslateConfig, args, base=profile)
    strategy = get_strategy(config.strategy)
    _complete_request(args, strategy, bundle, settings_from)
    # 1. the request's size and numbers, before anything is read or loaded
    gen = strategy.pairing == "gen"
    factors = {"images": len(args.image), "targets": len(args.target), "strengths": len(args.strength),
               "seeds": len(args.seed)} if not gen else {"targets": len(args.target), "seeds": len(args.seed)}
    count_jobs(factors, args.max_jobs, "--max-jobs")
    for s in [] if gen or strategy.start == "inversion" else args.strength:
        check_strength(s, config.num_inference_steps)
    for seed in args.seed:
        check_seed(seed, "--seed")
    sources = [Source(load_image(p, max_pixels=args.max_pixels), args.source_class, p.stem, str(p.resolve()))
               for p in args.image or []]
    if strategy.start == "inversion":
        jobs = _diffii_jobs(args, sources, bundle)
    else:
        jobs = make_jobs(sources, args.target, args.strength, args.seed, strategy.pairing)
    pipe = load_pipeline_for(pipeline_config(args), bundle, allow_base_mismatch=args.allow_base_mismatch)
    results = translate(pipe, jobs, config, bundle=bundle, superclass=args.superclass,
                        show_progress=not args.quiet, diff_ii=config_from_args(DiffIIConfig, args))
    for res in results:
        res.record["settings_from"] = settings_from   # which of CLI, saved profile, bundle, default set each
    index = write_translations(results, args.out)
    print(f"wrote {len(results)} image(s) and {index}")


def _complete_request(args: argparse.Namespace, strategy, bundle, settings_from: dict) -> None:
    """Fill in --strength and --target where the strategy allows (``settings_from["strength"]`` says
    "bundle" when the bundle's recommended strength is taken); stop on a missing --image,
    --source-class or --target."""
    from ..bundle import Profile
    from ..diffii import DIFFII_S
    from ..profiles import load_profile

    if args.strength is None:   # Profile.start_strength: the profile's, else the bundle's recommended, else 0.5;
        # diff-ii's s is another quantity: the authors' 0.3
        args.strength = [DIFFII_S if strategy.start == "inversion"
                         else (load_profile(bundle) if bundle else Profile()).start_strength(bundle)]
        if strategy.start != "inversion" and settings_from.get("strength") == "default" and bundle is not None \
                and bundle.meta.get("recommended_strength") is not None:
            settings_from["strength"] = "bundle"   # its recommended_strength
    if strategy.pairing != "gen" and not args.image:
        fail(f"strategy {strategy.name} needs --image")
    if strategy.pairing != "gen" and not args.source_class:
        fail("give --source-class (the class of the source images)")
    if not args.target:
        if strategy.pairing != "intra":
            fail(f"strategy {strategy.name} needs --target (the target class names)")
        args.target = [args.source_class]


def _diffii_jobs(args: argparse.Namespace, sources: list, bundle) -> list:
    """diff-ii jobs: each source with --partner, else with a same-class image drawn per seed from
    --data or the bundle's examples (diffii_jobs.partnered_jobs)."""
    from ..data import load_image
    from ..diffii import suffixes_for
    from ..diffii_jobs import partner_pool, partnered_jobs
    from ..translate import Source

    if bundle is None:
        fail("strategy diff-ii runs on a fine-tuned bundle: give --bundle")
    suffixes_for(config_from_args(DiffIIConfig, args), bundle.superclass)   # a bad --suffixes fails before any work
    if args.partner:
        pool = [Source(load_image(args.partner, max_pixels=args.max_pixels), args.source_class, args.partner.stem,
                       str(args.partner.resolve()))]
    else:
        pool = partner_pool(args.source_class, data=args.data, bundle=bundle, max_pixels=args.max_pixels)
    jobs, alone = partnered_jobs(sources, pool, args.target, args.strength, args.seed, draw=not args.partner)
    for source_id in alone:
        print(f"diff-ii: {source_id} has no other image of its class to pair with; it is denoised from its "
              "own inversion (no interpolation)")
    return jobs


def run_synthesize(args: argparse.Namespace) -> None:
    from ..synthesize import parse_shard, run_synthesis, train_split

    bundle = None
    if args.bundle:
        from ..hub import open_bundle

        bundle = open_bundle(args.bundle)
    configs = (SynthesizeConfig, TranslateConfig, Thresholds)
    profile = profile_values(args, bundle, configs)[0] if bundle else {}
    if bundle is None and not args.base and not args.merge:
        fail("give --bundle or --base")
    train, split_file = train_split(args.data, args.split_file, split_config_from_args(args), strict=args.strict,
                                    max_pixels=args.max_pixels, show_progress=not args.quiet)
    sconfig, tconfig, thresholds = (config_from_args(cls, args, base=profile) for cls in configs)
    if get_strategy(tconfig.strategy).start == "inversion" and "strength" not in given_values(SynthesizeConfig, args):
        from ..diffii import DIFFII_S   # diff-ii's s is another quantity (as translate): the authors' 0.3

        sconfig = dataclasses.replace(sconfig, strength=DIFFII_S)
    r = run_synthesis(train, args.out, sconfig, tconfig, pipeline_config(args), split_file=split_file,
                      bundle=bundle, superclass=args.superclass, shard=parse_shard(args.shard) if args.shard else None,
                      merge_only=args.merge, export=args.export, thresholds=thresholds,
                      score=args.score, reference=args.reference, clip_model=args.clip_model,
                      clip_pretrained=args.clip_pretrained, allow_base_mismatch=args.allow_base_mismatch,
                      show_progress=not args.quiet, diff_ii=config_from_args(DiffIIConfig, args))
    _print_synthesis(args, r)


def _print_synthesis(args: argparse.Namespace, r: dict) -> None:
    """What a synthesize run made, and what its merge wrote."""
    s, (i, n) = r["made"], r["shard"]
    if s:
        rate = f", {s['images_per_s']:.2f} img/s" if s["images_per_s"] else ""
        print(f"shard {s['shard']}: {s['planned']} planned, {s['skipped']} already made, {s['made']} made, "
              f"{s['rejected']} rejected, {s['seconds']:.1f} s{rate}")
    elif not args.merge:
        print(f"shard {i}/{n}: all its planned images are already made")
    if r["main"] and r["merged"] is None:
        print(f"{r['missing']} planned image(s) still to make by other shards; the last one merges "
              f"(or run with --merge)")
    elif r["merged"] is not None:
        m = r["merged"]
        print(f"merged {m['kept']} image(s) ({m['rejected']} rejected) into {args.out / 'records.jsonl'}"
              + (f"; exported {', '.join(m['export'])} to {args.out / 'export'}" if m["export"] else ""))


def run_calibrate(args: argparse.Namespace) -> None:
    from ..bundle import load_bundle
    from ..calibrate import calibrate, save_to_profile, write_calibration

    bundle = load_bundle(args.bundle)
    profile = profile_values(args, bundle, (TranslateConfig,))[0]
    translate_config = config_from_args(TranslateConfig, args, base=profile)
    config = config_from_args(CalibrateConfig, args)
    score_config = config_from_args(ScoreConfig, args, prefix="score_")
    reference, clip = _calibrate_scorers(args)

    def generate(bundle, jobs, config, callback=None):   # called once calibrate has checked the request
        from ..apply import load_pipeline_for
        from ..translate import translate

        pipe = load_pipeline_for(pipeline_config(args), bundle, allow_base_mismatch=args.allow_base_mismatch)
        return translate(pipe, jobs, config, bundle=bundle, show_progress=not args.quiet, callback=callback)

    # calibrate checks the request (sources x targets x strengths x seeds) before generate loads the pipeline
    cal = calibrate(bundle, None, config, data=args.data, split_file=args.split_file,
                    translate_config=translate_config, score_config=score_config,
                    reference=reference, clip=clip, generate=generate, limit=args.max_jobs,
                    show_progress=not args.quiet)
    files = write_calibration(cal, args.out)
    print(cal.clip)
    print(cal.text())
    print("wrote " + ", ".join(str(f) for f in files))
    if args.save_profile:
        from ..profiles import load_profile

        path = save_to_profile(bundle, cal)
        print(f"saved {path}: {load_profile(bundle).strength_source()}")


def _calibrate_scorers(args: argparse.Namespace) -> tuple[object | None, object | None]:
    """(reference, CLIP) named on the command line; None = the bundle's (calibrate loads it)."""
    from ..scoring import load_clip

    reference = None
    if args.reference:
        from ..reference import load_reference

        reference = load_reference(args.reference)
    given = given_values(ScoreConfig, args, prefix="score_")
    clip = None
    if "clip_model" in given:
        clip = load_clip(given["clip_model"], given.get("clip_pretrained", ScoreConfig.clip_pretrained))
    return reference, clip
