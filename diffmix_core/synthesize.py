"""Bulk synthesis: plans (docs/method.md §2), sharded resumable runs, the merge.

Output folder::

    <out>/plan.jsonl                 header line + one job per line, written before any work
    <out>/images/<idx:06d>.png       one image per planned job, its record in the PNG text chunk
    <out>/rejected/<idx:06d>.png     images a filter rejected (reason in the record)
    <out>/records-<i>-of-<n>.jsonl   per-shard records, one line appended per finished image
    <out>/records.jsonl              the merged index (accepted images, plan order)
    <out>/export/ (+ export.zip)     layouts from export.py, written by the merge

A PNG is written to a temporary name and renamed, so a run killed at any moment
leaves only whole files; a rerun treats a PNG whose record matches its job as
done and makes the rest. Job ``idx`` belongs to shard ``idx % n``, so any number
of processes (``--shard i/n`` or ``accelerate launch``) write disjoint files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .apply import load_pipeline_for
from .config import (DiffIIConfig, PipelineConfig, ScoreConfig, SynthesizeConfig, Thresholds, TranslateConfig,
                     get_strategy)
from .data import default_split_path, load_image, read_dataset, resolve_splits, split_subset
from .export import export_records, parse_formats
from .diffii import plan_partners, suffixes_for
from .labels import steps_run
from .models import normalise_model_id, pipeline_source
from .records import check_apart, read_jsonl, read_png_record, save_png, write_jsonl_atomic, write_text_atomic
from .reference import bundle_reference_path, load_reference
from .scoring import class_prompt, load_clip, score_images
from .translate import Job, Source, check_bundle_for, check_strength, translate

PLAN_FILE = "plan.jsonl"
PLAN_VERSION = 1
IMAGES, REJECTED = "images", "rejected"
BETA = (5.0, 5.0, 0.1, 0.9)   # the older variant: s ~ Beta(5, 5) clipped to [0.1, 0.9]
MAX_PLAN_JOBS = 10_000_000    # a plan larger than this is refused before it is drawn (split the data instead)


@dataclass(frozen=True)
class PlanJob:
    """One planned image: translate ``source_id`` (a train image) toward ``target_class``."""

    idx: int                  # position in the plan; names the output file
    source_id: str | None     # dataset item id (None for text-to-image strategies)
    source_path: str | None   # absolute path of the source image
    source_class: str
    target_class: str
    strength: float           # s as planned (the record also has the strength that ran)
    seed: int                 # derived from (plan seed, idx): see job_seed
    partner_id: str | None = None    # diff-ii: the second train image of the class (diffii.plan_partners)
    partner_path: str | None = None  # its absolute path


@dataclass(frozen=True)
class Plan:
    header: dict              # settings, bundle hash, split file, classes, counts
    jobs: tuple[PlanJob, ...]

    @property
    def classes(self) -> list[str]:
        return list(self.header["classes"])


# --------------------------------------------------------------------------- the plan (pure)
def job_seed(plan_seed: int, idx: int) -> int:
    """Per-job seed, a fixed function of (plan seed, job index); independent of sharding."""
    digest = hashlib.sha256(f"diffmix-plan:{plan_seed}:{idx}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def target_weights(counts: Sequence[int], long_tail: bool) -> np.ndarray:
    """Target-class probabilities: uniform, or p_c ~ 1/(n_c + 1) for long-tail data."""
    w = 1.0 / (np.asarray(counts, dtype=np.float64) + 1.0) if long_tail else np.ones(len(counts))
    return w / w.sum()


def _draw_strengths(rng: np.random.Generator, n: int, config: SynthesizeConfig) -> np.ndarray:
    if config.strength_strategy == "fixed":
        return np.full(n, config.strength)
    if config.strength_strategy == "uniform":
        return rng.choice(np.asarray(config.strengths, dtype=np.float64), size=n)
    a, b, lo, hi = BETA
    return np.round(np.clip(rng.beta(a, b, size=n), lo, hi), 4)


def source_pairing(config: SynthesizeConfig) -> str:
    """The plan's source draw: ``config.pairing``, with auto = image-uniform for long-tail data
    (the authors' sample_mp.py, task imbalanced), else class-uniform (their few-shot plan)."""
    if config.pairing != "auto":
        return config.pairing
    return "image-uniform" if config.long_tail else "class-uniform"


def make_plan(train, config: SynthesizeConfig, strategy: str) -> list[PlanJob]:
    """The jobs of a synthesis run over the TRAIN split ``train`` (a data.Dataset).

    round(M x |train|) jobs. Sources (:func:`source_pairing`): class-uniform draws a class
    uniformly over the classes with train images, then a random train image of it; image-uniform
    draws a train image uniformly (a class in proportion to its size). The target class is drawn
    independently over all classes (uniform; long-tail weighted only with class-uniform pairing;
    same-class pairs allowed, as the authors' plan) for inter-class strategies, equal to the
    source class for intra-class ones; no source for *-gen (strength 1). Deterministic from
    ``config.seed``.
    """
    pairing = get_strategy(strategy).pairing
    classes, by_class = list(train.classes), train.by_class()
    counts = [len(by_class[c]) for c in classes]
    sources = [i for i, n in enumerate(counts) if n]
    if not sources:
        raise ValueError("the train split has no images; check the dataset and the split file")
    n = int(round(config.multiplier * len(train)))
    if n > MAX_PLAN_JOBS:
        raise ValueError(f"multiplier {config.multiplier:g} x {len(train):,} train images = {n:,} planned images "
                         f"exceeds the limit of {MAX_PLAN_JOBS:,} per plan; use a smaller --multiplier")
    rng = np.random.default_rng(config.seed)
    if source_pairing(config) == "image-uniform":
        flat = [(ci, item) for ci, c in enumerate(classes) for item in by_class[c]]
        picked = [flat[k] for k in rng.integers(len(flat), size=n)]
        src, images = np.asarray([ci for ci, _ in picked]), [item for _, item in picked]
        tgt = rng.choice(len(classes), size=n)
    else:
        src = np.asarray(sources)[rng.integers(len(sources), size=n)]
        tgt = rng.choice(len(classes), size=n, p=target_weights(counts, config.long_tail))
        pick = rng.random(n)
        images = [by_class[classes[c]][min(int(u * counts[c]), counts[c] - 1)] for c, u in zip(src, pick)]
    strengths = _draw_strengths(rng, n, config)
    jobs = []
    for i in range(n):
        s_cls, t_cls = classes[src[i]], classes[tgt[i]]
        if pairing == "gen":
            jobs.append(PlanJob(i, None, None, t_cls, t_cls, 1.0, job_seed(config.seed, i)))
            continue
        if pairing == "intra":
            t_cls = s_cls
        item = images[i]
        jobs.append(PlanJob(i, item.id, str(item.path), s_cls, t_cls, float(strengths[i]), job_seed(config.seed, i)))
    if get_strategy(strategy).start == "inversion":
        jobs = plan_partners(jobs, train, config.seed)
    return jobs


def shard_jobs(jobs: Sequence[PlanJob], shard: tuple[int, int]) -> list[PlanJob]:
    """The jobs of shard ``i`` of ``n``: idx % n == i."""
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
    return [j for j in jobs if j.idx % n == i]


def parse_shard(text: str) -> tuple[int, int]:
    """'1/4' -> (1, 4)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    shard_jobs([], (i, n))
    return i, n


# --------------------------------------------------------------------------- plan file
def plan_header(config: SynthesizeConfig, translate_config: TranslateConfig, train, *, split_file,
                bundle_hash: str | None, base_model: str, scheduler: str, num_jobs: int,
                filter_config=None) -> dict:
    """Everything that determines the plan's images; a rerun must present the same header."""
    return {
        "format": "diffmix-plan", "version": PLAN_VERSION, "num_jobs": num_jobs,
        "synthesize": dataclasses.asdict(config),
        # cache_interval only when on: plans written before the option resume unchanged
        "translate": {k: v for k, v in dataclasses.asdict(translate_config).items()
                      if k != "batch_size" and (k, v) != ("cache_interval", 1)},
        "scheduler": scheduler, "base_model": base_model, "bundle_hash": bundle_hash,
        "data": str(train.root), "split_file": str(split_file) if split_file else None,
        "train_images": len(train), "classes": list(train.classes),
        "filter": dataclasses.asdict(filter_config) if filter_config is not None else None,
    }


def write_plan(out_dir: str | os.PathLike, header: dict, jobs: Sequence[PlanJob]) -> Plan:
    """Write ``plan.jsonl`` atomically, or check that the one there is the same plan.

    Raises ValueError when the folder holds a different plan (other settings, data or
    model): its images would not match, so use a new ``--out`` or the same settings.
    """
    path = Path(out_dir) / PLAN_FILE
    plan = Plan(json.loads(json.dumps(header)), tuple(jobs))
    if path.exists():
        old = read_plan(out_dir)
        diff = sorted(k for k in set(old.header) | set(plan.header) if old.header.get(k) != plan.header.get(k))
        if diff or old.jobs != plan.jobs:
            raise ValueError(f"{path} holds another plan (differs in {', '.join(diff) or 'its jobs'}); "
                             "rerun with the same settings to resume it, or use a new --out")
        return old
    write_jsonl_atomic(path, [{"plan": plan.header}] + [dataclasses.asdict(j) for j in jobs])
    return plan


def read_plan(out_dir: str | os.PathLike) -> Plan:
    path = Path(out_dir) / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run diffmix synthesize with this --out first")
    rows = read_jsonl(path)
    if not rows or "plan" not in rows[0]:
        raise ValueError(f"{path} has no plan header; it was not written by diffmix synthesize")
    return Plan(rows[0]["plan"], tuple(PlanJob(**r) for r in rows[1:]))


# --------------------------------------------------------------------------- state on disk
def image_name(job: PlanJob, rejected: bool = False) -> str:
    return f"{REJECTED if rejected else IMAGES}/{job.idx:06d}.png"


def finished_record(out_dir: Path, job: PlanJob) -> dict | None:
    """The record of ``job``'s PNG (kept or rejected) when it is whole and matches the job."""
    for rejected in (False, True):
        path = out_dir / image_name(job, rejected)
        if not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                im.verify()   # whole file, CRCs
            rec = read_png_record(path)
        except Exception:
            continue
        if rec and rec.get("plan_idx") == job.idx and rec.get("seed") == job.seed \
                and rec.get("target_class") == job.target_class and rec.get("source_id") == job.source_id:
            return dict(rec, file_name=image_name(job, rejected))   # where it is, whatever the chunk says
    return None


def shard_records_path(out_dir: Path, shard: tuple[int, int]) -> Path:
    return out_dir / f"records-{shard[0]}-of-{shard[1]}.jsonl"


def _clean_temporaries(out_dir: Path, jobs: Sequence[PlanJob]) -> None:
    """Remove temporaries a killed run of THIS shard left (other shards may be writing theirs)."""
    mine = {f"{j.idx:06d}.png" for j in jobs}
    for sub in (IMAGES, REJECTED):
        for tmp in (out_dir / sub).glob(".*.tmp"):
            if tmp.name[1:].split(".png.")[0] + ".png" in mine:
                tmp.unlink(missing_ok=True)


def resume_state(out_dir: Path, jobs: Sequence[PlanJob], shard: tuple[int, int]) -> dict[int, dict]:
    """{idx: record} of the shard's finished jobs; rewrites the shard's records file to match."""
    _clean_temporaries(out_dir, jobs)
    done = {}
    for job in jobs:
        rec = finished_record(out_dir, job)
        if rec is not None:
            done[job.idx] = rec
    write_jsonl_atomic(shard_records_path(out_dir, shard), [done[i] for i in sorted(done)])
    return done


class _RecordLog:
    """Append-only records file: one ``os.write`` per line, so a kill never tears a line."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            os.write(self.fd, data)

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------- the run
def batch_order(jobs: Sequence[PlanJob], num_inference_steps: int, batch_size: int) -> list[list[PlanJob]]:
    """Groups of ``batch_size`` jobs for one engine call each.

    Jobs are sorted by the steps they run, so a group's jobs start together and every
    UNet call is full; sources, targets and strengths otherwise mix freely.
    """
    order = sorted(jobs, key=lambda j: (-steps_run(num_inference_steps, j.strength), j.idx))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _engine_jobs(group: Sequence[PlanJob], load_image: Callable) -> list:
    sources: dict[str, Source] = {}
    out = []
    for job in group:
        if job.source_id is None:
            out.append(Job(None, job.target_class, 1.0, job.seed, source_class=job.source_class))
            continue
        for sid, path in ((job.source_id, job.source_path), (job.partner_id, job.partner_path)):
            if sid is not None and sid not in sources:
                sources[sid] = Source(load_image(path), job.source_class, sid, path)
        out.append(Job(sources[job.source_id], job.target_class, job.strength, job.seed,
                       partner=sources[job.partner_id] if job.partner_id is not None else None))
    return out


def _save(out_dir: Path, job: PlanJob, image: Image.Image, record: dict, log: _RecordLog) -> None:
    """PNG first (atomic), then its line in the shard's records file."""
    record = dict(record, plan_idx=job.idx, file_name=image_name(job, rejected=bool(record.get("rejected"))))
    save_png(image, out_dir / record["file_name"], record)
    log.append(record)


def _judge(results, scorer, filter_config) -> list[dict]:
    """Records with scores (when a scorer is given) and, failing a threshold, ``rejected``: the reason."""
    records = [dict(r.record) for r in results]
    if scorer is None:
        return records
    for rec, scores in zip(records, scorer([r.image for r in results], records)):
        rec["scores"] = scores
        reason = filter_config.reason(scores) if filter_config is not None else None
        if reason:
            rec["rejected"] = reason
    return records


def check_jobs(jobs: Sequence[PlanJob], config: TranslateConfig, bundle=None) -> None:
    """Refuse, before any work, strengths that run no step and classes the bundle lacks."""
    noised = get_strategy(config.strategy).start == "noised"   # diff-ii's s is checked by the engine
    for s in sorted({j.strength for j in jobs if j.source_id is not None and noised}):
        check_strength(s, config.num_inference_steps)
    if bundle is not None:
        for name in sorted({j.target_class for j in jobs} | {j.source_class for j in jobs}):
            bundle.class_index(name)


def synthesize(pipe, plan: Plan, out_dir: str | os.PathLike, config: TranslateConfig = TranslateConfig(), *,
               bundle=None, superclass: str = "", shard: tuple[int, int] = (0, 1), writers: int = 2,
               scorer: Callable[[list, list[dict]], list[dict]] | None = None, filter_config=None,
               show_progress: bool = True, diff_ii: DiffIIConfig | None = None) -> dict:
    """Make the shard's planned images that are not made yet; returns a summary dict.

    Jobs go through ``translate.translate`` ``config.batch_size`` at a time; PNG encoding and
    writing run on ``writers`` threads while the next batch denoises. ``scorer(images, records)``
    (e.g. scoring.score_images bound to a reference classifier) fills ``record["scores"]``;
    images failing ``filter_config`` (a config.Thresholds) go to ``rejected/`` with the reason.
    """
    out_dir = Path(out_dir)
    jobs = shard_jobs(plan.jobs, shard)
    check_jobs(jobs, config, bundle)
    (out_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = resume_state(out_dir, jobs, shard)
    pending = [j for j in jobs if j.idx not in done]
    bar = tqdm(total=len(jobs), initial=len(done), desc=f"synthesize {shard[0]}/{shard[1]}", unit="img",
               disable=not show_progress, smoothing=0.1)
    log = _RecordLog(shard_records_path(out_dir, shard))
    futures: list[Future] = []
    rejected = 0
    try:
        prompts: dict = {}   # text embeddings for the whole run, not per batch
        with ThreadPoolExecutor(max_workers=writers) as pool:
            for group in batch_order(pending, config.num_inference_steps, config.batch_size):
                results = translate(pipe, _engine_jobs(group, load_image), config, bundle=bundle,
                                    superclass=superclass, show_progress=False, prompt_cache=prompts,
                                    diff_ii=diff_ii)
                records = _judge(results, scorer, filter_config)
                rejected += sum(1 for r in records if r.get("rejected"))
                futures += [pool.submit(_save, out_dir, job, res.image, rec, log)
                            for job, res, rec in zip(group, results, records)]
                while len(futures) > 2 * config.batch_size or (futures and futures[0].done()):
                    futures.pop(0).result()   # bounds memory; raises a write error early
                bar.update(len(group))
            for f in futures:
                f.result()
    finally:
        log.close()
        bar.close()
    seconds = time.perf_counter() - start
    return {"shard": f"{shard[0]}/{shard[1]}", "planned": len(jobs), "skipped": len(done), "made": len(pending),
            "rejected": rejected, "seconds": round(seconds, 3),
            "images_per_s": round(len(pending) / seconds, 3) if pending and seconds > 0 else None}


# --------------------------------------------------------------------------- a whole run (CLI, experiment, benchmark)
def train_split(data: str | os.PathLike, split_file: str | os.PathLike | None = None, split_config=None, *,
                strict: bool = False, max_pixels: int | None = None, show_progress: bool = True):
    """(the TRAIN split of the dataset at ``data``, the split file it comes from): the split file
    is made on first use (data.resolve_splits; ``split_config`` = the settings the user gave)."""
    dataset = read_dataset(data, strict=strict, max_pixels=max_pixels, show_progress=show_progress)
    split_file = Path(split_file) if split_file else default_split_path(dataset)
    return split_subset(dataset, resolve_splits(dataset, split_file, split_config), "train"), split_file


def synthesis_scorer(thresholds: Thresholds, *, score: bool = False, reference: str | os.PathLike | None = None,
                     clip_model: str = "", clip_pretrained: str = "openai", bundle=None, superclass: str = "",
                     device: str | None = None) -> Callable | None:
    """scoring.score_images bound to the reference classifier (``reference``, else the bundle's)
    and CLIP (``clip_model``), or None when neither ``score`` nor a threshold asks for scores.
    A threshold whose score cannot be had is a ValueError, before any model loads."""
    if not (score or thresholds.active):
        return None

    ref_path = reference or (bundle_reference_path(bundle) if bundle else None)
    for name in ("min_p_target", "max_p_source"):
        if getattr(thresholds, name) is not None and not ref_path:
            raise ValueError(f"--{name.replace('_', '-')} needs a reference classifier: --reference FILE or a "
                             "bundle with one")
    if thresholds.min_clip_target is not None and not clip_model:
        raise ValueError("--min-clip-target needs CLIP scores: give --clip-model (and --clip-pretrained)")
    ref = load_reference(ref_path, device=device) if ref_path else None
    clip = load_clip(clip_model, clip_pretrained, device=device) if clip_model else None
    config = ScoreConfig(clip_model=clip_model, clip_pretrained=clip_pretrained)

    def scorer(images, records):
        return score_images(images, records, reference=ref, clip=clip, config=config,
                            prompt=lambda name: class_prompt(name, bundle, superclass))[0]
    return scorer


def _process_state():
    """accelerate's state of this process (index, count, device) for sharding a run."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # cpu=True lets processes started without GPUs (torchrun / accelerate launch) form a gloo group.
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def run_synthesis(train, out_dir: str | os.PathLike, config: SynthesizeConfig = SynthesizeConfig(),
                  translate_config: TranslateConfig = TranslateConfig(),
                  pipeline: PipelineConfig = PipelineConfig(), *, split_file: str | os.PathLike | None,
                  bundle=None, superclass: str = "", shard: tuple[int, int] | None = None, merge_only: bool = False,
                  export: Sequence[str] = (), thresholds: Thresholds | None = None, score: bool = False,
                  reference: str | os.PathLike | None = None, clip_model: str = "", clip_pretrained: str = "openai",
                  allow_base_mismatch: bool = False, pipe=None, show_progress: bool = True,
                  diff_ii: DiffIIConfig | None = None) -> dict:
    """A whole synthesis run over the TRAIN split ``train`` into ``out_dir``; rerun to resume.

    1. shard: ``shard`` (i, n), else accelerate's process index and count
    2. plan: drawn from ``config``, written to plan.jsonl (or checked against the one there)
    3. this shard's images not made yet: load the pipeline (``pipe`` if given, else
       apply.load_pipeline_for(pipeline, bundle)), bind the scorer, :func:`synthesize`
    4. merge (the main process, once no planned image is missing; ``merge_only`` makes nothing
       and merges): records.jsonl and the ``export`` layouts

    ``thresholds`` (None: no filter in the plan) reject images into rejected/; ``score``,
    ``reference``, ``clip_model`` and ``clip_pretrained`` choose the scores (:func:`synthesis_scorer`).
    Returns {"shard": (i, n), "made": synthesize's summary or None, "missing": planned images
    still to make, "merged": merge's summary or None, "main": this process merges}.
    """
    out_dir = Path(out_dir)
    check_apart(out_dir, [("the dataset", train.root)] + ([("the bundle", bundle.path)] if bundle is not None else []))
    formats = parse_formats(export)
    if bundle is None and get_strategy(translate_config.strategy).tokens:
        raise ValueError(f"strategy {translate_config.strategy} needs --bundle; real-* strategies run on --base alone")

    check_bundle_for(translate_config.strategy, bundle)   # ti-*: a TI-only bundle, before any work
    # 1. shard
    state = None
    if shard is None:
        state = _process_state()
        shard = (state.process_index, state.num_processes)
    shared = state is not None and state.num_processes > 1
    # 2. plan
    jobs = make_plan(train, config, translate_config.strategy)
    model = pipeline_source(pipeline, bundle)[0] if (bundle is not None or pipeline.model) else ""
    header = plan_header(config, translate_config, train, split_file=split_file,
                         bundle_hash=bundle.hash if bundle else None, base_model=normalise_model_id(model),
                         scheduler=pipeline.scheduler, num_jobs=len(jobs), filter_config=thresholds)
    if get_strategy(translate_config.strategy).start == "inversion":   # its settings and suffixes make the images
        diff_ii = diff_ii or DiffIIConfig()
        header["diff_ii"] = {**dataclasses.asdict(diff_ii), "suffix_list": suffixes_for(diff_ii, bundle.superclass)}
    plan = write_plan(out_dir, header, jobs)
    # 3. this shard's images
    made = None
    todo = [] if merge_only else [j for j in shard_jobs(plan.jobs, shard) if finished_record(out_dir, j) is None]
    if todo:
        device = pipeline.device or (str(state.device) if shared else None)
        scorer = synthesis_scorer(thresholds if thresholds is not None else Thresholds(), score=score,
                                  reference=reference, clip_model=clip_model, clip_pretrained=clip_pretrained,
                                  bundle=bundle, superclass=superclass, device=device)
        if pipe is None:
            pipe = load_pipeline_for(dataclasses.replace(pipeline, device=device), bundle,
                                     allow_base_mismatch=allow_base_mismatch)
        made = synthesize(pipe, plan, out_dir, translate_config, bundle=bundle, superclass=superclass, shard=shard,
                          scorer=scorer, filter_config=thresholds, show_progress=show_progress, diff_ii=diff_ii)
    # 4. merge
    if shared:
        state.wait_for_everyone()
    result = {"shard": shard, "made": made, "missing": 0, "merged": None,
              "main": not shared or state.is_main_process}
    if result["main"]:
        result["missing"] = len(missing_jobs(out_dir, plan))
        if merge_only or not result["missing"]:
            result["merged"] = merge(out_dir, plan, export=formats, show_progress=show_progress)
    return result


# --------------------------------------------------------------------------- merge
def missing_jobs(out_dir: str | os.PathLike, plan: Plan) -> list[int]:
    """Indices of planned jobs without an image (a quick existence check)."""
    out_dir = Path(out_dir)
    return [j.idx for j in plan.jobs if not (out_dir / image_name(j)).is_file()
            and not (out_dir / image_name(j, rejected=True)).is_file()]


def merge(out_dir: str | os.PathLike, plan: Plan | None = None, *, export: Sequence[str] = (),
          show_progress: bool = True, overwrite: bool = False) -> dict:
    """Check every planned image, write ``records.jsonl`` (+ ``rejected.jsonl``) and the exports
    (``<out>/export``: an earlier export there is replaced, anything else only with ``overwrite``).

    Raises ValueError when planned images are missing or broken (run the missing shards,
    or rerun: broken ones are made again).
    """
    out_dir = Path(out_dir)
    plan = plan or read_plan(out_dir)
    formats = parse_formats(export)
    kept, rejected, missing = [], [], []
    for job in tqdm(plan.jobs, desc="merge", unit="img", disable=not show_progress):
        rec = finished_record(out_dir, job)
        if rec is None:
            missing.append(job.idx)
        else:
            (rejected if rec["file_name"].startswith(REJECTED) else kept).append(rec)
    if missing:
        raise ValueError(f"{len(missing)} of {len(plan.jobs)} planned images are missing or broken in {out_dir} "
                         f"(e.g. job {missing[:5]}); run the remaining shards (or rerun) before merging")
    write_jsonl_atomic(out_dir / "records.jsonl", kept)
    write_jsonl_atomic(out_dir / "rejected.jsonl", rejected)
    if formats:
        export_records(((out_dir / r["file_name"], r) for r in kept), out_dir / "export", formats,
                       classes=plan.classes, show_progress=show_progress, overwrite=overwrite, protect=(out_dir,))
    summary = {"planned": len(plan.jobs), "kept": len(kept), "rejected": len(rejected), "export": list(formats)}
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary
