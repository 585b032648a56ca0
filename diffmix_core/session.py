"""What the app does, as plain functions (no ``gr.*``): bundles, sweeps, a per-session
store of generated images, curation, the per-dataset profile and export.

ui.py turns these into Gradio events; tests call them directly. A session is a
folder ``<sessions root>/<id>/`` holding the images it generated (PNG with
their records), ``records.jsonl`` and ``state.json`` (curated ids, last sweep).
The browser keeps a secret token; the folder is named by a one-way hash of it
(:func:`session_id`), so nothing a session shows or shares (image URLs, records,
exports) carries the token, and what it shows cannot open the session. Sessions
idle for ``DIFFMIX_SESSION_TTL_H`` hours expire; all sessions together, and all
exports, are kept under a size and an age bound (:class:`Limits`, :func:`prune`).
"""
from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import Bundle, Profile, bundle_examples, bundle_roots, find_bundles, load_bundle
from .config import THRESHOLD_TESTS, Thresholds, TranslateConfig, get_strategy
from .records import csv_cell, read_jsonl, safe_name, save_png, sha256_file, write_jsonl_atomic, write_text_atomic
from .profiles import load_profile, output_root
from .translate import Job, Result, Source, count_jobs, translate, validate_jobs

ALL_OTHER = "all other classes"            # target choice: one row block per other class (a matrix)
SESSIONS_ENV = "DIFFMIX_SESSIONS"          # per-session work folders (default: <tmp>/diffmix-sessions)
TABLE_COLUMNS = ("id", "source_id", "source", "target", "strength", "ran", "seed", "p_target", "p_source", "top1",
                 "clip_target", "clip_source", "distance", "ssim", "soft_label", "curated")


# --------------------------------------------------------------------------- settings
def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each from an environment variable."""

    max_jobs: int = 64          # DIFFMIX_MAX_JOBS: images per sweep
    max_curated: int = 1000     # DIFFMIX_MAX_CURATED: images in a curated batch
    max_upload_mb: int = 20     # DIFFMIX_MAX_UPLOAD_MB: size of an uploaded source image (checked by the HTTP layer)
    queue_size: int = 32        # DIFFMIX_QUEUE_SIZE: requests waiting for the model lane
    session_ttl_h: int = 24     # DIFFMIX_SESSION_TTL_H: idle hours before a session (and its uploads) expires
    sessions_max_mb: int = 2048  # DIFFMIX_SESSIONS_MAX_MB: all sessions together; the least recently used go first
    exports_ttl_h: int = 168    # DIFFMIX_EXPORTS_TTL_H: age in hours at which an app export is removed
    exports_max_mb: int = 4096  # DIFFMIX_EXPORTS_MAX_MB: all app exports together; the oldest go first

    @classmethod
    def from_env(cls) -> Limits:
        names = {"max_jobs": "DIFFMIX_MAX_JOBS", "max_curated": "DIFFMIX_MAX_CURATED",
                 "max_upload_mb": "DIFFMIX_MAX_UPLOAD_MB", "queue_size": "DIFFMIX_QUEUE_SIZE",
                 "session_ttl_h": "DIFFMIX_SESSION_TTL_H", "sessions_max_mb": "DIFFMIX_SESSIONS_MAX_MB",
                 "exports_ttl_h": "DIFFMIX_EXPORTS_TTL_H", "exports_max_mb": "DIFFMIX_EXPORTS_MAX_MB"}
        values = {k: env_int(env, getattr(cls, k)) for k, env in names.items()}
        bad = [names[k] for k, v in values.items() if v < 0]
        if bad:
            raise ValueError(f"environment variable(s) {', '.join(bad)} must be >= 0")
        return cls(**values)


def sessions_root() -> Path:
    return Path(os.environ.get(SESSIONS_ENV) or Path(tempfile.gettempdir()) / "diffmix-sessions").resolve()


# --------------------------------------------------------------------------- bundles
def app_bundles(broken: dict[str, str] | None = None) -> dict[str, str]:
    """{label: folder} of the bundles the app offers (bundle.find_bundles): DIFFMIX_BUNDLES'
    folders, then the shipped demo world and ``assets/bundles``; the offline placeholder when
    none loads. Bundles that fail to load are recorded in ``broken`` as {folder: reason}."""
    from .demo import placeholder_bundle
    from .paths import DEMO_ASSETS, SHIPPED_BUNDLES

    found = find_bundles(bundle_roots([DEMO_ASSETS, SHIPPED_BUNDLES]), broken)
    if not found:
        found["placeholder: tiny random pipeline"] = str(placeholder_bundle().path)
    return found


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def md_text(text: object) -> str:
    """Untrusted text (a class name, a bundle string) made inert in Markdown and HTML: HTML
    characters become entities and Markdown's markup characters are backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(str(text), quote=False)).replace("\n", " ")


def md_code(text: object) -> str:
    """Untrusted text shown as code (file names, ids): a code span, whose content Markdown shows
    literally (HTML included); text that could end the span is shown through :func:`md_text`."""
    text = str(text)
    if "`" in text or "\n" in text or "\r" in text or not text.strip():
        return f"<code>{md_text(text)}</code>"
    return f"`{text}`"


def bundle_status(bundle: Bundle, profile: Profile | None = None, examples: int | None = None) -> dict:
    """Plain facts for the bundle panel (``profile`` / ``examples``: when the caller has them already)."""
    from .demo import PLACEHOLDER_NOTE, is_placeholder

    ref = bundle.meta.get("reference_classifier")
    return {"classes": list(bundle.classes), "base_model": bundle.base_model, "revision": bundle.base_revision,
            "steps": bundle.meta.get("steps", 0), "resolution": bundle.resolution,
            "reference": ref, "recommended_strength": bundle.meta.get("recommended_strength"),
            "profile": load_profile(bundle) if profile is None else profile,
            "examples": len(bundle_examples(bundle)) if examples is None else examples,
            "note": PLACEHOLDER_NOTE if is_placeholder(bundle) else ""}


def bundle_markdown(bundle: Bundle, clip_status: str, reference_status: str, profile: Profile | None = None,
                    examples: int | None = None) -> str:
    st = bundle_status(bundle, profile, examples)
    names = ", ".join(md_text(c) for c in st["classes"][:30]) + (
        f" … (+{len(st['classes']) - 30})" if len(st["classes"]) > 30 else "")
    lines = [f"**{len(st['classes'])} classes**: {names}",
             f"base model {md_code(st['base_model'])}" + (f" @ {md_code(st['revision'])}" if st["revision"] else "")
             + f" · trained {st['steps']} steps at {st['resolution']} px",
             f"reference classifier: {reference_status}", clip_status]
    p = st["profile"]
    if p.strength is not None:   # one starting strength, with where it comes from
        lines.append(f"strength **{p.strength}** from the {md_text(p.source or 'profile')} · thresholds "
                     f"{p.thresholds.as_dict() or 'none'}")
    elif st["recommended_strength"] is not None:
        lines.append(f"strength **{st['recommended_strength']}** recommended by `diffmix score --set-recommended`")
    else:
        lines.append("no profile or recommended strength yet: run a sweep with scores")
    if st["note"]:
        lines.append(f"⚠️ {st['note']}")
    return "\n\n".join(lines)


# --------------------------------------------------------------------------- models (one cache per process)
_MODELS: dict[tuple, object] = {}
_MODEL_LOCK = threading.Lock()   # guards the cache
_ENGINE_LOCK = threading.Lock()  # one translate() at a time on the shared pipeline


def pipeline_for(bundle: Bundle):
    from .config import PipelineConfig
    from .apply import load_pipeline_for

    key = ("pipe", bundle.base_model, bundle.base_revision)
    with _MODEL_LOCK:
        if key not in _MODELS:   # shared by the bundles on this base: translate applies each per call
            _MODELS[key] = load_pipeline_for(PipelineConfig(), bundle, apply=False)
        return _MODELS[key]


def clip_scorer(bundle: Bundle | None = None, wait: bool = False):
    """The process-wide CLIP scorer for ``bundle`` (scoring.default_clip: DIFFMIX_CLIP_MODEL /
    _PRETRAINED when set, else the CLIP the bundle names, e.g. the demo world's, else ScoreConfig's).

    CLIP loads on a background thread: a first download (or, offline, a Hub look-up that
    has to time out) never holds up the page or a sweep. Until it is ready this returns an
    unavailable scorer whose status says so; ``wait=True`` blocks until it is loaded.
    An unavailable one says why (offline: no weights).
    """
    from .scoring import ClipScorer, default_clip, load_clip

    model, pretrained = default_clip(bundle)
    key = ("clip", model, pretrained)
    with _MODEL_LOCK:
        loader = _MODELS.get(("clip-thread", *key[1:]))
        if key not in _MODELS and loader is None:
            def load() -> None:
                offline = clip_offline_reason(model, pretrained)
                scorer = (ClipScorer(f"{model}/{pretrained}", reason=offline) if offline
                          else load_clip(model, pretrained))
                with _MODEL_LOCK:
                    _MODELS[key] = scorer

            loader = threading.Thread(target=load, name="clip-loader", daemon=True)
            _MODELS[("clip-thread", *key[1:])] = loader
            loader.start()
    if loader is not None:
        loader.join(None if wait else 2.0)   # quick answers (no model, a cached file) come back at once
    with _MODEL_LOCK:
        if key in _MODELS:
            return _MODELS[key]
    return ClipScorer(f"{model}/{pretrained}", reason=f"{model}/{pretrained} is still loading; scores of later "
                      "sweeps will include CLIP if its weights can be had")


OFFLINE = "no weights available offline"


def clip_offline_reason(model: str, pretrained: str, timeout: float = 1.5) -> str | None:
    """Why CLIP weights cannot be had here, found at once instead of through the Hub's retries:
    not in the local cache and either HF_HUB_OFFLINE is set or the Hub does not answer within
    ``timeout`` s. None when loading may work (a local file or folder, a cached copy, a reachable Hub)."""
    import socket

    if not model or model.lower() == "none" or model.startswith("local-dir:") or Path(pretrained or "").is_file():
        return None   # load_clip answers these at once
    repo = model[len("hf-hub:"):] if model.startswith("hf-hub:") else None
    if repo is None:
        try:
            import open_clip

            repo = (open_clip.get_pretrained_cfg(model, pretrained) or {}).get("hf_hub", "").strip("/") or None
        except Exception:   # an unknown architecture: load_clip says so
            return None
    if not repo:
        return None   # not a Hub download: load_clip answers at once
    from huggingface_hub.constants import HF_HUB_CACHE

    if (Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots").is_dir():
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return f"{OFFLINE} (HF_HUB_OFFLINE is set and {model}/{pretrained} is not in the local cache)"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return f"{OFFLINE} ({model}/{pretrained} is not in the local cache and the Hugging Face Hub cannot be reached)"
    return None


def clip_line(scorer) -> str:
    """One short line for the page, the full reason folded under it."""
    if scorer.available:
        return f"CLIP on ({scorer.name})"
    reason = scorer.reason or ""
    short = ("CLIP off: " + OFFLINE if reason.startswith(OFFLINE) else
             "CLIP loading…" if "still loading" in reason else
             "CLIP off: none chosen" if reason.startswith("no CLIP model given") else "CLIP off: could not load")
    return f"<details><summary>{short}</summary>{reason}</details>"


def reference_for(bundle: Bundle) -> tuple[object | None, str]:
    """(the bundle's reference classifier or None, a status line)."""
    from .reference import bundle_reference_path, load_reference

    path = bundle_reference_path(bundle)
    if path is None:
        return None, "no reference classifier attached (`diffmix train-reference --attach BUNDLE`)"
    key = ("ref", str(path), sha256_file(path / "model.safetensors") if path.is_dir() else str(path))
    with _MODEL_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_reference(path)
        clf = _MODELS[key]
    acc = clf.meta.get("val_accuracy")
    return clf, f"`{clf.model_name}`" + (f" (val. accuracy {acc:.3f})" if isinstance(acc, float) else "")


def generate(bundle: Bundle, jobs: list[Job], config: TranslateConfig,
             callback: Callable[[int, int], None] | None = None) -> list[Result]:
    """The engine on the cached pipeline (the model lane: ui.py runs one at a time);
    ``callback(steps done, total)`` after every UNet call."""
    pipe = pipeline_for(bundle)
    with _ENGINE_LOCK:
        return translate(pipe, jobs, config, bundle=bundle, show_progress=False, callback=callback)


# --------------------------------------------------------------------------- sweep settings
def parse_strengths(text: str, max_count: int | None = None) -> list[float]:
    """'0.3, 0.5 0.7' (a list) or '0.1:0.9:5' (from:to:count, evenly spaced) -> strengths; a
    count above ``max_count`` is refused before any list is built."""
    text = (text or "").strip()
    if ":" in text:
        parts = text.split(":")
        try:
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
        except (ValueError, IndexError):
            raise ValueError(f"strength range {text!r} must read from:to:count, e.g. 0.1:0.9:5") from None
        if len(parts) != 3 or n < 1:
            raise ValueError(f"strength range {text!r} must read from:to:count with count >= 1")
        _check_count(n, max_count, "strengths")
        return [round(lo + (hi - lo) * i / (n - 1), 6) for i in range(n)] if n > 1 else [lo]
    values = _numbers(text, float, "strength", max_count)
    bad = [s for s in values if not 0.0 <= s <= 1.0]
    if bad:
        raise ValueError(f"strengths must be between 0 and 1, got {bad}")
    return list(dict.fromkeys(values))


RANDOM_SEED = -1   # a seed of -1 asks for a random one (the record keeps the seed drawn)


def parse_seeds(text: str, max_count: int | None = None) -> list[int]:
    """'0, 1, 7' (a list), 'n=4' (a count: seeds 0..3) or -1 (a random seed) -> seeds; a count
    above ``max_count`` is refused before any list is built."""
    text = (text or "").strip()
    if text.lower().startswith("n="):
        try:
            n = int(text[2:])
        except ValueError:
            raise ValueError(f"seed count {text!r} must read n=<count>, e.g. n=4") from None
        if n < 1:
            raise ValueError(f"seed count must be >= 1, got {n}")
        _check_count(n, max_count, "seeds")
        return list(range(n))
    return resolve_seeds(_numbers(text, int, "seed", max_count))


def resolve_seeds(seeds: Sequence[int]) -> list[int]:
    """Each -1 becomes a fresh random seed in [0, 2**31); others must be in the generators' range
    (config.check_seed); duplicates dropped."""
    from .config import check_seed

    out = [secrets.randbelow(2**31) if s == RANDOM_SEED else s for s in seeds]
    for s in out:
        check_seed(s, "seed")
    return list(dict.fromkeys(int(s) for s in out))


def _check_count(n: int, max_count: int | None, what: str) -> None:
    if max_count is not None and n > max_count:
        raise ValueError(f"{n:,} {what} exceed the limit of {max_count:,} per sweep (images; "
                         "set DIFFMIX_MAX_JOBS to raise it)")


def _numbers(text: str, kind, what: str, max_count: int | None = None) -> list:
    if max_count is not None and len(text) > 32 * max_count:   # a text too long to hold max_count numbers
        raise ValueError(f"the {what}s text is {len(text):,} characters; give at most {max_count} {what}s")
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise ValueError(f"give at least one {what}")
    _check_count(len(parts), max_count, f"{what}s")
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise ValueError(f"could not read {what}s from {text!r}: use numbers separated by commas") from None


def check_upload(path: str | os.PathLike, limits: Limits) -> None:
    size = Path(path).stat().st_size
    if size > limits.max_upload_mb * 2**20:
        raise ValueError(f"the uploaded image is {size / 2**20:.1f} MB; the limit is {limits.max_upload_mb} MB "
                         "(set DIFFMIX_MAX_UPLOAD_MB to raise it)")


def make_jobs(bundle: Bundle, source: Source | None, source_class: str, target: str, strengths: Sequence[float],
              seeds: Sequence[int], strategy: str) -> list[Job]:
    """Jobs ordered target, strength, seed: the grid's rows are strengths, its columns seeds."""
    kind = get_strategy(strategy).pairing
    bundle.class_index(source_class)
    if kind == "intra":
        targets = [source_class]
    elif target == ALL_OTHER:
        targets = [c for c in bundle.classes if c != source_class]
    else:   # one class, or several separated by commas (side by side in the grid)
        targets = list(dict.fromkeys(t.strip() for t in (target or "").split(",") if t.strip()))
        if not targets:
            raise ValueError("choose a target class")
        for t in targets:
            bundle.class_index(t)
    if kind == "gen":
        return [Job(None, t, 1.0, seed, source_class=source_class) for t in targets for seed in seeds]
    if source is None:
        raise ValueError("pick an example image or upload a source image first")
    return [Job(source, t, s, seed, source_class=source_class) for t in targets for s in strengths for seed in seeds]


def command_for(record: dict, sweep: Sequence[dict] = (), out: str = "diffmix-out") -> str:
    """The `diffmix translate` command that makes this record's image again, pixel for pixel.

    With ``sweep`` (the records made with it) the command makes the whole sweep: the engine
    batches jobs, and a batch of other size may differ in the last bits of a float, so the
    same jobs in the same order is what gives the same pixels."""
    import shlex

    group = [r for r in sweep if r.get("source_path") == record.get("source_path")] or [record]
    targets = list(dict.fromkeys(r["target_class"] for r in group))
    strengths = list(dict.fromkeys(f"{r['strength']:g}" for r in group))
    seeds = list(dict.fromkeys(str(r["seed"]) for r in group))
    parts = ["diffmix", "translate", "--bundle", record["bundle"]]
    if record.get("source_path"):
        parts += ["--image", record["source_path"], "--source-class", record["source_class"]]
    parts += ["--target", *targets, "--strength", *strengths,
              "--seed", *seeds, "--steps", str(record["num_inference_steps"]),
              "--guidance", f"{record['guidance_scale']:g}", "--strategy", record["strategy"],
              "--resize", record["resize"], "--resolution", str(record["resolution"]),
              "--label-gamma", f"{record['label_gamma']:g}", "--label-scale", f"{record['label_scale']:g}"]
    if record.get("scheduler") in ("dpm++", "ddim"):
        parts += ["--scheduler", record["scheduler"]]
    return shlex.join(parts + ["--out", out])


def caption(record: dict) -> str:
    sc = record.get("scores") or {}
    head = f"→ {record['target_class']} · s={record['strength']:.2f} (ran {record['strength_run']:.2f}) · seed {record['seed']}"
    parts = [f"{label} {sc[key]:.2f}" for key, label in (("p_target", "P(target)"), ("p_source", "P(source)"),
                                                        ("clip_target", "CLIP"), ("distance", "dist"))
             if sc.get(key) is not None]
    label = ", ".join(f"{k} {v:.2f}" for k, v in record["soft_label"].items())
    return "\n".join([head, " · ".join(parts) or "no scores", f"label: {label}"])


# --------------------------------------------------------------------------- the session store
_TOKEN = re.compile(r"^[0-9a-f]{32}$")
_SESSION_LOCKS: dict[str, threading.Lock] = {}


def new_token() -> str:
    return secrets.token_hex(16)


def session_id(token: str) -> str:
    """The folder name of the session whose secret is ``token``: a one-way hash, so a name seen
    in an image URL or an export cannot be turned back into the token that opens the session."""
    return hashlib.sha256(f"diffmix-session:{token}".encode()).hexdigest()[:32]


@dataclass
class Store:
    """One session's folder. ``open_store(token)`` makes or finds it; all writes are atomic.
    ``token`` is the owner's secret (only ever sent back to the owner's browser); ``id``, the
    folder name, is what may appear in URLs and file names."""

    token: str
    root: Path
    lock: threading.Lock = field(repr=False, default_factory=threading.Lock)

    @property
    def id(self) -> str:
        return self.root.name

    @property
    def images(self) -> Path:
        return self.root / "images"

    def state(self) -> dict:
        file = self.root / "state.json"
        state = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        return {"curated": [], "last_sweep": [], "sweeps": 0, "summary": None, **state}

    def save_state(self, state: dict) -> None:
        write_text_atomic(self.root / "state.json", json.dumps(state, ensure_ascii=False))

    def records(self) -> dict[str, dict]:
        file = self.root / "records.jsonl"
        return {r["id"]: r for r in read_jsonl(file)} if file.is_file() else {}

    def add(self, results: list[Result]) -> list[str]:
        """Save images (PNG + record) and their records; returns their ids in order."""
        records = self.records()
        ids = []
        for res in results:
            rec = res.record
            rec["file_name"] = f"{rec['id']}.png"   # relative to images/
            save_png(res.image, self.images / rec["file_name"], rec)
            records[rec["id"]] = rec
            ids.append(rec["id"])
        write_jsonl_atomic(self.root / "records.jsonl", records.values())
        return ids

    def image_path(self, record: dict) -> str:
        return str(self.images / record["file_name"])

    def save_source(self, image, name: str) -> str:
        """A private copy of an uploaded source (so scores and a reload still find it). Returns its
        path RELATIVE to the session (``sources/...``): records name it without a server path."""
        digest = hashlib.sha256(image.tobytes()).hexdigest()[:16]
        rel = f"{UPLOADS}/{safe_name(Path(name).stem)}-{digest}.png"
        if not (self.root / rel).exists():
            save_png(image, self.root / rel)
        return rel

    def source_file(self, record: dict) -> Path | None:
        """The source image file of a record: an upload of this session, or an example's path."""
        where = record.get("source_path")
        if not where:
            return None
        return self.root / where if where.startswith(f"{UPLOADS}/") else Path(where)


UPLOADS = "sources"   # uploads' folder in a session; records name them "sources/<name>-<sha>.png"
_PRUNED = {"sessions": 0.0, "exports": 0.0}   # last prune time per root (at most one pass a minute)


def open_store(token: str | None, limits: Limits | None = None) -> Store:
    """The session of the secret ``token``; a new one when the token is empty, malformed or
    expired (idle longer than ``session_ttl_h``). Opening a session marks it active."""
    limits = limits or Limits.from_env()
    token = token if isinstance(token, str) and _TOKEN.match(token) else new_token()
    root = sessions_root() / session_id(token)
    if root.is_dir() and time.time() - root.stat().st_mtime > limits.session_ttl_h * 3600:
        shutil.rmtree(root, ignore_errors=True)   # expired: its images and uploads go with it
        token = new_token()
        root = sessions_root() / session_id(token)
    root.mkdir(parents=True, exist_ok=True)
    os.utime(root)
    prune(sessions_root(), limits.session_ttl_h * 3600, limits.sessions_max_mb * 2**20, keep=(root,),
          what="sessions")
    lock = _SESSION_LOCKS.setdefault(root.name, threading.Lock())
    return Store(token, root, lock)


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*"))


def prune(root: Path, max_age_s: float, max_bytes: int, keep: Sequence[Path] = (), what: str = "") -> list[Path]:
    """Remove entries of ``root`` idle longer than ``max_age_s``, then the least recently used
    until the rest fit in ``max_bytes`` (``keep`` stays). At most one pass a minute per ``what``.
    Returns what was removed."""
    now = time.time()
    if what and now - _PRUNED.get(what, 0.0) < 60:
        return []
    _PRUNED[what] = now
    if not root.is_dir():
        return []
    keep = {Path(k).resolve() for k in keep}
    entries = []
    for entry in root.iterdir():
        try:
            entries.append((entry.lstat().st_mtime, entry))
        except FileNotFoundError:
            continue
    removed, live = [], []
    for mtime, entry in sorted(entries):
        if entry.resolve() not in keep and now - mtime > max_age_s:
            removed.append(entry)
        else:
            live.append((mtime, entry))
    sizes = {entry: _size(entry) for _, entry in live}
    total = sum(sizes.values())
    for _, entry in live:   # oldest first
        if total <= max_bytes:
            break
        if entry.resolve() not in keep:
            removed.append(entry)
            total -= sizes[entry]
    for entry in removed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------- sweep
@dataclass
class SweepOutcome:
    ids: list[str]
    records: list[dict]
    summary: dict | None       # scoring.summarize, None when scoring is unavailable
    figure: object | None      # matplotlib Figure
    columns: int               # seeds per row
    notes: list[str]


@dataclass(frozen=True)
class SweepPlan:
    jobs: list[Job]           # ordered target, strength, seed
    config: TranslateConfig
    seeds: list[int]          # random seeds (-1) already drawn


def plan_sweep(bundle: Bundle, source: Source | None, source_class: str, target: str, strengths: str,
               seeds: str, steps: int, guidance: float, strategy: str, limits: Limits = Limits()) -> SweepPlan:
    """Read and check every setting of a sweep without running anything (cheap: the app calls it
    first, so a typo leaves the previous results alone)."""
    s_list = parse_strengths(strengths, limits.max_jobs)
    seed_list = parse_seeds(seeds, limits.max_jobs)
    config = TranslateConfig(strategy=strategy, num_inference_steps=int(steps), guidance_scale=float(guidance))
    kind = get_strategy(strategy).pairing
    n_targets = len(bundle.classes) - 1 if target == ALL_OTHER and kind == "inter" else 1
    factors = {"targets": n_targets, "strengths": 1 if kind == "gen" else len(s_list), "seeds": len(seed_list)}
    count_jobs(factors, limits.max_jobs, "DIFFMIX_MAX_JOBS")   # before the job list is built
    jobs = make_jobs(bundle, source, source_class, target, s_list, seed_list, strategy)
    validate_jobs(jobs, config, bundle)
    return SweepPlan(jobs, config, seed_list)


def run_sweep(store: Store, bundle: Bundle, source: Source | None, source_class: str, target: str,
              strengths: str, seeds: str, steps: int, guidance: float, strategy: str, *,
              limits: Limits = Limits(), generate_fn: Callable = generate,
              callback: Callable[[int, int], None] | None = None) -> SweepOutcome:
    """Make, score and store one sweep; rows = strength, columns = seed."""
    plan = plan_sweep(bundle, source, source_class, target, strengths, seeds, steps, guidance, strategy, limits)
    jobs, config, seed_list = plan.jobs, plan.config, plan.seeds
    results = generate_fn(bundle, jobs, config, callback=callback)
    summary, figure, notes = score_results(results, bundle)
    with store.lock:
        ids = store.add(results)
        state = store.state()
        state.update(last_sweep=ids, sweeps=state["sweeps"] + 1, summary=summary, bundle=str(bundle.path))
        store.save_state(state)
    return SweepOutcome(ids, [r.record for r in results], summary, figure, len(seed_list), notes)


def score_results(results: list[Result], bundle: Bundle) -> tuple[dict | None, object | None, list[str]]:
    """Fill each record's ``scores`` (reference classifier, CLIP, distance, SSIM); summary and plot."""
    try:
        from .scoring import class_prompt, plot_sweep, score_images, summarize
    except ImportError as err:
        return None, None, [f"scores unavailable ({err})"]
    reference, ref_status = reference_for(bundle)
    clip = clip_scorer(bundle)
    records = [r.record for r in results]
    scores, embeddings = score_images([r.image for r in results], records, reference=reference, clip=clip,
                                      prompt=lambda c: class_prompt(c, bundle))
    for rec, s in zip(records, scores):
        rec["scores"] = s
    summary = summarize(records, embeddings, clip=clip.status, reference=None if reference is None else ref_status)
    figure = plot_sweep(summary)
    notes = [clip.status] + ([] if reference is not None else [ref_status])
    return summary, figure, notes


def table(records: Sequence[dict], curated: set[str]) -> list[list]:
    rows = []
    for r in records:
        sc = r.get("scores") or {}
        label = ", ".join(f"{k} {v:.3f}" for k, v in r["soft_label"].items())
        values = [sc.get(k) for k in ("p_target", "p_source", "top1", "clip_target", "clip_source", "distance", "ssim")]
        values = [round(v, 4) if isinstance(v, float) else v for v in values]
        rows.append([r["id"], r.get("source_id"), r["source_class"], r["target_class"], r["strength"], r["strength_run"], r["seed"],
                     *values, label, r["id"] in curated])
    return rows


def write_csv(path: str | os.PathLike, rows: Sequence[Sequence]) -> Path:
    """The sweep table as CSV; text cells through records.csv_cell (a class name starting with
    ``=`` is not a formula), numbers as numbers; CRLF rows so a CR inside a name is quoted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(TABLE_COLUMNS)
    writer.writerows(["" if v is None else v if isinstance(v, (int, float)) else csv_cell(v) for v in row]
                     for row in rows)
    return write_text_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- curation
def clean_thresholds(thresholds: dict | Thresholds | None) -> dict:
    """The tests that are on, {field: limit} (config.Thresholds checks names and ranges)."""
    if isinstance(thresholds, Thresholds):
        return thresholds.as_dict()
    return Thresholds.from_dict(thresholds).as_dict()


def passing(records: Sequence[dict], thresholds: dict | Thresholds) -> tuple[list[str], list[str]]:
    """Ids of records meeting every threshold, and notes on thresholds that could not apply
    (no image of the sweep has that score: the test is skipped, and said so)."""
    active, notes = {}, []
    for key, limit in clean_thresholds(thresholds).items():
        score, op, label = THRESHOLD_TESTS[key]
        if all((r.get("scores") or {}).get(score) is None for r in records):
            notes.append(f"{label} {op} {limit} ignored: no image has a {label} score")
        else:
            active[key] = limit
    tests = Thresholds(**active)
    return [r["id"] for r in records if not tests.failures(r.get("scores"), missing_fails=True)], notes


def update_curated(store: Store, ids: Sequence[str], mode: str, limits: Limits = Limits()) -> list[str]:
    """Change the curated batch: ``add``, ``remove``, ``toggle`` the ids, or ``set`` the ids of
    the last sweep to exactly ``ids`` (the sweep's checkboxes). Unknown ids are refused."""
    with store.lock:
        state, known = store.state(), store.records()
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ValueError(f"unknown image id(s) {unknown[:5]} in this session")
        cur = list(state["curated"])
        if mode == "add":
            cur += [i for i in ids if i not in cur]
        elif mode == "remove":
            cur = [i for i in cur if i not in set(ids)]
        elif mode == "toggle":
            for i in ids:
                cur.remove(i) if i in cur else cur.append(i)
        elif mode == "set":
            sweep = set(state["last_sweep"])
            cur = [i for i in cur if i not in sweep or i in set(ids)] + [i for i in ids if i not in cur]
        else:
            raise ValueError(f"mode must be add, remove, toggle or set, got {mode!r}")
        if len(cur) > limits.max_curated:
            raise ValueError(f"the curated batch would hold {len(cur)} images; the limit is {limits.max_curated} "
                             "(export and clear it, or set DIFFMIX_MAX_CURATED to raise it)")
        state["curated"] = cur
        store.save_state(state)
        return cur


# --------------------------------------------------------------------------- export
_EXPORT_LOCK = threading.Lock()


def export_curated(store: Store, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Export the curated batch with export.py's writers into a NEW folder under
    ``<root>/exports/`` (never over an earlier export). Returns (folder, zip)."""
    from .export import FORMATS, export_records

    state, records = store.state(), store.records()
    items = [(store.image_path(records[i]), records[i]) for i in state["curated"] if i in records]
    if not items:
        raise ValueError("the curated batch is empty: select images first")
    bundles = {r.get("bundle") for _, r in items}
    classes = None
    if len(bundles) == 1 and next(iter(bundles)):
        try:
            classes = load_bundle(next(iter(bundles))).classes
        except (ValueError, FileNotFoundError):
            classes = None
    base = Path(root or output_root()) / "exports"
    with _EXPORT_LOCK:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        n = 0
        while True:
            out = base / f"{stamp}-{store.id[:8]}-{n}"
            if not out.exists() and not out.with_name(out.name + ".zip").exists():
                break
            n += 1
        folder = export_records(items, out, FORMATS, classes=classes, show_progress=False)
    limits = Limits.from_env()
    prune(base, limits.exports_ttl_h * 3600, limits.exports_max_mb * 2**20,
          keep=(folder, folder.with_name(folder.name + ".zip")), what="exports")
    return folder, folder.with_name(folder.name + ".zip")
