"""The embedded demo world, built end to end from offline packages (issue 5).

:func:`build_world` runs, each stage skipped when its output is complete, so a killed
build continues where it stopped when run again with the same ``out``:

1. ``data/``: the demo birds ImageFolder + the broader pre-training set (demo/data.py);
2. ``base/``: the tiny SD-architecture pipeline trained from scratch (demo/pretrain.py);
3. splits: ``data/birds/diffmix_split.json`` (the full split) and
   ``data/fewshot_split.json`` (same seed, ``shots`` per class; val/test identical);
   ``clip/``: the demo CLIP, an open_clip model trained on the train split (demo/clip.py);
4. ``bundle/``: ``finetune.finetune`` over the base on the few-shot split;
5. ``reference-data/`` + ``reference/``: the reference classifier, trained on the train
   split plus a VAE round trip and a blurred copy of every train image (and round trips
   in validation), so it judges species rather than sharpness; attached to the bundle;
6. the recommended strength: validation images translated to every other class at
   0.3 ... 0.9, scored by the reference (scoring.recommend_strength);
7. ``assets/demo/``: what ships: ``base/`` (fp16 safetensors), ``bundle/`` (its reference
   in fp16, the demo CLIP in fp16 under ``bundle/clip``, example images) and ``demo.json``
   (sampler settings, figures).

:func:`evaluate_world` prints the per-strength table of ``diffmix demo evaluate``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..apply import load_pipeline_for
from ..bundle import ADAPTER_JSON, Bundle, Profile, bundle_examples, load_bundle, update_bundle_meta
from ..calibrate import target_classes
from ..classifier import WEIGHTS_FILE, quantize_int8
from ..config import (DemoClipConfig, DemoDataConfig, DemoWorldConfig, FinetuneConfig, PipelineConfig, PretrainConfig,
                      ReferenceConfig, ScoreConfig, SplitConfig, TranslateConfig)
from ..data import (SPLITS, SPLIT_FILE, SPLIT_FORMAT_VERSION, default_split_path, load_image, make_splits as split_ids,
                    read_dataset, read_split_file, resolve_splits, split_subset, write_split_file)
from ..finetune import RUN_FILE, finetune
from ..models import load_pipeline, write_clip_tokenizer_files
from ..paths import DEMO_ASSETS_REL
from ..profiles import load_profile
from ..records import atomic_path, safe_name, save_png, sha256_file, write_text_atomic
from ..reference import (BUNDLE_REFERENCE_DIR, META_FILE, attach_reference, bundle_reference_path, load_reference,
                         train_reference)
from ..scoring import class_prompt, score_images, summarize
from ..translate import Job, Source, translate
from .clip import CONFIG_FILE, attach_clip, spearman, train_clip, zero_shot_accuracy
from .data import build_dataset, build_heldout
from .pretrain import pretrain

FEWSHOT_SPLIT = "fewshot_split.json"
DEMO_JSON = "demo.json"
EVAL_STRENGTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def quick_config() -> DemoWorldConfig:
    """Tiny settings: every stage runs for real in about a minute (tests, `demo build --quick`)."""
    return DemoWorldConfig(
        data=DemoDataConfig(image_size=32, birds_per_class=6, pretrain_per_class=3, pretrain_per_other=0),
        pretrain=PretrainConfig(resolution=32, vae_channels=(8, 16), vae_steps=2, vae_crop=16, vae_batch_size=4,
                                decoder_steps=1, unet_channels=(16, 32), text_width=32, text_layers=1,
                                attention_heads=2, unet_steps=2, unet_batch_size=4, warmup_steps=1,
                                checkpoint_every=2),
        clip=DemoClipConfig(embed_dim=16, image_size=32, vision_width=32, vision_layers=1, text_width=32,
                            text_layers=1, steps=2, batch_size=8, warmup_steps=1, checkpoint_every=1),
        shots=2, finetune_steps=2, finetune_batch_size=2, lora_rank=2, reference_model="test_resnet",
        recommend_targets=2, reference_pretrained="none", reference_epochs=1, reference_image_size=32, num_inference_steps=4,
        heldout_per_class=2)


# --------------------------------------------------------------------------- splits and bundle
def make_splits(birds: Path, out: Path, settings: DemoWorldConfig) -> tuple[Path, Path]:
    """(full split file, few-shot split file) of the birds, one seed."""
    dataset = read_dataset(birds, show_progress=False)
    full = default_split_path(dataset)
    resolve_splits(dataset, full, SplitConfig(seed=settings.split_seed))
    fewshot = out / FEWSHOT_SPLIT
    resolve_splits(dataset, fewshot, SplitConfig(seed=settings.split_seed, shots=settings.shots))
    return full, fewshot


def finetune_config(settings: DemoWorldConfig) -> FinetuneConfig:
    return FinetuneConfig(
        superclass="bird", token_init="class-name", max_steps=settings.finetune_steps,
        batch_size=settings.finetune_batch_size, resolution=settings.data.image_size, rank=settings.lora_rank,
        lora_alpha=float(settings.lora_rank), lr=settings.finetune_lr, ti_lr=settings.finetune_ti_lr,
        checkpoint_every=min(250, settings.finetune_steps), sample_steps=0, mixed_precision="no", num_workers=0)


def make_bundle(birds: Path, base: Path, fewshot: Path, out: Path, settings: DemoWorldConfig,
                show_progress: bool = True):
    """``finetune.finetune`` over the base on the few-shot split (resumed when a run is there)."""
    if (out / "adapter.json").is_file():
        bundle = load_bundle(out)
        if bundle.meta["steps"] == settings.finetune_steps:
            return bundle
    return finetune(birds, base, out, finetune_config(settings), split_file=fewshot,
                    resume=(out / RUN_FILE).is_file(), show_progress=show_progress)


# --------------------------------------------------------------------------- the reference classifier
def _round_trip(vae, images: list[Image.Image], size: int) -> list[Image.Image]:
    """VAE encode (posterior mean) + decode, as the generator renders."""
    x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC),
                                                 np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images])
    with torch.inference_mode():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)   # (B, 3, size, size)
    arr = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def _blur(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur, or a down-and-up resize: the softness of generated images."""
    if rng.random() < 0.5:
        return im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.3))))
    small = max(8, int(im.width * rng.uniform(0.45, 0.7)))
    return im.resize((small, small), Image.BILINEAR).resize(im.size, Image.BICUBIC)


def augmented_reference_data(birds: Path, base: Path, out: Path, settings: DemoWorldConfig) -> Path:
    """An ImageFolder of the birds plus generator-like copies, with its own split file: train =
    train originals + their VAE round trips + blurred copies; val = val originals + round trips;
    test = test originals (never used here)."""
    if (out / "diffmix_split.json").is_file():
        return out
    dataset = read_dataset(birds, show_progress=False)
    splits = resolve_splits(dataset)
    vae = load_pipeline(base, device="cpu", dtype="fp32", scheduler="native").vae
    ids = {s: [] for s in ("train", "val", "test")}
    for name in ids:
        items = split_subset(dataset, splits, name).items
        for i in range(0, len(items), 32):
            chunk = items[i:i + 32]
            originals = [load_image(it.path) for it in chunk]
            trips = _round_trip(vae, originals, settings.data.image_size) if name != "test" else [None] * len(chunk)
            for it, im, trip in zip(chunk, originals, trips):
                rng = np.random.default_rng([settings.split_seed, zlib.crc32(it.id.encode())])
                variants = {"": im, "-vae": trip, "-blur": _blur(im, rng) if name == "train" else None}
                for suffix, v in variants.items():
                    if v is not None:
                        rel = f"{Path(it.id).parent}/{Path(it.id).stem}{suffix}.png"
                        save_png(v, out / rel)
                        ids[name].append(rel)
    ref_data = read_dataset(out, show_progress=False)
    write_split_file(out / "diffmix_split.json", ref_data, ids, SplitConfig(seed=settings.split_seed))
    return out


def make_reference(birds: Path, base: Path, out: Path, settings: DemoWorldConfig, show_progress: bool = True) -> Path:
    """Train (once) the reference classifier on the augmented copy of the birds."""
    if (out / "reference" / META_FILE).is_file():
        return out / "reference"
    data = augmented_reference_data(birds, base, out / "reference-data", settings)
    config = ReferenceConfig(model_name=settings.reference_model, pretrained=settings.reference_pretrained,
                             image_size=settings.reference_image_size, epochs=settings.reference_epochs)
    return train_reference(data, out / "reference", config, show_progress=show_progress)


# --------------------------------------------------------------------------- translations
def sources_of(data: str | os.PathLike, split: str, per_class: int):
    """``per_class`` images of each class from a split of the demo birds, as translate Sources."""
    dataset = read_dataset(data, show_progress=False)
    subset = split_subset(dataset, resolve_splits(dataset), split)
    out = []
    for items in subset.by_class().values():
        out += [Source(load_image(it.path), it.class_name, it.id, str(it.path)) for it in items[:per_class]]
    if not out:
        raise ValueError(f"the {split} split of {data} is empty")
    return out


def _targets(classes: tuple[str, ...], source_class: str, k: int | None) -> list[str]:
    """The other classes, starting after the source's in label order; the first ``k`` (None: all)."""
    return target_classes(classes, source_class, k or 0)


def sweep(pipe, bundle, sources, strengths, config: TranslateConfig, seed: int = 0, show_progress: bool = True,
          targets_per_source: int | None = None, clip=None) -> tuple[list[dict], list]:
    """Translate every source to every OTHER class (or the next ``targets_per_source``) at every
    strength; score with the bundle's reference classifier (and, with an available ``clip``
    scorer, its ``clip_target`` / ``clip_source``). Returns (records with scores,
    reference-feature embeddings)."""
    ref_path = bundle_reference_path(bundle)
    if ref_path is None:
        raise ValueError(f"bundle {bundle.path} has no reference classifier; attach one first")
    reference = load_reference(ref_path, device="cpu")
    jobs = [Job(src, t, s, seed) for src in sources
            for t in _targets(bundle.classes, src.source_class, targets_per_source) for s in strengths]
    results = translate(pipe, jobs, config, bundle=bundle, show_progress=show_progress)
    records, embeddings = [], []
    texts = None
    if clip is not None and clip.available:
        texts = dict(zip(bundle.classes, clip.encode_texts([class_prompt(c, bundle) for c in bundle.classes])))
    for i in range(0, len(results), 64):
        chunk = results[i:i + 64]
        recs = [r.record for r in chunk]
        scores, embs = score_images([r.image for r in chunk], recs, reference=reference)
        if texts is not None:   # CLIP scores beside the reference's; distances stay on the reference features
            emb = clip.encode_images([r.image for r in chunk])
            for s, e, rec in zip(scores, emb, recs):
                s["clip_target"] = round(float(e @ texts[rec["target_class"]]), 5)
                s["clip_source"] = round(float(e @ texts[rec["source_class"]]), 5)
        for rec, s in zip(recs, scores):
            rec["scores"] = s
        records += recs
        embeddings += embs
    return records, embeddings


def strength_table(records: list[dict]) -> list[dict]:
    """Per strength: n, target-hit (top-1 = target), source-keep (top-1 = source), mean P(target),
    mean distance to the source (reference features, 1 - cos) and mean SSIM."""
    rows = []
    for s in sorted({float(r["strength"]) for r in records}):
        sc = [r["scores"] for r in records if float(r["strength"]) == s]
        recs = [r for r in records if float(r["strength"]) == s]
        mean = lambda k: float(np.mean([x[k] for x in sc if x.get(k) is not None])) if sc else float("nan")  # noqa
        rows.append({"strength": s, "n": len(sc),
                     "target_hit": float(np.mean([x["top1"] == r["target_class"] for x, r in zip(sc, recs)])),
                     "source_keep": float(np.mean([x["top1"] == r["source_class"] for x, r in zip(sc, recs)])),
                     "p_target": mean("p_target"), "distance": mean("distance"), "ssim": mean("ssim")})
        if any(x.get("clip_target") is not None for x in sc):
            rows[-1]["clip_target"] = mean("clip_target")
    return rows


def format_table(rows: list[dict]) -> str:
    """The table of ``diffmix demo evaluate``; the last line is machine-readable."""
    cols = ("strength", "n", "target_hit", "source_keep", "p_target", "distance", "ssim")
    cols += ("clip_target",) if rows and "clip_target" in rows[0] else ()
    lines = ["  ".join(f"{c:>11}" for c in cols)]
    lines += ["  ".join(f"{r[c]:>11.3f}" if isinstance(r[c], float) else f"{r[c]:>11}" for c in cols) for r in rows]
    at = {r["strength"]: r for r in rows}
    hit = at.get(0.9, {}).get("target_hit")
    keep = at.get(0.3, {}).get("source_keep")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines.append(f"target_hit_at_0.9={fmt(hit)} source_keep_at_0.3={fmt(keep)}")
    return "\n".join(lines)


def _pipeline_for(bundle, base: str | os.PathLike | None = None):
    """The bundle's base pipeline (or ``base``: e.g. the shipped copy) with the bundle applied."""
    return load_pipeline_for(PipelineConfig(model=str(base or ""), device="cpu", dtype="fp32"), bundle,
                             allow_base_mismatch=base is not None)


def clip_agreement(records: list[dict]) -> dict:
    """Spearman rank correlation of the CLIP target score with the reference's P(target) over
    the translations that have both: {'spearman', 'n'} (spearman None when fewer than 3)."""
    pairs = [(r["scores"]["clip_target"], r["scores"]["p_target"]) for r in records
             if r["scores"].get("clip_target") is not None and r["scores"].get("p_target") is not None]
    rho = spearman(*zip(*pairs)) if len(pairs) >= 3 else None
    return {"spearman": rho, "n": len(pairs)}


def clip_zero_shot(clip, bundle, data: str | os.PathLike, split: str = "test") -> dict:
    """The CLIP's zero-shot top-1 over the bundle's class prompts on every image of a split of
    ``data`` (clip.zero_shot_accuracy)."""
    dataset = read_dataset(data, show_progress=False)
    items = split_subset(dataset, resolve_splits(dataset), split).items
    prompts = {c: class_prompt(c, bundle) for c in bundle.classes}
    return zero_shot_accuracy(clip, [load_image(it.path) for it in items], [it.class_name for it in items], prompts)


def evaluate_world(bundle, data: str | os.PathLike, *, strengths=EVAL_STRENGTHS, per_class: int = 2,
                   guidance_scale: float = 2.5, num_inference_steps: int = 25, seed: int = 0,
                   base: str | os.PathLike | None = None, clip=None, show_progress: bool = True,
                   targets_per_source: int | None = None) -> dict:
    """Translate ``per_class`` held-out TEST images of each class to every other class (or the
    next ``targets_per_source`` in label order) at each strength; print and return the
    per-strength table ({'rows': [...], 'text': str, 'records', 'clip'}).

    Args:
        bundle: a bundle folder or bundle.Bundle with a reference classifier attached.
        data: the demo birds ImageFolder (its split file decides what is held out).
        base: the base pipeline folder (default: the one the bundle names).
        clip: an available scoring.ClipScorer: the table gains the mean CLIP target score, and a
            line gives its zero-shot accuracy on every test image of ``data`` and the Spearman
            correlation of its target score with the reference's P(target) over the sweep.
    """
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    pipe = _pipeline_for(bundle, base)
    config = TranslateConfig(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             resolution=bundle.resolution)
    clip = clip if clip is not None and clip.available else None
    records, _ = sweep(pipe, bundle, sources_of(data, "test", per_class), strengths, config, seed, show_progress,
                       targets_per_source=targets_per_source, clip=clip)
    rows = strength_table(records)
    text = format_table(rows)
    result = {"rows": rows, "records": records, "clip": None}
    if clip is not None:
        zero_shot = clip_zero_shot(clip, bundle, data)
        agreement = clip_agreement(records)
        result["clip"] = {"name": clip.name, "zero_shot": zero_shot, "agreement": agreement}
        rho = "n/a" if agreement["spearman"] is None else f"{agreement['spearman']:.3f}"
        line = (f"{clip.name}: zero-shot accuracy {zero_shot['accuracy']:.3f} on {zero_shot['n']} test images "
                f"(class prompts); Spearman(CLIP target score, reference P(target)) {rho} over "
                f"{agreement['n']} translations")
        head, last = text.rsplit("\n", 1)
        text = f"{head}\n{line}\n{last}"
    print(text)
    result["text"] = text
    return result


def translation_grid(bundle, pairs: list[tuple[str, str]] | None = None, *,
                     strengths: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9), seed: int = 0, scale: int = 2,
                     show_progress: bool = False) -> Image.Image:
    """One row per (source class, target class): the bundle's first example image of the source,
    then its diff-mix translations at ``strengths``, labelled. Sampler settings from the bundle's
    profile. ``pairs`` default: each class to the next one in label order."""
    from PIL import ImageDraw

    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    classes = list(bundle.classes)
    pairs = pairs or [(c, classes[(i + 1) % len(classes)]) for i, c in enumerate(classes)]
    examples = {}
    for path, cls in bundle_examples(bundle):
        examples.setdefault(cls, path)
    for source, target in pairs:
        bundle.class_index(target)
        if source not in examples:
            raise ValueError(f"the bundle has no example image of {source!r}; it has {sorted(examples)}")
    profile = load_profile(bundle)
    config = TranslateConfig(strategy="diff-mix", num_inference_steps=profile.num_inference_steps or 25,
                             guidance_scale=7.5 if profile.guidance_scale is None else profile.guidance_scale,
                             resolution=bundle.resolution)
    sources = {s: Source(load_image(examples[s]), s, Path(examples[s]).stem) for s, _ in pairs}
    jobs = [Job(sources[s], t, st, seed) for s, t in pairs for st in strengths]
    results = translate(_pipeline_for(bundle), jobs, config, bundle=bundle, show_progress=show_progress)
    side, label_w, head = bundle.resolution * scale, 150, 22
    grid = Image.new("RGB", (label_w + side * (len(strengths) + 1), head + side * len(pairs)), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(["source"] + [f"s = {st}" for st in strengths]):
        draw.text((label_w + j * side + 6, 5), title, fill="black")
    for i, (s, t) in enumerate(pairs):
        y = head + i * side
        draw.text((6, y + side // 2 - 7), f"{s} -> {t}", fill="black")
        row = [sources[s].image] + [r.image for r in results[i * len(strengths):(i + 1) * len(strengths)]]
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((side, side), Image.LANCZOS), (label_w + j * side, y))
    return grid


def recommend(bundle, data: Path, settings: DemoWorldConfig, show_progress: bool = True) -> tuple[float, dict]:
    """Recommended strength from a sweep of validation images (scoring.recommend_strength);
    written into the bundle. Returns (strength, {'rows': ..., 'reason': ...})."""
    pipe = _pipeline_for(bundle)
    config = TranslateConfig(num_inference_steps=settings.num_inference_steps,
                             guidance_scale=settings.guidance_scale, resolution=bundle.resolution)
    records, embeddings = sweep(pipe, bundle, sources_of(data, "val", settings.recommend_per_class),
                                (0.3, 0.5, 0.7, 0.9), config, show_progress=show_progress,
                                targets_per_source=settings.recommend_targets)
    summary = summarize(records, embeddings, ScoreConfig(clip_model=""))
    strength = summary["recommended_strength"]
    update_bundle_meta(bundle.path, recommended_strength=strength)
    return strength, {"rows": strength_table(records), "reason": summary["recommendation"]}


# --------------------------------------------------------------------------- assets
def _int8_file(src: Path, dest: Path) -> None:
    """The reference classifier's weights stored int8 (classifier.quantize_int8): a quarter of fp32.
    On the demo test split: top-1 0.990 int8 vs 0.995 fp32, the same prediction for 99.5 % of images."""
    from safetensors.torch import load_file, save_file

    with atomic_path(dest) as tmp:
        save_file(quantize_int8(load_file(str(src))), str(tmp))


def _slim_tokenizer(folder: Path, tokenizer) -> None:
    """The CLIP tokenizer as vocab.json + merges.txt (1.5 MB) instead of the fast tokenizer.json
    (3.6 MB) that save_pretrained writes; CLIPTokenizer.from_pretrained reads either. Refuses
    unless the slim files give ``tokenizer``'s vocabulary and ids."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(folder)
    (folder / "tokenizer.json").unlink(missing_ok=True)
    slim = CLIPTokenizer.from_pretrained(str(folder))
    probe = "a photo of a black-footed albatross, bird 42!"
    if slim.get_vocab() != tokenizer.get_vocab() or slim(probe).input_ids != tokenizer(probe).input_ids:
        raise ValueError(f"the base model's tokenizer is not the CLIP BPE tokenizer; keep its tokenizer.json")


def _copy_bundle(src: Path, dest: Path, examples_from: Path, per_class: int, base: Path, profile: Profile):
    """The bundle's shipped files (no checkpoints or logs), its reference weights in fp16, example
    images from the TEST split, pointing at the shipped ``base``, with ``profile`` (the app's sweep
    settings for it). Returns the loaded copy."""
    skip = shutil.ignore_patterns("checkpoints", "finetune_run.json", "train_log.jsonl", ".*")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=skip)
    meta = json.loads((dest / ADAPTER_JSON).read_text(encoding="utf-8"))
    ref = dest / BUNDLE_REFERENCE_DIR
    if (ref / WEIGHTS_FILE).is_file():
        _int8_file(src / BUNDLE_REFERENCE_DIR / WEIGHTS_FILE, ref / WEIGHTS_FILE)
        ref_meta = json.loads((ref / META_FILE).read_text(encoding="utf-8"))
        ref_meta.update(sha256={WEIGHTS_FILE: sha256_file(ref / WEIGHTS_FILE)},
                        stored_dtype="int8 weights (per-channel fp32 scales), fp16 other tensors")
        write_text_atomic(ref / META_FILE, json.dumps(ref_meta, indent=2, ensure_ascii=False) + "\n")
        for rel in (f"{BUNDLE_REFERENCE_DIR}/{WEIGHTS_FILE}", f"{BUNDLE_REFERENCE_DIR}/{META_FILE}"):
            meta["files"][rel] = sha256_file(dest / rel)
    for source in sources_of(examples_from, "test", per_class):
        save_png(source.image, dest / "examples" / safe_name(source.source_class) / Path(source.id).name)
    # The base is named relative to the bundle ('../base'), so assets/demo can be moved or cloned anywhere.
    rel = Path(os.path.relpath(base.resolve(), dest.resolve())).as_posix()
    meta.update(examples="examples", base_model={"model": rel if rel.startswith("../") else f"./{rel}",
                                                 "revision": None}, profile=profile.to_dict())
    write_text_atomic(dest / ADAPTER_JSON, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return load_bundle(dest)   # verifies every file again


def write_assets(out: Path, base: Path, bundle_dir: Path, data: Path, info: dict, per_class: int = 2,
                 clip: Path | None = None, settings: DemoWorldConfig | None = None) -> Path:
    """``out/base`` (the pipeline in fp16 safetensors; it loads as fp32 with the same output),
    ``out/bundle`` (pointing at it; with ``clip`` and ``settings``, the demo CLIP attached and
    the shipped birds: :func:`ship_extras`) and ``out/demo.json``. Returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "base", ignore_errors=True)
    pipe = load_pipeline(base, device="cpu", dtype="fp32", scheduler="native")
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.half()
    pipe.save_pretrained(out / "base", safe_serialization=True)
    _slim_tokenizer(out / "base" / "tokenizer", pipe.tokenizer)
    profile = Profile(strength=info["recommended_strength"], strategy="diff-mix",
                      num_inference_steps=info["num_inference_steps"], guidance_scale=info["guidance_scale"])
    bundle = _copy_bundle(bundle_dir, out / "bundle", data, per_class, out / "base", profile)
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    info = dict(info, total_bytes=sum(sizes.values()), bundle_hash=bundle.hash)
    write_text_atomic(out / DEMO_JSON, json.dumps(info, indent=1) + "\n")
    if clip is not None and settings is not None:
        ship_extras(out, data.parent, clip, settings)
    return out


def ship_extras(assets: str | os.PathLike, data: str | os.PathLike, clip: str | os.PathLike,
                settings: DemoWorldConfig, show_progress: bool = False) -> dict:
    """Add to a shipped demo world (``assets``: base/, bundle/, demo.json) the demo CLIP (attached
    to the bundle: clip.attach_clip) and the shipped birds with the held-out test set
    (:func:`ship_birds` from the build's ``data`` folder); refresh demo.json (sizes, bundle hash,
    the CLIP's and the birds' figures). Returns demo.json's content."""
    assets = Path(assets)
    bundle = attach_clip(assets / "bundle", clip)
    birds = ship_birds(assets / SHIPPED_BIRDS, data, settings, settings.heldout_per_class, show_progress)
    splits = read_split_file(birds / SPLIT_FILE)["splits"]
    info = json.loads((assets / DEMO_JSON).read_text(encoding="utf-8"))
    clip_meta = json.loads((bundle.path / "clip" / CONFIG_FILE).read_text(encoding="utf-8"))
    info["settings"] = json.loads(json.dumps(dataclasses.asdict(settings)))
    info["clip"] = {"label": clip_meta["label"], "folder": "bundle/clip", **{k: clip_meta["diffmix"][k] for k in
                                                                            ("train_images", "parameters", "seconds")}}
    info["birds"] = {"folder": SHIPPED_BIRDS, **{k: len(v) for k, v in splits.items()},
                     "test_sources": f"the test split + {settings.heldout_per_class} new images per class"}
    bundle = load_bundle(assets / "bundle")
    for _ in range(2):   # demo.json counts itself
        total = sum(p.stat().st_size for p in assets.rglob("*") if p.is_file())
        info.update(total_bytes=total, bundle_hash=bundle.hash)
        write_text_atomic(assets / DEMO_JSON, json.dumps(info, indent=1) + "\n")
    return info


# --------------------------------------------------------------------------- the shipped birds + held-out set
SHIPPED_BIRDS = "birds"              # assets/demo/birds: what `demo evaluate` and the experiment read
LONGTAIL_SPLIT = "longtail_split.json"
LONGTAIL_IMBALANCE = 0.1             # the long-tail setting of configs/experiment_demo.yaml (n_i = 10 ... 1)
TEST_JPEG_QUALITY = 95               # held-out images are stored as JPEG (a third of PNG; train/val stay PNG)


def _split_json(dataset_name: str, classes, splits: dict, config: SplitConfig) -> str:
    return json.dumps({"format_version": SPLIT_FORMAT_VERSION, "dataset": dataset_name, "classes": list(classes),
                       "config": dataclasses.asdict(config), "splits": {k: list(splits[k]) for k in SPLITS}},
                      indent=1) + "\n"


def ship_birds(dest: str | os.PathLike, data: str | os.PathLike, settings: DemoWorldConfig,
               heldout_per_class: int = 80, show_progress: bool = True) -> Path:
    """The demo birds the repository ships (``dest``, e.g. ``assets/demo/birds``), so the demo
    experiment and ``demo evaluate`` need no data build:

    * train + val: the few-shot split's images (exactly what the bundle was fine-tuned on, and
      its validation images), PNG as built;
    * test: the test split's images plus ``heldout_per_class`` NEW images per class
      (data.build_heldout: never trained, fine-tuned or selected on), JPEG q95;
    * ``diffmix_split.json`` (the 10-shot split; its test = all held-out images) and
      ``longtail_split.json`` (IF :data:`LONGTAIL_IMBALANCE` over the same pool, same val/test).

    Written to a temporary folder and renamed into place. Returns ``dest``."""
    from PIL import Image

    data, dest = Path(data), Path(dest)
    birds = read_dataset(data / "birds", show_progress=False)
    few_config = SplitConfig(seed=settings.split_seed, shots=settings.shots)
    few = resolve_splits(birds, data / FEWSHOT_SPLIT, few_config)
    lt_config = SplitConfig(seed=settings.split_seed, shots=settings.shots, imbalance=LONGTAIL_IMBALANCE)

    long_tail = split_ids(birds, lt_config)
    assert long_tail["val"] == few["val"] and long_tail["test"] == few["test"]
    heldout = read_dataset(build_heldout(data / "heldout", heldout_per_class, settings.data,
                                         show_progress=show_progress), show_progress=False)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in few["train"] + few["val"]:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(birds.root / rel, tmp / rel)
    test = []
    for item in list(split_subset(birds, few, "test").items) + list(heldout.items):
        rel = f"{Path(item.id).parent.as_posix()}/{Path(item.id).stem}.jpg"
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(item.path) as im:
            im.convert("RGB").save(tmp / rel, format="JPEG", quality=TEST_JPEG_QUALITY)
        test.append(rel)
    test = sorted(test)
    for name, splits, config in ((SPLIT_FILE, few, few_config), (LONGTAIL_SPLIT, long_tail, lt_config)):
        write_text_atomic(tmp / name, _split_json(dest.name, birds.classes, dict(splits, test=test), config))
    shipped = read_dataset(tmp, show_progress=False)     # every listed file is there and reads
    for name, config in ((SPLIT_FILE, few_config), (LONGTAIL_SPLIT, lt_config)):
        resolve_splits(shipped, tmp / name, config)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


# --------------------------------------------------------------------------- the whole world
def build_world(out: str | os.PathLike, settings: DemoWorldConfig = DemoWorldConfig(), *,
                assets: str | os.PathLike | None = None, show_progress: bool = True, data_only: bool = False):
    """Build (or continue building) the demo world in ``out``; see the module docstring.

    Args:
        out: work folder (every stage's output; rerun to resume).
        settings: every stage's settings (:func:`quick_config` for a smoke run).
        assets: where the shipped copy goes (default ``<out>/assets/demo``).
        data_only: stop after the dataset and its split files (``<out>/data``).
    Returns:
        The shipped bundle (bundle.Bundle), reference attached; None with ``data_only``.
    """
    out = Path(out)
    say = print if show_progress else (lambda *a, **k: None)
    say(f"[1/8] dataset -> {out / 'data'}")
    build_dataset(out / "data", settings.data, show_progress=show_progress)
    birds = out / "data" / "birds"
    if data_only:
        make_splits(birds, out / "data", settings)
        return None
    say(f"[2/8] base model -> {out / 'base'}")
    base = pretrain(out / "data" / "pretrain", out / "base", settings.pretrain, show_progress=show_progress)
    say("[3/8] splits")
    _, fewshot = make_splits(birds, out / "data", settings)
    say(f"[4/8] demo CLIP -> {out / 'clip'}")
    clip = train_clip(out / "data", out / "clip", settings.clip, show_progress=show_progress)
    say(f"[5/8] bundle (few-shot fine-tune, k={settings.shots}) -> {out / 'bundle'}")
    bundle = make_bundle(birds, base, fewshot, out / "bundle", settings, show_progress)
    say(f"[6/8] reference classifier -> {out / 'reference'}")
    if not bundle.meta.get("reference_classifier"):
        bundle = attach_reference(bundle.path, make_reference(birds, base, out, settings, show_progress))
    say("[7/8] recommended strength")
    state = out / "recommend.json"
    if not state.is_file():
        strength, rec = recommend(bundle, birds, settings, show_progress)
        write_text_atomic(state, json.dumps({"recommended_strength": strength, **rec}, indent=1) + "\n")
    rec = json.loads(state.read_text(encoding="utf-8"))
    target = Path(assets) if assets is not None else out / DEMO_ASSETS_REL
    say(f"[8/8] assets -> {target}")
    pre = json.loads((base / "pretrain.json").read_text(encoding="utf-8"))
    info = {"guidance_scale": settings.guidance_scale, "num_inference_steps": settings.num_inference_steps,
            "recommended_strength": rec["recommended_strength"], "recommendation": rec["reason"],
            "validation_sweep": rec["rows"], "classes": list(bundle.classes),
            "base": {k: pre[k] for k in ("scaling_factor", "vae_psnr_db", "vae_psnr_after_decoder_db", "parameters")},
            "reference_val_accuracy": json.loads((bundle.path / "reference" / "reference.json").read_text())
            .get("val_accuracy"), "settings": json.loads(json.dumps(dataclasses.asdict(settings)))}
    write_assets(target, base, load_bundle(out / "bundle").path, birds, info, clip=clip, settings=settings)
    return load_bundle(target / "bundle")
