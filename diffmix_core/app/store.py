"""A session's store: the folder ``<sessions root>/<id>/`` holding the images it generated (PNG
with their records), ``records.jsonl`` and ``state.json`` (curated ids, last sweep).

The browser keeps a secret token; the folder is named by a one-way hash of it
(:func:`session_id`), so nothing a session shows or shares (image URLs, records, exports)
carries the token, and what it shows cannot open the session. Sessions idle for
``DIFFMIX_SESSION_TTL_H`` hours expire; all sessions together, and all exports, are kept
under a size and an age bound (:class:`Limits`, :func:`prune`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import load_bundle
from ..config import CALIBRATE_MAX_JOBS_ENV
from ..export import FORMATS, export_records
from ..profiles import output_root
from ..records import read_jsonl, safe_name, save_png, write_jsonl_atomic, write_text_atomic
from ..translate import Result

SESSIONS_ENV = "DIFFMIX_SESSIONS"          # per-session work folders (default: <tmp>/diffmix-sessions)


# --------------------------------------------------------------------------- limits
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
    max_calibration_jobs: int = 512  # DIFFMIX_MAX_CALIBRATION_JOBS: images per calibration (the CLI's default: 2048)
    max_curated: int = 1000     # DIFFMIX_MAX_CURATED: images in a curated batch
    max_upload_mb: int = 20     # DIFFMIX_MAX_UPLOAD_MB: size of an uploaded source image (checked by the HTTP layer)
    queue_size: int = 32        # DIFFMIX_QUEUE_SIZE: requests waiting for the model lane
    session_ttl_h: int = 24     # DIFFMIX_SESSION_TTL_H: idle hours before a session (and its uploads) expires
    sessions_max_mb: int = 2048  # DIFFMIX_SESSIONS_MAX_MB: all sessions together; the least recently used go first
    exports_ttl_h: int = 168    # DIFFMIX_EXPORTS_TTL_H: age in hours at which an app export is removed
    exports_max_mb: int = 4096  # DIFFMIX_EXPORTS_MAX_MB: all app exports together; the oldest go first
    upload_grace_s: int = 600   # DIFFMIX_UPLOAD_GRACE_S: seconds an upload no handler accepted stays in Gradio's cache

    @classmethod
    def from_env(cls) -> Limits:
        names = {"max_jobs": "DIFFMIX_MAX_JOBS", "max_calibration_jobs": CALIBRATE_MAX_JOBS_ENV,
                 "max_curated": "DIFFMIX_MAX_CURATED",
                 "max_upload_mb": "DIFFMIX_MAX_UPLOAD_MB", "queue_size": "DIFFMIX_QUEUE_SIZE",
                 "session_ttl_h": "DIFFMIX_SESSION_TTL_H", "sessions_max_mb": "DIFFMIX_SESSIONS_MAX_MB",
                 "exports_ttl_h": "DIFFMIX_EXPORTS_TTL_H", "exports_max_mb": "DIFFMIX_EXPORTS_MAX_MB",
                 "upload_grace_s": "DIFFMIX_UPLOAD_GRACE_S"}
        values = {k: env_int(env, getattr(cls, k)) for k, env in names.items()}
        bad = [names[k] for k, v in values.items() if v < 0]
        if bad:
            raise ValueError(f"environment variable(s) {', '.join(bad)} must be >= 0")
        return cls(**values)


def sessions_root() -> Path:
    return Path(os.environ.get(SESSIONS_ENV) or Path(tempfile.gettempdir()) / "diffmix-sessions").resolve()


def check_upload(path: str | os.PathLike, limits: Limits) -> None:
    size = Path(path).stat().st_size
    if size > limits.max_upload_mb * 2**20:
        raise ValueError(f"the uploaded image is {size / 2**20:.1f} MB; the limit is {limits.max_upload_mb} MB "
                         "(set DIFFMIX_MAX_UPLOAD_MB to raise it)")


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
            save_png(res.image, self.images / rec["file_name"], public_record(rec))   # served to the visitor
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


def public_record(record: dict) -> dict:
    """``record`` as a visitor may see it (a PNG's record chunk, an export): the bundle by its
    folder's name, every other absolute path (the base model, the source, diff-ii's partner, any
    ``*_path`` field) relative to the bundle when inside it, else by its file name; the server's
    absolute paths stay in the session's records.jsonl and the logs."""
    out = dict(record)
    bundle = Path(record["bundle"]) if record.get("bundle") else None
    if bundle is not None:
        out["bundle"] = bundle.name
    for key, where in record.items():
        if key == "bundle" or not isinstance(where, str) or not where or not Path(where).is_absolute():
            continue
        if key == "base_model" or key.endswith("_path"):
            inside = bundle is not None and Path(where).is_relative_to(bundle)
            out[key] = Path(where).relative_to(bundle).as_posix() if inside else Path(where).name
    return out


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


def prune_upload_cache(root: Path, uploads: set[str], accepted: set[str], limits: Limits) -> list[Path]:
    """Gradio's cache (``root``: the files visitors uploaded and the files the app returned, each
    in a folder of its own), under the sessions' bounds: an upload that no handler accepted goes
    after ``upload_grace_s`` seconds (``uploads``: Gradio's record of uploaded paths, which loses
    them; ``accepted``: what a handler took); then entries idle longer than ``session_ttl_h``,
    then the least recently used beyond ``sessions_max_mb``. At most one pass a minute."""
    now = time.time()
    if now - _PRUNED.get("gradio-cache", 0.0) < 60:
        return []
    removed = []
    for name in list(uploads):
        path = Path(name)
        try:
            idle = now - path.stat().st_mtime
        except OSError:
            uploads.discard(name)
            continue
        if name not in accepted and idle > limits.upload_grace_s and path.resolve().is_relative_to(root.resolve()):
            path.unlink(missing_ok=True)
            if path.parent != root:
                shutil.rmtree(path.parent, ignore_errors=True)   # Gradio keeps each upload in a folder of its own
            uploads.discard(name)
            removed.append(path)
    removed += prune(root, limits.session_ttl_h * 3600, limits.sessions_max_mb * 2**20, what="gradio-cache")
    return removed


# --------------------------------------------------------------------------- curation and export
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


_EXPORT_LOCK = threading.Lock()


def export_curated(store: Store, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Export the curated batch with export.py's writers into a NEW folder under
    ``<root>/exports/`` (never over an earlier export). Returns (folder, zip)."""
    state, records = store.state(), store.records()
    curated = [records[i] for i in state["curated"] if i in records]
    items = [(store.image_path(r), public_record(r)) for r in curated]
    if not items:
        raise ValueError("the curated batch is empty: select images first")
    bundles = {r.get("bundle") for r in curated}
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
