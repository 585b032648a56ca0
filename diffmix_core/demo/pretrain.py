"""Training the demo's tiny text-to-image pipeline from scratch (issue 5).

Same classes as Stable Diffusion 1.x, so the result loads through
``models.load_pipeline`` like any real base model: AutoencoderKL (f = 4),
UNet2DConditionModel, CLIPTextModel with the REAL CLIP tokenizer and its full
49,408-token vocabulary (``models.clip_tokenizer``), DPM-Solver++.

Stages (each resumable: a checkpoint every ``checkpoint_every`` steps under
``<out>/work/``; a finished stage is skipped on a rerun):

1. ``vae``: the autoencoder at the full resolution (GroupNorm statistics of 32 px
   crops do not carry over to 64 px images), L1 + a small KL;
2. ``decoder``: the decoder alone, on the frozen encoder's latents (docs/demo-world.md: the
   largest gain of the trial);
3. ``latents``: every image's posterior (mean, std) once, and the latent scaling
   factor (1 / std of the sampled latents);
4. ``unet``: UNet + text encoder jointly, eps-prediction, min-SNR weighting, EMA,
   empty captions ``caption_dropout`` of the time; horizontal flips on the latents;
5. the pipeline: ``<out>/model_index.json`` + components (the EMA weights).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import PretrainConfig
from ..data import load_image
from ..models import clip_tokenizer
from ..records import atomic_path, write_text_atomic
from .data import read_captions

WORK = "work"
LOG = "pretrain_log.jsonl"


# --------------------------------------------------------------------------- models
def build_vae(config: PretrainConfig):
    from diffusers import AutoencoderKL

    n = len(config.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=config.vae_channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=min(32, min(config.vae_channels)),
                         sample_size=config.resolution, mid_block_add_attention=False)


def build_unet(config: PretrainConfig):
    """Attention only on the smaller levels (at 16x16 it makes each CPU step ~3x slower)."""
    from diffusers import UNet2DConditionModel

    n = len(config.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    f = 2 ** (len(config.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=config.resolution // f, in_channels=4, out_channels=4, layers_per_block=config.layers_per_block,
        block_out_channels=config.unet_channels, down_block_types=down, up_block_types=up,
        cross_attention_dim=config.text_width, attention_head_dim=config.attention_heads,
        norm_num_groups=min(32, min(config.unet_channels)))


def build_text_encoder(config: PretrainConfig, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=config.text_width, intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers, num_attention_heads=config.attention_heads,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=config.text_width))


def noise_schedule():
    """Stable Diffusion's training schedule (scaled-linear betas, 1000 steps, eps-prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type="epsilon")


def sampler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       algorithm_type="dpmsolver++", solver_order=2)


# --------------------------------------------------------------------------- data
def load_images(folder: str | os.PathLike, rows: list[dict], size: int, show_progress: bool) -> torch.Tensor:
    """All images as one uint8 tensor (N, 3, size, size) (14k images at 64 px: ~170 MB)."""
    from PIL import Image

    out = torch.empty((len(rows), 3, size, size), dtype=torch.uint8)
    for i, row in enumerate(tqdm(rows, desc="load images", disable=not show_progress, leave=False)):
        im = load_image(Path(folder) / row["file_name"])
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out[i] = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    return out


def to_pixels(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return batch.float() / 127.5 - 1.0


# --------------------------------------------------------------------------- checkpoints
def save_state(path: Path, step: int, modules: dict, optimizer: torch.optim.Optimizer | None,
               extra: dict | None = None) -> None:
    """Weights of ``modules`` ({name: module or state dict}), AdamW moments and the step, as
    one safetensors file + a JSON beside it (written last: its presence means complete)."""
    tensors = {}
    for name, module in modules.items():
        sd = module if isinstance(module, dict) else module.state_dict()
        tensors.update({f"{name}/{k}": v.detach().cpu().contiguous() for k, v in sd.items()})
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"optimizer/{i}/{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    with atomic_path(path.with_suffix(".safetensors")) as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(path.with_suffix(".json"), json.dumps({"step": step, **(extra or {})}) + "\n")


def load_state(path: Path, modules: dict, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore what :func:`save_state` wrote; returns its JSON (with 'step'); {} when none."""
    if not path.with_suffix(".json").is_file():
        return {}
    tensors = load_file(str(path.with_suffix(".safetensors")))
    for name, module in modules.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + "/")}
        if isinstance(module, dict):
            for k in module:
                module[k].copy_(sd[k])
        else:
            module.load_state_dict(sd)
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            entry = {k.split("/")[2]: v for k, v in tensors.items() if k.startswith(f"optimizer/{i}/")}
            if entry:
                optimizer.state[p] = {k: (v if k == "step" else v.to(p.device)) for k, v in entry.items()}
    return json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def state_step(path: Path) -> int:
    """The step of the checkpoint :func:`save_state` wrote at ``path`` (0 when none)."""
    return int(_read_json(path.with_suffix(".json")).get("step", 0))


def _log(out: Path, row: dict) -> None:
    with open(out / LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _crop(x: torch.Tensor, side: int, step: int) -> torch.Tensor:
    """A (side x side) crop of a batch at an offset drawn from the step."""
    if side >= x.shape[-1]:
        return x
    rng = np.random.default_rng([step, 9])
    i, j = (int(rng.integers(0, x.shape[d] - side + 1)) for d in (-2, -1))
    return x[..., i:i + side, j:j + side]


def _batch(n: int, size: int, seed: int, step: int, stage: int) -> np.ndarray:
    """Indices of one batch: a pure function of (seed, stage, step), so a resumed run repeats."""
    return np.random.default_rng([seed, stage, step]).integers(0, n, size)


# --------------------------------------------------------------------------- 1-2. the VAE
def _vae_loss(vae, x: torch.Tensor, kl_weight: float, gen: torch.Generator, decoder_only: bool) -> torch.Tensor:
    with torch.set_grad_enabled(not decoder_only):
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
    rec = vae.decode(z).sample
    loss = F.l1_loss(rec, x)
    if not decoder_only and kl_weight:
        loss = loss + kl_weight * post.kl().mean()
    return loss


def train_vae(images: torch.Tensor, out: Path, config: PretrainConfig, *, decoder_only: bool = False,
              show_progress: bool = True):
    """Stage 1 (whole VAE) or 2 (decoder only, from stage 1's result). Returns the VAE."""
    from diffusers import AutoencoderKL

    work = out / WORK
    name = "decoder" if decoder_only else "vae"
    final, state = work / name, work / f"{name}-state"
    steps, lr = (config.decoder_steps, config.decoder_lr) if decoder_only else (config.vae_steps, config.vae_lr)
    # The decoder stage starts from the stage-1 VAE; a stage-1 VAE trained further since invalidates it.
    origin = {"from_vae_step": state_step(work / "vae-state")} if decoder_only else {}
    previous = _read_json(state.with_suffix(".json"))
    if previous and any(previous.get(k) != v for k, v in origin.items()):
        state.with_suffix(".json").unlink()
        previous = {}
    if (final / "config.json").is_file() and previous.get("step", 0) >= steps:
        return AutoencoderKL.from_pretrained(final)   # done (more steps asked: train on from the state)
    torch.manual_seed(config.seed)
    vae = AutoencoderKL.from_pretrained(work / "vae") if decoder_only else build_vae(config)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()) if decoder_only \
        else list(vae.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = load_state(state, {"vae": vae}, optimizer).get("step", 0)
    vae.train()
    bar = tqdm(total=steps, initial=start, desc=name, disable=not show_progress)
    t0 = time.perf_counter()
    for step in range(start + 1, steps + 1):
        batch = config.vae_batch_size // 2 if decoder_only else config.vae_batch_size
        x = to_pixels(_crop(images[_batch(len(images), max(1, batch), config.seed, step, 2 if decoder_only else 1)],
                            config.resolution if decoder_only else config.vae_crop, step))
        if step % 2:
            x = x.flip(-1)
        gen = torch.Generator().manual_seed(config.seed * 100_003 + step)
        loss = _vae_loss(vae, x, config.kl_weight, gen, decoder_only)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % config.checkpoint_every == 0 or step == steps:
            save_state(state, step, {"vae": vae}, optimizer, origin)
            _log(out, {"stage": name, "step": step, "loss": round(loss.item(), 5),
                       "s_per_step": round((time.perf_counter() - t0) / (step - start), 3)})
    bar.close()
    vae.eval()
    vae.save_pretrained(final)
    return vae


@torch.no_grad()
def vae_psnr(vae, images: torch.Tensor, batch_size: int = 64) -> float:
    """PSNR (dB) of VAE round trips (posterior mean) of uint8 images."""
    mse = []
    for i in range(0, len(images), batch_size):
        x = to_pixels(images[i:i + batch_size])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse.append(((rec - x) / 2).pow(2).mean(dim=(1, 2, 3)))
    return float((10 * torch.log10(1 / torch.cat(mse).clamp(min=1e-10))).mean())


# --------------------------------------------------------------------------- 3. latents
@torch.no_grad()
def encode_all(vae, images: torch.Tensor, out: Path, seed: int, show_progress: bool) -> tuple[dict, float]:
    """Posterior mean/std of every image (cached in work/latents.safetensors) and the scaling factor."""
    file = out / WORK / "latents.safetensors"
    made_by = torch.tensor([state_step(out / WORK / "vae-state"), state_step(out / WORK / "decoder-state")])
    if file.is_file():
        t = load_file(str(file))
        if "made_by" in t and torch.equal(t["made_by"], made_by):   # else the VAE has trained on since
            return {"mean": t["mean"], "std": t["std"]}, float(t["scaling_factor"])
    means, stds = [], []
    for i in tqdm(range(0, len(images), 128), desc="encode", disable=not show_progress, leave=False):
        post = vae.encode(to_pixels(images[i:i + 128])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    gen = torch.Generator().manual_seed(seed)
    sampled = mean + std * torch.randn(mean.shape, generator=gen)
    scaling = float(1.0 / sampled.std())
    with atomic_path(file) as tmp:
        save_file({"mean": mean.contiguous(), "std": std.contiguous(), "scaling_factor": torch.tensor(scaling),
                   "made_by": made_by}, str(tmp))
    return {"mean": mean, "std": std}, scaling


# --------------------------------------------------------------------------- 4. UNet + text encoder
def _min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR per sample (eps-prediction); ones when gamma = 0."""
    if not gamma:
        return torch.ones(len(timesteps))
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return snr.clamp(max=gamma) / snr


class _Ema:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = {k: p.detach().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach(), 1 - d)


def _tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def train_unet(latents: dict, scaling: float, captions: list[str], out: Path, config: PretrainConfig,
               *, show_progress: bool = True) -> tuple:
    """Stage 4; returns (unet, text_encoder, tokenizer) holding the EMA weights."""
    tokenizer = clip_tokenizer()
    torch.manual_seed(config.seed)
    unet, text = build_unet(config), build_text_encoder(config, len(tokenizer))
    ids = _tokenize(tokenizer, captions)                      # (N, 77)
    empty = _tokenize(tokenizer, [""])[0]                     # (77,)
    named = {f"unet.{k}": p for k, p in unet.named_parameters()}
    named.update({f"text.{k}": p for k, p in text.named_parameters()})
    optimizer = torch.optim.AdamW(list(named.values()), lr=config.unet_lr, weight_decay=1e-2)
    ema = _Ema(named, config.ema_decay)
    state = out / WORK / "unet-state"
    start = load_state(state, {"unet": unet, "text": text, "ema": ema.shadow}, optimizer).get("step", 0)
    sched = noise_schedule()
    unet.train()
    text.train()
    bar = tqdm(total=config.unet_steps, initial=start, desc="unet", disable=not show_progress)
    t0, n = time.perf_counter(), len(ids)
    for step in range(start + 1, config.unet_steps + 1):
        rng = np.random.default_rng([config.seed, 4, step])
        idx = rng.integers(0, n, config.unet_batch_size)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        z = latents["mean"][idx] + latents["std"][idx] * torch.randn(latents["mean"][idx].shape, generator=gen)
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        z = torch.where(flip[:, None, None, None], z.flip(-1), z) * scaling           # (B, 4, h, w)
        tokens = ids[idx].clone()
        tokens[torch.from_numpy(rng.random(len(idx)) < config.caption_dropout)] = empty
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = unet(sched.add_noise(z, noise, t), t, text(tokens)[0]).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * _min_snr_weights(sched, t, config.min_snr_gamma)).mean()
        for g in optimizer.param_groups:
            g["lr"] = config.unet_lr * min(1.0, step / max(1, config.warmup_steps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(named.values()), 1.0)
        optimizer.step()
        ema.update(step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % config.checkpoint_every == 0 or step == config.unet_steps:
            save_state(state, step, {"unet": unet, "text": text, "ema": ema.shadow}, optimizer)
            _log(out, {"stage": "unet", "step": step, "loss": round(loss.item(), 5),
                       "s_per_step": round((time.perf_counter() - t0) / (step - start), 3)})
    bar.close()
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(ema.shadow[k])
    return unet.eval(), text.eval(), tokenizer


# --------------------------------------------------------------------------- the run
def save_pipeline(out: str | os.PathLike, vae, unet, text_encoder, tokenizer, scaling: float,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write a diffusers StableDiffusionImg2ImgPipeline folder (``models.load_pipeline`` loads it)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=sampler(), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe = copy.deepcopy(pipe).to(dtype) if dtype != torch.float32 else pipe
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def pretrain(data: str | os.PathLike, out: str | os.PathLike, config: PretrainConfig = PretrainConfig(), *,
             show_progress: bool = True) -> Path:
    """Train the whole pipeline on ``<data>/captions.jsonl`` (demo/data.py's pre-training set).

    ``out`` gets the pipeline (``model_index.json`` + components), ``pretrain.json`` (settings,
    VAE PSNR, scaling factor) and ``pretrain_log.jsonl``; ``out/work`` the resumable
    checkpoints. A finished run (``pretrain.json`` with the same settings) is returned as is.
    """
    out = Path(out)
    done = out / "pretrain.json"
    if done.is_file() and json.loads(done.read_text(encoding="utf-8")).get("config") == _jsonable(config):
        return out
    (out / WORK).mkdir(parents=True, exist_ok=True)
    rows = read_captions(data)
    images = load_images(data, rows, config.resolution, show_progress)
    held = images[-min(256, len(images) // 10 + 1):]   # PSNR probe (also trained on; a sanity figure)
    vae = train_vae(images, out, config, show_progress=show_progress)
    psnr_vae = vae_psnr(vae, held)
    if config.decoder_steps:
        vae = train_vae(images, out, config, decoder_only=True, show_progress=show_progress)
    psnr = vae_psnr(vae, held)
    latents, scaling = encode_all(vae, images, out, config.seed, show_progress)
    del images
    unet, text, tokenizer = train_unet(latents, scaling, [r["caption"] for r in rows], out, config,
                                       show_progress=show_progress)
    save_pipeline(out, vae, unet, text, tokenizer, scaling)
    meta = {"config": _jsonable(config), "images": len(rows), "scaling_factor": scaling,
            "vae_psnr_db": round(psnr_vae, 2), "vae_psnr_after_decoder_db": round(psnr, 2),
            "parameters": {"vae": _count(vae), "unet": _count(unet), "text_encoder": _count(text)}}
    write_text_atomic(done, json.dumps(meta, indent=1) + "\n")
    return out


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _jsonable(config: PretrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))
