"""The authors' Diff-Mix checkpoint (docs/method.md §1) converted into an adapter bundle.

Their textual-inversion file (``learned_embeds-steps-last.bin``: ``learned_embeds_dict``,
``name2placeholder``, ``placeholder2name``) is a torch pickle: it is read weights-only,
never executed. Their LoRA (``pytorch_lora_weights.safetensors``, old attention-processor
keys) is read as safetensors only; weights.py converts its keys.

1. :func:`_load_plain_torch` reads the embeddings file weights-only;
2. :func:`_parse_authors_embeddings` turns it into classes, tokens and vectors, in the
   order of the integers in their placeholders;
3. :func:`import_diffmix` writes the bundle through ``bundle.save_bundle``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .bundle import LORA_FILE, Bundle, save_bundle
from .models import load_weights_only
from .weights import read_weights, to_bundle_lora


def _load_plain_torch(path: Path) -> dict:
    """The authors' learned_embeds file, read weights-only (never code)."""
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    data = load_weights_only(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected the authors' dict with learned_embeds_dict")
    return data


def _placeholder_order(name2placeholder: dict[str, str]) -> list[str]:
    """Class names sorted by the integer in their placeholder (<class_12> -> 12) when every
    placeholder has exactly one distinct integer, else in name2placeholder's order."""
    numbers = {n: re.findall(r"\d+", p) for n, p in name2placeholder.items()}
    ints = [int(d[0]) for d in numbers.values() if len(d) == 1]
    if len(ints) == len(numbers) and len(set(ints)) == len(ints):
        return sorted(name2placeholder, key=lambda n: int(numbers[n][0]))
    return list(name2placeholder)


def _parse_authors_embeddings(data: dict, path: Path) -> tuple[list[str], list[str], dict[str, torch.Tensor]]:
    """(classes, tokens, {token: vector}) from the authors' learned_embeds file."""
    embeds, n2p, p2n = data.get("learned_embeds_dict"), data.get("name2placeholder"), data.get("placeholder2name")
    if not isinstance(embeds, dict) or not isinstance(n2p, dict):
        raise ValueError(f"{path} lacks learned_embeds_dict / name2placeholder; keys found: {sorted(data)[:10]}")
    if p2n is not None and p2n != {p: n for n, p in n2p.items()}:
        raise ValueError(f"{path}: name2placeholder and placeholder2name disagree")
    if len(set(n2p.values())) != len(n2p) or set(n2p.values()) != set(embeds):
        raise ValueError(f"{path}: placeholders of name2placeholder {sorted(n2p.values())[:5]} do not match "
                         f"the learned embeddings {sorted(embeds)[:5]} one to one")
    classes = _placeholder_order(n2p)
    tokens = [n2p[c] for c in classes]
    vectors = {}
    for t in tokens:
        if not isinstance(embeds[t], torch.Tensor):
            raise ValueError(f"{path}: the embedding of {t} is a {type(embeds[t]).__name__}, not a tensor")
        v = embeds[t].detach()
        vectors[t] = v[0] if v.dim() == 2 and v.shape[0] == 1 else v  # (1, D) -> (D,)
    widths = {t: tuple(v.shape) for t, v in vectors.items()}
    if len(set(widths.values())) != 1 or any(len(w) != 1 for w in widths.values()):
        raise ValueError(f"{path}: embeddings must all be single vectors of one width; shapes {widths}")
    return classes, tokens, vectors


def _read_lora_file(lora: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(lora)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors LoRA files are read (pickled .bin files are refused)")
    return read_weights(path)


def native_resolution(model: str, revision: str | None = None) -> int:
    """The base model's own image side, ``unet sample_size x VAE factor`` (2 ** (VAE levels - 1)),
    read from its config files (a local folder or the Hub / its cache) without loading weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision)
        vae = AutoencoderKL.load_config(model, subfolder="vae", revision=revision)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the UNet / VAE config of the base model {model} to find its resolution "
                         f"({type(err).__name__}); give --resolution") from None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def import_diffmix(
    embeddings_file: str | os.PathLike,
    lora: str | os.PathLike | None,
    *,
    base_model: str,
    superclass: str,
    out_dir: str | os.PathLike,
    base_revision: str | None = None,
    resolution: int | None = None,
) -> Bundle:
    """Convert the authors' checkpoint (docs/method.md §1) into a bundle.

    Args:
        embeddings_file: ``learned_embeds-steps-last.bin`` (read with weights_only=True).
        lora: their ``pytorch_lora_weights.safetensors`` or the folder holding it; None
            for embeddings only. Old attention-processor, diffusers and peft keys are accepted.
        base_model / base_revision: the SD model they trained on.
        superclass: e.g. "bird"; the prompt template is the paper's.
        out_dir: where to write the bundle.
        resolution: the checkpoint's training resolution; None = the base model's own default
            (:func:`native_resolution`).
    """
    path = Path(embeddings_file)
    classes, tokens, vectors = _parse_authors_embeddings(_load_plain_torch(path), path)
    lora_sd, rank = None, None
    if lora is not None:
        lora_sd, rank = to_bundle_lora(_read_lora_file(lora))
    if resolution is None:
        resolution = native_resolution(base_model, base_revision)
    return save_bundle(
        out_dir, classes=classes, tokens=tokens, embeddings=vectors, lora_state_dict=lora_sd,
        base_model=base_model, base_revision=base_revision, superclass=superclass, resolution=resolution,
        lora_rank=rank, lora_alpha=rank,  # scale 1, as in the paper
        training={"imported_from": {"embeddings": str(path), "lora": None if lora is None else str(lora)}},
    )
