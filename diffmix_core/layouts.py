"""Benchmark datasets in their official layouts, read with their own train/test split.

:func:`detect_layout` recognises a folder as one of the layouts below (the folder itself
or the folder the archive unpacks to inside it) and returns a :class:`Layout`: every image
with its clean class name and its official split ('train' or 'test'), classes in the
official class-id order. ``data.read_dataset`` turns it into a ``Dataset``; ``data.make_splits``
then keeps the official test set and draws validation, few-shot and long-tail subsets from
the official train set only. The official validation sets (FGVC-Aircraft, Flowers-102) are
part of train, as in the benchmarks' usual "trainval" protocol.

===================  ==========================================================  ==================
layout               files                                                       train / test
===================  ==========================================================  ==================
cub-200-2011         images.txt, train_test_split.txt, classes.txt,              is_training_image
                     image_class_labels.txt, images/NNN.Name/*.jpg               1 / 0
fgvc-aircraft        data/images_variant_{train,val,test}.txt, variants.txt,     train+val / test
                     data/images/<id>.jpg
oxford-flowers-102   imagelabels.mat, setid.mat, jpg/image_NNNNN.jpg             trnid+valid / tstid
stanford-cars        devkit/cars_meta.mat, devkit/cars_train_annos.mat,          cars_train /
                     cars_test_annos_withlabels.mat, cars_train/, cars_test/     cars_test
oxford-iiit-pet      annotations/trainval.txt, annotations/test.txt,             trainval / test
                     images/<Breed>_<n>.jpg
hf-disk              datasets.save_to_disk() DatasetDict with train and test     train(+validation)
                                                                                 / test
===================  ==========================================================  ==================

.mat files are read with ``scipy.io.loadmat`` (MATLAB v5 data, no code is run).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .records import atomic_path

# The 102 Oxford Flowers category names, in label order (label 1 = "pink primrose"): the list
# the dataset's authors publish with the labels and the Diff-Mix code uses.
FLOWERS102_CLASSES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen",
    "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper",
    "blackberry lily",
)
assert len(FLOWERS102_CLASSES) == 102

_ID_PREFIX = re.compile(r"^\d+\.(?=\D)")   # '001.' in '001.Black_footed_Albatross'


def clean_class_name(raw: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross': drop a numeric 'NNN.' prefix,
    '_' becomes a space, runs of spaces become one."""
    return " ".join(_ID_PREFIX.sub("", raw.strip()).replace("_", " ").split())


@dataclass(frozen=True)
class Layout:
    """A dataset read in its official layout (see the module docstring)."""

    name: str                                   # layout name, e.g. 'cub-200-2011'
    root: Path                                  # image ids are paths relative to this folder
    classes: tuple[str, ...]                    # clean class names, official class-id order
    files: tuple[tuple[Path, str, str], ...]    # (image path, class name, 'train' | 'test')


def _first(root: Path, *relpaths: str) -> Path | None:
    """The first of ``root/relpath`` that exists."""
    return next((root / r for r in relpaths if (root / r).exists()), None)


def _need(folder: Path, layout: str, *names: str) -> list[Path]:
    """``folder/name`` for each name; FileNotFoundError naming the first missing one."""
    for name in names:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} looks like the {layout} layout but {name} is missing from it")
    return [folder / n for n in names]


def _table(path: Path, fields: int) -> list[tuple[int, list[str]]]:
    """(line number, ``fields`` whitespace-separated fields, the last one taking the rest) of
    each non-empty, non-'#' line; ValueError naming the file and line of a short one."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(maxsplit=fields - 1)
        if len(parts) < fields:
            raise ValueError(f"{path} line {n}: expected {fields} fields, got {line.strip()!r}")
        rows.append((n, parts))
    return rows


def _int(text: str, path: Path, n: int) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path} line {n}: {text!r} is not an integer id") from None


# --------------------------------------------------------------------------- CUB-200-2011
def read_cub(root: Path) -> Layout:
    """CUB-200-2011: ids, split flags and class ids from its four text files."""
    images, split, classes, labels = _need(root, "CUB-200-2011", "images.txt", "train_test_split.txt",
                                           "classes.txt", "image_class_labels.txt")
    names = {_int(p[0], classes, n): clean_class_name(p[1]) for n, p in _table(classes, 2)}
    paths = {_int(p[0], images, n): p[1].strip() for n, p in _table(images, 2)}
    train = _lookup(split, paths, lambda v: {"1": "train", "0": "test"}.get(v.strip()), "is_training_image 1 or 0")
    label = _lookup(labels, paths, lambda v: names.get(int(v)) if v.strip().isdigit() else None,
                    "a class id of classes.txt")
    for table, found in ((split, train), (labels, label)):
        missing = sorted(set(paths) - set(found))
        if missing:
            raise ValueError(f"{root}: image id {missing[0]} of images.txt has no line in {table.name}")
    files = tuple((root / "images" / paths[i], label[i], train[i]) for i in sorted(paths))
    return Layout("cub-200-2011", root, tuple(names[c] for c in sorted(names)), files)


def _lookup(path: Path, ids: dict, value: Callable[[str], str | None], expected: str) -> dict[int, str]:
    """{image id: value(second field)} of a two-field table; ValueError for an unknown id or a bad value."""
    out = {}
    for n, (first, second) in _table(path, 2):
        i = _int(first, path, n)
        if i not in ids:
            raise ValueError(f"{path} line {n}: unknown image id {i} (not in images.txt)")
        v = value(second)
        if v is None:
            raise ValueError(f"{path} line {n}: {second.strip()!r} is not {expected}")
        out[i] = v
    return out


# --------------------------------------------------------------------------- FGVC-Aircraft
def read_aircraft(root: Path) -> Layout:
    """FGVC-Aircraft (variant level): train + val lists are the training set, test the test set."""
    data = root / "data"
    (variants,) = _need(data, "FGVC-Aircraft", "variants.txt")
    order = [line.strip() for line in variants.read_text(encoding="utf-8").splitlines() if line.strip()]
    known = set(order)
    files = []
    for part, split in (("train", "train"), ("val", "train"), ("test", "test")):
        (listing,) = _need(data, "FGVC-Aircraft", f"images_variant_{part}.txt")
        for n, (image_id, variant) in _table(listing, 2):
            variant = variant.strip()
            if variant not in known:
                raise ValueError(f"{listing} line {n}: variant {variant!r} is not in variants.txt")
            files.append((data / "images" / f"{image_id}.jpg", clean_class_name(variant), split))
    return Layout("fgvc-aircraft", root, tuple(clean_class_name(v) for v in order), tuple(files))


# --------------------------------------------------------------------------- Oxford Flowers-102
def _loadmat(path: Path, layout: str, *keys: str) -> list:
    """The named variables of a MATLAB v5 file (scipy.io.loadmat, squeezed)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path, squeeze_me=True)
    except (NotImplementedError, ValueError, OSError) as err:
        raise ValueError(f"{path}: cannot read it as a MATLAB v5 .mat file ({err})") from None
    for key in keys:
        if key not in mat:
            raise ValueError(f"{path}: no variable {key!r} (a {layout} file has {list(keys)})")
    return [mat[k] for k in keys]


def read_flowers(root: Path) -> Layout:
    """Oxford Flowers-102: labels from imagelabels.mat, trnid + valid = train, tstid = test (setid.mat)."""
    import numpy as np

    labels_mat, setid = _need(root, "Oxford Flowers-102", "imagelabels.mat", "setid.mat")
    (labels,) = _loadmat(labels_mat, "imagelabels.mat", "labels")
    labels = np.atleast_1d(labels).astype(int)
    if labels.min() < 1 or labels.max() > len(FLOWERS102_CLASSES):
        raise ValueError(f"{labels_mat}: labels must be 1..{len(FLOWERS102_CLASSES)}, found {labels.min()}.."
                         f"{labels.max()}")
    trn, val, tst = (np.atleast_1d(a).astype(int) for a in _loadmat(setid, "setid.mat", "trnid", "valid", "tstid"))
    files = []
    for ids, split, key in ((trn, "train", "trnid"), (val, "train", "valid"), (tst, "test", "tstid")):
        for i in ids:
            if not 1 <= i <= len(labels):
                raise ValueError(f"{setid}: {key} lists image {i}, but imagelabels.mat has {len(labels)} images")
            files.append((root / "jpg" / f"image_{i:05d}.jpg", FLOWERS102_CLASSES[labels[i - 1] - 1], split))
    classes = tuple(FLOWERS102_CLASSES[c - 1] for c in sorted(set(labels.tolist())))
    return Layout("oxford-flowers-102", root, classes, tuple(files))


# --------------------------------------------------------------------------- Stanford Cars
def read_cars(root: Path) -> Layout:
    """Stanford Cars devkit: class names from cars_meta.mat, cars_train/ = train, cars_test/ = test."""
    meta = _first(root, "devkit/cars_meta.mat", "cars_meta.mat")
    test = _first(root, "cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat")
    train = _first(root, "devkit/cars_train_annos.mat", "cars_train_annos.mat")
    if train is None or test is None:
        missing = "cars_train_annos.mat" if train is None else "cars_test_annos_withlabels.mat"
        raise FileNotFoundError(f"{root} looks like the Stanford Cars devkit layout but {missing} is missing "
                                "(cars_test_annos.mat has no labels; the test labels come in "
                                "cars_test_annos_withlabels.mat)")
    (names,) = _loadmat(meta, "cars_meta.mat", "class_names")
    names = [clean_class_name(str(n)) for n in names]
    files = []
    for annos_file, folder, split in ((train, "cars_train", "train"), (test, "cars_test", "test")):
        (annos,) = _loadmat(annos_file, "Stanford Cars annotation", "annotations")
        for n, row in enumerate(annos.reshape(-1), 1):
            try:
                fname, cls = str(row["fname"]), int(row["class"])
            except (ValueError, IndexError) as err:
                raise ValueError(f"{annos_file}: annotation {n} has no fname / class ({err})") from None
            if not 1 <= cls <= len(names):
                raise ValueError(f"{annos_file}: annotation {n} ({fname}) has class {cls}, "
                                 f"cars_meta.mat names {len(names)}")
            files.append((root / folder / fname, names[cls - 1], split))
    return Layout("stanford-cars", root, tuple(names), tuple(files))


# --------------------------------------------------------------------------- Oxford-IIIT Pet
def read_pets(root: Path) -> Layout:
    """Oxford-IIIT Pet: class = image name without its trailing number ('Abyssinian_100' ->
    'Abyssinian'; cat breeds are capitalised, dog breeds are not, and stay so), official class ids."""
    annotations = root / "annotations"
    classes: dict[int, str] = {}
    files = []
    for listing, split in zip(_need(annotations, "Oxford-IIIT Pet", "trainval.txt", "test.txt"), ("train", "test")):
        for n, parts in _table(listing, 2):
            name, class_id = parts[0], _int(parts[1].split()[0], listing, n)
            breed = clean_class_name(name.rsplit("_", 1)[0])
            if classes.setdefault(class_id, breed) != breed:
                raise ValueError(f"{listing} line {n}: class id {class_id} is {classes[class_id]!r} elsewhere, "
                                 f"{breed!r} here")
            files.append((root / "images" / f"{name}.jpg", breed, split))
    return Layout("oxford-iiit-pet", root, tuple(classes[c] for c in sorted(classes)), tuple(files))


# --------------------------------------------------------------------------- datasets.save_to_disk()
HF_IMAGES = "diffmix_images"     # where the images of a save_to_disk() folder are written as files
HF_SPLITS = {"train": "train", "validation": "train", "val": "train", "valid": "train", "test": "test"}


def read_hf_disk(root: Path) -> Layout:
    """A ``datasets.save_to_disk()`` DatasetDict with train and test splits (validation is part of
    train). Every stage reads image files, so its images are written once, as they are stored,
    to ``<root>/diffmix_images/<split>/<row>.<ext>`` (kept while their size matches)."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{root}: cannot load this datasets.save_to_disk() folder with "
                         f"datasets.load_from_disk ({err})") from None
    if not isinstance(saved, datasets.DatasetDict) or not {"train", "test"} <= {k.lower() for k in saved}:
        found = list(saved) if isinstance(saved, datasets.DatasetDict) else "a single Dataset"
        raise ValueError(f"{root}: a save_to_disk() folder needs a DatasetDict with 'train' and 'test' splits "
                         f"(found {found}); save one with both, or write an imagefolder")
    first = saved[next(k for k in saved if k.lower() == "train")]
    image, label, classes = _hf_columns(first.features, root)
    files = []
    for key in (k for k in saved if k.lower() in HF_SPLITS):
        rows = saved[key].cast_column(image, datasets.Image(decode=False)).select_columns([image, label])
        for n, row in enumerate(tqdm(rows, desc=f"writing {key} images", unit="img", leave=False)):
            value = row[label]   # a ClassLabel index, else the label as stored (a name or a number)
            if classes and not 0 <= value < len(classes):
                raise ValueError(f"{root}: {key} row {n} has label {value}; the ClassLabel has {len(classes)} names")
            name = classes[value] if classes else clean_class_name(str(value))
            path = _write_stored_image(row[image], root / HF_IMAGES / key / f"{n:06d}", f"{key} row {n}")
            files.append((path, name, HF_SPLITS[key.lower()]))
    order = tuple(classes) if classes else tuple(sorted({name for _, name, _ in files}))
    return Layout("hf-disk", root, order, tuple(files))


def _hf_columns(features: dict, root: Path) -> tuple[str, str, list[str]]:
    """(image column, label column, clean ClassLabel names or [] for a string label column)."""
    import datasets

    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    labels += [k for k in ("label", "labels", "class_name", "class") if k in features and k not in labels]
    if not images or not labels:
        raise ValueError(f"{root}: the train split needs an Image column and a ClassLabel (or label) column; "
                         f"it has {dict(features)}")
    feature = features[labels[0]]
    return images[0], labels[0], [clean_class_name(n) for n in getattr(feature, "names", [])]


def _write_stored_image(value: dict, stem: Path, where: str) -> Path:
    """The file of one stored image: its own path when only a path is stored, else its bytes
    written (atomically, once) to ``stem`` + the format's extension."""
    import io

    from PIL import Image, UnidentifiedImageError

    data, path = value.get("bytes"), value.get("path")
    if data is None:
        if not path:
            raise ValueError(f"{stem.parent}: {where} stores neither image bytes nor a path")
        return Path(path)
    try:
        with Image.open(io.BytesIO(data)) as im:
            ext = {"JPEG": ".jpg", "TIFF": ".tif"}.get(im.format, f".{(im.format or 'png').lower()}")
    except UnidentifiedImageError:
        ext = Path(path or "x.png").suffix or ".png"   # left for the decoder to report as unusable
    target = stem.with_suffix(ext)
    if not (target.is_file() and target.stat().st_size == len(data)):
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    return target


# --------------------------------------------------------------------------- detection
# (marker file, the folders it may sit in relative to the given folder, reader); first match wins.
READERS: tuple[tuple[str, tuple[str, ...], Callable[[Path], Layout]], ...] = (
    ("train_test_split.txt", (".", "CUB_200_2011"), read_cub),
    ("data/images_variant_test.txt", (".", "fgvc-aircraft-2013b"), read_aircraft),
    ("setid.mat", (".", "flowers102", "oxford-flowers-102"), read_flowers),
    ("devkit/cars_meta.mat", (".", "stanford_cars", "stanford-cars"), read_cars),
    ("annotations/trainval.txt", (".", "oxford-iiit-pet"), read_pets),
    ("dataset_dict.json", (".",), read_hf_disk),
)


def detect_layout(folder: Path) -> Layout | None:
    """The official layout ``folder`` (or its usual unpacked sub-folder) holds, read; None if none.

    Raises FileNotFoundError / ValueError when a layout's marker file is there but the layout
    is broken (a missing file, an unknown image id in line N, ...).
    """
    if folder.name == "data" and (folder / "images_variant_test.txt").is_file():
        folder = folder.parent   # pointed at FGVC-Aircraft's data/ folder
    for marker, places, reader in READERS:
        for place in places:
            root = (folder / place).resolve()
            if (root / marker).is_file():
                return reader(root)
    if (folder / "cars_meta.mat").is_file():   # devkit files unpacked beside the image folders
        return read_cars(folder.resolve())
    return None
