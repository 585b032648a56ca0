"""The adapter bundle: a dataset's class tokens + UNet LoRA in one folder, and
everything about it short of putting it on a pipeline (apply.py does that).

Layout (see docs/formats.md)::

    <bundle>/adapter.json                        what the bundle is (below)
    <bundle>/pytorch_lora_weights.safetensors    UNet LoRA, diffusers keys (optional)
    <bundle>/embeddings/<token>.safetensors      {token: (D,) vector}, one per class
    <bundle>/reference/                          its reference classifier (optional)
    <bundle>/examples/<class>/*.png              example source images (optional)

``adapter.json`` holds the format version, the base model, the classes in
label order with one placeholder token each, the prompt template, training
settings and the sha256 of every weight file. Loading verifies all of it and
never unpickles anything.

1. prompts: :func:`make_prompt` is the one function that fills a template;
2. :class:`Bundle`, what :func:`load_bundle` returns;
3. :func:`save_bundle` writes one (weights first, adapter.json last, atomically);
4. :func:`load_bundle` reads and verifies one folder (a Hub repo id is opened one
   layer up, by ``hub.open_bundle``);
5. :func:`update_bundle_meta` changes one in place, verified before and after
   (``reference.attach_reference`` adds a reference classifier through it);
6. :func:`find_bundles`, :func:`bundle_examples`: where bundles are and what they ship.

Prompt templates use two named fields: ``{word}`` (required: the class token,
or the class name for real-* strategies) and ``{superclass}`` (optional), e.g.
``"a photo of a {word} {superclass}"``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import save

from .config import DEFAULT_START_STRENGTH, PROFILE_SETTINGS, STRATEGIES, Thresholds
from .data import read_dataset
from .models import normalise_model_id
from .records import atomic_path, contained_file, sha256_file, write_text_atomic
from .weights import check_vectors, lora_file_metadata, read_weights, to_bundle_lora

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


# --------------------------------------------------------------------------- 1. prompts
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


# --------------------------------------------------------------------------- 2. the bundle
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
    def profile(self) -> Profile:
        """The bundle's own profile (profiles.load_profile lays a user's saved overlay over it)."""
        own = self.meta.get("profile")
        return Profile.from_dict(own, self.path / ADAPTER_JSON, "bundle profile" if own else "")

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

    def weights(self) -> tuple[list[torch.Tensor], dict[str, torch.Tensor] | None]:
        """The embedding vectors (token order) and the LoRA state dict (None without one),
        re-verified against the sha256 in adapter.json."""
        files = self.meta["files"]

        def read(rel: str) -> dict[str, torch.Tensor]:
            data = (self.path / rel).read_bytes()
            if _sha256_bytes(data) != files[rel]:
                raise ValueError(f"bundle file {self.path / rel} changed since the bundle was loaded; load it again")
            return read_weights(self.path / rel, data)

        vectors = [read(embedding_relpath(t))[t] for t in self.tokens]
        return vectors, (read(LORA_FILE) if self.lora_file else None)


@dataclass(frozen=True)
class Profile:
    """A dataset's chosen settings: adapter.json's ``profile``, or a user's saved overlay
    (profiles.py). The app's controls and `diffmix translate / synthesize` start from it.
    Read with :meth:`from_dict` (checked like adapter.json), written with :meth:`to_dict`."""

    strength: float | None = None            # s the app's slider and --strength start from
    thresholds: Thresholds = Thresholds()    # score tests: the app's auto-select, synthesize's filter
    strategy: str | None = None              # a config.STRATEGIES name
    num_inference_steps: int | None = None   # sampler steps N
    guidance_scale: float | None = None      # classifier-free guidance
    calibration: dict | None = None          # summary of the calibration the strength came from (calibrate.py)
    extra: dict = field(default_factory=dict, compare=False)  # other keys, kept as written (bundle, saved...)
    source: str = ""                         # "saved profile", "bundle profile" or "" (not written)

    @classmethod
    def from_dict(cls, data: dict | None, file: str | os.PathLike = "profile", source: str = "") -> Profile:
        """From the JSON object; ValueError naming ``file`` for a value out of range."""
        data = dict(data or {})
        check_profile(data, file)
        try:
            thresholds = Thresholds.from_dict(data.pop("thresholds", None))
        except ValueError as err:
            raise ValueError(f"{file}: profile {err}") from None
        settings = {k: data.pop(k) for k in PROFILE_SETTINGS if k in data}
        return cls(thresholds=thresholds, calibration=data.pop("calibration", None), extra=data, source=source,
                   **settings)

    def to_dict(self) -> dict:
        """The JSON object: strength, thresholds (the tests that are on), sampler settings, the
        calibration summary (when there is one), extra."""
        out = {} if self.strength is None else {"strength": self.strength}
        out["thresholds"] = self.thresholds.as_dict()
        out.update({k: v for k, v in self.settings().items() if k != "strength"})
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return {**out, **self.extra}

    def strength_source(self) -> str:
        """Where the strength came from, in one line for the bundle panel: a calibration (its date,
        sources x targets x strengths x seeds, the recommendation's interval), else the profile."""
        if self.strength is None:
            return "no strength in the profile"
        where = {"saved profile": "your saved profile", "bundle profile": "the bundle's profile"}.get(
            self.source, "the profile")
        cal = self.calibration
        if not cal:
            return f"strength {self.strength} from {where}"
        low, high = (cal.get("interval") or [None, None])[:2]
        span = f", {cal.get('confidence', 0.95):.0%} interval {low}-{high}" if None not in (low, high) else ""
        return (f"strength {self.strength} from a calibration on {cal.get('date', '?')} ({where}): "
                f"{cal.get('sources', '?')} sources of {len(cal.get('classes') or [])} classes x "
                f"{cal.get('targets_per_source', '?')} targets x {len(cal.get('strengths') or [])} strengths x "
                f"{len(cal.get('seeds') or [])} seed(s) = {cal.get('images', '?')} images{span}")

    def settings(self) -> dict:
        """{name: value} of the PROFILE_SETTINGS that are set (the options they start)."""
        return {k: getattr(self, k) for k in PROFILE_SETTINGS if getattr(self, k) is not None}

    def start_strength(self, bundle: Bundle | None = None) -> float:
        """The one rule for the strength the app's slider, `diffmix translate` (no --strength)
        and the Hub's diffusers snippet start from: this profile's strength; else the bundle's
        ``recommended_strength`` (`diffmix score --set-recommended`); else 0.5."""
        if self.strength is not None:
            return float(self.strength)
        recommended = bundle.meta.get("recommended_strength") if bundle is not None else None
        return float(recommended) if recommended is not None else DEFAULT_START_STRENGTH


def embedding_relpath(token: str) -> str:
    """``<class_0>`` -> ``embeddings/class_0.safetensors`` (filename-safe)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", token.strip("<>")).strip("._") or "token"
    return f"{EMBEDDINGS_DIR}/{stem}.safetensors"


# --------------------------------------------------------------------------- files
def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


# --------------------------------------------------------------------------- 3. save
MAX_CLASSES_ENV = "DIFFMIX_MAX_CLASSES"   # the most classes a bundle may have (default 10,000)
MAX_ADAPTER_BYTES = 64 * 2**20           # an adapter.json larger than this is refused before it is parsed


def max_classes() -> int:
    """The class cap: ``DIFFMIX_MAX_CLASSES`` (a positive integer) or 10,000."""
    text = os.environ.get(MAX_CLASSES_ENV, "").strip()
    if not text:
        return 10_000
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{MAX_CLASSES_ENV}={text!r} must be a positive integer")
    return int(text)


def _check_class_count(classes: object, tokens: object) -> None:
    """Refuse more classes or tokens than :func:`max_classes` before any other work on them."""
    cap = max_classes()
    for kind, names in (("classes", classes), ("tokens", tokens)):
        if isinstance(names, (list, tuple)) and len(names) > cap:
            raise ValueError(f"{len(names):,} {kind}: a bundle may have at most {cap:,} classes "
                             f"(set {MAX_CLASSES_ENV} to allow more)")


def _repeated(names: Sequence[str]) -> list[str]:
    """The names that occur more than once, sorted (one pass)."""
    seen, dupes = set(), set()
    for n in names:
        (dupes if n in seen else seen).add(n)
    return sorted(dupes)


def _check_names(classes, tokens) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Class names and tokens: capped in count, non-empty strings, unique, one token per class,
    no whitespace, distinct embedding file names. Linear in the number of classes."""
    _check_class_count(classes, tokens)
    classes, tokens = tuple(classes), tuple(tokens)
    if not classes:
        raise ValueError("a bundle needs at least one class")
    for kind, names in (("class name", classes), ("token", tokens)):
        bad = [n for n in names if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"every {kind} must be a non-empty string, got {bad[:10]!r}")
        dupes = _repeated(names)
        if dupes:
            raise ValueError(f"{kind}s must be unique; repeated: {dupes[:20]}")
    if len(tokens) < len(classes):
        raise ValueError(f"class(es) without a token: {list(classes[len(tokens):])[:10]}; give one token per class")
    if len(tokens) > len(classes):
        raise ValueError(f"{len(tokens)} tokens for {len(classes)} classes; give one token per class")
    spaced = [t for t in tokens if len(t.split()) != 1 or t != t.strip()]
    if spaced:
        raise ValueError(f"tokens must not contain whitespace: {spaced[:20]}")
    clashing = _repeated([embedding_relpath(t).lower() for t in tokens])  # case-insensitive file systems
    if clashing:
        raise ValueError(f"tokens map to clashing embedding file names {clashing[:20]}; make them differ in "
                         "letters/digits")
    return classes, tokens


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
    payloads, lora = _weight_payloads(check_vectors(tokens, embeddings), lora_state_dict, lora_rank, lora_alpha)
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
        weights, rank = to_bundle_lora(lora_state_dict)
        if lora_rank is not None and lora_rank != rank:
            raise ValueError(f"lora_rank={lora_rank} but the LoRA weights have rank {rank}")
        lora = {"rank": rank, "alpha": float(lora_alpha if lora_alpha is not None else rank)}
        payloads[LORA_FILE] = save(weights, lora_file_metadata(weights, lora))
    for token, vector in vectors.items():
        payloads[embedding_relpath(token)] = save({token: vector}, {"format": "pt"})
    return payloads, lora


# --------------------------------------------------------------------------- 4. load
def _read_meta(folder: Path) -> tuple[dict, str]:
    """Parse adapter.json strictly; returns (meta, sha256 of its bytes)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter bundle folder {folder} does not exist")
    file = folder / ADAPTER_JSON
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no {ADAPTER_JSON}: not an adapter bundle")
    if file.stat().st_size > MAX_ADAPTER_BYTES:
        raise ValueError(f"{file} is {file.stat().st_size:,} bytes; an adapter.json may be at most "
                         f"{MAX_ADAPTER_BYTES:,} bytes")
    data = file.read_bytes()
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not JSON ({err}); it must be the adapter.json written by save_bundle") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} must hold a JSON object, not {type(meta).__name__}")
    try:
        _check_class_count(meta.get("classes"), meta.get("tokens"))   # before any other work on it
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
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
    calibration = profile.get("calibration")
    if calibration is not None and not (isinstance(calibration, dict) and len(json.dumps(calibration)) <= 2**20):
        raise ValueError(f"{file}: profile calibration must be null or an object (at most 1 MB as JSON)")
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
        tensors = read_weights(folder / rel)
        if list(tensors) != [token]:
            raise ValueError(f"{folder / rel} must hold exactly the token {token!r}, holds {list(tensors)[:5]}")
        if tensors[token].dim() != 1:
            raise ValueError(f"{folder / rel}: embedding of {token} has shape {tuple(tensors[token].shape)}, expected (D,)")
        widths[token] = tensors[token].shape[0]
    if len(set(widths.values())) > 1:
        raise ValueError(f"bundle {folder}: embeddings have different widths {widths}")


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Load and verify a bundle folder (or its adapter.json). Never unpickles. (A Hub repo id
    is resolved one layer up, by ``hub.open_bundle``.)

    Raises:
        FileNotFoundError: the folder, adapter.json or a listed file is missing.
        ValueError: anything else wrong (JSON, keys, tokens, embeddings, LoRA, sha256).
    """
    folder = Path(path)
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
        _, rank = to_bundle_lora(read_weights(folder / LORA_FILE))
        if rank != meta["lora"]["rank"]:
            raise ValueError(f"{file}: lora.rank is {meta['lora']['rank']} but {LORA_FILE} has rank {rank}")
    return Bundle(path=folder.resolve(), classes=classes, tokens=tokens, superclass=meta["superclass"],
                  template=meta["template"], base_model=_resolve_base(folder, meta["base_model"]["model"]),
                  base_revision=meta["base_model"]["revision"], resolution=meta["resolution"], meta=meta,
                  adapter_sha256=digest)


# --------------------------------------------------------------------------- 5. changes in place
def update_bundle_meta(bundle_dir: str | os.PathLike, *, add_files: tuple[str, ...] = (), **fields) -> Bundle:
    """Rewrite a bundle's adapter.json atomically with ``fields`` set (optional keys such as
    ``reference_classifier`` or ``recommended_strength``) and the sha256 of ``add_files``
    (paths relative to the bundle) added to ``files``. The bundle is verified before and
    after; if the result does not load, the old adapter.json is put back. Returns the Bundle."""
    bundle = load_bundle(bundle_dir)
    file = bundle.path / ADAPTER_JSON
    old = file.read_bytes()
    meta = json.loads(old)
    meta.update(fields)
    meta["files"] = dict(meta["files"], **{rel: sha256_file(bundle.path / rel) for rel in add_files})
    write_text_atomic(file, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    try:
        return load_bundle(bundle.path)
    except (ValueError, FileNotFoundError):
        write_text_atomic(file, old.decode("utf-8"))
        raise


# --------------------------------------------------------------------------- 6. finding bundles
BUNDLES_ENV = "DIFFMIX_BUNDLES"   # os.pathsep-separated folders searched for bundles


def bundle_roots(shipped: Sequence[Path] = ()) -> list[Path]:
    """The ``DIFFMIX_BUNDLES`` folders first, then ``shipped`` (the app's: the demo world)."""
    env = os.environ.get(BUNDLES_ENV)
    return ([Path(p) for p in env.split(os.pathsep) if p] if env else []) + list(shipped)


def find_bundles(roots: Sequence[Path], broken: dict[str, str] | None = None) -> dict[str, str]:
    """{label: folder} of every bundle that loads, each a root itself or a folder directly in
    one. A bundle that fails to load is left out (one broken bundle never hides the others)
    and, when ``broken`` is given, recorded there as {folder: reason}."""
    found: dict[str, str] = {}
    for root in roots:
        if root.is_dir():
            for meta in sorted(root.glob(ADAPTER_JSON)) + sorted(root.glob(f"*/{ADAPTER_JSON}")):
                try:
                    load_bundle(meta.parent)
                except (ValueError, OSError) as err:
                    if broken is not None:
                        broken[str(meta.parent)] = str(err)
                    continue
                found[f"{meta.parent.name} ({meta.parent.parent})"] = str(meta.parent)
    return found


def bundle_examples(bundle: Bundle) -> list[tuple[str, str]]:
    """(image path, class) of the bundle's example images (``examples`` folder, ImageFolder
    layout or a metadata.jsonl), in the bundle's label order; [] when it has none. Only regular
    files inside the bundle count: a symlink, or a metadata ``file_name`` that is absolute or
    goes up with '..', is skipped with a warning. Every consumer of examples reads them here."""
    rel = bundle.meta.get("examples")
    if not rel or not (bundle.path / rel).is_dir():
        return []
    try:
        data = read_dataset(bundle.path / rel, show_progress=False)   # warns of metadata names outside
    except ValueError:
        return []
    skipped, items = [], []
    for it in data.items:
        inside = Path(it.path).is_relative_to(bundle.path)
        try:
            if not inside:
                raise ValueError(f"example {it.id!r} is outside the bundle")
            contained_file(bundle.path, Path(it.path).relative_to(bundle.path).as_posix(), "example")
        except (ValueError, FileNotFoundError) as err:
            skipped.append(str(err))
            continue
        if it.class_name in bundle.classes:
            items.append(it)
    if skipped:
        warnings.warn(f"bundle {bundle.path.name}: {len(skipped)} example(s) skipped, examples must be regular "
                      f"files inside the bundle: {'; '.join(skipped[:3])}", stacklevel=2)
    items.sort(key=lambda it: (bundle.class_index(it.class_name), it.id))
    return [(str(it.path), it.class_name) for it in items]
