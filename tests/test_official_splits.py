"""Benchmarks in their official layouts (layouts.py): detection, clean class names, and the official
train/test split kept by every split (validation, few-shot and long-tail drawn from official train)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy.io import savemat

from diffmix_core.cli import main
from diffmix_core.config import SplitConfig
from diffmix_core.data import make_splits, read_dataset, resolve_splits, write_split_file
from diffmix_core.layouts import clean_class_name
from helpers import FAST_CLASSIFIER, shape_image


def read(path, **kw):
    return read_dataset(path, show_progress=False, **kw)


def save(path, i):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape_image(i).save(path)


# --------------------------------------------------------------------------- writers of each official layout
CUB = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "017.Cardinal")


def write_cub(root, train=3, test=2):
    """CUB_200_2011/ inside ``root``: per class ``train`` training and ``test`` test images."""
    cub = root / "CUB_200_2011"
    images, split, labels, n = [], [], [], 0
    for c, folder in enumerate(CUB, 1):
        for j in range(train + test):
            n += 1
            rel = f"{folder}/{folder.split('.')[1]}_{j:04d}_{n}.jpg"
            save(cub / "images" / rel, n)
            images.append(f"{n} {rel}")
            split.append(f"{n} {int(j < train)}")
            labels.append(f"{n} {c}")
    for name, lines in (("images.txt", images), ("train_test_split.txt", split), ("image_class_labels.txt", labels),
                        ("classes.txt", [f"{c} {f}" for c, f in enumerate(CUB, 1)])):
        (cub / name).write_text("\n".join(lines) + "\n")
    return root


VARIANTS = ("707-320", "F/A-18", "Cessna_172")


def write_aircraft(root):
    """fgvc-aircraft-2013b/data/: per variant 2 train, 1 val, 2 test images."""
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(VARIANTS) + "\n")
    lists, n = {"train": [], "val": [], "test": []}, 0
    for v in VARIANTS:
        for part in ("train", "train", "val", "test", "test"):
            n += 1
            save(data / "images" / f"{1000000 + n}.jpg", n)
            lists[part].append(f"{1000000 + n} {v}")
    for part, lines in lists.items():
        (data / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_flowers(root):
    """imagelabels.mat, setid.mat, jpg/: labels 1, 2 and 5, per class 2 trnid + 2 valid + 2 tstid."""
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    for label in (1, 2, 5):
        for key in ("trnid", "trnid", "valid", "valid", "tstid", "tstid"):
            labels.append(label)
            ids[key].append(len(labels))
            save(root / "jpg" / f"image_{len(labels):05d}.jpg", len(labels))
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(root / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    return root


CARS = ("AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012", "smart fortwo Convertible 2012")


def _annotations(rows):
    fields = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    out = np.zeros((1, len(rows)), dtype=fields)
    for i, (cls, fname) in enumerate(rows):
        out[0, i] = (1, 1, 15, 15, np.uint8(cls), fname)
    return {"annotations": out}


def write_cars(root):
    """The devkit: per class 3 cars_train and 2 cars_test images."""
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array([list(CARS)], dtype=object)})
    rows = {"train": [], "test": []}
    for c in range(1, len(CARS) + 1):
        for split in ("train", "train", "train", "test", "test"):
            fname = f"{len(rows[split]) + 1:05d}.jpg"
            save(root / f"cars_{split}" / fname, 10 * c + len(rows[split]))
            rows[split].append((c, fname))
    savemat(root / "devkit" / "cars_train_annos.mat", _annotations(rows["train"]))
    savemat(root / "cars_test_annos_withlabels.mat", _annotations(rows["test"]))
    return root


PETS = (("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 6, 1))   # (breed, class id, species)


def write_pets(root):
    """annotations/trainval.txt + test.txt, images/: per breed 3 trainval and 2 test images."""
    lines, n = {"trainval": ["#Image CLASS-ID SPECIES BREED ID"], "test": []}, 0
    for breed, class_id, species in PETS:
        for part in ("trainval", "trainval", "trainval", "test", "test"):
            n += 1
            save(root / "images" / f"{breed}_{n}.jpg", n)
            lines[part].append(f"{breed}_{n} {class_id} {species} {n}")
    (root / "annotations").mkdir()
    for part, rows in lines.items():
        (root / "annotations" / f"{part}.txt").write_text("\n".join(rows) + "\n")
    return root


def write_split_folders(root):
    """train/<class>/ and test/<class>/ (e.g. Stanford Cars as ImageFolder per split)."""
    for split, n in (("train", 3), ("test", 2)):
        for c, name in enumerate(("001.Acura_TL", "002.Audi_R8")):
            for j in range(n):
                save(root / split / name / f"{j}.jpg", 10 * c + j + (50 if split == "test" else 0))
    return root


def write_hf_disk(root):
    """datasets.save_to_disk() of a DatasetDict: per class 2 train + 1 validation and 2 test rows."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CUB))})
    parts = {"train": 2, "validation": 1, "test": 2}
    rows = {k: {"image": [shape_image(100 * c + j + 10 * len(k)) for c in range(3) for j in range(n)],
                "label": [c for c in range(3) for _ in range(n)]} for k, n in parts.items()}
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in rows.items()}
                         ).save_to_disk(str(root))
    return root


LAYOUTS = {   # writer, layout name, classes, official train and test images per class
    "cub": (write_cub, "cub-200-2011", ("Black footed Albatross", "Laysan Albatross", "Cardinal"), 3, 2),
    "aircraft": (write_aircraft, "fgvc-aircraft", ("707-320", "F/A-18", "Cessna 172"), 3, 2),
    "flowers": (write_flowers, "oxford-flowers-102", ("pink primrose", "hard-leaved pocket orchid",
                                                      "english marigold"), 4, 2),
    "cars": (write_cars, "stanford-cars", CARS, 3, 2),
    "pets": (write_pets, "oxford-iiit-pet", ("Abyssinian", "american bulldog", "Bengal"), 3, 2),
    "hf-disk": (write_hf_disk, "hf-disk", ("Black footed Albatross", "Laysan Albatross", "Cardinal"), 3, 2),
    "split-folders": (write_split_folders, "hf-imagefolder", ("Acura TL", "Audi R8"), 3, 2),
}


@pytest.fixture(params=sorted(LAYOUTS))
def official(request, tmp_path):
    writer, layout, classes, n_train, n_test = LAYOUTS[request.param]
    (tmp_path / "ds").mkdir()
    return read(writer(tmp_path / "ds")), layout, classes, n_train, n_test


def official_ids(ds, split):
    return {i for i, s in ds.official.items() if s == split}


# --------------------------------------------------------------------------- reading
def test_layout_classes_and_official_counts(official):
    ds, layout, classes, n_train, n_test = official
    assert ds.layout == layout and ds.classes == classes and ds.skipped == ()
    for split, n in (("train", n_train), ("test", n_test)):
        assert ds.subset(sorted(official_ids(ds, split))).counts() == [n] * len(classes)
    assert set(ds.official) == {it.id for it in ds.items}


def test_splits_keep_the_official_test_set(official, tmp_path):
    ds, *_ = official
    splits = resolve_splits(ds, tmp_path / "split.json", SplitConfig(seed=3, val_fraction=0.3, test_fraction=0.5))
    assert set(splits["test"]) == official_ids(ds, "test")     # test_fraction has no say
    assert set(splits["train"]) | set(splits["val"]) == official_ids(ds, "train")
    assert not set(splits["train"]) & set(splits["val"]) and splits["val"]
    assert ds.subset(splits["val"]).counts() == [1] * len(ds.classes)   # round-half-up, at least 1
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["layout"] == ds.layout and saved["official_split"] is True
    assert resolve_splits(ds, tmp_path / "split.json") == splits     # the file is read back as it is


def test_few_shot_and_long_tail_draw_from_official_train(official):
    ds, *_ = official
    train = official_ids(ds, "train")
    few = {seed: make_splits(ds, SplitConfig(seed=seed, shots=2)) for seed in (0, 1, 2)}
    for splits in few.values():
        assert set(splits["train"]) <= train and set(splits["test"]) == official_ids(ds, "test")
        assert ds.subset(splits["train"]).counts() == [2] * len(ds.classes)
    tail = make_splits(ds, SplitConfig(shots=2, imbalance=0.5))
    assert set(tail["train"]) <= train and ds.subset(tail["train"]).counts()[0] == 2
    assert set(tail["val"]) == set(few[0]["val"])   # val never depends on shots / imbalance


def test_a_pooled_split_file_is_refused(official, tmp_path):
    ds, *_ = official
    pooled = dataclasses.replace(ds, official=None)
    config = SplitConfig(val_fraction=0.2, test_fraction=0.4)
    write_split_file(tmp_path / "old.json", ds, make_splits(pooled, config), config)
    with pytest.raises(ValueError, match="official train/test split"):
        resolve_splits(ds, tmp_path / "old.json")


def test_dataset_root_or_its_unpacked_folder(tmp_path):
    write_cub(tmp_path / "dl")
    inner = read(tmp_path / "dl" / "CUB_200_2011")
    outer = read(tmp_path / "dl")
    assert inner.root == outer.root == (tmp_path / "dl" / "CUB_200_2011").resolve()
    assert inner.items[0].id.startswith("images/001.Black_footed_Albatross/")
    write_aircraft(tmp_path / "air")
    data = read(tmp_path / "air" / "fgvc-aircraft-2013b" / "data")   # pointed at data/
    assert data.layout == "fgvc-aircraft" and data.root == (tmp_path / "air" / "fgvc-aircraft-2013b").resolve()


def test_clean_class_names_and_imagefolder_order(tmp_path):
    assert clean_class_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert clean_class_name(" 200.Common_Yellowthroat ") == "Common Yellowthroat"
    assert clean_class_name("707-320") == "707-320" and clean_class_name("3") == "3"
    assert clean_class_name("1.5") == "1.5" and clean_class_name("a__b") == "a b"
    write_cub(tmp_path / "cub")
    folder = read(tmp_path / "cub" / "CUB_200_2011" / "images")   # the images/ folder alone: an ImageFolder
    assert folder.layout == "imagefolder" and folder.official is None
    assert folder.classes == ("Black footed Albatross", "Laysan Albatross", "Cardinal")   # folder (id) order


def test_hf_disk_images_are_written_once(tmp_path):
    import datasets

    ds = read(write_hf_disk(tmp_path / "hf"))
    files = sorted((tmp_path / "hf" / "diffmix_images").rglob("*.png"))
    assert len(files) == len(ds.items) == 15 and ds.items[0].id.startswith("diffmix_images/")
    stamps = [f.stat().st_mtime_ns for f in files]
    again = read(tmp_path / "hf")
    assert [f.stat().st_mtime_ns for f in files] == stamps and again.official == ds.official
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [shape_image(0)], "label": [0]},
                          features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
                              names=["a", "b"])}))}).save_to_disk(str(tmp_path / "trainonly"))
    with pytest.raises(ValueError, match="'train' and 'test' splits"):
        read(tmp_path / "trainonly")


def test_csv_and_metadata_labels_are_cleaned_and_clashes_refused(tmp_path):
    for j in range(2):
        save(tmp_path / "ds" / f"{j}.png", j)
    (tmp_path / "ds" / "list.csv").write_text("path,label\n0.png,001.Black_footed_Albatross\n1.png,017.Cardinal\n")
    assert read(tmp_path / "ds" / "list.csv").classes == ("Black footed Albatross", "Cardinal")
    (tmp_path / "ds" / "clash.csv").write_text("path,label\n0.png,a_b\n1.png,a b\n")
    with pytest.raises(ValueError, match="labels 'a_b' and 'a b' .* both give class name 'a b'"):
        read(tmp_path / "ds" / "clash.csv")
    rows = [{"file_name": "0.png", "label": "002.Laysan_Albatross"}, {"file_name": "1.png", "label": "017.Cardinal"}]
    (tmp_path / "ds" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read(tmp_path / "ds").classes == ("Cardinal", "Laysan Albatross")


# --------------------------------------------------------------------------- broken layouts
def test_broken_cub_names_the_file_and_line(tmp_path):
    cub = write_cub(tmp_path / "a") / "CUB_200_2011"
    (cub / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classes.txt is missing"):
        read(tmp_path / "a")
    cub = write_cub(tmp_path / "b") / "CUB_200_2011"
    with open(cub / "train_test_split.txt", "a") as f:
        f.write("99 1\n")
    with pytest.raises(ValueError, match=r"train_test_split.txt line 16: unknown image id 99"):
        read(tmp_path / "b")
    lines = (cub / "train_test_split.txt").read_text().splitlines()
    (cub / "train_test_split.txt").write_text("\n".join(lines[1:15]) + "\n")
    with pytest.raises(ValueError, match="image id 1 of images.txt has no line in train_test_split.txt"):
        read(tmp_path / "b")


def test_broken_aircraft_flowers_cars_pets(tmp_path):
    data = write_aircraft(tmp_path / "air") / "fgvc-aircraft-2013b" / "data"
    (data / "images_variant_val.txt").write_text("1000003 707-320\n1000099 Spitfire\n")
    with pytest.raises(ValueError, match="images_variant_val.txt line 2: variant 'Spitfire' is not in variants.txt"):
        read(tmp_path / "air")
    flowers = write_flowers(tmp_path / "fl")
    savemat(flowers / "setid.mat", {"trnid": np.array([[1, 40]]), "valid": np.array([[2]]), "tstid": np.array([[3]])})
    with pytest.raises(ValueError, match="trnid lists image 40, but imagelabels.mat has 18 images"):
        read(flowers)
    savemat(flowers / "setid.mat", {"trnid": np.array([[1]]), "tstid": np.array([[3]])})
    with pytest.raises(ValueError, match="no variable 'valid'"):
        read(flowers)
    cars = write_cars(tmp_path / "cars")
    (cars / "cars_test_annos_withlabels.mat").rename(cars / "devkit" / "cars_test_annos.mat")
    with pytest.raises(FileNotFoundError, match="cars_test_annos_withlabels.mat"):
        read(cars)
    pets = write_pets(tmp_path / "pets")
    with open(pets / "annotations" / "test.txt", "a") as f:
        f.write("Bengal_99 2 1 1\n")
    with pytest.raises(ValueError, match="class id 2 is 'american bulldog' elsewhere, 'Bengal' here"):
        read(pets)


def test_missing_images_are_skipped_like_any_unusable_file(tmp_path):
    write_cub(tmp_path / "cub")
    gone = next((tmp_path / "cub" / "CUB_200_2011" / "images" / CUB[2]).iterdir())
    gone.unlink()
    with pytest.warns(UserWarning, match="skipped 1 unusable"):
        ds = read(tmp_path / "cub")
    assert dict(ds.skipped)[str(gone)] == "file not found" and len(ds.official) == len(ds.items) == 14
    with pytest.raises(ValueError, match="1 unusable"):
        read(tmp_path / "cub", strict=True)


# --------------------------------------------------------------------------- the CLI on an official layout
def test_cli_split_and_train_on_cub(tmp_path, capsys, one_torch_thread):
    root = write_cub(tmp_path / "cub", train=4, test=2)
    assert main(["split", "--data", str(root), "--shots", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "layout: cub-200-2011, official train/test split kept" in out and "Black footed Albatross" in out
    split_file = root / "CUB_200_2011" / "diffmix_split.json"
    assert json.loads(split_file.read_text())["layout"] == "cub-200-2011"
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--epochs", "1", *FAST_CLASSIFIER]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["counts"]["train"] == 6 and report["counts"]["val"] == 3 and report["counts"]["test"] == 6
    assert set(report["per_class"]) == {"Black footed Albatross", "Laysan Albatross", "Cardinal"}
