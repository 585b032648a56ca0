"""What one process holds for every session: the bundles the app offers, each bundle loaded
and verified once per change of its files (:func:`open_bundle_cached`), the pipeline of each
base model, the CLIP scorer and each reference classifier (loaded on first use).
"""
from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from .. import scoring
from ..apply import load_pipeline_for
from ..bundle import ADAPTER_JSON, BUNDLES_ENV, Bundle, bundle_roots, find_bundles, load_bundle
from ..config import DiffIIConfig, PipelineConfig, TranslateConfig
from ..demo import placeholder_bundle
from ..hub import HUB_REPO_ID, open_bundle
from ..paths import DEMO_ASSETS, SHIPPED_BUNDLES
from ..reference import bundle_reference_path, load_reference
from ..translate import Job, Result, translate

_MODELS: dict[tuple, object] = {}
_MODEL_LOCK = threading.Lock()   # guards the cache
_ENGINE_LOCK = threading.Lock()  # one translate() at a time on the shared pipeline
_BUNDLES: dict[str, tuple[tuple, Bundle]] = {}   # resolved folder -> (its files' stat key, the loaded Bundle)


# --------------------------------------------------------------------------- bundles
def app_bundles(broken: dict[str, str] | None = None) -> dict[str, str]:
    """{label: folder} of the bundles the app offers (bundle.find_bundles): DIFFMIX_BUNDLES'
    folders, then the shipped demo world and ``assets/bundles``; the offline placeholder when
    none loads. Bundles that fail to load are recorded in ``broken`` as {folder: reason}."""
    found = find_bundles(bundle_roots([DEMO_ASSETS, SHIPPED_BUNDLES]), broken)
    if not found:
        found["placeholder: tiny random pipeline"] = str(placeholder_bundle().path)
    return found


def served_roots() -> list[Path]:
    """The folders the app opens bundles from, resolved: the bundle roots (DIFFMIX_BUNDLES, the
    demo world, ``assets/bundles``), the offline placeholder's folder and the Hub cache (where a
    bundle pulled by its repo id lives)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    roots = bundle_roots([DEMO_ASSETS, SHIPPED_BUNDLES]) + [Path(HF_HUB_CACHE)]
    return [r.resolve() for r in roots] + [placeholder_bundle().path.resolve().parent]


def open_typed_bundle(text: str) -> Bundle:
    """The bundle a visitor typed: a folder inside one of :func:`served_roots` (its adapter.json
    included), or a Hub repo id pulled through the Hub cache. Any other server path (the upload
    cache, a home folder, /etc) is refused before anything there is read."""
    text = (text or "").strip()
    if not text:
        raise ValueError("give a bundle folder or a Hugging Face Hub repo id (owner/name)")
    path = Path(text).expanduser()
    local = path.is_absolute() or text.startswith(".") or not HUB_REPO_ID.match(text) or path.exists()
    if local:
        folder = path.resolve()
        if not any(folder.is_relative_to(root) for root in served_roots()):
            raise ValueError(f"{path.name or text} is not in this app's bundle folders; give a bundle folder "
                             f"inside them (the operator sets them with {BUNDLES_ENV}) or a Hub repo id (owner/name)")
    return open_bundle(text)


def _files_key(folder: Path) -> tuple:
    """(path, mtime, size) of adapter.json and every file it lists: what a change of the bundle changes."""
    adapter = folder / ADAPTER_JSON
    listed = json.loads(adapter.read_text(encoding="utf-8")).get("files") or {}
    key = []
    for path in [adapter, *(folder / rel for rel in sorted(listed))]:
        try:
            st = path.stat()
        except OSError:
            return ()   # a listed file is missing: load_bundle says so
        key.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(key)


def open_bundle_cached(path: str | os.PathLike) -> Bundle:
    """``bundle.load_bundle``, verified once per change: the loaded bundle is kept by folder and
    reused while adapter.json and every file it lists keep their modification time and size,
    so a sweep does not re-hash every weight file; a changed file is verified again."""
    folder = Path(path)
    folder = (folder.parent if folder.name == ADAPTER_JSON else folder).resolve()
    try:
        key = _files_key(folder)
    except (OSError, ValueError):
        key = ()
    with _MODEL_LOCK:
        hit = _BUNDLES.get(str(folder))
    if key and hit is not None and hit[0] == key:
        return hit[1]
    bundle = load_bundle(folder)
    if key:
        with _MODEL_LOCK:
            _BUNDLES[str(folder)] = (key, bundle)
    return bundle


# --------------------------------------------------------------------------- models (one cache per process)
def pipeline_for(bundle: Bundle):
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
    model, pretrained = scoring.default_clip(bundle)
    key = ("clip", model, pretrained)
    with _MODEL_LOCK:
        loader = _MODELS.get(("clip-thread", *key[1:]))
        if key not in _MODELS and loader is None:
            def load() -> None:
                offline = clip_offline_reason(model, pretrained)
                scorer = (scoring.ClipScorer(f"{model}/{pretrained}", reason=offline) if offline
                          else scoring.load_clip(model, pretrained))
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
    return scoring.ClipScorer(f"{model}/{pretrained}", reason=f"{model}/{pretrained} is still loading; scores of "
                              "later sweeps will include CLIP if its weights can be had")


OFFLINE = "no weights available offline"


def clip_offline_reason(model: str, pretrained: str, timeout: float = 1.5) -> str | None:
    """Why CLIP weights cannot be had here, found at once instead of through the Hub's retries:
    not in the local cache and either HF_HUB_OFFLINE is set or the Hub does not answer within
    ``timeout`` s. None when loading may work (a local file or folder, a cached copy, a reachable Hub)."""
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


def reference_for(bundle: Bundle) -> tuple[object | None, str]:
    """(the bundle's reference classifier or None, a status line)."""
    path = bundle_reference_path(bundle)
    if path is None:
        return None, "no reference classifier attached (`diffmix train-reference --attach BUNDLE`)"
    key = ("ref", str(path), bundle.hash)   # the bundle's hash covers the reference's files (both are listed)
    with _MODEL_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_reference(path)
        clf = _MODELS[key]
    acc = clf.meta.get("val_accuracy")
    return clf, f"`{clf.model_name}`" + (f" (val. accuracy {acc:.3f})" if isinstance(acc, float) else "")


def generate(bundle: Bundle, jobs: list[Job], config: TranslateConfig,
             callback: Callable[[int, int], None] | None = None, diff_ii: DiffIIConfig | None = None
             ) -> list[Result]:
    """The engine on the cached pipeline (the model lane: ui.py runs one at a time);
    ``callback(steps done, total)`` after every UNet call; ``diff_ii``: diff-ii's inversion settings
    (its inversions are cached under the output root)."""
    pipe = pipeline_for(bundle)
    with _ENGINE_LOCK:
        return translate(pipe, jobs, config, bundle=bundle, show_progress=False, callback=callback, diff_ii=diff_ii)
