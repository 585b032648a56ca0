"""Diff-II jobs from what a user has: a partner drawn from a folder or a bundle's examples, and the
job (with its settings) that makes a diff-ii record's image again. Above the engine (diffii.py sits
below it), so these may build translate.Source / translate.Job."""
from __future__ import annotations

import os
from pathlib import Path

from .bundle import bundle_examples
from .config import DiffIIConfig, TranslateConfig
from .data import load_image as default_load
from .data import read_dataset
from .diffii import draw_partner
from .translate import Job, Source


def partner_pool(source_class: str, *, data: str | os.PathLike | None = None, bundle=None,
                 max_pixels: int | None = None) -> list:
    """translate.Source of every image of ``source_class`` in the dataset at ``data``, else among
    the bundle's example images: the images a partner is drawn from."""
    if data:
        items = [(str(it.path), it.class_name) for it in read_dataset(data, max_pixels=max_pixels,
                                                                      show_progress=False).items]
        where = str(data)
    else:
        items = bundle_examples(bundle) if bundle is not None else []
        where = "the bundle's examples"
    pool = [Source(default_load(p, max_pixels=max_pixels), c, Path(p).stem, str(Path(p).resolve()))
            for p, c in items if c == source_class]
    if not pool:
        raise ValueError(f"no image of class {source_class!r} in {where} to pair with: give --partner IMAGE or "
                         "--data FOLDER (ImageFolder)")
    return pool


def job_from_record(record: dict, load_image=None):
    """The translate.Job that makes a diff-ii record's image again (sources read from their paths,
    α and the suffix from the record), with the TranslateConfig and DiffIIConfig to run it under."""
    load = load_image or default_load
    for key in ("source_path", "partner_path"):
        if not record.get(key):
            raise ValueError(f"the record has no {key}: its image cannot be made again from it")
    source = Source(load(record["source_path"]), record["source_class"], record["source_id"], record["source_path"])
    partner = Source(load(record["partner_path"]), record["source_class"], record["partner_id"],
                     record["partner_path"])
    for src, key in ((source, "source_sha256"), (partner, "partner_sha256")):
        if src.pixel_hash() != record[key]:
            raise ValueError(f"{src.path} has changed since the record was made ({key} differs)")
    job = Job(source, record["target_class"], record["strength"], record["seed"], partner=partner,
              alpha=record["alpha"], suffix=record["suffix"])
    config = TranslateConfig(strategy=record["strategy"], num_inference_steps=record["num_inference_steps"],
                             guidance_scale=record["guidance_scale"], resize=record["resize"],
                             resolution=record["resolution"], label_gamma=record["label_gamma"],
                             label_scale=record["label_scale"])
    return job, config, DiffIIConfig(inversion_steps=record["inversion_steps"],
                                     inversion_guidance=record["inversion_guidance"])


def partnered_jobs(sources: list, pool: list, targets: list[str], strengths: list[float], seeds: list[int], *,
                   draw: bool = True) -> tuple[list, list[str]]:
    """diff-ii jobs: each source with a same-class partner per seed, drawn (seeded, diffii.draw_partner)
    from ``pool``, or ``pool[0]`` for every source when not ``draw`` (a partner the user named).
    Also the ids of the sources paired with themselves (no other image of their class: denoised
    from their own inversion), once per seed."""
    jobs, alone = [], []
    for src in sources:
        for seed in seeds:
            partner = draw_partner(src, pool, seed) if draw else pool[0]
            if partner.pixel_hash() == src.pixel_hash():
                alone.append(src.id)
            jobs += [Job(src, t, s, seed, partner=partner) for t in targets for s in strengths]
    return jobs, alone
