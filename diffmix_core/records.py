"""The record every generated image carries (docs/formats.md, "Records"), safe file
names, and atomic writers shared by every stage that writes files."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image, PngImagePlugin

PNG_KEY = "diffmix"  # PNG tEXt/iTXt key holding the JSON record

# Keys every record has (values may be null); see make_record in translate.py.
RECORD_KEYS = (
    "id", "file_name", "source_id", "source_path", "source_sha256", "source_class", "target_class", "strategy",
    "strength", "strength_run", "num_inference_steps", "steps_run", "guidance_scale", "seed",
    "scheduler", "resize", "resolution", "prompt", "base_model", "base_revision", "bundle",
    "bundle_hash", "label_gamma", "label_scale", "cache_interval", "soft_label", "scores", "diffmix_version",
)


@functools.cache
def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by
    setting and restoring it (once, then cached)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def user_mode(path: str | os.PathLike) -> None:
    """Give a file 0666 & ~umask (a folder 0777 & ~umask), as a plain ``open``/``mkdir``
    would: tempfile's private 0600/0700 must not leak into the outputs it is renamed to."""
    mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    A crash or error leaves ``path`` as it was (old content or absent) and removes
    the temporary file, so readers never see a partial file. The file ends with the
    user's usual permissions (0666 & ~umask), not tempfile's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.isfile(tmp):
            user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


LEFTOVER_ENV = "DIFFMIX_LEFTOVER_MINUTES"   # leftovers without a process id are stale after this (default 60)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def leftover_owner(entry: Path, name: str) -> int | None:
    """The process id in the name of a temporary beside ``name`` (``.{name}.staging-{pid}-*``,
    ``.{name}.old-{pid}-*``, ``.{name}.tmp-{pid}``, ``.{name}.zip.{pid}-*.tmp``); None when it
    names none; -1 when ``entry`` is no such temporary."""
    for kind in ("staging", "old", "tmp-", "zip."):
        prefix = f".{name}.{kind}"
        if entry.name.startswith(prefix) and (kind != "zip." or entry.name.endswith(".tmp")):
            pid = entry.name[len(prefix):].lstrip("-").split("-", 1)[0]
            return int(pid) if pid.isdigit() else None
    return -1


def clean_leftovers(folder: str | os.PathLike, name: str) -> list[Path]:
    """Remove what killed runs left beside ``folder / name`` (staging and old folders, a zip's
    temporary): those whose process is gone, and those naming no process that are older than
    ``DIFFMIX_LEFTOVER_MINUTES`` (60). A live run's are kept. Returns what was removed (and
    says so on stderr)."""
    import glob
    import shutil
    import sys
    import time

    folder = Path(folder)
    minutes = float(os.environ.get(LEFTOVER_ENV, "") or 60)
    removed = []
    for entry in sorted(folder.glob(f".{glob.escape(name)}.*")) if folder.is_dir() else []:
        pid = leftover_owner(entry, name)
        if pid == -1 or entry.is_symlink():
            continue
        if pid is not None and _pid_alive(pid):
            continue
        if pid is None and time.time() - entry.lstat().st_mtime < minutes * 60:
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        print(f"diffmix: removed {len(removed)} leftover(s) of an interrupted run beside {folder / name}: "
              f"{', '.join(p.name for p in removed[:5])}", file=sys.stderr)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; a bad line raises ValueError naming its number."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON line ({err.msg})") from None
    return rows


def save_png(image: Image.Image, path: str | os.PathLike, record: dict | None = None) -> Path:
    """Write a lossless PNG atomically, with the record in its text chunk."""
    info = PngImagePlugin.PngInfo()
    if record is not None:
        info.add_itxt(PNG_KEY, json.dumps(record, ensure_ascii=False))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def read_png_record(path: str | os.PathLike) -> dict | None:
    """The record stored in a PNG by :func:`save_png` (None when absent)."""
    with Image.open(path) as im:
        text = im.text.get(PNG_KEY) if hasattr(im, "text") else None
    return json.loads(text) if text else None


_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def safe_name(name: str, max_len: int = 80) -> str:
    """A file-system-safe, collision-resistant name for a class or image id.

    Spaces become '_' (the authors' layout); anything else unsafe ('/', '..',
    control characters, non-ASCII) is replaced, and a short hash of the
    original is appended whenever the name had to change beyond spaces, so two
    different names never map to the same file name.
    """
    plain = unicodedata.normalize("NFC", str(name))
    cleaned = _UNSAFE.sub("_", plain).replace(" ", "_").strip("._-") or "_"
    if cleaned.replace("_", " ") != plain or len(cleaned) > max_len:
        digest = hashlib.sha256(plain.encode("utf-8")).hexdigest()[:8]
        cleaned = f"{cleaned[: max_len - 9]}-{digest}"
    return cleaned


def contained_file(folder: str | os.PathLike, name: object, where: str) -> Path:
    """``folder / name`` for a file name read from a records file (metadata.jsonl, meta.csv,
    records.jsonl), checked to be a relative path with no '..', no symlink on the way, naming a
    regular file inside ``folder``. ValueError otherwise; FileNotFoundError when it is absent.
    The one rule for every reader of such names: a listed file never leads outside its folder."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise ValueError(f"{where}: file_name {name!r} is not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not (folder / rel).resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{where}: {name!r} is outside {folder}; only the folder's own files are read")
    path = folder / rel
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"{where}: {name!r} is missing from {folder}")
    part = folder
    for piece in rel.parts:   # no symlink anywhere below the folder
        part = part / piece
        if part.is_symlink():
            raise ValueError(f"{where}: {part} is a symlink; only the folder's own regular files are read")
    if not path.is_file():
        raise ValueError(f"{where}: {path} is not a regular file")
    return path


def check_apart(out: str | os.PathLike, sources: Iterable[tuple[str, str | os.PathLike]], *,
                inside: bool = True) -> Path:
    """``out`` resolved; ValueError when it is, contains or (with ``inside``) sits inside one of
    ``sources`` ((what, folder) pairs: the images being written out, a bundle, the records), so
    that no writer that replaces its target (``--overwrite``) or fills it can destroy or change
    what it reads. The one rule for every writer with an output folder."""
    target = Path(out).resolve()
    for what, source in sources:
        src = Path(source).resolve()
        if src == target or src.is_relative_to(target):
            raise ValueError(f"output folder {target} is or contains {what} {src}; writing there would replace "
                             "it. Choose a folder outside it (even --overwrite never replaces it)")
        if inside and target.is_relative_to(src):
            raise ValueError(f"output folder {target} is inside {what} {src}; writing there would change it. "
                             "Choose a folder outside it")
    return target


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Cells a spreadsheet would read as a formula (OWASP "CSV injection"); "'" is listed so that
# a name that really starts with "'" survives the round trip through csv_cell / csv_cell_value.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")   # inline Markdown: escapes, code, emphasis, links, cells


def md_text(text: object) -> str:
    """Untrusted text (a class name, a token, a setting) made inert for a generated Markdown card
    or table: one line (runs of whitespace, newlines included, become one space), HTML escaped
    (``<img onerror>`` shows as text) and inline Markdown punctuation backslash-escaped (no
    link, image, emphasis, code span or table cell break; with no newline left, no block
    marker can start a line). The one helper every generated card and table uses."""
    import html

    line = " ".join(str(text).split())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(line, quote=False))   # no &#x27; (its # would be escaped)


def md_fence(code: str, lang: str = "") -> str:
    """``code`` in a fenced block whose fence is longer than any run of backticks in it (so
    nothing in the code can close the block)."""
    longest = max((len(m) for m in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{code.rstrip(chr(10))}\n{fence}\n"


def csv_cell(text: object) -> str:
    """A TEXT cell (class name, path, id) safe to open in a spreadsheet: one starting with
    ``= + - @``, tab, CR (or ``'``) gets a leading ``'``. Numbers are written as numbers,
    never through this (a negative number is not a formula)."""
    text = "" if text is None else str(text)
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_cell_value(cell: str) -> str:
    """The text :func:`csv_cell` wrote: its added ``'`` removed (other cells as they are)."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(_FORMULA_START) else cell


# --------------------------------------------------------------------------- a translate folder
def translation_name(record: dict) -> str:
    """The PNG name of one translation: ``<source>-to-<target>-s<strength>-seed<seed>-<id[:8]>.png``."""
    stem = safe_name(record["source_id"] or record["source_class"])
    return (f"{stem}-to-{safe_name(record['target_class'])}-s{record['strength']:.2f}-seed{record['seed']}-"
            f"{record['id'][:8]}.png")


def write_translations(results, out_dir: str | os.PathLike) -> Path:
    """Write translate's results into ``out_dir`` (`diffmix translate --out`): one PNG each, its
    record in the text chunk and ``file_name`` set, and records.jsonl, where the new records
    replace those of the same file names and the others are kept. Returns the index path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for res in results:
        rec = res.record
        rec["file_name"] = translation_name(rec)
        save_png(res.image, out_dir / rec["file_name"], rec)
        records.append(rec)
    index = out_dir / "records.jsonl"
    names = {r["file_name"] for r in records}
    kept = [r for r in (read_jsonl(index) if index.exists() else []) if r.get("file_name") not in names]
    write_jsonl_atomic(index, kept + records)
    return index
