"""Export writers for generated images and their records; one implementation
shared by ``diffmix synthesize``, ``diffmix export`` and the app. The readers of
the layouts they write are here too (:func:`read_synthetic`, for ``diffmix classify``).

An export folder holds any of::

    <out>/imagefolder/metadata.jsonl + <number:06d>.png   Hugging Face imagefolder
    <out>/imagefolder/README.md                          its dataset card (with the class list): ``label`` loads
                                                         as a ClassLabel in the bundle's class order
    <out>/authors/meta.csv + data/<Source>/<Target>-<number:06d>-<s>.png   the authors' layout
    <out>/manifest.json, <out>/MANIFEST.sha256           sha256 of every file above
    <out>.zip                                            the folder, zipped ('zip' format)

Everything is built in a staging folder beside ``<out>`` and moved into place
only when complete, so a failed export (disk full, a bad image) leaves the
previous export exactly as it was and raises an error saying what happened.

An export never destroys data: ``<out>`` may replace only an earlier diffmix
export (its ``manifest.json`` says ``"format": "diffmix-export"`` and the folder
holds nothing the manifest does not list) or an empty folder; anything else needs
``overwrite=True``, and even then the working directory, the folders the images
come from and any folder containing them are refused (:func:`check_target`).
Images are always copied (never hard-linked) from their source, which must be a
regular file, not a symlink.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .data import ImageError, load_image
from .records import (atomic_path, check_apart, clean_leftovers, contained_file, csv_cell, csv_cell_value, md_text,
                      read_jsonl, read_png_record, safe_name, save_png, sha256_file, user_mode, write_jsonl_atomic,
                      write_text_atomic)

FORMATS = ("imagefolder", "authors", "zip")
META_CSV_COLUMNS = ("First Directory", "Second Directory", "Number", "Strength", "Path")  # docs/method.md §2
MANIFEST_JSON = "manifest.json"
MANIFEST_SHA = "MANIFEST.sha256"
EXPORT_FORMAT = "diffmix-export"   # manifest.json's "format": marks a folder as a diffmix export
DATASET_CARD = "README.md"   # in imagefolder/: the Hugging Face dataset card


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


_AUTHORS_UNSAFE = re.compile(r'[\x00-\x1f\x7f\\:*?"<>|]')   # not portable in a file name (Windows, macOS)
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


def _authors_plain(name: str) -> str | None:
    """The authors' spelling of a folder name (spaces and '/' -> '_'), or None where no file
    system takes it portably (non-ASCII or control characters, reserved names, leading '.', long)."""
    plain = str(name).replace(" ", "_").replace("/", "_")
    if (not plain.isascii() or not plain.isprintable() or _AUTHORS_UNSAFE.search(plain) or plain.startswith(".")
            or not plain.strip("_") or len(plain) > 100 or plain.split(".")[0].upper() in _RESERVED):
        return None
    return plain


def authors_dir_names(classes: Sequence[str]) -> dict[str, str]:
    """Each class's folder in the authors' layout: as their sample_mp.py writes it (spaces and '/'
    become '_', apostrophes and '-' kept), so their generate_meta_csv (``(.+)`` for the folder,
    ``(.+)-(\\d+)-(.+).png`` for the file, then '_' -> ' ') reads it back as :func:`authors_label`.
    A name no file system takes that way, or whose spelling another class shares (``a/b``, ``a_b``
    and ``a b`` all spell ``a_b``; case-insensitively, as on macOS and Windows), gets
    records.safe_name (with its hash) instead: one folder per class, never shared."""
    plain = {c: _authors_plain(c) for c in dict.fromkeys(classes)}
    uses = Counter(_label_key(p) for p in plain.values() if p)
    return {c: p if p and uses[_label_key(p)] == 1 else safe_name(c) for c, p in plain.items()}


def _label_key(folder: str) -> str:
    """What a folder reads back as (its meta.csv name, stripped as readers strip cells), case-folded."""
    return folder.replace("_", " ").strip().casefold()


def authors_dir_name(name: str, classes: Sequence[str] | None = None) -> str:
    """One class's folder (:func:`authors_dir_names`; without ``classes``, judged on its own)."""
    return authors_dir_names([*(classes or ()), name])[name] if classes else (_authors_plain(name) or safe_name(name))


def authors_label(name: str, classes: Sequence[str] | None = None) -> str:
    """The class name the authors' generate_meta_csv parses back from :func:`authors_dir_name`
    ('_' and '/' read as spaces, as their loaders normalise names); meta.csv holds this one."""
    return authors_dir_name(name, classes).replace("_", " ")


def authors_relpath(record: dict, number: int, names: dict[str, str] | None = None) -> str:
    """``<Source_Class>/<Target_Class>-<number:06d>-<s>.png``, relative to ``data/`` (``names``:
    :func:`authors_dir_names` of the export's classes)."""
    def folder(c: str) -> str:
        return (names or {}).get(c) or authors_dir_name(c)
    return f"{folder(record['source_class'])}/{folder(record['target_class'])}-{number:06d}-" \
           f"{strength_text(record['strength'])}.png"


def imagefolder_row(record: dict, file_name: str, classes: Sequence[str] | None = None) -> dict:
    """One metadata.jsonl row: ``file_name`` first, then the record (its own file_name
    kept as ``source_file``); with ``classes``: ``label`` (the hard target class's index,
    also ``target_label``), ``source_label`` and ``soft_label_vector`` (weights in class order)."""
    row = {"file_name": file_name}
    row.update({k: v for k, v in record.items() if k != "file_name"})
    row["source_file"] = record.get("file_name")
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        row["label"] = row["target_label"] = index.get(record.get("target_class"))
        row["source_label"] = index.get(record.get("source_class"))
        row["soft_label_vector"] = [float((record.get("soft_label") or {}).get(c, 0.0)) for c in classes]
    return row


def _copy_regular(src: Path, dst: Path) -> None:
    """Copy the bytes of ``src`` to ``dst``; ``src`` must be a regular file and not a symlink
    (opened with O_NOFOLLOW and checked on the open descriptor, so it cannot be swapped)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(f"{src} is a symlink; an export copies only regular files") from None
        raise
    with os.fdopen(fd, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
            raise ValueError(f"{src} is not a regular file; an export copies only regular files")
        with open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


def dataset_features(metadata_jsonl: str | os.PathLike, classes: Sequence[str]):
    """The ``datasets.Features`` of an imagefolder export: every metadata column as the
    ``datasets`` library infers it from the JSON lines, ``file_name`` as the image, and
    ``label`` as a ``ClassLabel`` with ``classes`` in order."""
    import datasets
    import pyarrow.json as paj

    size = os.path.getsize(metadata_jsonl)   # one block: the schema is inferred from every row
    table = paj.read_json(metadata_jsonl, read_options=paj.ReadOptions(block_size=max(size + 1, 1 << 20)))
    inferred = datasets.Features.from_arrow_schema(table.schema)
    features = {"image": datasets.Image()}
    for name, feature in inferred.items():
        if name == "label":
            feature = datasets.ClassLabel(names=list(classes))
        if name != "file_name":
            features[name] = feature
    return datasets.Features(features)


def dataset_card_text(metadata_jsonl: str | os.PathLike, classes: Sequence[str]) -> str:
    """README.md of an imagefolder export: the Hub's dataset-card metadata (one config whose
    ``features`` make ``label`` a ClassLabel) and what each column means."""
    import yaml

    config = {"config_name": "default", "data_files": [{"split": "train", "path": ["*.png", "metadata.jsonl"]}]}
    note = ""
    try:
        config["features"] = dataset_features(metadata_jsonl, classes)._to_yaml_list()
    except (ValueError, TypeError) as err:   # columns datasets cannot type: the card still lists the classes
        note = f"\n(`label` loads as an integer here: the columns could not be typed: {md_text(str(err)[:200])})\n"
    meta = {"configs": [config], "tags": ["synthetic", "diffmix", "image-classification"],
            "task_categories": ["image-classification"]}
    order = "\n".join(f"| {i} | {md_text(c)} |" for i, c in enumerate(classes))   # one line, inert
    return (f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n\n"
            "# Synthetic images made with diffmix (Diff-Mix)\n\n"
            "Each row is one translated image and its record.\n\n"
            "```python\nfrom datasets import load_dataset\n"
            "ds = load_dataset(\"path/to/this/folder\")   # or the Hub repo id it was uploaded to\n"
            "ds[\"train\"].features[\"label\"].names           # the class order below\n```\n\n"
            "| column | meaning |\n| --- | --- |\n"
            "| `image` | the generated PNG (its record is also in the PNG's `diffmix` text chunk) |\n"
            "| `label` | the hard target class (ClassLabel, class order below); same as `target_label` |\n"
            "| `source_label`, `source_class`, `target_class` | the translation's source and target |\n"
            "| `soft_label_vector` | the soft label, one weight per class in the class order below |\n"
            "| `soft_label` | the same as {class: weight} |\n"
            "| `strength` | the strength asked for |\n"
            "| `strength_run` | the strength that ran, floor(N·s)/N for N steps; the soft labels use it: "
            "y = k((1 − s^γ) onehot(source) + s^γ onehot(target)), γ = `label_gamma`, k = `label_scale` |\n\n"
            f"Class order:\n\n| index | class |\n| --- | --- |\n{order}\n{note}")


def _place(src: Path, dst: Path) -> None:
    """Put ``src``, a file of the staging folder, at ``dst`` too (a hard link when possible:
    both are the export's own files, never edited in place)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        _copy_regular(src, dst)


def is_export(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is an earlier diffmix export that holds only its own files: its
    manifest.json is one diffmix wrote (format marker, or the older unmarked layout) and
    every file in it is listed there (so replacing it loses nothing of anyone else's)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (isinstance(manifest, dict) and manifest.get("algorithm") == "sha256"
            and isinstance(manifest.get("files"), dict)
            and manifest.get("format", EXPORT_FORMAT) == EXPORT_FORMAT):
        return False
    own = set(manifest["files"]) | {MANIFEST_JSON, MANIFEST_SHA}
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink() or (not path.is_dir() and rel not in own):
            return False
    return True


def _is_export_zip(path: Path, name: str) -> bool:
    """True when ``path`` is a zip diffmix wrote for the export folder ``name``."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return f"{name}/{MANIFEST_JSON}" in names and all(n.startswith(f"{name}/") for n in names)


def check_target(out_dir: str | os.PathLike, *, overwrite: bool = False,
                 protect: Sequence[str | os.PathLike] = (), zip_too: bool = False,
                 sealed: Sequence[str | os.PathLike] = ()) -> Path:
    """Where an export may go, resolved; ValueError when writing there could destroy data.

    Refused always: a file (or anything not a folder) at ``out_dir``; the working directory,
    a folder in ``protect`` (the sources: the records' folder, every folder holding an image
    being exported) or any folder that contains one of them; a folder in ``sealed`` (a bundle,
    its base), a folder containing one, or one inside one (:func:`records.check_apart`). Refused
    unless ``overwrite``: an existing folder that is neither empty nor an earlier diffmix
    export (:func:`is_export`), and (with ``zip_too``) an existing ``<out>.zip`` that is not
    the zip of such an export.
    """
    out = Path(out_dir).resolve()
    if Path(out_dir).is_symlink() or out.exists() and not out.is_dir():
        raise ValueError(f"export target {out} exists and is not a folder; choose another --out "
                         "(a file is never replaced by an export)")
    check_apart(out, [("the working directory", Path.cwd()), ("your home folder", Path.home())]
                + [("the source folder", p) for p in protect], inside=False)
    check_apart(out, [("the bundle", p) for p in sealed])
    if out.is_dir() and any(out.iterdir()) and not is_export(out) and not overwrite:
        raise ValueError(f"export target {out} exists and is not an earlier diffmix export (it has files a "
                         "diffmix manifest does not list); choose a new or empty --out, or pass --overwrite "
                         "to replace it")
    zip_path = out.with_name(out.name + ".zip")
    if zip_too and (zip_path.exists() or zip_path.is_symlink()):
        if zip_path.is_dir() or zip_path.is_symlink():
            raise ValueError(f"{zip_path} exists and is not a file; the export's zip would replace it. "
                             "Choose another --out")
        if not overwrite and not _is_export_zip(zip_path, out.name):
            raise ValueError(f"{zip_path} exists and is not the zip of an earlier diffmix export; choose "
                             "another --out, or pass --overwrite to replace it")
    return out


class ExportWriter:
    """Build one export folder image by image; :meth:`close` moves it into place.

    Use as a context manager: an exception inside the block (or in ``close``)
    removes the staging folder and leaves any earlier export untouched::

        with ExportWriter(out, ("imagefolder", "authors", "zip")) as w:
            for image, record in items:
                w.add(image, record)
    """

    def __init__(self, out_dir: str | os.PathLike, formats: Sequence[str] = ("imagefolder", "authors"),
                 *, classes: Sequence[str] | None = None, overwrite: bool = False,
                 protect: Sequence[str | os.PathLike] = (), sealed: Sequence[str | os.PathLike] = ()):
        self.formats = parse_formats(formats)
        if not self.formats:
            raise ValueError("no export format given")
        self.overwrite, self.protect, self.sealed = overwrite, tuple(protect), tuple(sealed)
        self.out_dir = check_target(out_dir, overwrite=overwrite, protect=protect, zip_too="zip" in self.formats,
                                    sealed=sealed)
        self.classes = list(classes) if classes is not None else None
        self.authors = authors_dir_names(self.classes) if self.classes else {}   # class -> authors' folder
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.out_dir.parent, self.out_dir.name)   # of killed runs; a live run's are kept
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.staging-{os.getpid()}-",
                                           dir=self.out_dir.parent))
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
        if not isinstance(image, Image.Image):   # the folder of an image being exported is never replaced
            try:
                check_apart(self.out_dir, [("the folder holding the image", Path(image).parent)], inside=False)
            except ValueError:
                self.abort()
                raise
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
                    _copy_regular(Path(image), dst)
            except ValueError:
                self.abort()
                raise
            except OSError as err:
                self._fail(err, f"writing {rel}")
            first = first or dst
            if fmt == "imagefolder":
                self.rows.append(imagefolder_row(record, Path(rel).name, self.classes))
            else:
                label = {c: (self.authors.get(c) or authors_dir_name(c)).replace("_", " ")
                         for c in (record["source_class"], record["target_class"])}
                self.meta.append({"First Directory": csv_cell(label[record["source_class"]]),
                                  "Second Directory": csv_cell(label[record["target_class"]]), "Number": number,
                                  "Strength": float(record["strength"]), "Path": csv_cell(rel.split("/", 2)[2])})
        self.count += 1

    def _targets(self, record: dict, number: int) -> list[tuple[str, str]]:
        out = []
        if "imagefolder" in self.formats:
            out.append(("imagefolder", f"imagefolder/{number:06d}.png"))
        if "authors" in self.formats:
            out.append(("authors", f"authors/data/{authors_relpath(record, number, self.authors)}"))
        return out

    def close(self) -> Path:
        """Write the indexes and manifest, the zip if asked, then swap the folder into place."""
        try:
            if "imagefolder" in self.formats:
                write_jsonl_atomic(self.stage / "imagefolder" / "metadata.jsonl",
                                   sorted(self.rows, key=lambda r: r["file_name"]))
                if self.classes is not None and self.rows:
                    write_text_atomic(self.stage / "imagefolder" / DATASET_CARD,
                                      dataset_card_text(self.stage / "imagefolder" / "metadata.jsonl", self.classes))
            if "authors" in self.formats:
                write_text_atomic(self.stage / "authors" / "meta.csv", meta_csv_text(self.meta))
            write_manifest(self.stage)
            for folder in (self.stage, *(p for p in self.stage.rglob("*") if p.is_dir())):
                user_mode(folder)   # mkdtemp made the stage 0700
            check_target(self.out_dir, overwrite=self.overwrite, protect=self.protect,
                         zip_too="zip" in self.formats, sealed=self.sealed)   # nothing appeared there meanwhile
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
    """The authors' meta.csv: exactly :data:`META_CSV_COLUMNS`, sorted by Number. Rows end in
    CRLF (RFC 4180), so a CR or LF inside a class name is quoted, never a row break; text cells
    come through :func:`records.csv_cell` (see :meth:`ExportWriter.add`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=META_CSV_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["Number"]))
    return buf.getvalue()


def _swap_into_place(stage: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``stage`` with renames; on failure the old folder is restored."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
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
    write_text_atomic(root / MANIFEST_JSON, json.dumps({"format": EXPORT_FORMAT, "algorithm": "sha256",
                                                       "count": len(files), "files": files}, indent=1) + "\n")
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
                   show_progress: bool = True, overwrite: bool = False,
                   protect: Sequence[str | os.PathLike] = (), sealed: Sequence[str | os.PathLike] = ()) -> Path:
    """Export (image, record) pairs; see the module docstring for the layout, and
    :func:`check_target` for ``overwrite``, ``protect`` (the source folders) and ``sealed``
    (a bundle). The folder of every image given as a file is protected too."""
    items = list(items)
    protect = (*protect, *{Path(image).parent for image, _ in items if not isinstance(image, Image.Image)})
    with ExportWriter(out_dir, formats, classes=classes, overwrite=overwrite, protect=protect,
                      sealed=sealed) as writer:
        for image, record in tqdm(items, desc="export", unit="img", disable=not show_progress):
            writer.add(image, record)
    return writer.out_dir


def owned_image(folder: Path, name: object, where: str) -> Path:
    """The image ``name`` (a path from a records file) inside ``folder``, checked: a relative
    path that resolves inside ``folder`` with no symlink on the way, a regular file that
    decodes as an image. Anything else is a ValueError (FileNotFoundError when absent)."""
    path = contained_file(folder, name, where)
    try:
        load_image(path).close()
    except (ImageError, OSError) as err:
        raise ValueError(f"{where}: {err}") from None
    return path


def read_generated_folder(folder: str | os.PathLike) -> list[tuple[Path, dict]]:
    """(image path, record) pairs of a folder of generated images with ``records.jsonl``
    (as ``diffmix translate`` / ``diffmix synthesize`` write it). Every listed image is
    checked by :func:`owned_image`: the folder's own regular image files, nothing else."""
    folder = Path(folder)
    index = folder / "records.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index} does not exist: give a folder written by diffmix translate/synthesize")
    items = []
    for n, rec in enumerate(read_jsonl(index), 1):
        if not isinstance(rec, dict):
            raise ValueError(f"{index}:{n}: not a record (a JSON object)")
        items.append((owned_image(folder, rec.get("file_name"), f"{index}:{n}"), rec))
    return items


# --------------------------------------------------------------------------- reading an export back
@dataclass(frozen=True)
class SyntheticItem:
    """One synthetic image and what its soft label is made from."""

    path: Path
    source_class: str
    target_class: str
    strength: float     # the strength that ran when known (imagefolder's strength_run, or the PNG's
    #                     record in the authors' layout), else as written
    strength_asked: float | None = None   # the strength asked for (the plan's; meta.csv's Strength)


def synthetic_layout(path: str | os.PathLike) -> tuple[str, Path]:
    """('imagefolder' | 'authors', folder) for a synthetic set: an export layout folder, an
    export folder holding them, or a ``diffmix synthesize`` output folder (its ``export/``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"synthetic set {path} does not exist")
    for folder in (path, path / "imagefolder", path / "authors", path / "export" / "imagefolder",
                   path / "export" / "authors"):
        if (folder / "metadata.jsonl").is_file():
            return "imagefolder", folder
        if (folder / "meta.csv").is_file() and (folder / "data").is_dir():
            return "authors", folder
    raise ValueError(f"{path} is not a synthetic set: expected metadata.jsonl (Hugging Face imagefolder) or "
                     "meta.csv + data/ (the authors' layout), as `diffmix export` / `synthesize --export` write")


def _read_imagefolder_set(folder: Path) -> list[SyntheticItem]:
    items = []
    for n, row in enumerate(read_jsonl(folder / "metadata.jsonl"), 1):
        missing = [k for k in ("file_name", "source_class", "target_class", "strength") if row.get(k) is None]
        if missing:
            raise ValueError(f"{folder / 'metadata.jsonl'}:{n}: no {', '.join(missing)} (not a diffmix export)")
        strength = row.get("strength_run", row["strength"])
        path = _listed_image(folder, row["file_name"], f"{folder / 'metadata.jsonl'}:{n}")
        items.append(SyntheticItem(path, str(row["source_class"]), str(row["target_class"]), float(strength),
                                   float(row["strength"])))
    return items


def _listed_image(folder: Path, name: object, where: str) -> Path:
    """A synthetic set's image: inside ``folder`` as a regular file (:func:`records.contained_file`;
    an absolute or '../' name, or a symlink, is refused); a missing one is returned as it is,
    for :func:`read_synthetic` to list with the others."""
    try:
        return contained_file(folder, name, where)
    except FileNotFoundError:
        return folder / str(name)


def _read_authors_set(folder: Path, classes: Sequence[str] | None = None) -> list[SyntheticItem]:
    """The items of meta.csv; with ``classes``, a name as the authors' layout writes it
    (:func:`authors_label`: 'F A-18' for 'F/A-18') maps back to its class."""
    names = {d.replace("_", " ").strip(): c for c, d in authors_dir_names(classes or ()).items()}
    names.update({c: c for c in classes or ()})
    with open(folder / "meta.csv", newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in META_CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{folder / 'meta.csv'} lacks column(s) {missing}; the authors' layout has "
                             f"{META_CSV_COLUMNS}")
        rows = [(_listed_image(folder / "data", csv_cell_value(row["Path"]), f"{folder / 'meta.csv'}:{n}"),
                 csv_cell_value(row["First Directory"].strip()), csv_cell_value(row["Second Directory"].strip()),
                 float(row["Strength"])) for n, row in enumerate(reader, 2)]
        return [SyntheticItem(path, names.get(src, src), names.get(tgt, tgt),
                              _strength_that_ran(path, s, folder / "data"), s) for path, src, tgt, s in rows]


def _strength_that_ran(image: Path, asked: float, data: Path) -> float:
    """meta.csv's Strength is the strength asked for (what the authors' loader reads); the
    soft label uses the strength that ran, from the image's own record (PNG text chunk) when
    it has one, so both layouts give the same labels. Images without a record (or outside
    ``data``, whose records are not read): as written."""
    if not image.resolve().is_relative_to(data.resolve()):
        return asked
    try:
        record = read_png_record(image)
    except (OSError, ValueError):   # missing or not a PNG: read_synthetic reports missing files
        return asked
    if record and record.get("strength_run") is not None and record.get("strength") is not None \
            and abs(float(record["strength"]) - asked) < 1e-6:
        return float(record["strength_run"])
    return asked


def read_synthetic(path: str | os.PathLike, classes: tuple[str, ...] | list[str] | None = None
                   ) -> tuple[str, list[SyntheticItem]]:
    """(layout, items) of a synthetic set; with ``classes``, every named class must be one of them."""
    layout, folder = synthetic_layout(path)
    items = _read_imagefolder_set(folder) if layout == "imagefolder" else _read_authors_set(folder, classes)
    if not items:
        raise ValueError(f"synthetic set {folder} ({layout}) lists no images")
    absent = [str(it.path) for it in items if not it.path.is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} image(s) listed by the synthetic set {folder} are missing, "
                                f"e.g. {absent[:3]}")
    if classes is not None:
        unknown = sorted({c for it in items for c in (it.source_class, it.target_class)} - set(classes))
        if unknown:
            raise ValueError(f"synthetic set {folder} names class(es) {unknown[:5]} that the dataset does not have; "
                             "was it made from another dataset?")
    return layout, items
