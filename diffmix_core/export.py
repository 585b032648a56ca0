"""Export writers for generated images and their records; one implementation
shared by ``diffmix synthesize``, ``diffmix export`` and the app.

An export folder holds any of::

    <out>/imagefolder/metadata.jsonl + <number:06d>.png   Hugging Face imagefolder
    <out>/authors/meta.csv + data/<Source>/<Target>-<number:06d>-<s>.png   the authors' layout
    <out>/manifest.json, <out>/MANIFEST.sha256           sha256 of every file above
    <out>.zip                                            the folder, zipped ('zip' format)

Everything is built in a staging folder beside ``<out>`` and moved into place
only when complete, so a failed export (disk full, a bad image) leaves the
previous export exactly as it was and raises an error saying what happened.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .records import atomic_path, read_jsonl, safe_name, save_png, sha256_file, write_jsonl_atomic, write_text_atomic

FORMATS = ("imagefolder", "authors", "zip")
META_CSV_COLUMNS = ("First Directory", "Second Directory", "Number", "Strength", "Path")  # REFERENCE.md §2
MANIFEST_JSON = "manifest.json"
MANIFEST_SHA = "MANIFEST.sha256"


def parse_formats(value: str | Sequence[str]) -> tuple[str, ...]:
    """'imagefolder,authors,zip' (or a list) -> validated tuple, order kept, duplicates dropped."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(v.strip() for v in items if v.strip()))
    bad = [n for n in names if n not in FORMATS]
    if bad:
        raise ValueError(f"unknown export format(s) {bad}; use a comma-separated list of {', '.join(FORMATS)}")
    return names


def strength_text(strength: float) -> str:
    """Strength as the authors write it in file names: 0.7 -> '0.7'."""
    return f"{float(strength):g}"


def authors_relpath(record: dict, number: int) -> str:
    """``<Source_Class>/<Target_Class>-<number:06d>-<s>.png``, relative to ``data/``."""
    return (f"{safe_name(record['source_class'])}/{safe_name(record['target_class'])}-"
            f"{number:06d}-{strength_text(record['strength'])}.png")


def imagefolder_row(record: dict, file_name: str, classes: Sequence[str] | None = None) -> dict:
    """One metadata.jsonl row: ``file_name`` first, then the record (its own file_name
    kept as ``source_file``); with ``classes``, label indices and the soft-label vector."""
    row = {"file_name": file_name}
    row.update({k: v for k, v in record.items() if k != "file_name"})
    row["source_file"] = record.get("file_name")
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        row["source_label"] = index.get(record.get("source_class"))
        row["target_label"] = index.get(record.get("target_class"))
        row["soft_label_vector"] = [float((record.get("soft_label") or {}).get(c, 0.0)) for c in classes]
    return row


def _place(src: Path, dst: Path) -> None:
    """Put a copy of ``src`` at ``dst`` (a hard link when possible: files are never edited in place)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class ExportWriter:
    """Build one export folder image by image; :meth:`close` moves it into place.

    Use as a context manager: an exception inside the block (or in ``close``)
    removes the staging folder and leaves any earlier export untouched::

        with ExportWriter(out, ("imagefolder", "authors", "zip")) as w:
            for image, record in items:
                w.add(image, record)
    """

    def __init__(self, out_dir: str | os.PathLike, formats: Sequence[str] = ("imagefolder", "authors"),
                 *, classes: Sequence[str] | None = None):
        self.out_dir = Path(out_dir).resolve()
        self.formats = parse_formats(formats)
        if not self.formats:
            raise ValueError("no export format given")
        self.classes = list(classes) if classes is not None else None
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.staging-", dir=self.out_dir.parent))
        self.rows: list[dict] = []
        self.meta: list[dict] = []
        self.numbers: set[int] = set()
        self.count = 0

    def __enter__(self) -> ExportWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, image, record: dict, number: int | None = None) -> None:
        """Add one image (a file path, e.g. a PNG from the engine, or a PIL image) with its record.

        ``number`` is the image's index in the export (default: ``record['plan_idx']``, else
        the running count); it names the files and fills meta.csv's ``Number``.
        """
        number = int(record.get("plan_idx", self.count) if number is None else number)
        if number in self.numbers:
            raise ValueError(f"export number {number} used twice (record {record.get('id')})")
        self.numbers.add(number)
        first: Path | None = None
        for fmt, rel in self._targets(record, number):
            dst = self.stage / rel
            try:
                if first is not None:
                    _place(first, dst)
                elif isinstance(image, Image.Image):
                    save_png(image, dst, record)
                else:
                    _place(Path(image), dst)
            except OSError as err:
                self._fail(err, f"writing {rel}")
            first = first or dst
            if fmt == "imagefolder":
                self.rows.append(imagefolder_row(record, Path(rel).name, self.classes))
            else:
                self.meta.append({"First Directory": record["source_class"],
                                  "Second Directory": record["target_class"], "Number": number,
                                  "Strength": record["strength"], "Path": rel.split("/", 2)[2]})
        self.count += 1

    def _targets(self, record: dict, number: int) -> list[tuple[str, str]]:
        out = []
        if "imagefolder" in self.formats:
            out.append(("imagefolder", f"imagefolder/{number:06d}.png"))
        if "authors" in self.formats:
            out.append(("authors", f"authors/data/{authors_relpath(record, number)}"))
        return out

    def close(self) -> Path:
        """Write the indexes and manifest, the zip if asked, then swap the folder into place."""
        try:
            if "imagefolder" in self.formats:
                write_jsonl_atomic(self.stage / "imagefolder" / "metadata.jsonl",
                                   sorted(self.rows, key=lambda r: r["file_name"]))
            if "authors" in self.formats:
                write_text_atomic(self.stage / "authors" / "meta.csv", meta_csv_text(self.meta))
            write_manifest(self.stage)
            if "zip" in self.formats:   # the zip lands right after the folder, or neither does
                with atomic_path(self.out_dir.with_name(self.out_dir.name + ".zip")) as tmp:
                    write_zip(self.stage, tmp, arc_root=self.out_dir.name)
                    _swap_into_place(self.stage, self.out_dir)
            else:
                _swap_into_place(self.stage, self.out_dir)
        except OSError as err:
            self._fail(err, "finishing the export")
        except BaseException:
            self.abort()
            raise
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    def _fail(self, err: OSError, doing: str):
        self.abort()
        raise OSError(err.errno, f"export to {self.out_dir} failed while {doing}: {err.strerror or err}; "
                      f"nothing was changed there (free some space or choose another --out)") from err


def meta_csv_text(rows: Iterable[dict]) -> str:
    """The authors' meta.csv: exactly :data:`META_CSV_COLUMNS`, sorted by Number."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=META_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["Number"]))
    return buf.getvalue()


def _swap_into_place(stage: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``stage`` with renames; on failure the old folder is restored."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
    try:
        os.replace(stage, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old / "x", out_dir)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _walk(root: Path, skip: Sequence[str] = ()) -> list[str]:
    """Relative POSIX paths of all files under ``root``, sorted (hidden temporaries excluded)."""
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in skip and not path.name.startswith("."):
            files.append(rel)
    return sorted(files)


def write_manifest(root: str | os.PathLike) -> Path:
    """``manifest.json`` ({path: sha256}) and ``MANIFEST.sha256`` (``sha256sum -c`` format) in ``root``."""
    root = Path(root)
    files = {rel: sha256_file(root / rel) for rel in _walk(root, skip=(MANIFEST_JSON, MANIFEST_SHA))}
    write_text_atomic(root / MANIFEST_JSON, json.dumps({"algorithm": "sha256", "count": len(files),
                                                       "files": files}, indent=1) + "\n")
    write_text_atomic(root / MANIFEST_SHA, "".join(f"{h}  {rel}\n" for rel, h in files.items()))
    return root / MANIFEST_JSON


def verify_manifest(root: str | os.PathLike) -> list[str]:
    """Problems found checking ``root`` against its manifest (empty list = all files intact)."""
    root = Path(root)
    files = json.loads((root / MANIFEST_JSON).read_text(encoding="utf-8"))["files"]
    problems = [f"missing: {rel}" for rel in files if not (root / rel).is_file()]
    problems += [f"changed: {rel}" for rel, h in files.items() if (root / rel).is_file()
                 and sha256_file(root / rel) != h]
    problems += [f"extra: {rel}" for rel in _walk(root, skip=(MANIFEST_JSON, MANIFEST_SHA)) if rel not in files]
    return problems


def write_zip(root: str | os.PathLike, zip_path: str | os.PathLike, arc_root: str = "") -> Path:
    """Zip every file under ``root`` (PNGs stored, text deflated) into ``zip_path``."""
    root = Path(root)
    with zipfile.ZipFile(zip_path, "w") as zf:
        for rel in _walk(root):
            kind = zipfile.ZIP_STORED if rel.endswith(".png") else zipfile.ZIP_DEFLATED
            zf.write(root / rel, f"{arc_root}/{rel}" if arc_root else rel, compress_type=kind)
    return Path(zip_path)


def export_records(items: Iterable[tuple[object, dict]], out_dir: str | os.PathLike,
                   formats: Sequence[str] = ("imagefolder", "authors"), *, classes: Sequence[str] | None = None,
                   show_progress: bool = True) -> Path:
    """Export (image, record) pairs; see the module docstring for the layout."""
    items = list(items)
    with ExportWriter(out_dir, formats, classes=classes) as writer:
        for image, record in tqdm(items, desc="export", unit="img", disable=not show_progress):
            writer.add(image, record)
    return writer.out_dir


def read_generated_folder(folder: str | os.PathLike) -> list[tuple[Path, dict]]:
    """(image path, record) pairs of a folder of generated images with ``records.jsonl``
    (as ``diffmix translate`` / ``diffmix synthesize`` write it)."""
    folder = Path(folder)
    index = folder / "records.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index} does not exist: give a folder written by diffmix translate/synthesize")
    items = []
    for n, rec in enumerate(read_jsonl(index), 1):
        name = rec.get("file_name")
        if not name or not (folder / name).is_file():
            raise FileNotFoundError(f"{index}:{n}: image {name!r} is missing from {folder}")
        items.append((folder / name, rec))
    return items
