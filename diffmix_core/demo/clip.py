"""The demo CLIP (issue 19): a small CLIP trained contrastively on the demo world.

No CLIP image weights can be had offline, so the demo world ships its own: an
open_clip ``CLIP`` (a ViT image tower and a causal text transformer over the REAL
CLIP BPE tokenizer, 49,408 tokens, context 77) trained from scratch on the demo
birds. It is stored the way open_clip stores a model in a folder
(``open_clip_config.json`` with ``model_cfg`` + ``preprocess_cfg``, and
``open_clip_model.safetensors``), so ``scoring.load_clip("local-dir:DIR")`` loads it
through the same ``open_clip.create_model_from_pretrained`` call as OpenAI's
ViT-B-32. Wherever it is named it is :data:`CLIP_LABEL`, never OpenAI's.

Training (:func:`train_clip`, resumable): images of the birds' TRAIN split (and,
with ``pretrain_birds``, the pre-training set's bird images; neither holds a
validation or test image), each with a caption made from its class name in a
random template (:data:`TEMPLATES`); a symmetric contrastive loss over the batch
where every caption of an image's class is a positive (ten classes: a batch holds
many images per class, so plain one-to-one CLIP targets would call most true pairs
negatives); random crops, flips and brightness/contrast jitter.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..bundle import update_bundle_meta
from ..config import DemoClipConfig
from ..data import read_dataset, resolve_splits, split_subset
from ..records import atomic_path, write_text_atomic
from ..scoring import LOCAL_DIR, load_clip
from .data import read_captions
from .pretrain import load_images, load_state, save_state, state_step

CLIP_LABEL = "demo CLIP (trained on the demo world), not OpenAI's"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
WORK = "work"
LOG = "clip_log.jsonl"
# Caption templates ({c}: the class name). The first is the bundle's prompt ("a photo of a {word} {superclass}").
TEMPLATES = ("a photo of a {c} bird", "a photo of a {c}", "an emoji of a {c} bird", "an emoji of a {c}",
             "a picture of a {c} bird", "a {c} bird", "a {c}", "{c}", "a close-up photo of a {c}",
             "a {c} in the picture")
MEAN = (0.48145466, 0.4578275, 0.40821073)   # open_clip's OPENAI_DATASET_MEAN / _STD (the preprocess it writes)
STD = (0.26862954, 0.26130258, 0.27577711)


def model_config(config: DemoClipConfig) -> dict:
    """The open_clip ``model_cfg`` of the demo CLIP."""
    return {"embed_dim": config.embed_dim,
            "vision_cfg": {"image_size": config.image_size, "patch_size": config.patch_size,
                           "width": config.vision_width, "layers": config.vision_layers, "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": config.text_width,
                         "heads": config.text_heads, "layers": config.text_layers}}


def build_model(config: DemoClipConfig):
    """A freshly initialised open_clip CLIP (seeded)."""
    import open_clip

    torch.manual_seed(config.seed)
    return open_clip.CLIP(**model_config(config))


# --------------------------------------------------------------------------- data
def training_images(data: str | os.PathLike, config: DemoClipConfig, show_progress: bool = True):
    """(uint8 images (N, 3, S, S), labels (N,), class names) for training: the birds' train split
    (``<data>/birds``, its split file) and, with ``pretrain_birds``, the demo birds of
    ``<data>/pretrain`` (made from other random draws: never a validation or test image)."""
    data = Path(data).resolve()
    birds = read_dataset(data / "birds", show_progress=False)
    train = split_subset(birds, resolve_splits(birds), "train")
    rows = [{"file_name": str(it.path)} for it in train.items]
    labels = [it.label for it in train.items]
    if config.pretrain_birds:
        index = {c: i for i, c in enumerate(birds.classes)}
        extra = [r for r in read_captions(data / "pretrain") if r["name"] in index]
        rows += [{"file_name": str(data / "pretrain" / r["file_name"])} for r in extra]
        labels += [index[r["name"]] for r in extra]
    images = load_images("/", rows, config.image_size, show_progress)
    return images, torch.tensor(labels), birds.classes


def augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> normalised float: random crop (70-100 % of the side) resized back,
    horizontal flip, brightness/contrast jitter (±15 %)."""
    b = batch.shape[0]
    x = batch.float() / 255.0
    scale = 0.7 + 0.3 * torch.rand(b, generator=gen)
    shift = (1 - scale)[:, None] * (2 * torch.rand(b, 2, generator=gen) - 1)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bright = 1 + 0.3 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    contrast = 1 + 0.3 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * bright
    return normalize(x.clamp(0, 1))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> the CLIP input normalisation of :data:`MEAN` / :data:`STD`."""
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
                     caption_labels: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over (B images) x (U distinct captions) where every caption of an image's
    class is a positive (uniform target over them), in both directions."""
    img = F.normalize(image_emb, dim=-1)
    txt = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * img @ txt.T
    pos = (labels[:, None] == caption_labels[None, :]).float()
    loss_i = -(F.log_softmax(logits, dim=1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
    pos_t = pos.T
    has = pos_t.sum(1) > 0
    loss_t = -(F.log_softmax(logits.T[has], dim=1) * pos_t[has] / pos_t[has].sum(1, keepdim=True)).sum(1).mean()
    return (loss_i + loss_t) / 2


# --------------------------------------------------------------------------- training
def _lr(step: int, config: DemoClipConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _optimizer(model, config: DemoClipConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def is_trained(out: str | os.PathLike, config: DemoClipConfig) -> bool:
    """Whether ``out`` holds a finished demo CLIP of these settings."""
    file = Path(out) / CONFIG_FILE
    if not (file.is_file() and (Path(out) / WEIGHTS_FILE).is_file()):
        return False
    return json.loads(file.read_text(encoding="utf-8")).get("diffmix", {}).get("settings") == asdict(config)


def train_clip(data: str | os.PathLike, out: str | os.PathLike, config: DemoClipConfig = DemoClipConfig(), *,
               show_progress: bool = True) -> Path:
    """Train (or continue training) the demo CLIP on ``<data>/birds`` (+ pre-training birds) and
    write it to ``out`` as an open_clip folder (fp32). A finished one with the same settings is
    kept. Returns ``out``."""
    import open_clip

    out = Path(out)
    if is_trained(out, config):
        return out
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    images, labels, classes = training_images(data, config, show_progress)
    model = build_model(config).train()
    optimizer = _optimizer(model, config)
    state = work / "state"
    start = state_step(state)
    if start:
        load_state(state, {"model": model}, optimizer)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")   # the CLIP BPE tokenizer shipped with open_clip (offline)
    captions = [[t.format(c=c) for t in TEMPLATES] for c in classes]
    tokens = [tokenizer(caps) for caps in captions]
    t0, n = time.time(), len(labels)
    bar = tqdm(range(start, config.steps), desc="demo CLIP", disable=not show_progress, initial=start,
               total=config.steps)
    for step in bar:
        rng = np.random.default_rng([config.seed, 7, step])
        idx = torch.from_numpy(rng.integers(0, n, config.batch_size))
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        x = augment(images[idx], gen)
        y = labels[idx]
        # One random template per class present: U <= 10 distinct captions per step, each encoded once.
        present = sorted(set(y.tolist()))
        picks = [int(rng.integers(len(TEMPLATES))) for _ in present]
        text = torch.stack([tokens[c][t] for c, t in zip(present, picks)])
        for g in optimizer.param_groups:
            g["lr"] = _lr(step, config)
        loss = contrastive_loss(model.encode_image(x), model.encode_text(text), y, torch.tensor(present),
                                model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        done = step + 1
        if done % 20 == 0 or done == config.steps:
            row = {"step": done, "loss": round(float(loss.detach()), 4), "lr": _lr(step, config),
                   "logit_scale": round(float(model.logit_scale.detach().exp()), 2), "seconds": round(time.time() - t0, 1)}
            with open(work / LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=row["loss"])
        if done % config.checkpoint_every == 0 and done < config.steps:
            save_state(state, done, {"model": model}, optimizer)
    info = {"train_images": n, "classes": list(classes), "seconds": round(time.time() - t0, 1),
            "parameters": sum(p.numel() for p in model.parameters())}
    save_clip(model.eval(), out, config, info)
    return out


def save_clip(model, out: str | os.PathLike, config: DemoClipConfig, info: dict,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` as an open_clip folder: ``open_clip_config.json`` (model_cfg, preprocess_cfg,
    ``label``, ``diffmix``: settings + ``info``) and ``open_clip_model.safetensors`` in ``dtype``
    (weights first; the config, written last, marks the folder complete)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    cfg = {"model_cfg": model_config(config),
           "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
                              "resize_mode": "shortest"},
           "label": CLIP_LABEL,
           "diffmix": {"settings": asdict(config), "templates": list(TEMPLATES),
                       "stored_dtype": str(dtype).replace("torch.", ""), **info}}
    write_text_atomic(out / CONFIG_FILE, json.dumps(cfg, indent=1) + "\n")
    return out


def copy_fp16(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """The shipped copy of a trained demo CLIP folder: same config, weights stored in fp16
    (open_clip casts them back to fp32 on load). Returns ``dest``."""
    from safetensors.torch import load_file, save_file

    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in load_file(str(src / WEIGHTS_FILE)).items()}
    with atomic_path(dest / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    cfg = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    cfg["diffmix"]["stored_dtype"] = "float16"
    write_text_atomic(dest / CONFIG_FILE, json.dumps(cfg, indent=1) + "\n")
    return dest


# --------------------------------------------------------------------------- measures
def zero_shot_accuracy(clip, images, labels: list[str], prompts: dict[str, str], batch_size: int = 256) -> dict:
    """Top-1 of the class whose prompt is most similar to each image: {'accuracy', 'n', 'per_class'}."""
    names = list(prompts)
    texts = clip.encode_texts([prompts[c] for c in names])
    hits: dict[str, list[bool]] = {c: [] for c in names}
    for i in range(0, len(images), batch_size):
        sims = clip.encode_images(images[i:i + batch_size]) @ texts.T
        for label, j in zip(labels[i:i + batch_size], sims.argmax(1).tolist()):
            hits[label].append(names[j] == label)
    flat = [h for v in hits.values() for h in v]
    return {"accuracy": float(np.mean(flat)), "n": len(flat),
            "per_class": {c: float(np.mean(v)) for c, v in hits.items() if v}}


def spearman(a, b) -> float:
    """Spearman rank correlation of two equally long sequences (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a, dtype=float), np.asarray(b, dtype=float)).statistic)


# --------------------------------------------------------------------------- the bundle names its CLIP
BUNDLE_CLIP_DIR = "clip"


def attach_clip(bundle_dir: str | os.PathLike, clip_dir: str | os.PathLike):
    """Copy a trained demo CLIP into ``<bundle>/clip/`` (fp16 weights) and name it in adapter.json
    (``clip``: "clip", both files' sha256 under ``files``), so the app and ``diffmix score`` use it
    by default for this bundle (scoring.default_clip). Refuses a CLIP that does not load. Returns
    the updated Bundle."""
    clip_dir = Path(clip_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (clip_dir / name).is_file():
            raise FileNotFoundError(f"{clip_dir / name} does not exist; train the demo CLIP first "
                                    "(`diffmix demo build`)")
    dest = copy_fp16(clip_dir, Path(bundle_dir) / BUNDLE_CLIP_DIR)
    scorer = load_clip(f"{LOCAL_DIR}{dest}", device="cpu")
    if not scorer.available:
        raise ValueError(f"the demo CLIP in {dest} does not load: {scorer.reason}")
    rels = tuple(f"{BUNDLE_CLIP_DIR}/{name}" for name in (CONFIG_FILE, WEIGHTS_FILE))
    return update_bundle_meta(bundle_dir, add_files=rels, clip=BUNDLE_CLIP_DIR)
