"""The adapter bundle: a dataset's class tokens + UNet LoRA, in one folder.

Layout (see DESIGN.md)::

    <bundle>/adapter.json                        what the bundle is (below)
    <bundle>/pytorch_lora_weights.safetensors    UNet LoRA, diffusers keys (optional)
    <bundle>/embeddings/<token>.safetensors      {token: (D,) vector}, one per class

``adapter.json`` holds the format version, the base model, the classes in
label order with one placeholder token each, the prompt template, training
settings and the sha256 of every weight file. Loading verifies all of it and
never unpickles anything; applying checks the bundle against the pipeline
before touching it, so a bad bundle leaves the pipeline as it was.

Prompt templates use two named fields: ``{word}`` (required: the class token,
or the class name for real-* strategies) and ``{superclass}`` (optional), e.g.
``"a photo of a {word} {superclass}"``. :func:`make_prompt` is the one function
that fills them in.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save

from .config import STRATEGIES
from .models import load_weights_only, model_identity, normalise_model_id
from .records import atomic_path, sha256_file

FORMAT_VERSION = 1
DEFAULT_TEMPLATE = "a photo of a {word} {superclass}"  # the paper's prompt
ADAPTER_JSON = "adapter.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_DIR = "embeddings"

_REQUIRED_KEYS = ("format_version", "base_model", "classes", "tokens", "superclass", "template",
                  "resolution", "lora", "training", "steps", "files")
_OPTIONAL_KEYS = ("reference_classifier", "recommended_strength", "examples", "profile", "clip")
_TEMPLATE_FIELDS = {"word", "superclass"}
MAX_RESOLUTION = 2048   # a bundle's training resolution: SD 1.x/2.x train at 512/768 (a 10^6 px side is an attack)


# --------------------------------------------------------------------------- prompts
MAX_TEMPLATE_CHARS = 1000   # a prompt template longer than this is not a prompt


def check_template(template: str) -> None:
    """Raise ValueError unless ``template`` uses ``{word}`` and optionally ``{superclass}``,
    each plain: no format spec (``{word:>99999}``), conversion (``{word!r}``), attribute or
    index (``{word.__class__}``, ``{word[0]}``) -- a bundle's template is untrusted text."""
    if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"prompt template must be a string of at most {MAX_TEMPLATE_CHARS} characters")
    try:
        parts = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"prompt template {template[:100]!r} is malformed ({err}); "
                         "write it like 'a photo of a {word} {superclass}'") from None
    names = [f for f, _, _ in parts]
    bad = [n for n in names if n not in _TEMPLATE_FIELDS] + [f"{f}:{spec}" for f, spec, _ in parts if spec] \
        + [f"{f}!{conv}" for f, _, conv in parts if conv]
    if bad or "word" not in names:
        raise ValueError(f"prompt template {template[:100]!r} must contain {{word}} and may contain "
                         f"{{superclass}}, plain, nothing else in braces (found {(bad or names)[:5]})")


def make_prompt(word: str, superclass: str = "", template: str = DEFAULT_TEMPLATE) -> str:
    """Fill a prompt template; runs of whitespace (e.g. from an empty superclass) collapse.

    >>> make_prompt("<class_0>", "bird")
    'a photo of a <class_0> bird'
    >>> make_prompt("sparrow")
    'a photo of a sparrow'
    """
    check_template(template)
    return " ".join(template.format(word=word, superclass=superclass).split())


# --------------------------------------------------------------------------- the bundle
@dataclass(frozen=True)
class Bundle:
    """A loaded (verified) adapter bundle; build it with :func:`load_bundle`."""

    path: Path                      # the bundle folder
    classes: tuple[str, ...]        # class names in label order
    tokens: tuple[str, ...]         # placeholder token per class, same order
    superclass: str                 # e.g. "bird"; may be ""
    template: str                   # prompt template with {word} and {superclass}
    base_model: str                 # Hub id or resolved local path it was trained on
    base_revision: str | None       # Hub revision, None when unknown / a folder
    resolution: int                 # training resolution in pixels
    meta: dict = field(hash=False, repr=False)  # the whole adapter.json
    adapter_sha256: str = field(default="", repr=False)  # sha256 of adapter.json as loaded

    @property
    def hash(self) -> str:
        """sha256 (hex) of adapter.json's bytes: identifies the bundle in records."""
        return self.adapter_sha256 or _sha256_bytes((self.path / ADAPTER_JSON).read_bytes())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def lora_file(self) -> Path | None:
        """The LoRA weights file, or None for an embeddings-only bundle."""
        return self.path / LORA_FILE if LORA_FILE in self.meta.get("files", {}) else None

    def embedding_file(self, token: str) -> Path:
        """Where the embedding of ``token`` lives."""
        return self.path / embedding_relpath(token)

    def class_index(self, name: str) -> int:
        """Label index of a class name; ValueError listing the known classes."""
        try:
            return self.classes.index(name)
        except ValueError:
            shown = ", ".join(repr(c) for c in self.classes[:20])
            more = f" (+{len(self.classes) - 20} more)" if len(self.classes) > 20 else ""
            raise ValueError(f"unknown class {name!r} for bundle {self.path}; known classes: {shown}{more}") from None

    def prompt(self, class_name: str, use_token: bool = True) -> str:
        """The class's prompt: with its token (diff-*, ti-*) or its plain name (real-*)."""
        i = self.class_index(class_name)
        return make_prompt(self.tokens[i] if use_token else class_name, self.superclass, self.template)


def embedding_relpath(token: str) -> str:
    """``<class_0>`` -> ``embeddings/class_0.safetensors`` (filename-safe)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", token.strip("<>")).strip("._") or "token"
    return f"{EMBEDDINGS_DIR}/{stem}.safetensors"


# --------------------------------------------------------------------------- LoRA keys
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


def _lora_pairs(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
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


def _to_bundle_lora(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Convert any accepted key format to the bundle's (``unet.<module>.lora.down.weight``)
    and return it with its (single) rank; ValueError on half pairs or mixed ranks."""
    out, ranks = {}, set()
    for module, parts in _lora_pairs(state_dict).items():
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
    for name, parts in _lora_pairs(lora_state_dict).items():
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


# --------------------------------------------------------------------------- files
def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_weights(path: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
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


def _write_atomic(path: Path, data: bytes) -> None:
    """Write bytes via a temp name in the same folder + rename (no half-written files)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _safe_relpath(rel: str, what: str) -> str:
    """A relative POSIX path that stays inside the bundle, else ValueError."""
    if not isinstance(rel, str) or not rel or PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts \
            or "\\" in rel or "\x00" in rel:
        raise ValueError(f"{what} {rel!r} must be a relative path inside the bundle (no '..', not absolute)")
    return rel


def bundle_path(folder: Path, rel: str, what: str) -> Path:
    """``folder / rel`` for a path a bundle names, checked to stay inside the bundle once
    symlinks are resolved (a link to ``/etc`` or to another bundle is refused)."""
    path = folder / _safe_relpath(rel, what)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{what} {rel!r} leaves the bundle {folder} through a symlink; a bundle's files "
                         "must be inside its folder")
    return path


# --------------------------------------------------------------------------- save
def _check_names(classes, tokens) -> tuple[tuple[str, ...], tuple[str, ...]]:
    classes, tokens = tuple(classes), tuple(tokens)
    if not classes:
        raise ValueError("a bundle needs at least one class")
    for kind, names in (("class name", classes), ("token", tokens)):
        if any(not isinstance(n, str) or not n.strip() for n in names):
            raise ValueError(f"every {kind} must be a non-empty string, got {list(names)}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{kind}s must be unique; repeated: {dupes}")
    if len(tokens) < len(classes):
        raise ValueError(f"class(es) without a token: {list(classes[len(tokens):])[:10]}; give one token per class")
    if len(tokens) > len(classes):
        raise ValueError(f"{len(tokens)} tokens for {len(classes)} classes; give one token per class")
    spaced = [t for t in tokens if len(t.split()) != 1 or t != t.strip()]
    if spaced:
        raise ValueError(f"tokens must not contain whitespace: {spaced}")
    files = [embedding_relpath(t).lower() for t in tokens]  # case-insensitive file systems
    if len(set(files)) != len(files):
        raise ValueError(f"tokens {list(tokens)} map to clashing embedding file names; make them differ in letters/digits")
    return classes, tokens


def _check_vectors(tokens: tuple[str, ...], embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def save_bundle(
    out_dir: str | os.PathLike,
    *,
    classes,
    tokens,
    embeddings: dict[str, torch.Tensor],
    lora_state_dict: dict[str, torch.Tensor] | None,
    base_model: str,
    base_revision: str | None = None,
    superclass: str = "",
    template: str = DEFAULT_TEMPLATE,
    resolution: int = 512,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    training: dict | None = None,
    steps: int = 0,
    extra: dict | None = None,
) -> Bundle:
    """Write a bundle (weights first, adapter.json last, each via temp name + rename).

    Args:
        classes / tokens: class names in label order and one placeholder token each.
        embeddings: {token: (D,) vector}.
        lora_state_dict: UNet LoRA in peft, diffusers or old attention-processor keys
            (see :func:`lora_state_dict_from_unet`), or None for an embeddings-only bundle.
        base_model / base_revision: what it was trained on (local folders are stored resolved;
            a path starting with './' or '../' is kept relative to the bundle folder).
        lora_rank / lora_alpha: default: the rank read from the shapes, alpha = rank (scale 1).
        extra: optional keys: reference_classifier, recommended_strength, examples, profile, clip.
    """
    classes, tokens = _check_names(classes, tokens)
    check_template(template)
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(_OPTIONAL_KEYS))
    if unknown:
        raise ValueError(f"unknown extra key(s) {unknown}; allowed: {list(_OPTIONAL_KEYS)}")
    out = Path(out_dir)
    # 1. everything in memory first, so a bad argument writes nothing
    payloads, lora = _weight_payloads(_check_vectors(tokens, embeddings), lora_state_dict, lora_rank, lora_alpha)
    files = {rel: _sha256_bytes(data) for rel, data in payloads.items()}
    if extra.get("reference_classifier"):
        rel = _safe_relpath(extra["reference_classifier"], "reference_classifier")
        if not (out / rel).is_file():
            raise FileNotFoundError(f"reference classifier {out / rel} does not exist; copy it into the bundle first")
        files[rel] = sha256_file(out / rel)
    meta = {
        "format_version": FORMAT_VERSION,
        "base_model": {"model": _stored_base(base_model), "revision": base_revision},
        "classes": list(classes), "tokens": list(tokens), "superclass": superclass, "template": template,
        "resolution": int(resolution), "lora": lora, "training": dict(training or {}), "steps": int(steps),
        "files": files, **extra,
    }
    try:
        text = json.dumps(meta, indent=2, ensure_ascii=False, default=_json_path) + "\n"
    except TypeError as err:
        raise ValueError(f"training / extra settings must be JSON-serialisable ({err})") from None
    # 2. weights, then adapter.json: a reader never sees an adapter.json without its files
    for rel, data in payloads.items():
        _write_atomic(out / rel, data)
    _write_atomic(out / ADAPTER_JSON, text.encode("utf-8"))
    if lora is None and (out / LORA_FILE).exists():  # a stale LoRA from an earlier save
        (out / LORA_FILE).unlink()
    return load_bundle(out)


def _stored_base(base_model: str | os.PathLike) -> str:
    """How adapter.json records the base model: a path written relative to the bundle
    ('../base', './base') stays relative so a shipped bundle and its base can move together;
    any other local folder is stored resolved; a Hub id as written."""
    text = os.fspath(base_model)
    return text if text.startswith(("./", "../")) else normalise_model_id(text)


def _resolve_base(folder: Path, model: str) -> str:
    """The base model a loaded bundle names: bundle-relative paths resolved against its folder."""
    return str((folder / model).resolve()) if model.startswith(("./", "../")) else model


def _json_path(obj):
    """json.dumps default: paths become strings; anything else is an error."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} {obj!r} is not JSON-serialisable")


def _weight_payloads(vectors: dict[str, torch.Tensor], lora_state_dict: dict | None, lora_rank: int | None,
                     lora_alpha: float | None) -> tuple[dict[str, bytes], dict | None]:
    """Serialised weight files {relpath: safetensors bytes} and the adapter.json 'lora' entry."""
    payloads, lora = {}, None
    if lora_state_dict:
        weights, rank = _to_bundle_lora(lora_state_dict)
        if lora_rank is not None and lora_rank != rank:
            raise ValueError(f"lora_rank={lora_rank} but the LoRA weights have rank {rank}")
        lora = {"rank": rank, "alpha": float(lora_alpha if lora_alpha is not None else rank)}
        payloads[LORA_FILE] = save(weights, _lora_file_metadata(weights, lora))
    for token, vector in vectors.items():
        payloads[embedding_relpath(token)] = save({token: vector}, {"format": "pt"})
    return payloads, lora


def _lora_file_metadata(weights: dict[str, torch.Tensor], lora: dict) -> dict[str, str]:
    """safetensors header diffusers reads to rebuild the LoraConfig (keeps alpha != rank exact)."""
    modules = sorted({k.removeprefix("unet.").split(".lora.")[0] for k in weights})
    config = {"unet.r": lora["rank"], "unet.lora_alpha": lora["alpha"], "unet.target_modules": modules}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}


# --------------------------------------------------------------------------- load
def _read_meta(folder: Path) -> tuple[dict, str]:
    """Parse adapter.json strictly; returns (meta, sha256 of its bytes)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter bundle folder {folder} does not exist")
    file = folder / ADAPTER_JSON
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no {ADAPTER_JSON}: not an adapter bundle")
    data = file.read_bytes()
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not JSON ({err}); it must be the adapter.json written by save_bundle") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} must hold a JSON object, not {type(meta).__name__}")
    unknown = sorted(set(meta) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
        raise ValueError(f"{file} has unknown key(s) {unknown}; allowed: {list(_REQUIRED_KEYS + _OPTIONAL_KEYS)}")
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{file} lacks required key(s) {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {meta['format_version']!r} is not supported; "
                         f"this diffmix reads {FORMAT_VERSION}")
    return meta, _sha256_bytes(data)


def _check_fields(meta: dict, file: Path) -> None:
    """Types and ranges of the scalar fields."""
    base = meta["base_model"]
    if not (isinstance(base, dict) and set(base) == {"model", "revision"} and isinstance(base["model"], str)
            and (base["revision"] is None or isinstance(base["revision"], str))):
        raise ValueError(f"{file}: base_model must be {{'model': str, 'revision': str or null}}, got {base!r}")
    for key, kind in (("classes", list), ("tokens", list), ("superclass", str), ("template", str),
                      ("training", dict), ("files", dict)):
        if not isinstance(meta[key], kind):
            raise ValueError(f"{file}: {key} must be a {kind.__name__}, got {type(meta[key]).__name__}")
    for key, low, high in (("resolution", 8, MAX_RESOLUTION), ("steps", 0, 10**9)):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or not low <= meta[key] <= high:
            raise ValueError(f"{file}: {key} must be an integer from {low} to {high:,}, got {meta[key]!r}")
    if meta["resolution"] % 8:
        raise ValueError(f"{file}: resolution must be a multiple of 8, got {meta['resolution']}")
    lora = meta["lora"]
    if lora is not None and not (isinstance(lora, dict) and set(lora) == {"rank", "alpha"}
                                 and isinstance(lora["rank"], int) and 0 < lora["rank"] <= 4096
                                 and _finite(lora["alpha"])):
        raise ValueError(f"{file}: lora must be null or {{'rank': int > 0, 'alpha': number}}, got {lora!r}")
    if (lora is None) == (LORA_FILE in meta["files"]):
        raise ValueError(f"{file}: lora settings and the listed files disagree about {LORA_FILE}")
    s = meta.get("recommended_strength")
    if s is not None and not (_finite(s) and 0 <= s <= 1):
        raise ValueError(f"{file}: recommended_strength must be null or in [0, 1], got {s!r}")
    if meta.get("profile") is not None:
        check_profile(meta["profile"], file)
    for key in ("reference_classifier", "examples", "clip"):   # clip: an open_clip folder (the demo CLIP)
        if meta.get(key) is not None:
            try:
                bundle_path(file.parent, meta[key], key)
            except ValueError as err:
                raise ValueError(f"{file}: {err}") from None
    clip = meta.get("clip")
    if clip is not None and not any(rel.startswith(clip.rstrip("/") + "/") for rel in meta["files"]):
        raise ValueError(f"{file}: clip {clip!r} has no file listed in files (their sha256 is what makes it part "
                         "of the bundle); attach it with demo.clip.attach_clip")
    if meta.get("reference_classifier") is not None and meta["reference_classifier"] not in meta["files"]:
        raise ValueError(f"{file}: reference_classifier {meta['reference_classifier']!r} is not listed in files "
                         "(its sha256 is what makes it part of the bundle); attach it with diffmix train-reference")
    try:
        check_template(meta["template"])
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None


def _finite(value: object) -> bool:
    """A JSON number that is finite (json.loads accepts NaN and Infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Profile keys a bundle may set, with the range each must be in (the app and `diffmix synthesize`
# start from them); other profile keys are kept as written.
_PROFILE_RANGES = {"strength": (0.0, 1.0), "num_inference_steps": (1, 1000), "guidance_scale": (0.0, 100.0)}


def check_profile(profile: object, file: str | os.PathLike) -> None:
    """A profile's numbers are finite and in range, its thresholds numbers or null (ValueError
    naming ``file`` otherwise): a bundle's own profile and a saved overlay alike."""
    if not isinstance(profile, dict):
        raise ValueError(f"{file}: profile must be null or an object")
    for key, (low, high) in _PROFILE_RANGES.items():
        v = profile.get(key)
        if v is not None and not (_finite(v) and low <= v <= high):
            raise ValueError(f"{file}: profile {key} must be a number from {low} to {high}, got {v!r}")
    if profile.get("num_inference_steps") is not None and not isinstance(profile["num_inference_steps"], int):
        raise ValueError(f"{file}: profile num_inference_steps must be an integer")
    if profile.get("strategy") is not None and profile["strategy"] not in STRATEGIES:
        raise ValueError(f"{file}: profile strategy {profile['strategy']!r} is not one of {list(STRATEGIES)}")
    thresholds = profile.get("thresholds")
    if thresholds is not None and not (isinstance(thresholds, dict) and len(thresholds) <= 64 and all(
            isinstance(k, str) and (v is None or _finite(v)) for k, v in thresholds.items())):
        raise ValueError(f"{file}: profile thresholds must map names to finite numbers or null")


def _verify_files(folder: Path, files: dict) -> None:
    """Every listed file exists inside the bundle and has the recorded sha256."""
    for rel, expected in files.items():
        path = bundle_path(folder, rel, "listed file")
        if not path.is_file():
            raise FileNotFoundError(f"bundle file {path} listed in {ADAPTER_JSON} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(f"bundle file {path} was changed or corrupted: sha256 expected {expected}, "
                             f"actual {actual}. Re-export the bundle or restore the file.")


def _check_embedding_files(folder: Path, tokens: tuple[str, ...], files: dict) -> None:
    """Each token has a listed embedding file holding exactly that token, one vector, same widths."""
    widths = {}
    for token in tokens:
        rel = embedding_relpath(token)
        if rel not in files:
            raise ValueError(f"token {token} has no embedding: {rel} is not listed in {ADAPTER_JSON}")
        tensors = _read_weights(folder / rel)
        if list(tensors) != [token]:
            raise ValueError(f"{folder / rel} must hold exactly the token {token!r}, holds {list(tensors)[:5]}")
        if tensors[token].dim() != 1:
            raise ValueError(f"{folder / rel}: embedding of {token} has shape {tuple(tensors[token].shape)}, expected (D,)")
        widths[token] = tensors[token].shape[0]
    if len(set(widths.values())) > 1:
        raise ValueError(f"bundle {folder}: embeddings have different widths {widths}")


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Load and verify a bundle folder (or its adapter.json), or a Hub repo id ``owner/name``
    that is not a local path (fetched through the Hub cache by ``hub.pull_bundle``, then
    verified the same way). Never unpickles.

    Raises:
        FileNotFoundError: the folder, adapter.json or a listed file is missing.
        ValueError: anything else wrong (JSON, keys, tokens, embeddings, LoRA, sha256).
    """
    folder = Path(path)
    if not folder.exists():
        from .hub import HUB_REPO_ID, pull_bundle

        if HUB_REPO_ID.match(str(path)):
            return pull_bundle(str(path))
    if folder.name == ADAPTER_JSON and folder.is_file():
        folder = folder.parent
    meta, digest = _read_meta(folder)
    file = folder / ADAPTER_JSON
    _check_fields(meta, file)
    try:
        classes, tokens = _check_names(meta["classes"], meta["tokens"])
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    _verify_files(folder, meta["files"])
    _check_embedding_files(folder, tokens, meta["files"])
    if meta["lora"] is not None:
        _, rank = _to_bundle_lora(_read_weights(folder / LORA_FILE))
        if rank != meta["lora"]["rank"]:
            raise ValueError(f"{file}: lora.rank is {meta['lora']['rank']} but {LORA_FILE} has rank {rank}")
    return Bundle(path=folder.resolve(), classes=classes, tokens=tokens, superclass=meta["superclass"],
                  template=meta["template"], base_model=_resolve_base(folder, meta["base_model"]["model"]),
                  base_revision=meta["base_model"]["revision"], resolution=meta["resolution"], meta=meta,
                  adapter_sha256=digest)


# --------------------------------------------------------------------------- apply
def check_base(pipe, bundle: Bundle, allow_mismatch: bool = False) -> None:
    """ValueError unless ``pipe`` is the base model the bundle was trained on.

    Local folders compare by resolved path; revisions compare only when both are known.
    With ``allow_mismatch`` a mismatch only warns.
    """
    have = model_identity(pipe)
    have_model = normalise_model_id(have.get("model") or "")
    want_model = normalise_model_id(bundle.base_model)
    revs = (have.get("revision"), bundle.base_revision)
    same = have_model == want_model and (None in revs or revs[0] == revs[1])
    if same:
        return
    msg = (f"bundle {bundle.path} was trained on {want_model or '<unknown>'}"
           f"{'@' + revs[1] if revs[1] else ''} but the pipeline is {have_model or '<built in memory>'}"
           f"{'@' + revs[0] if revs[0] else ''}")
    if allow_mismatch:
        warnings.warn(msg + "; applying anyway (allow_base_mismatch)", stacklevel=3)
        return
    raise ValueError(msg + ". Load that base model, or pass allow_base_mismatch=True "
                     "(CLI: --allow-base-mismatch) to apply it anyway.")


def _read_bundle_weights(bundle: Bundle) -> tuple[list[torch.Tensor], dict[str, torch.Tensor] | None]:
    """The embedding vectors (token order) and the LoRA state dict, re-verified against adapter.json."""
    files = bundle.meta["files"]

    def read(rel: str) -> dict[str, torch.Tensor]:
        data = (bundle.path / rel).read_bytes()
        if _sha256_bytes(data) != files[rel]:
            raise ValueError(f"bundle file {bundle.path / rel} changed since the bundle was loaded; load it again")
        return _read_weights(bundle.path / rel, data)

    vectors = [read(embedding_relpath(t))[t] for t in bundle.tokens]
    return vectors, (read(LORA_FILE) if bundle.lora_file else None)


def _check_fits(pipe, bundle: Bundle, vectors: list[torch.Tensor], lora: dict | None) -> None:
    """Everything apply_bundle needs to hold, checked before the pipeline is touched."""
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if vectors[0].shape[0] != width:
        raise ValueError(f"bundle {bundle.path}: embedding width {vectors[0].shape[0]} != the text encoder's "
                         f"hidden size {width}; the bundle was made for another base model")
    current = getattr(pipe, "diffmix_bundle", None)
    leaving = set(current.tokens) if current is not None else set()
    vocab = pipe.tokenizer.get_vocab()
    taken = [t for t in bundle.tokens if t in vocab and t not in leaving]
    if taken:
        raise ValueError(f"token(s) {taken[:5]} are already in the tokenizer's vocabulary; unload the adapter "
                         "that added them or rename the bundle's tokens")
    if lora is not None:
        check_lora_fits(pipe.unet, lora)


def apply_bundle(pipe, bundle: Bundle, *, allow_base_mismatch: bool = False, adapter_name: str = "diffmix") -> None:
    """Load the bundle's class tokens and UNet LoRA into ``pipe``.

    All checks (base model, embedding width, free tokens, LoRA shapes) run first, so
    a bundle that fails them leaves the pipeline unchanged. Applying the bundle that is
    already applied does nothing; applying another first unloads the current one.
    The applied bundle is recorded as ``pipe.diffmix_bundle`` (None when none is).
    """
    if getattr(pipe, "diffmix_bundle", None) == bundle and getattr(pipe, "diffmix_adapter_name", None) == adapter_name:
        return
    check_base(pipe, bundle, allow_mismatch=allow_base_mismatch)
    vectors, lora = _read_bundle_weights(bundle)
    _check_fits(pipe, bundle, vectors, lora)
    unload_bundle(pipe)
    had_lora = any(pipe.get_list_adapters().values())
    pipe.load_textual_inversion(vectors, token=list(bundle.tokens))
    if lora is not None:
        try:
            pipe.load_lora_weights(str(bundle.path), weight_name=LORA_FILE, adapter_name=adapter_name)
        except Exception:  # past the checks this is unexpected; leave the base, not half a bundle
            pipe.unload_textual_inversion(list(bundle.tokens))
            if not had_lora:
                pipe.unload_lora_weights()
            raise
    pipe.diffmix_bundle = bundle
    pipe.diffmix_adapter_name = adapter_name


def unload_bundle(pipe) -> None:
    """Remove the applied bundle's tokens and LoRA; the base model is restored exactly."""
    bundle = getattr(pipe, "diffmix_bundle", None)
    if bundle is None:
        return
    pipe.unload_textual_inversion(list(bundle.tokens))
    if bundle.lora_file is not None:
        pipe.unload_lora_weights()
    pipe.diffmix_bundle = None
    pipe.diffmix_adapter_name = None


def set_lora_enabled(pipe, enabled: bool) -> None:
    """Switch the UNet LoRA on or off without unloading it (ti-* strategies use the
    tokens alone). A no-op when no LoRA is loaded."""
    if enabled:
        pipe.unet.enable_lora()
    else:
        pipe.unet.disable_lora()


# --------------------------------------------------------------------------- importer
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
    return _read_weights(path)


def import_diffmix(
    embeddings_file: str | os.PathLike,
    lora: str | os.PathLike | None,
    *,
    base_model: str,
    superclass: str,
    out_dir: str | os.PathLike,
    base_revision: str | None = None,
    resolution: int = 512,
) -> Bundle:
    """Convert the authors' checkpoint (REFERENCE.md §1) into a bundle.

    Args:
        embeddings_file: ``learned_embeds-steps-last.bin`` (read with weights_only=True).
        lora: their ``pytorch_lora_weights.safetensors`` or the folder holding it; None
            for embeddings only. Old attention-processor, diffusers and peft keys are accepted.
        base_model / base_revision: the SD model they trained on.
        superclass: e.g. "bird"; the prompt template is the paper's.
        out_dir: where to write the bundle.
    """
    path = Path(embeddings_file)
    classes, tokens, vectors = _parse_authors_embeddings(_load_plain_torch(path), path)
    lora_sd, rank = None, None
    if lora is not None:
        lora_sd, rank = _to_bundle_lora(_read_lora_file(lora))
    return save_bundle(
        out_dir, classes=classes, tokens=tokens, embeddings=vectors, lora_state_dict=lora_sd,
        base_model=base_model, base_revision=base_revision, superclass=superclass, resolution=resolution,
        lora_rank=rank, lora_alpha=rank,  # scale 1, as in the paper
        training={"imported_from": {"embeddings": str(path), "lora": None if lora is None else str(lora)}},
    )
