"""DDIM inversion as a cached stage (the first step of Diff-II, docs/diff-ii.md).

A source image is squashed to the model resolution (LANCZOS), encoded to the VAE posterior
mean (x the VAE scaling factor) and run UP the DDIM schedule with diffusers'
``DDIMInverseScheduler`` under its class prompt: z_0 -> z_T. Several images share each
UNet call (the run's batch size). This module sits below the engine (translate.py imports
it through diffii.py), so it uses the pipeline's parts directly.

Inverted latents are kept as safetensors files under ``<output root>/inversions/``, one per
(source pixels, settings): the key hashes the bundle, the base model, the prompt, the steps,
the guidance, the resolution and the dtype, so a change to any of them misses the cache and a
rerun (another sweep, another synthesis run) reads the file instead of inverting again.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .models import model_identity
from .records import atomic_path

INVERSIONS_DIR = "inversions"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class InversionSettings:
    """Everything besides the source's pixels that determines an inverted latent."""

    prompt: str                # the class prompt ("a photo of a <token> <superclass>")
    steps: int                 # DDIM inversion steps (Diff-II: 200)
    guidance: float            # classifier-free guidance of the inversion (Diff-II: 1.0 = none)
    resolution: int            # square model input side in px
    dtype: str                 # the UNet's dtype, e.g. "torch.float32"
    bundle_hash: str | None    # the applied bundle (tokens + LoRA), None for a bare base model
    base_model: str            # the base model's id or folder
    base_revision: str | None  # its Hub revision, when known

    def as_record(self) -> dict:
        """The settings under the names a diff-ii record gives them."""
        return {"inversion_steps": self.steps, "inversion_guidance": self.guidance,
                "inversion_resolution": self.resolution, "inversion_prompt": self.prompt,
                "inversion_dtype": self.dtype}

    def key(self, source_sha256: str) -> str:
        """sha256 of the settings and the source's pixel hash: the cache file's name."""
        fields = dict(self.__dict__, source_sha256=source_sha256, format=CACHE_FORMAT)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def settings_for(pipe, prompt: str, steps: int, guidance: float, resolution: int) -> InversionSettings:
    """The settings of an inversion on ``pipe`` as it is now (its applied bundle, base and dtype)."""
    bundle = getattr(pipe, "diffmix_bundle", None)
    ident = model_identity(pipe)
    return InversionSettings(prompt, int(steps), float(guidance), int(resolution), str(pipe.unet.dtype),
                             bundle.hash if bundle is not None else None, ident["model"], ident["revision"])


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """``<root>/inversions``; ``root`` defaults to the output root (``DIFFMIX_OUTPUT``, else ./outputs,
    as profiles.output_root: the engine's layer may not import profiles)."""
    return Path(root or os.environ.get("DIFFMIX_OUTPUT") or "outputs").resolve() / INVERSIONS_DIR


def cache_file(settings: InversionSettings, source_sha256: str, root: str | os.PathLike | None = None) -> Path:
    key = settings.key(source_sha256)
    return cache_root(root) / key[:2] / f"{key}.safetensors"


def ddim_schedulers(pipe):
    """(DDIMInverseScheduler, DDIMScheduler) on the pipeline's noise schedule, with Stable Diffusion's
    DDIM settings as the authors load them (no sample clipping, final alpha = alphas_cumprod[0])."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    extra = {"clip_sample": False, "set_alpha_to_one": False}
    return (DDIMInverseScheduler.from_config(pipe.scheduler.config, **extra),
            DDIMScheduler.from_config(pipe.scheduler.config, **extra))


def encode_latents(pipe, image, resolution: int) -> torch.Tensor:
    """VAE posterior mean x scaling factor of ``image`` squashed to resolution^2 (LANCZOS); (1, 4, h, w)."""
    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.LANCZOS)
    x = pipe.image_processor.preprocess(image).to(device=pipe.device, dtype=pipe.vae.dtype)
    return (pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor).to(pipe.unet.dtype)


def invert_latents(pipe, latents: torch.Tensor, prompts: Sequence[str], steps: int, guidance: float = 1.0, *,
                   batch_size: int = 8, show_progress: bool = True) -> torch.Tensor:
    """DDIM inversion of ``latents`` (B, 4, h, w), row i under ``prompts[i]``; returns z_T (B, 4, h, w).

    The same update as diffusers' StableDiffusionPipeline run with a DDIMInverseScheduler (the
    authors' get_inversion.py): for each of the scheduler's ascending timesteps one UNet call
    per ``batch_size`` rows (both guidance halves when ``guidance`` > 1), then the scheduler's step.
    """
    inverse, _ = ddim_schedulers(pipe)
    inverse.set_timesteps(steps, device=pipe.device)
    rows = list(latents.to(device=pipe.device, dtype=pipe.unet.dtype).split(1))
    cfg = guidance > 1
    cache: dict[str, tuple] = {}

    def embed(prompt: str) -> tuple:
        if prompt not in cache:
            cache[prompt] = pipe.encode_prompt(prompt, pipe.device, 1, cfg, negative_prompt=None)
        return cache[prompt]

    def step(chunk: list[int]) -> None:
        x = torch.cat([rows[i] for i in chunk])
        text = torch.cat([embed(prompts[i])[0] for i in chunk])
        if cfg:
            x, text = torch.cat([x, x]), torch.cat([torch.cat([embed(prompts[i])[1] for i in chunk]), text])
        noise = pipe.unet(inverse.scale_model_input(x, t), t, encoder_hidden_states=text, return_dict=False)[0]
        if cfg:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance * (cond - uncond)
        out = inverse.step(noise, t, torch.cat([rows[i] for i in chunk]), return_dict=False)[0]
        for j, i in enumerate(chunk):
            rows[i] = out[j : j + 1]

    bar = tqdm(total=len(rows) * len(inverse.timesteps), desc="invert", unit="step", disable=not show_progress)
    with torch.inference_mode():
        for t in inverse.timesteps:
            for start in range(0, len(rows), batch_size):
                chunk = list(range(start, min(start + batch_size, len(rows))))
                step(chunk)
                bar.update(len(chunk))
    bar.close()
    return torch.cat(rows)


def _read(path: Path, settings: InversionSettings, sha: str) -> torch.Tensor | None:
    """The cached latent at ``path`` when it is whole and was made with these settings, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != settings.key(sha):
                return None
            return f.get_tensor("latents")
    except Exception:   # a torn or foreign file: invert again and replace it
        return None


def _write(path: Path, latent: torch.Tensor, settings: InversionSettings, sha: str) -> None:
    from safetensors.torch import save_file

    meta = {"key": settings.key(sha), "source_sha256": sha,
            "settings": json.dumps(settings.__dict__, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({"latents": latent.detach().cpu().contiguous()}, str(tmp), metadata=meta)


def invert_sources(pipe, sources: Sequence, settings: Sequence[InversionSettings], *,
                   root: str | os.PathLike | None = None, batch_size: int = 8,
                   show_progress: bool = True) -> tuple[list[torch.Tensor], int]:
    """z_T of each ``sources[i]`` (a translate.Source) under ``settings[i]``, (1, 4, h, w) on the
    pipeline's device; read from the cache when there, else inverted (all missing ones batched)
    and written to it atomically. Returns (latents, how many were inverted now)."""
    out: list[torch.Tensor | None] = []
    todo: dict[str, list[int]] = {}   # cache key -> positions (a source given twice is inverted once)
    for i, (src, st) in enumerate(zip(sources, settings)):
        sha = src.pixel_hash()
        cached = _read(cache_file(st, sha, root), st, sha)
        out.append(cached)
        if cached is None:
            todo.setdefault(st.key(sha), []).append(i)
    if todo:
        first = [pos[0] for pos in todo.values()]
        by_shape: dict[tuple, list[int]] = {}
        for i in first:
            by_shape.setdefault((settings[i].steps, settings[i].guidance, settings[i].resolution), []).append(i)
        for (steps, guidance, resolution), group in by_shape.items():
            with torch.inference_mode():
                z0 = torch.cat([encode_latents(pipe, sources[i].image, resolution) for i in group])
            zt = invert_latents(pipe, z0, [settings[i].prompt for i in group], steps, guidance,
                                batch_size=batch_size, show_progress=show_progress)
            for row, i in enumerate(group):
                sha = sources[i].pixel_hash()
                _write(cache_file(settings[i], sha, root), zt[row : row + 1], settings[i], sha)
                for j in todo[settings[i].key(sha)]:
                    out[j] = zt[row : row + 1]
    # contiguous: a fresh latent (a view of the UNet's output) and a cached one must give the same images
    return [z.to(device=pipe.device, dtype=pipe.unet.dtype).contiguous() for z in out], len(todo)
