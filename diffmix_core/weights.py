"""A bundle's tensors: class-token vectors and UNet LoRA weights -- the key formats
diffmix reads, the one it writes, safetensors reading, and the check that a LoRA fits a UNet.

Accepted key formats (each names a module of the UNet and its down / up matrix)::

    unet.<module>.lora.down.weight                      diffusers (the bundle's own format)
    <module>.lora_A.weight / lora_B.weight              peft
    <module>.lora_linear_layer.down.weight              diffusers' LoRALinearLayer
    <block>.processor.to_q_lora.down.weight             old attention processors (the authors' checkpoints)

1. :func:`lora_pairs` groups any accepted state dict by UNet module;
2. :func:`to_bundle_lora` rewrites it in the bundle's keys and reads its one rank;
3. :func:`check_lora_fits` compares every pair with the UNet's layer before anything is loaded;
4. :func:`lora_state_dict_from_unet` reads a peft-LoRA UNet's weights back in the bundle's keys;
5. :func:`read_weights` reads a safetensors file (never a pickle), refusing NaN / Inf;
   :func:`check_vectors` checks token vectors before they are written.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

# Any accepted LoRA key -> (module path inside the UNet, "down" | "up").
_OLD_PROCESSOR_KEY = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_LORA_SUFFIXES = {".lora.down.weight": "down", ".lora.up.weight": "up",           # diffusers
                  ".lora_A.weight": "down", ".lora_B.weight": "up",               # peft
                  ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up"}


def _split_lora_key(key: str) -> tuple[str, str] | None:
    """Module path and part of a LoRA key in any of the known formats, else None."""
    k = key.removeprefix("unet.")
    m = _OLD_PROCESSOR_KEY.search(k)
    if m:  # old attention-processor LoRA (the authors' checkpoints)
        module = "to_out.0" if m.group(1) == "to_out" else m.group(1)
        return f"{k[:m.start()]}.{module}", m.group(2)
    for suffix, part in _LORA_SUFFIXES.items():
        if k.endswith(suffix) and len(k) > len(suffix):
            return k[: -len(suffix)], part
    return None


def lora_pairs(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"down": A, "up": B}}; ValueError for unknown or duplicate keys."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown, dupes = [], []
    for key, tensor in state_dict.items():
        split = _split_lora_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, part = split
        if part in pairs.setdefault(module, {}):
            dupes.append(key)
        pairs[module][part] = tensor
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) are not UNet LoRA weights (expected '...lora.down/up.weight', "
                         f"'...lora_A/B.weight' or '...processor.to_q_lora.down.weight'): {unknown[:5]}")
    if dupes:
        raise ValueError(f"LoRA state dict names the same weight twice (mixed key formats?): {dupes[:5]}")
    if not pairs:
        raise ValueError("the LoRA state dict is empty")
    return pairs


def to_bundle_lora(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Convert any accepted key format to the bundle's (``unet.<module>.lora.down.weight``)
    and return it with its (single) rank; ValueError on half pairs or mixed ranks."""
    out, ranks = {}, set()
    for module, parts in lora_pairs(state_dict).items():
        if set(parts) != {"down", "up"}:
            raise ValueError(f"LoRA module {module!r} has only its {'/'.join(parts)} weight")
        ranks.add(int(parts["down"].shape[0]))
        for part, tensor in parts.items():
            out[f"unet.{module}.lora.{part}.weight"] = tensor.detach().to("cpu").contiguous()
    if len(ranks) != 1:
        raise ValueError(f"LoRA modules have different ranks {sorted(ranks)}; a bundle holds one rank")
    return out, ranks.pop()


def lora_state_dict_from_unet(unet, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """A peft-LoRA UNet's adapter weights in the bundle / diffusers file format
    (``unet.<module>.lora.down.weight``), as ``save_lora_weights`` writes them."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    return {f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _expected_lora_shapes(layer: torch.nn.Module, rank: int) -> tuple[tuple, tuple] | None:
    """(down shape, up shape) a rank-``rank`` LoRA on ``layer`` must have; None if unsupported."""
    if isinstance(layer, torch.nn.Linear):
        return (rank, layer.in_features), (layer.out_features, rank)
    if isinstance(layer, torch.nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return None


def check_lora_fits(unet, lora_state_dict: dict[str, torch.Tensor]) -> None:
    """Check that every LoRA weight names a Linear/Conv2d of ``unet`` with matching shapes
    and that the rank is consistent; ValueError listing the first few problems."""
    modules = dict(unet.named_modules())
    bad, ranks = [], set()
    for name, parts in lora_pairs(lora_state_dict).items():
        if set(parts) != {"down", "up"}:
            bad.append(f"{name}: only its {'/'.join(parts)} weight is present")
            continue
        layer = modules.get(name)
        layer = getattr(layer, "base_layer", layer)  # unwrap a LoRA layer already loaded there
        rank = int(parts["down"].shape[0])
        expected = None if layer is None else _expected_lora_shapes(layer, rank)
        found = (tuple(parts["down"].shape), tuple(parts["up"].shape))
        if layer is None:
            bad.append(f"{name}: no such module in the UNet")
        elif expected is None:
            bad.append(f"{name}: is a {type(layer).__name__}, not a Linear or Conv2d")
        elif found != expected:
            bad.append(f"{name}: expected down {expected[0]} / up {expected[1]}, found down {found[0]} / up {found[1]}")
        ranks.add(rank)
    if len(ranks) > 1:
        bad.append(f"ranks differ across modules: {sorted(ranks)}")
    if bad:
        raise ValueError(f"the LoRA does not fit this UNet ({len(bad)} problem(s); was it trained on another "
                         f"base model?): " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))


# --------------------------------------------------------------------------- files and vectors
def read_weights(path: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file (or its bytes) as {name: tensor}; a truncated or corrupted file and
    NaN/Inf values raise ValueError saying so (never a crash inside the reader)."""
    from safetensors import SafetensorError

    try:
        tensors = load_file(path) if data is None else load_safetensors_bytes(data)
    except (SafetensorError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a readable safetensors file: truncated or corrupted ({err}); "
                         "re-export the bundle or restore the file") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path} holds NaN or infinite values in {bad[:5]}; the training diverged or the file "
                         "is corrupted: use an earlier checkpoint or retrain")
    return tensors


def check_vectors(tokens: tuple[str, ...], embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One 1-D float32 vector per token, all the same width."""
    missing = [t for t in tokens if t not in embeddings]
    extra = [t for t in embeddings if t not in tokens]
    if missing or extra:
        raise ValueError(f"embeddings must hold exactly the tokens; missing {missing[:10]}, extra {extra[:10]}")
    vectors = {}
    for t in tokens:
        v = embeddings[t].detach().to("cpu", torch.float32)
        if v.dim() == 2 and v.shape[0] == 1:
            v = v[0]
        if v.dim() != 1:
            raise ValueError(f"embedding of {t} has shape {tuple(v.shape)}; one vector per token, shape (D,)")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"embedding of {t} holds NaN or infinite values; the training diverged or the "
                             "source file is corrupted")
        vectors[t] = v.contiguous()
    widths = {t: v.shape[0] for t, v in vectors.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(f"embeddings have different widths: {widths}")
    return vectors


def lora_file_metadata(weights: dict[str, torch.Tensor], lora: dict) -> dict[str, str]:
    """safetensors header diffusers reads to rebuild the LoraConfig (keeps alpha != rank exact)."""
    modules = sorted({k.removeprefix("unet.").split(".lora.")[0] for k in weights})
    config = {"unet.r": lora["rank"], "unet.lora_alpha": lora["alpha"], "unet.target_modules": modules}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
