"""Fine-tuning: one learned token per class (textual inversion) + a UNet LoRA
(docs/method.md §1), under ``accelerate``; the result is an adapter bundle.

The run, step by step (:func:`finetune`):

1. read the dataset and its split (``data.resolve_splits``): only the train split is seen;
2. load the base pipeline, add one token ``<class_i>`` per class, initialised from the
   super-class word; the text encoder is frozen except those rows (other rows are
   restored after every optimizer step); LoRA (peft) on to_q/to_k/to_v/to_out.0;
3. train with the standard SD loss (epsilon or v-prediction, as the scheduler says);
4. every ``checkpoint_every`` steps: ``<out>/checkpoints/step-XXXXXX/`` holding a loadable
   bundle, the optimizer moments (safetensors), the trainer state (JSON) and a
   validation grid (one text-to-image sample per class, fixed seeds, via the engine);
5. at the end: the bundle in ``<out>`` (``bundle.save_bundle``).

Every random draw (batch order, flips, VAE sampling, noise, timesteps) is a pure
function of (seed, micro-step, process rank), so a checkpoint needs no RNG state:
a run resumed from a checkpoint repeats the uninterrupted run exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .bundle import Bundle, embedding_relpath, load_bundle, make_prompt, save_bundle
from .config import FinetuneConfig, SplitConfig, TranslateConfig
from .data import Dataset, default_split_path, load_image, read_dataset, resolve_splits, split_subset
from .models import load_pipeline, model_identity
from .records import check_apart, read_jsonl, save_png, write_jsonl_atomic, write_text_atomic
from .translate import Job, translate
from .weights import lora_state_dict_from_unet

RUN_FILE = "finetune_run.json"     # what the output folder is a run of (refuse to mix runs)
LOG_FILE = "train_log.jsonl"       # one line per optimizer step
CHECKPOINTS = "checkpoints"
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
EMBEDDING = "text_embedding"       # name of the token-embedding matrix in optimizer files
# Settings that may change between an interrupted run and its resumption.
RESUMABLE = ("max_steps", "checkpoint_every", "sample_steps", "num_workers")


def class_tokens(num_classes: int) -> list[str]:
    """The placeholder token of each class: ``<class_0>``, ``<class_1>``, ..."""
    return [f"<class_{i}>" for i in range(num_classes)]


def _seed_for(*values: int) -> int:
    """A 63-bit seed derived from integers (seed, micro-step, rank, ...)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


# --------------------------------------------------------------------------- data
class TrainImages(torch.utils.data.Dataset):
    """Train-split images, resized + center-cropped to ``resolution``; indexed by (item, flip)."""

    def __init__(self, dataset: Dataset, resolution: int):
        self.items, self.resolution = dataset.items, resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        index, flip = key
        item = self.items[index]
        image = ImageOps.fit(load_image(item.path), (self.resolution,) * 2, Image.BILINEAR)
        if flip:
            image = ImageOps.mirror(image)
        pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, H, W)
        return {"pixel_values": pixels, "label": item.label}


class StepBatches(torch.utils.data.Sampler):
    """Batches of (item index, flip) for one process, from micro-step ``start`` on.

    Epoch mode: position p = (m * world + rank) * batch + j of a seeded permutation per
    epoch, so the processes together see every image once per epoch. Balanced mode:
    a class drawn uniformly, then one of its images (long-tail datasets).
    """

    def __init__(self, labels: list[int], batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1, balanced: bool = False, flip: bool = True):
        self.labels, self.batch, self.seed, self.start, self.stop = labels, batch_size, seed, start, stop
        self.rank, self.world, self.balanced, self.flip = rank, world, balanced, flip
        self.by_class = [np.flatnonzero(np.asarray(labels) == c) for c in sorted(set(labels))]
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(_seed_for(self.seed, epoch, 7)).permutation(len(self.labels))}
        return self._perms[epoch]

    def batch_at(self, m: int) -> list[tuple[int, bool]]:
        rng = np.random.default_rng(_seed_for(self.seed, m, self.rank, 1))
        flips = (rng.random(self.batch) < 0.5) & self.flip
        if self.balanced:
            classes = rng.integers(len(self.by_class), size=self.batch)
            idx = [int(self.by_class[c][rng.integers(len(self.by_class[c]))]) for c in classes]
        else:
            n, first = len(self.labels), (m * self.world + self.rank) * self.batch
            idx = [int(self._perm(p // n)[p % n]) for p in range(first, first + self.batch)]
        return [(i, bool(f)) for i, f in zip(idx, flips)]

    def __iter__(self):
        for m in range(self.start, self.stop):
            yield self.batch_at(m)


# --------------------------------------------------------------------------- model setup
def add_class_tokens(tokenizer, text_encoder, tokens: list[str], init_words: list[str]) -> list[int]:
    """Add one new token per class and set its embedding to the mean of ``init_words``' token
    embeddings; ValueError when a token exists already or does not tokenize to one new id."""
    vocab = tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab]
    if taken:
        raise ValueError(f"token(s) {taken[:5]} already exist in the base model's tokenizer; the base model has "
                         "class tokens loaded already: start from a clean base model")
    init_ids = []
    for word in init_words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"initialisation word {word!r} has no tokens; give --superclass")
        init_ids.append(ids)
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise ValueError(f"the tokenizer did not add all of {tokens[:5]}...: tokens collide")
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    for token, tid in zip(tokens, token_ids):
        if tokenizer(token, add_special_tokens=False).input_ids != [tid]:
            raise ValueError(f"token {token!r} does not tokenize to its single new id; tokens collide")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set below
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for tid, ids in zip(token_ids, init_ids):
            weight[tid] = weight[ids].mean(dim=0)
    return list(token_ids)


def _init_words(dataset: Dataset, config: FinetuneConfig) -> list[str]:
    how = config.token_init
    if how == "auto":
        how = "superclass" if config.superclass.strip() and config.trains_tokens else "class-name"
    return [config.superclass.strip() if how == "superclass" else c for c in dataset.classes]


def _add_lora(unet, config: FinetuneConfig) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))
    return [p for p in unet.parameters() if p.requires_grad]


def _multi_cpu() -> bool:
    """True for a multi-process launch on a machine without CUDA: accelerate then runs
    one CPU process per rank (gloo), e.g. ``accelerate launch --multi_gpu --num_processes 2``."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return not torch.cuda.is_available() and (world > 1 or os.environ.get("ACCELERATE_USE_CPU", "").lower()
                                              in ("1", "true", "yes"))


def _mixed_precision(config: FinetuneConfig) -> str:
    if config.mixed_precision == "auto":
        return "fp16" if torch.cuda.is_available() else "no"
    return config.mixed_precision


# --------------------------------------------------------------------------- the run folder
def run_fingerprint(config: FinetuneConfig, dataset: Dataset, splits: dict, base: dict, world: int) -> dict:
    """What makes two runs the same run (resumable into each other)."""
    train_hash = hashlib.sha256("\n".join(splits["train"]).encode()).hexdigest()
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE}
    return {"config": settings, "dataset": str(dataset.root), "classes": list(dataset.classes),
            "train_sha256": train_hash, "base_model": base, "num_processes": world}


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    folder = Path(out) / CHECKPOINTS
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer_state.json").is_file()) if folder.is_dir() else []
    return done[-1] if done else None


# --------------------------------------------------------------------------- the trainer
class _Trainer:
    """The models, the optimizer, one training step and the bundle export; checkpoints are
    written and read by :func:`save_checkpoint` / :func:`load_checkpoint` below."""

    def __init__(self, accelerator, pipe, dataset: Dataset, config: FinetuneConfig, base: dict, meta: dict):
        self.acc, self.config, self.dataset, self.base, self.meta = accelerator, config, dataset, base, meta
        # 1. the pipeline frozen, one new token per class, the training noise schedule
        self.tokens = class_tokens(len(dataset.classes))
        self.vae, self.unet, self.text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
        self._freeze(pipe, tokenizer)
        # 2. what trains: the UNet's LoRA, the class tokens' embedding rows
        models = self._trainable()
        if config.gradient_checkpointing:
            self._gradient_checkpointing()
        # 3. the optimizer; only models with trained weights go through DDP
        self.optimizer = self._optimizer()
        for name in models:
            setattr(self, name, accelerator.prepare(getattr(self, name)))
        self.trained = [getattr(self, name) for name in models]
        self.optimizer = accelerator.prepare(self.optimizer)
        # 4. one prompt per class, tokenised once
        prompts = [make_prompt(t, config.superclass, config.template) for t in self.tokens]
        self.prompt_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids   # (C, 77)
        self.sample_pipe = None   # the pipeline of the checkpoints' sample grids, loaded on first use

    def _freeze(self, pipe, tokenizer) -> None:
        """Freeze every weight, add the class tokens, take the noise schedule; the VAE (never
        trained) in the mixed-precision dtype."""
        from diffusers import DDPMScheduler

        for model in (self.vae, self.unet, self.text_encoder):
            model.requires_grad_(False)
        self.token_ids = add_class_tokens(tokenizer, self.text_encoder, self.tokens,
                                          _init_words(self.dataset, self.config))
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if self.acc.mixed_precision in ("fp16", "bf16"):
            self.vae.to(dtype=torch.float16 if self.acc.mixed_precision == "fp16" else torch.bfloat16)

    def _trainable(self) -> list[str]:
        """Set ``named_params`` (the trained weights, by name) and return the names of the models
        holding them. The whole embedding matrix is a parameter; its other rows are restored
        after every step (``keep`` marks them)."""
        config, models = self.config, []
        self.named_params: list[tuple[str, torch.nn.Parameter]] = []
        if config.trains_lora:
            torch.manual_seed(_seed_for(config.seed, 3))   # the same LoRA init on every process
            _add_lora(self.unet, config)
            self.named_params += [(f"unet.{n}", p) for n, p in self.unet.named_parameters() if p.requires_grad]
            models.append("unet")
        embedding = self.text_encoder.get_input_embeddings().weight
        if config.trains_tokens:
            embedding.requires_grad_(True)
            self.original = embedding.detach().clone()
            self.keep = torch.ones(embedding.shape[0], dtype=torch.bool, device=embedding.device)
            self.keep[self.token_ids] = False   # rows restored after every step
            self.named_params.append((EMBEDDING, embedding))
            models.append("text_encoder")
        return models

    def _gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        if self.config.trains_tokens:   # transformers 5 renamed it; absorb the drift here
            te = self.text_encoder
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()

    def _optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        groups = [{"params": [p for n, p in self.named_params if n != EMBEDDING], "lr": c.lr},
                  {"params": [p for n, p in self.named_params if n == EMBEDDING], "lr": c.ti_lr}]
        return torch.optim.AdamW([g for g in groups if g["params"]], betas=(c.adam_beta1, c.adam_beta2),
                                 weight_decay=c.weight_decay, eps=c.adam_epsilon)

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    def loss(self, batch: dict, micro_step: int) -> torch.Tensor:
        """The SD denoising loss of one micro-batch; every draw seeded by (seed, micro-step, rank)."""
        acc, sched = self.acc, self.noise_scheduler
        gen = torch.Generator().manual_seed(_seed_for(self.config.seed, micro_step, acc.process_index, 2))
        pixels = batch["pixel_values"].to(acc.device, dtype=self.vae.dtype)       # (B, 3, H, W)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator=gen).float()
            latents = latents * self.vae.config.scaling_factor                        # (B, 4, H/8, W/8)
        noise = torch.randn(latents.shape, generator=gen).to(acc.device)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        timesteps = timesteps.to(acc.device)
        noisy = sched.add_noise(latents, noise, timesteps)
        ids = self.prompt_ids[batch["label"]].to(acc.device)
        with torch.set_grad_enabled(self.config.trains_tokens), acc.autocast():
            hidden = self.text_encoder(ids)[0]                                        # (B, 77, D)
        with acc.autocast():
            pred = self.unet(noisy, timesteps, hidden).sample
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())

    def update(self) -> None:
        """Clip, step, zero; then put every embedding row but the class tokens' back exactly."""
        params = [p for _, p in self.named_params]
        if self.config.trains_tokens:
            emb = self.unwrap(self.text_encoder).get_input_embeddings().weight
            if emb.grad is not None:
                emb.grad[self.keep] = 0   # only the new rows learn (and count in the clip norm)
        self.acc.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.trains_tokens:
            with torch.no_grad():
                emb[self.keep] = self.original[self.keep]

    # ----------------------------------------------------------------- files
    def export(self, folder: Path, step: int) -> Bundle:
        """Write the current tokens + LoRA as an adapter bundle."""
        c = self.config
        emb = self.unwrap(self.text_encoder).get_input_embeddings().weight
        vectors = {t: emb[i].detach().float().cpu() for t, i in zip(self.tokens, self.token_ids)}
        lora = lora_state_dict_from_unet(self.unwrap(self.unet)) if c.trains_lora else None
        return save_bundle(folder, classes=self.dataset.classes, tokens=self.tokens, embeddings=vectors,
                           lora_state_dict=lora, base_model=self.base["model"], base_revision=self.base["revision"],
                           superclass=c.superclass, template=c.template, resolution=c.resolution,
                           lora_rank=c.rank if lora else None, lora_alpha=c.lora_alpha if lora else None,
                           training=self.meta, steps=step)


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(trainer: _Trainer, out: Path, step: int) -> Path:
    """``<out>/checkpoints/step-XXXXXX/`` (main process; complete or absent), then its grid."""
    acc = trainer.acc
    final = out / CHECKPOINTS / f"step-{step:06d}"
    if acc.is_main_process:
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            trainer.export(tmp / "bundle", step)
            save_file(_optimizer_tensors(trainer), tmp / "optimizer.safetensors")
            scaler = acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None
            write_text_atomic(tmp / "trainer_state.json", json.dumps(
                {"step": step, "seed": trainer.config.seed, "num_processes": acc.num_processes, "scaler": scaler},
                indent=1) + "\n")
        except OSError as err:   # e.g. a full disk: drop the partial folder, keep the earlier ones
            shutil.rmtree(tmp, ignore_errors=True)
            last = latest_checkpoint(out)
            raise OSError(err.errno, f"could not write checkpoint {final} ({err.strerror or err}); "
                          f"earlier checkpoints are intact (latest: {last.name if last else 'none'}); "
                          "free some space and rerun with --resume") from err
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if trainer.config.sample_steps:
            sample_grid(trainer, final, step)
    acc.wait_for_everyone()
    return final


def load_checkpoint(trainer: _Trainer, folder: Path) -> int:
    """Restore LoRA, class-token rows, optimizer moments and the scaler; returns the step."""
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    _restore_weights(trainer, folder / "bundle")
    _restore_optimizer(trainer, load_file(folder / "optimizer.safetensors"))
    if state.get("scaler") and getattr(trainer.acc, "scaler", None) is not None:
        trainer.acc.scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def _restore_weights(trainer: _Trainer, bundle: Path) -> None:
    """The LoRA and the class tokens' embedding rows of a checkpoint's bundle."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    if trainer.config.trains_lora:
        sd = {k.removeprefix("unet."): v for k, v in load_file(bundle / "pytorch_lora_weights.safetensors").items()}
        set_peft_model_state_dict(trainer.unwrap(trainer.unet), convert_unet_state_dict_to_peft(sd),
                                  adapter_name="default")
    emb = trainer.unwrap(trainer.text_encoder).get_input_embeddings().weight
    with torch.no_grad():
        for token, tid in zip(trainer.tokens, trainer.token_ids):
            emb[tid] = load_file(bundle / embedding_relpath(token))[token].to(emb)


def _torch_optimizer(trainer: _Trainer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer


def _optimizer_tensors(trainer: _Trainer) -> dict[str, torch.Tensor]:
    """AdamW moments and step counts by parameter name (the embedding: class-token rows only;
    the others are zero, their gradients being masked)."""
    state = _torch_optimizer(trainer).state
    out = {}
    for name, p in trainer.named_params:
        for key, value in state.get(p, {}).items():
            if torch.is_tensor(value):
                if name == EMBEDDING and value.dim() > 0:
                    value = value[trainer.token_ids]
                out[f"{name}/{key}"] = value.detach().cpu().contiguous()
    return out


def _restore_optimizer(trainer: _Trainer, tensors: dict[str, torch.Tensor]) -> None:
    """Put :func:`_optimizer_tensors`' moments back (the embedding's other rows: zero)."""
    opt = _torch_optimizer(trainer)
    for name, p in trainer.named_params:
        entry = {}
        for key in {k.split("/", 1)[1] for k in tensors if k.startswith(name + "/")}:
            value = tensors[f"{name}/{key}"]
            if name == EMBEDDING and value.dim() > 0:
                full = torch.zeros_like(p)
                full[trainer.token_ids] = value.to(full)
                value = full
            entry[key] = value if value.dim() == 0 else value.to(p.device)
        if entry:
            opt.state[p] = entry


def sample_grid(trainer: _Trainer, folder: Path, step: int) -> Path:
    """One text-to-image sample per class (seed = label) with the checkpoint's bundle, via the engine."""
    if trainer.sample_pipe is None:
        trainer.sample_pipe = load_pipeline(trainer.base["model"], revision=trainer.base["revision"],
                                            device=str(trainer.acc.device))
    bundle = load_bundle(folder / "bundle")
    config = TranslateConfig(strategy="diff-gen", num_inference_steps=trainer.config.sample_steps,
                             resolution=trainer.config.resolution)
    jobs = [Job(None, c, 1.0, seed=i) for i, c in enumerate(bundle.classes)]
    images = [r.image for r in translate(trainer.sample_pipe, jobs, config, bundle=bundle, show_progress=False)]
    return save_png(image_grid(images), folder / "samples.png",
                    {"step": step, "classes": list(bundle.classes), "seeds": list(range(len(jobs))),
                     "num_inference_steps": config.num_inference_steps, "guidance_scale": config.guidance_scale})


def image_grid(images: list[Image.Image]) -> Image.Image:
    """Images (same size) in a near-square grid, row by row."""
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


# --------------------------------------------------------------------------- the run
def _training_meta(config: FinetuneConfig, dataset: Dataset, split_path: Path, train: Dataset, acc) -> dict:
    """``training`` of adapter.json: every setting, the data and the split it saw."""
    split = json.loads(split_path.read_text(encoding="utf-8")) if split_path.is_file() else {}
    return {**dataclasses.asdict(config), "dataset": str(dataset.root), "split_file": str(split_path),
            "split_config": split.get("config"), "train_images": len(train.items), "train_counts": train.counts(),
            "num_processes": acc.num_processes, "mixed_precision_used": acc.mixed_precision,
            "optimizer": "AdamW", "lr_schedule": "constant", "diffmix_version": __version__}


def _check_out(out: Path, fingerprint: dict, resume: bool, overwrite: bool) -> None:
    """Read-only checks of the output folder (every process runs them)."""
    if overwrite and resume:
        raise ValueError("give either resume (continue the run in the folder) or overwrite (replace it), not both")
    if overwrite or not out.exists() or not any(out.iterdir()):
        return
    if not resume:
        raise ValueError(f"output folder {out} is not empty; pass --resume to continue the run in it or "
                         "--overwrite to replace it")
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise ValueError(f"output folder {out} holds no diffmix fine-tuning run ({RUN_FILE} missing); "
                         "choose an empty folder or pass --overwrite")
    old = json.loads(run_file.read_text(encoding="utf-8"))
    if old != fingerprint:
        diff = [k for k in fingerprint if k != "config" and old.get(k) != fingerprint[k]]
        diff += [f"config.{k}" for k, v in fingerprint["config"].items() if old.get("config", {}).get(k) != v]
        raise ValueError(f"output folder {out} holds a different run (differs in: {', '.join(diff)}); "
                         "use the same settings to resume, another --out, or --overwrite")


def _clear_out(out: Path) -> None:
    """--overwrite: remove what a previous run wrote (only its files)."""
    for name in (CHECKPOINTS, "embeddings"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (RUN_FILE, LOG_FILE, "adapter.json", "pytorch_lora_weights.safetensors"):
        (out / name).unlink(missing_ok=True)


def finetune(
    data: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    revision: str | None = None,
    split_file: str | os.PathLike | None = None,
    split_config: SplitConfig | dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    max_pixels: int | None = None,
    show_progress: bool = True,
    stop_after: int | None = None,
) -> Bundle | None:
    """Fine-tune class tokens + UNet LoRA on the train split of ``data``; write the bundle to ``out``.

    Args:
        data: dataset (see data.read_dataset). Only its train split is used.
        base: base model, Hub id or diffusers folder (``revision`` for Hub ids).
        out: bundle folder; also holds checkpoints/, train_log.jsonl and finetune_run.json.
        config: training settings (defaults: the paper's).
        split_file / split_config: see data.resolve_splits (one split for every stage).
        resume: continue from the latest checkpoint in ``out`` (same settings; max_steps may grow).
        overwrite: replace a previous run in ``out``.
        stop_after: stop after this step, as an interruption would (no final bundle; the
            checkpoints written so far stay): for tests and for runs split over job-time limits.

    Returns:
        The loaded bundle (``bundle.load_bundle(out)``, on every process). With
        ``stop_after``: the latest checkpoint's bundle, or None when none was written.
    """
    from accelerate import Accelerator

    out = Path(out)
    root = Path(data).parent if Path(data).is_file() else Path(data)   # a CSV dataset: its folder
    check_apart(out, [("the dataset", root)] + ([("the base model", base)] if Path(base).is_dir() else []))
    acc = Accelerator(mixed_precision=_mixed_precision(config), cpu=_multi_cpu(),
                      gradient_accumulation_steps=config.gradient_accumulation_steps)
    main = acc.is_main_process
    dataset = read_dataset(data, strict=strict, max_pixels=max_pixels, show_progress=show_progress and main)
    with acc.main_process_first():
        splits = resolve_splits(dataset, split_file, split_config)
    split_path = Path(split_file) if split_file is not None else default_split_path(dataset)
    train = split_subset(dataset, splits, "train")
    if not train.items:
        raise ValueError(f"the train split of {data} is empty")
    pipe = load_pipeline(base, revision=revision, dtype="fp32", device=str(acc.device), scheduler="native")
    base_id = model_identity(pipe)
    fingerprint = run_fingerprint(config, dataset, splits, base_id, acc.num_processes)
    _check_out(out, fingerprint, resume, overwrite)
    acc.wait_for_everyone()
    if main:
        if overwrite:
            _clear_out(out)
        write_text_atomic(out / RUN_FILE, json.dumps(fingerprint, indent=1, ensure_ascii=False) + "\n")
    trainer = _Trainer(acc, pipe, dataset, config, base_id, _training_meta(config, dataset, split_path, train, acc))
    checkpoint = latest_checkpoint(out) if resume else None
    start = load_checkpoint(trainer, checkpoint) if checkpoint else 0
    log = [r for r in read_jsonl(out / LOG_FILE) if r["step"] <= start] if start and (out / LOG_FILE).is_file() else []
    stop = min(config.max_steps, stop_after or config.max_steps)
    _train(trainer, train, out, start, stop, log, show_progress and main)
    if stop < config.max_steps:
        return load_bundle(latest_checkpoint(out) / "bundle") if latest_checkpoint(out) else None
    if main:
        trainer.export(out, config.max_steps)
    acc.wait_for_everyone()
    return load_bundle(out)


def _train(trainer: _Trainer, train: Dataset, out: Path, start: int, stop: int, log: list[dict],
           show_progress: bool) -> None:
    """Optimizer steps start+1 .. stop, with the loss log and checkpoints."""
    acc, c = trainer.acc, trainer.config
    accum = c.gradient_accumulation_steps
    sampler = StepBatches([it.label for it in train.items], c.batch_size, c.seed, start * accum, stop * accum,
                          rank=acc.process_index, world=acc.num_processes, balanced=c.balanced_sampler,
                          flip=c.random_flip)
    loader = torch.utils.data.DataLoader(TrainImages(train, c.resolution), batch_sampler=sampler,
                                         num_workers=c.num_workers)
    batches = iter(loader)
    for model in trainer.trained:
        model.train()
    bar = tqdm(total=c.max_steps, initial=start, desc="finetune", unit="step", disable=not show_progress)
    t0 = time.perf_counter()
    for step in range(start + 1, stop + 1):
        losses = []
        for a in range(accum):
            with acc.accumulate(*trainer.trained):
                loss = trainer.loss(next(batches), (step - 1) * accum + a)
                acc.backward(loss)
                if acc.sync_gradients:
                    trainer.update()
            losses.append(loss.detach())
        mean = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
        log.append({"step": step, "loss": mean, "lr": c.lr, "ti_lr": c.ti_lr,
                    "elapsed_s": round(time.perf_counter() - t0, 3)})
        bar.update(1)
        bar.set_postfix(loss=f"{mean:.4f}")
        if c.checkpoint_every and (step % c.checkpoint_every == 0 or step == c.max_steps):
            if acc.is_main_process:
                write_jsonl_atomic(out / LOG_FILE, log)
            save_checkpoint(trainer, out, step)
        elif acc.is_main_process and (step % 100 == 0 or step == stop):
            write_jsonl_atomic(out / LOG_FILE, log)
    bar.close()
