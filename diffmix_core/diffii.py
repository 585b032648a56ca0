"""Diff-II (inversion circle interpolation, CVPR 2025) on a diffmix bundle; docs/diff-ii.md.

1. the source and a partner image of the same class are DDIM-inverted under the class prompt
   (inversion.py, cached);
2. a random point on the great circle through their inverted latents z1, z2
   (:func:`circle_point`, α drawn by :func:`draw_alpha`);
3. the engine (translate.translate) denoises it with DDIM over all N steps; steps whose timestep
   t >= T (1 - s) use the class prompt plus a context suffix, the rest the class prompt alone
   (:func:`prepare_states` sets this up per job; ``_State.prompt_at`` switches).

The label is the class, one-hot. A class with a single image pairs it with itself: z = z1, α = 0.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import DiffIIConfig

SUFFIX_FILE = Path(__file__).with_name("diffii_suffixes.json")
# superclass word -> the built-in list that serves it (others: "default")
SUPERCLASS_LISTS = {"bird": "bird", "flower": "flower", "aircraft": "aircraft", "airplane": "aircraft",
                    "plane": "aircraft", "car": "car", "vehicle": "car", "dog": "pet", "cat": "pet", "pet": "pet",
                    "animal": "animal", "food": "food", "dish": "food"}
DIFFII_S = 0.3   # the authors' default s
MIN_SIN = 1e-6   # |sin θ| below this: z1, z2 (anti)parallel, the circle through them is undefined


# --------------------------------------------------------------------------- circle interpolation (pure)
def circle_angle(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """θ = the angle between z1 and z2 as flat vectors, in radians (computed in float64)."""
    a, b = z1.detach().double().flatten(), z2.detach().double().flatten()
    norms = float(a.norm() * b.norm())
    if norms == 0:
        raise ValueError("circle interpolation needs two non-zero latents")
    return math.acos(max(-1.0, min(1.0, float(a @ b) / norms)))


def draw_alpha(theta: float, generator: torch.Generator) -> float:
    """α ~ U(0, 2π/θ) from ``generator``: every point of the circle is equally likely."""
    return float(torch.rand((), generator=generator, dtype=torch.float64)) * 2 * math.pi / theta


def circle_point(z1: torch.Tensor, z2: torch.Tensor, alpha: float) -> torch.Tensor:
    """z = sin((1+α)θ)/sin θ · z1 − sin(αθ)/sin θ · z2, θ = angle(z1, z2) (the authors' rand_slerp).

    α = 0 and α = 2π/θ give z1, α = −1 gives z2; for |z1| = |z2| = r every z has norm r (a
    great circle); otherwise |z|² = a²|z1|² + b²|z2|² − 2ab⟨z1, z2⟩ with a, b the two weights.
    ValueError when sin θ < 1e-6 (z1, z2 (anti)parallel: no unique circle through them).
    """
    theta = circle_angle(z1, z2)
    sin = math.sin(theta)
    if sin < MIN_SIN:
        raise ValueError(f"the latents are (anti)parallel (angle {theta:.3g} rad): the circle through them is "
                         "undefined; pair the image with a different one")
    a, b = math.sin((1 + alpha) * theta) / sin, math.sin(alpha * theta) / sin
    return (a * z1.double() - b * z2.double()).to(z1.dtype)


# --------------------------------------------------------------------------- context suffixes
def _check_list(values: object, where: str) -> list[str]:
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"{where}: expected a non-empty list of non-empty strings")
    return [v.strip() for v in values]


def builtin_suffixes(superclass: str) -> list[str]:
    """The shipped suffix list for ``superclass`` (bird, flower, aircraft, car, dog/cat/pet, animal,
    food; any other word gets the 'default' list)."""
    data = json.loads(SUFFIX_FILE.read_text(encoding="utf-8"))
    name = SUPERCLASS_LISTS.get(superclass.strip().lower(), "default")
    return _check_list(data[name], f"{SUFFIX_FILE} [{name}]")


def read_suffixes(path: str | os.PathLike, superclass: str = "") -> list[str]:
    """Suffixes from a file: a JSON list, a JSON {superclass: list} (the bundle's superclass, else
    'default'), or plain text with one suffix per line (blank lines and lines starting # skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suffix file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        if isinstance(data, dict):
            key = superclass if superclass in data else "default"
            if key not in data:
                raise ValueError(f"{path} has no list for superclass {superclass!r} and no 'default' list")
            data = data[key]
        return _check_list(data, str(path))
    return _check_list([line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")],
                       str(path))


def suffixes_for(config: DiffIIConfig, superclass: str) -> list[str]:
    """The suffixes a run uses: ``config.suffixes`` (a file) or the built-in list of ``superclass``."""
    return read_suffixes(config.suffixes, superclass) if config.suffixes else builtin_suffixes(superclass)


def context_prompt(prompt: str, suffix: str) -> str:
    """The class prompt with a suffix: joined by a space, as the authors (a suffix may start with ',')."""
    return f"{prompt}{suffix}" if suffix[:1] in ",;." else f"{prompt} {suffix}"


# --------------------------------------------------------------------------- partners
def draw_partner(source, candidates: Sequence, seed: int):
    """A partner for ``source`` (a translate.Source): a same-class candidate with other pixels, drawn
    with a generator seeded by (seed, source pixels); the source itself when there is none."""
    mine = source.pixel_hash()
    others = [c for c in candidates if c.source_class == source.source_class and c.pixel_hash() != mine]
    if not others:
        return source
    return others[random.Random(f"diff-ii-partner:{seed}:{mine}").randrange(len(others))]


def plan_partners(jobs: Sequence, train, seed: int) -> list:
    """Plan jobs (synthesize.PlanJob) with a partner: another train image of the source's class,
    uniform, from (plan seed, job idx); the source itself for a class with one image."""
    by_class = train.by_class()
    out = []
    for job in jobs:
        others = [it for it in by_class[job.source_class] if it.id != job.source_id]
        if others:
            item = others[random.Random(f"diff-ii-partner:{seed}:{job.idx}").randrange(len(others))]
            job = dataclasses.replace(job, partner_id=item.id, partner_path=str(item.path))
        else:
            job = dataclasses.replace(job, partner_id=job.source_id, partner_path=job.source_path)
        out.append(job)
    return out


def check_job(job) -> None:
    """A diff-ii job has a same-class partner and s in [0, 1]."""
    if job.partner is None:
        raise ValueError("strategy 'diff-ii' interpolates two images of one class: give the job a partner "
                         "(CLI: --partner, or one is drawn from --data / the bundle's examples)")
    if job.partner.source_class != job.from_class:
        raise ValueError(f"diff-ii partner {job.partner.id!r} is a {job.partner.source_class!r}, the source a "
                         f"{job.from_class!r}: both must be of one class")
    if not 0.0 <= job.strength <= 1.0:
        raise ValueError(f"s (the share of steps with a context suffix) must be between 0 and 1, got {job.strength}")


# --------------------------------------------------------------------------- the engine's set-up
def prepare_states(pipe, states: list, config, resolution: int, settings: DiffIIConfig, superclass: str, *,
                   show_progress: bool = True) -> None:
    """Inverted (cached) latents, α, suffix, the interpolated start and a DDIM scheduler per job
    (translate._State), for all N steps; ``record_extra`` holds what the record adds."""
    from .inversion import ddim_schedulers, invert_sources, settings_for

    if config.resize != "squash":
        raise ValueError("diff-ii interpolates the latents of two images, which needs one shape: use --resize squash")
    suffixes = suffixes_for(settings, superclass)
    inv = [settings_for(pipe, st.prompt, settings.inversion_steps, settings.inversion_guidance, resolution)
           for st in states]
    latents, _ = invert_sources(pipe, [s for st in states for s in (st.job.source, st.job.partner)],
                                [x for x in inv for _ in range(2)], batch_size=config.batch_size,
                                show_progress=show_progress)
    _, template = ddim_schedulers(pipe)
    template.set_timesteps(config.num_inference_steps, device=pipe.device)
    start_t = template.config.num_train_timesteps
    for i, st in enumerate(states):
        job, (z1, z2) = st.job, latents[2 * i : 2 * i + 2]
        same = job.partner.pixel_hash() == job.source.pixel_hash()
        theta = 0.0 if same else circle_angle(z1, z2)
        alpha = job.alpha if job.alpha is not None else (0.0 if same else draw_alpha(theta, st.generator))
        suffix = job.suffix if job.suffix is not None else \
            suffixes[int(torch.randint(len(suffixes), (), generator=st.generator))]
        st.latents = (z1 if same else circle_point(z1, z2, alpha)) * template.init_noise_sigma
        st.scheduler, st.start, st.steps = copy.deepcopy(template), 0, config.num_inference_steps
        st.model_size = st.size = (resolution, resolution)
        st.extra = {"eta": 0.0, "generator": st.generator}   # DDIMScheduler.step: deterministic DDIM
        st.context_prompt, st.context_from = context_prompt(st.prompt, suffix), start_t * (1 - job.strength)
        with_context = sum(1 for t in template.timesteps if t >= st.context_from)
        st.record_extra = {
            "partner_id": job.partner.id, "partner_path": job.partner.path, "partner_sha256": job.partner.pixel_hash(),
            "alpha": alpha, "theta": theta, "suffix": suffix, "context_prompt": st.context_prompt,
            "context_steps": with_context, "scheduler": "ddim", "strength_run": with_context / st.steps,
            **inv[i].as_record()}
