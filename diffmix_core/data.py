"""Reading datasets and images, and the one split every stage shares.

Data stage API (other stages code against these names):

* :func:`load_image` — the one decoding path (CLI, fine-tuning, the app's uploads);
  raises :class:`ImageError` / FileNotFoundError.
* :func:`read_dataset` -> :class:`Dataset` of :class:`Item` (id = path relative
  to the dataset root, posix). Layouts, detected in this order:

  0. a benchmark in its official layout (layouts.py: CUB-200-2011, FGVC-Aircraft,
     Flowers-102, Stanford Cars, Oxford-IIIT Pet, a ``save_to_disk()`` DatasetDict):
     its official train/test split is kept (``Dataset.official``), classes in its
     class-id order;
  1. a ``.csv`` file with header ``path,label``: paths relative to the CSV's
     folder (the dataset root), label = the class name;
  2. a Hugging Face ``imagefolder`` folder: it (or a ``train/`` split folder in
     it) holds ``metadata.jsonl`` / ``metadata.csv`` (``file_name`` plus a
     ``label`` / ``class_name`` / ``class`` column, else the parent folder names
     the class), or every sub-folder is a split name (train, validation, val,
     valid, test) holding class folders. With both a train and a test folder their
     split is kept (validation folders count as train), else they are pooled;
  3. otherwise an ImageFolder: one sub-folder per class (searched recursively).

  Class names are cleaned (layouts.clean_class_name: ``001.Black_footed_Albatross``
  -> ``Black footed Albatross``). Label order: official class ids, else folder
  names, else numeric or by name. Every image is decoded once; bad files are
  skipped with a warning and listed in ``Dataset.skipped`` (``strict=True`` raises
  instead).
* :class:`~diffmix_core.config.SplitConfig`, :func:`make_splits`,
  :func:`write_split_file`, :func:`read_split_file`, :func:`split_subset`.
* :func:`resolve_splits` — THE entry every stage uses: reads the split file
  (checking it fits the dataset and the given config) or makes and writes it
  (default :func:`default_split_path`: ``<root>/diffmix_split.json``). The CLI
  helpers ``cli.add_dataset_args`` / ``cli.split_config_from_args`` give every
  subcommand the same ``--data --strict --split-file --split-seed --shots ...``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .config import SplitConfig
from .layouts import Layout, clean_class_name, detect_layout
from .records import read_jsonl, write_text_atomic

# Refuse images above this many pixels before decoding them (decompression bombs).
MAX_PIXELS = int(os.environ.get("DIFFMIX_MAX_PIXELS", 40_000_000))
MAX_SIDE = int(os.environ.get("DIFFMIX_MAX_SIDE", 16_384))     # ... and above this many pixels on a side
MAX_ASPECT = float(os.environ.get("DIFFMIX_MAX_ASPECT", 500))  # ... and longer than this many times their width
BACKGROUND = (255, 255, 255)   # transparent pixels are composited on white
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImageError(ValueError):
    """An image file that cannot be used, with the reason."""


def load_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file to 8-bit RGB, fully, or raise :class:`ImageError` saying why.

    Handles EXIF orientation, transparency (composited on white), palette, CMYK,
    grayscale, 16-bit and float images, and animated files (first frame). Images
    with more than ``max_pixels`` pixels (default ``DIFFMIX_MAX_PIXELS`` or 40 M), or
    whose shape :func:`check_shape` refuses, are refused from their header, before decoding.
    """
    path = Path(path)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > limit:
                    raise ImageError(f"{path}: {w}x{h} = {w * h:,} pixels exceeds the limit of {limit:,} "
                                     "(raise it with DIFFMIX_MAX_PIXELS or --max-pixels)")
                check_shape(w, h, path)
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)   # animated GIF/WebP/TIFF: the first frame
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except Image.DecompressionBombError:   # PIL's own guard fires in Image.open for huge headers
        raise ImageError(f"{path}: more pixels than PIL will open; exceeds the limit of {limit:,} "
                         "(raise it with DIFFMIX_MAX_PIXELS or --max-pixels)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: broken or truncated image ({err})") from None


def check_shape(width: int, height: int, path: str | os.PathLike = "image") -> None:
    """Refuse a shape no stage should work on, from the header: a side over ``MAX_SIDE``
    (``DIFFMIX_MAX_SIDE``, 16,384) or an aspect ratio over ``MAX_ASPECT`` (``DIFFMIX_MAX_ASPECT``, 500:1)."""
    if max(width, height) > MAX_SIDE:
        raise ImageError(f"{path}: {width}x{height} has a side over the limit of {MAX_SIDE:,} px "
                         "(raise it with DIFFMIX_MAX_SIDE)")
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise ImageError(f"{path}: {width}x{height} is longer than {MAX_ASPECT:g} times its width "
                         "(raise the limit with DIFFMIX_MAX_ASPECT)")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if im.mode.startswith("I;16") else (float(a.min()), float(a.max()))
        if im.mode == "F" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        a = np.clip((a - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        canvas = Image.new("RGB", im.size, BACKGROUND)
        canvas.paste(im, mask=im.getchannel("A"))
        return canvas
    return im.convert("RGB")


# --------------------------------------------------------------------------- datasets
SPLIT_NAMES = ("train", "validation", "val", "valid", "test")   # HF imagefolder split folders
LABEL_COLUMNS = ("label", "class_name", "class", "labels")       # HF metadata label columns, in preference order
SPLIT_FILE = "diffmix_split.json"


@dataclass(frozen=True)
class Item:
    """One usable image of a dataset."""

    id: str            # path relative to the dataset root, posix: stable across machines
    path: Path         # absolute path
    label: int         # index into Dataset.classes
    class_name: str


@dataclass(frozen=True)
class Dataset:
    """A read, validated dataset (see :func:`read_dataset`)."""

    root: Path                              # ids are relative to this folder
    classes: tuple[str, ...]                # class names in label order
    items: tuple[Item, ...]
    skipped: tuple[tuple[str, str], ...] = ()   # (path, reason) of unusable files
    source: Path | None = None              # what was read (the folder, or the CSV file)
    layout: str = ""                        # the layout detected, e.g. 'imagefolder', 'cub-200-2011'
    # {image id: 'train' | 'test'}: the dataset's own split, which make_splits keeps (None: it has none)
    official: dict[str, str] | None = dataclasses.field(default=None, hash=False)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, ids: Iterable[str]) -> Dataset:
        """The same classes with only the items ``ids`` (in that order); unknown id -> ValueError."""
        index = {it.id: it for it in self.items}
        ids = list(ids)
        unknown = [i for i in ids if i not in index]
        if unknown:
            raise ValueError(f"{len(unknown)} id(s) are not in the dataset {self.root}: {unknown[:5]}")
        return dataclasses.replace(self, items=tuple(index[i] for i in ids))

    def counts(self) -> list[int]:
        """Images per class, in label order."""
        n = [0] * len(self.classes)
        for it in self.items:
            n[it.label] += 1
        return n

    def by_class(self) -> dict[str, list[Item]]:
        """{class name: its items}, every class present (possibly empty), label order."""
        out: dict[str, list[Item]] = {c: [] for c in self.classes}
        for it in self.items:
            out[it.class_name].append(it)
        return out


def folder_class_name(folder: str) -> str:
    """ImageFolder folder name -> class name ('001.Black_footed_Albatross' -> 'Black footed Albatross')."""
    return clean_class_name(folder)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive, hidden files and folders skipped), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if _is_image(Path(f))]
    return out


def _read_imagefolder(root: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]], dict[str, str]]:
    """(path, class name) candidates of an ImageFolder, files outside class folders, and
    {class name: its folder name}."""
    candidates, stray = [], []
    names: dict[str, str] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            if _is_image(entry):
                stray.append((str(entry), "image outside a class folder (ImageFolder: one sub-folder per class)"))
            continue
        name = folder_class_name(entry.name)
        if name in names:
            raise ValueError(f"folders {names[name]!r} and {entry.name!r} in {root} both give class name "
                             f"{name!r} ('_' reads as a space); rename one")
        names[name] = entry.name
        candidates += [(p, name) for p in _image_files(entry)]
    return candidates, stray, names


def _class_order(names: Iterable[str]) -> list[str]:
    """Label order of classes not named by folders: numeric when every label is an integer, else by name."""
    names = set(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _hf_split_folders(root: Path) -> list[Path] | None:
    """The split folders of a Hugging Face imagefolder, or None when ``root`` is not one."""
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    has_meta = any((root / m).is_file() for m in ("metadata.jsonl", "metadata.csv"))
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_NAMES]
    if has_meta:
        return [root]
    if split_dirs and len(split_dirs) == len(subdirs) and any(d.name.lower() == "train" for d in split_dirs):
        return sorted(split_dirs)
    return None


def _metadata_rows(folder: Path) -> list[dict] | None:
    """Rows of metadata.jsonl / metadata.csv in ``folder``, or None when it has none."""
    if (folder / "metadata.jsonl").is_file():
        return read_jsonl(folder / "metadata.jsonl")
    if (folder / "metadata.csv").is_file():
        with open(folder / "metadata.csv", newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return None


def _read_hf_imagefolder(root: Path, folders: list[Path]) -> tuple[list[tuple[Path, str]], list[tuple[str, str]],
                                                                   list[str] | None]:
    """(path, class name) candidates of a Hugging Face imagefolder (all splits), problems, and the
    class order when every split names its classes by folders (else None)."""
    candidates, problems, class_folders, by_metadata = [], [], {}, False
    for folder in folders:
        rows = _metadata_rows(folder)
        if rows is None:  # labels from the class folders inside the split folder
            sub, stray, names = _read_imagefolder(folder)
            candidates += sub
            problems += stray
            class_folders.update(names)
            continue
        by_metadata = True
        for n, row in enumerate(rows, 1):
            name = row.get("file_name")
            label = next((row[c] for c in LABEL_COLUMNS if row.get(c) not in (None, "")), None)
            if not name:
                problems.append((f"{folder}/metadata line {n}", "no file_name"))
                continue
            if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
                problems.append((f"{folder}/metadata line {n}", f"file_name {name!r} is outside the folder "
                                 "(absolute or '..'); metadata names only the folder's own files"))
                continue
            path = folder / name
            if label is None:  # the datasets library's rule: the parent folder names the class
                label = folder_class_name(path.parent.name) if path.parent != folder else None
            if label is None:
                problems.append((str(path), f"no label: metadata has none of {LABEL_COLUMNS} and no class folder"))
                continue
            candidates.append((path, str(label).strip()))
    return candidates, problems, None if by_metadata else sorted(class_folders, key=class_folders.get)


def _split_folder_official(root: Path, folders: list[Path], candidates: list[tuple[Path, str]]) -> dict | None:
    """{path: 'train' | 'test'} from the split folders (train, validation, val, valid -> train), when
    the dataset has both a train and a test folder; else None (the split file then re-splits)."""
    names = {f.name.lower() for f in folders if f != root}
    if not {"train", "test"} <= names:
        return None
    return {p: "test" if Path(os.path.relpath(p, root)).parts[0].lower() == "test" else "train"
            for p, _ in candidates}


def _read_csv(file: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """(path, class name) candidates of a ``path,label`` CSV (paths relative to its folder)."""
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        if "path" not in fields or "label" not in fields:
            raise ValueError(f"{file}: a dataset CSV needs the header 'path,label'; found {fields}")
        candidates, problems = [], []
        for n, row in enumerate(reader, 2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row["path"] or not row["label"]:
                problems.append((f"{file}:{n}", "empty path or label"))
                continue
            path = Path(row["path"])
            candidates.append((path if path.is_absolute() else file.parent / path, row["label"]))
    return _clean_names(candidates, file), problems


def _clean_names(candidates: list[tuple[Path, str]], source: Path) -> list[tuple[Path, str]]:
    """Candidates with clean class names (layouts.clean_class_name); ValueError when two labels
    as written give one name."""
    written: dict[str, str] = {}
    for _, raw in candidates:
        name = clean_class_name(raw)
        if written.setdefault(name, raw) != raw:
            raise ValueError(f"labels {written[name]!r} and {raw!r} in {source} both give class name {name!r} "
                             "('_' reads as a space, a 'NNN.' id prefix is dropped); rename one")
    return [(path, clean_class_name(raw)) for path, raw in candidates]


@dataclass(frozen=True)
class _Found:
    """What :func:`_detect` read from a dataset path, before any image is decoded."""

    layout: str                               # layout name ('csv', 'imagefolder', 'cub-200-2011', ...)
    root: Path                                # image ids are relative to this folder
    candidates: list[tuple[Path, str]]        # (image path, class name)
    problems: list[tuple[str, str]]           # (path, reason) of entries unusable before decoding
    classes: list[str] | None = None          # label order; None: _class_order decides
    official: dict[Path, str] | None = None   # {image path: 'train' | 'test'}: the dataset's own split


def _from_layout(layout: Layout) -> _Found:
    """An official layout (layouts.detect_layout) as candidates with their official split."""
    candidates = [(path, name) for path, name, _ in layout.files]
    return _Found(layout.name, layout.root, candidates, [], list(layout.classes),
                  {path: split for path, _, split in layout.files})


def _detect(source: Path) -> _Found:
    """What a dataset path holds: an official layout (layouts.py), a CSV, a Hugging Face
    imagefolder or an ImageFolder, in that order."""
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise ValueError(f"{source} is a file but not a .csv; give a CSV with header 'path,label', an "
                             "ImageFolder folder (one sub-folder per class) or a Hugging Face imagefolder")
        return _Found("csv", source.parent.resolve(), *_read_csv(source))
    if not source.is_dir():
        raise FileNotFoundError(f"dataset {source} does not exist")
    root = source.resolve()
    layout = detect_layout(root)
    if layout is not None:
        return _from_layout(layout)
    if any((root / f).is_file() for f in ("dataset_info.json", "state.json")):
        raise ValueError(f"{source} looks like a single datasets.save_to_disk() Dataset; diffmix reads a saved "
                         "DatasetDict with 'train' and 'test' splits, or an imagefolder (images + metadata.jsonl)")
    folders = _hf_split_folders(root)
    if folders is not None:
        candidates, problems, order = _read_hf_imagefolder(root, folders)
        candidates = _clean_names(candidates, root)
        return _Found("hf-imagefolder", root, candidates, problems, order,
                      _split_folder_official(root, folders, candidates))
    candidates, stray, class_folders = _read_imagefolder(root)
    return _Found("imagefolder", root, candidates, stray, sorted(class_folders, key=class_folders.get))


def _item_id(path: Path, root: Path) -> str:
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()   # an absolute CSV path outside the root: its own path is its id


def _validate(candidates: list[tuple[Path, str]], root: Path, max_pixels: int | None,
              show_progress: bool, layout: str = "") -> tuple[list[tuple[str, Path, str]], list[tuple[str, str]]]:
    """Decode every candidate once; (id, path, class) of the good ones and (path, reason) of the rest."""
    good, bad, seen = [], [], set()
    desc = f"checking images ({layout})" if layout else "checking images"
    for path, name in tqdm(candidates, desc=desc, unit="img", disable=not show_progress):
        item_id = _item_id(path, root)
        if item_id in seen:
            bad.append((str(path), "listed twice"))
            continue
        seen.add(item_id)
        try:
            load_image(path, max_pixels=max_pixels)
        except FileNotFoundError:
            bad.append((str(path), "file not found"))
            continue
        except ImageError as err:
            bad.append((str(path), str(err).removeprefix(f"{path}: ")))
            continue
        good.append((item_id, Path(os.path.abspath(path)), name))
    return good, bad


def _report_skipped(skipped: list[tuple[str, str]], source: str | os.PathLike, strict: bool) -> None:
    """Raise (strict) or warn about the unusable files, naming the first ones."""
    if skipped and strict:
        lines = "\n".join(f"  {p}: {r}" for p, r in skipped[:50])
        more = f"\n  ... and {len(skipped) - 50} more" if len(skipped) > 50 else ""
        raise ValueError(f"{len(skipped)} unusable file(s) in {source} (strict):\n{lines}{more}")
    if skipped:
        shown = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
        warnings.warn(f"skipped {len(skipped)} unusable file(s) in {source}: {shown}"
                      f"{' ...' if len(skipped) > 5 else ''}", stacklevel=3)


def _usable_classes(found: _Found, good: list[tuple[str, Path, str]], source: str | os.PathLike) -> list[str]:
    """Classes with at least one usable image, in label order; warns about the empty ones, refuses < 2."""
    present = {name for _, _, name in good}
    order = found.classes if found.classes is not None else _class_order(present)
    classes = [c for c in order if c in present]
    empty = sorted({name for _, name in found.candidates} - present)
    if empty:
        warnings.warn(f"class(es) without a usable image are left out: {empty[:10]}", stacklevel=3)
    if len(classes) < 2:
        raise ValueError(f"dataset {source} ({found.layout}) has {len(classes)} class(es) with usable images "
                         f"{classes}; Diff-Mix needs at least 2 (ImageFolder: one sub-folder per class)")
    return classes


def read_dataset(source: str | os.PathLike, *, strict: bool = False, max_pixels: int | None = None,
                 show_progress: bool = True) -> Dataset:
    """Read and validate a dataset (layouts: see the module docstring and layouts.py).

    Args:
        source: an official benchmark folder (CUB-200-2011, FGVC-Aircraft, Flowers-102, Stanford
            Cars, Oxford-IIIT Pet), an ImageFolder folder, a Hugging Face imagefolder folder or a
            ``path,label`` CSV.
        strict: raise ValueError listing every unusable file instead of skipping them.
        max_pixels: refuse larger images (default :data:`MAX_PIXELS`).
        show_progress: tqdm bar while decoding (it names the layout detected).

    Raises:
        FileNotFoundError: ``source`` does not exist, or an official layout misses one of its files.
        ValueError: fewer than two classes with usable images, bad CSV header, clashing class
            folders, a broken official list (unknown image id in line N, ...), or (strict) any
            unusable file.
    """
    found = _detect(Path(source))
    good, bad = _validate(found.candidates, found.root, max_pixels, show_progress, found.layout)
    skipped = found.problems + bad
    _report_skipped(skipped, source, strict)
    classes = _usable_classes(found, good, source)
    label = {c: i for i, c in enumerate(classes)}
    items = sorted((Item(i, p, label[c], c) for i, p, c in good), key=lambda it: (it.label, it.id))
    official = None
    if found.official is not None:
        split_of = {_item_id(p, found.root): s for p, s in found.official.items()}
        official = {it.id: split_of[it.id] for it in items}
    return Dataset(root=found.root, classes=tuple(classes), items=tuple(items), skipped=tuple(skipped),
                   source=Path(source).resolve(), layout=found.layout, official=official)


# --------------------------------------------------------------------------- splits
SPLITS = ("train", "val", "test")
SPLIT_FORMAT_VERSION = 1


def _held_out(n: int, fraction: float) -> int:
    """Images of an n-image class for a held-out split: round-half-up, at least 1 when fraction > 0."""
    return 0 if fraction <= 0 else max(1, math.floor(n * fraction + 0.5))


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """n_i = floor(n_max * IF**(i/(C-1))), at least 1, for classes i = 0..C-1 (label order = head first)."""
    if num_classes == 1:
        return [n_max]
    return [max(1, math.floor(n_max * imbalance ** (i / (num_classes - 1)) + 1e-9)) for i in range(num_classes)]


def make_splits(dataset: Dataset, config: SplitConfig) -> dict[str, list[str]]:
    """Stratified train / val / test ids, deterministic from ``config.seed``.

    Per class (its own RNG seeded by (seed, class name), so adding a class does
    not reshuffle the others): shuffle, take round(n*test_fraction) for test,
    round(n*val_fraction) for val (at least one each when the fraction is > 0),
    the rest is the training pool. A dataset with an official split
    (``dataset.official``) keeps it: test is its test set (``test_fraction`` is
    not used), val and the pool come from its train images only. Few-shot keeps
    ``shots`` images of each pool; long-tail keeps n_i = n_max * IF**(i/(C-1))
    with n_max = ``shots`` or else the smallest pool, so every count is exact.
    Unused pool images go nowhere: val and test never change with shots /
    imbalance. Ids come back in dataset order.
    """
    pools: list[list[Item]] = []
    chosen: dict[str, set[str]] = {s: set() for s in SPLITS}
    for name, items in dataset.by_class().items():
        test, val, pool = _class_parts(name, items, config, dataset.official)
        chosen["test"].update(it.id for it in test)
        chosen["val"].update(it.id for it in val)
        pools.append(pool)
    for name, pool, n in zip(dataset.classes, pools, _train_counts([len(p) for p in pools], config)):
        if n > len(pool):
            raise ValueError(f"class {name!r} has {len(pool)} training image(s) after val/test, "
                             f"fewer than the {n} that shots={config.shots} / imbalance={config.imbalance} ask for")
        chosen["train"].update(it.id for it in pool[:n])
    return {s: [it.id for it in dataset.items if it.id in chosen[s]] for s in SPLITS}


def _class_parts(name: str, items: list[Item], config: SplitConfig,
                 official: dict[str, str] | None) -> tuple[list[Item], list[Item], list[Item]]:
    """(test, val, training pool) of one class, shuffled by its own RNG; with an official split
    the test part is its test images and only its train images are shuffled and divided."""
    items = sorted(items, key=lambda it: it.id)
    test = [it for it in items if official is not None and official[it.id] == "test"]
    items = [it for it in items if official is None or official[it.id] != "test"]
    random.Random(f"diffmix-split:{config.seed}:{name}").shuffle(items)
    n_test = 0 if official is not None else _held_out(len(items), config.test_fraction)
    n_val = _held_out(len(items), config.val_fraction)
    if n_test + n_val >= len(items):
        if official is not None:
            raise ValueError(f"class {name!r} has {len(items)} official training image(s): too few for "
                             f"val_fraction {config.val_fraction} to leave a training image; lower it or add images")
        raise ValueError(f"class {name!r} has {len(items)} image(s): too few for val_fraction "
                         f"{config.val_fraction} and test_fraction {config.test_fraction} to leave a training "
                         "image; lower the fractions or add images")
    return test + items[:n_test], items[n_test:n_test + n_val], items[n_test + n_val:]


def _train_counts(pool_sizes: list[int], config: SplitConfig) -> list[int]:
    """Training images per class for the pools' sizes (all, few-shot, long-tail)."""
    if config.imbalance is not None:
        n_max = config.shots if config.shots is not None else min(pool_sizes)
        return long_tail_counts(n_max, len(pool_sizes), config.imbalance)
    if config.shots is not None:
        return [config.shots] * len(pool_sizes)
    return list(pool_sizes)


def write_split_file(path: str | os.PathLike, dataset: Dataset, splits: dict, config: SplitConfig) -> Path:
    """Write the split file (JSON, atomically)."""
    data = {"format_version": SPLIT_FORMAT_VERSION, "dataset": str(dataset.root), "layout": dataset.layout,
            "official_split": dataset.official is not None, "classes": list(dataset.classes),
            "config": dataclasses.asdict(config), "splits": {s: list(splits[s]) for s in SPLITS}}
    return write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def read_split_file(path: str | os.PathLike) -> dict:
    """Read and check a split file: keys, version, one list of ids per split, disjoint splits."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"split file {path} is not JSON ({err})") from None
    keys = {"format_version", "dataset", "classes", "config", "splits"}
    if not isinstance(data, dict) or not keys <= set(data):
        raise ValueError(f"{path} is not a diffmix split file (needs keys {sorted(keys)})")
    if data["format_version"] != SPLIT_FORMAT_VERSION:
        raise ValueError(f"{path}: split file format {data['format_version']!r} is not supported "
                         f"(this diffmix reads {SPLIT_FORMAT_VERSION})")
    splits = data["splits"]
    if not isinstance(splits, dict) or set(splits) != set(SPLITS) or not all(
            isinstance(v, list) and all(isinstance(i, str) for i in v) for v in splits.values()):
        raise ValueError(f"{path}: 'splits' must map each of {SPLITS} to a list of image ids")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = set(splits[a]) & set(splits[b])
        if both:
            raise ValueError(f"{path}: {len(both)} image(s) are in both {a} and {b}, e.g. {sorted(both)[:3]}")
    try:
        SplitConfig(**data["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad split config {data['config']!r} ({err})") from None
    return data


def default_split_path(dataset: Dataset) -> Path:
    """``<root>/diffmix_split.json`` (a CSV dataset: ``<root>/<csv stem>.diffmix_split.json``)."""
    if dataset.source is not None and dataset.source.is_file():
        return dataset.root / f"{dataset.source.stem}.{SPLIT_FILE}"
    return dataset.root / SPLIT_FILE


def _config_diff(stored: SplitConfig, given: dict) -> str:
    """'field: file X vs given Y' for every given field that differs ('' when none)."""
    return ", ".join(f"{k}: file {getattr(stored, k)!r} vs given {v!r}"
                     for k, v in given.items() if getattr(stored, k) != v)


def resolve_splits(dataset: Dataset, split_file: str | os.PathLike | None = None,
                   config: SplitConfig | dict | None = None) -> dict[str, list[str]]:
    """The split every stage uses: read ``split_file`` if it exists, else make it and write it.

    Args:
        dataset: from :func:`read_dataset`.
        split_file: default :func:`default_split_path` (inside the dataset root).
        config: the split settings: a SplitConfig, or a dict of only the fields the
            user gave (the CLI's way: other fields are not checked against the file).
            With an existing file the given settings must equal the file's (None =
            accept the file's). Without a file they make it (missing = defaults).

    Raises:
        ValueError: the file was made for other classes or other settings, or lists
            images the dataset does not have (removed or now unreadable).
    """
    path = Path(split_file) if split_file is not None else default_split_path(dataset)
    given = dataclasses.asdict(config) if isinstance(config, SplitConfig) else dict(config or {})
    if not path.exists():
        config = SplitConfig(**given)
        splits = make_splits(dataset, config)
        try:
            write_split_file(path, dataset, splits, config)
        except OSError as err:
            raise OSError(f"cannot write the split file {path} ({err}); give a writable --split-file") from err
        return splits
    data = read_split_file(path)
    if list(data["classes"]) != list(dataset.classes):
        raise ValueError(f"split file {path} was made for classes {data['classes'][:5]}... ({len(data['classes'])}), "
                         f"the dataset has {list(dataset.classes)[:5]}... ({len(dataset.classes)}); "
                         "use the split file of this dataset or another --split-file path")
    stored = SplitConfig(**data["config"])
    SplitConfig(**given)  # unknown fields / bad values: TypeError / ValueError before comparing
    if _config_diff(stored, given):
        raise ValueError(f"split file {path} was made with other settings ({_config_diff(stored, given)}). "
                         "Every stage must use one split: drop the split options to use the file, or give "
                         "another --split-file to make a new split")
    known = {it.id for it in dataset.items}
    missing = [i for s in SPLITS for i in data["splits"][s] if i not in known]
    if missing:
        raise ValueError(f"split file {path} lists {len(missing)} image(s) the dataset does not have (removed or "
                         f"unreadable), e.g. {missing[:3]}; restore them, or give another --split-file")
    _check_official(dataset, data["splits"], path)
    return {s: list(data["splits"][s]) for s in SPLITS}


def _check_official(dataset: Dataset, splits: dict, path: Path) -> None:
    """Refuse a split file that does not keep the dataset's official split (test = its test set,
    train and val from its train set), e.g. one made by a diffmix that pooled every image."""
    if dataset.official is None:
        return
    test = {i for i, s in dataset.official.items() if s == "test"}
    leaked = [i for s in ("train", "val") for i in splits[s] if i in test]
    if leaked or set(splits["test"]) != test:
        problem = (f"puts {len(leaked)} official test image(s) in train/val, e.g. {leaked[:3]}" if leaked else
                   f"has a test split of {len(splits['test'])} image(s), not the {len(test)} official test images")
        raise ValueError(f"split file {path} {problem}: this {dataset.layout} dataset has an official train/test "
                         "split, which every stage keeps. Delete the file (it is made again) or give another "
                         "--split-file")


def split_subset(dataset: Dataset, splits: dict, name: str) -> Dataset:
    """The ``name`` split ('train', 'val' or 'test') as a Dataset with the same classes."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; use one of {SPLITS}")
    return dataset.subset(splits[name])
