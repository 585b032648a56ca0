"""The data stage: reading ImageFolder / CSV / HF imagefolder, validation, splits."""
from __future__ import annotations

import json

import pytest

from diffmix_core.config import SplitConfig
from diffmix_core.data import (Dataset, long_tail_counts, make_splits, read_dataset, read_split_file,
                               resolve_splits, split_subset, write_split_file)
from helpers import make_imagefolder, shape_image


@pytest.fixture
def folder(tmp_path):
    return make_imagefolder(tmp_path / "ds")


def read(path, **kw) -> Dataset:
    return read_dataset(path, show_progress=False, **kw)


# --------------------------------------------------------------------------- reading
def test_imagefolder_classes_ids_and_underscores(folder):
    ds = read(folder)
    assert ds.classes == ("Black footed Albatross", "cardinal", "owl")
    assert ds.counts() == [6, 6, 6] and len(ds.items) == 18 and ds.skipped == ()
    first = ds.items[0]
    assert first.id == "Black_footed_Albatross/img_000.png" and first.path.is_absolute() and first.path.is_file()
    assert first.label == 0 and first.class_name == "Black footed Albatross"
    assert [len(v) for v in ds.by_class().values()] == [6, 6, 6]
    sub = ds.subset(["owl/img_001.png", "cardinal/img_000.png"])
    assert sub.classes == ds.classes and [it.id for it in sub.items] == ["owl/img_001.png", "cardinal/img_000.png"]
    assert sub.counts() == [0, 1, 1]
    with pytest.raises(ValueError, match="not in the dataset"):
        ds.subset(["nope.png"])


def test_class_order_follows_folder_names(tmp_path):
    root = make_imagefolder(tmp_path / "ds", classes=("b_x", "a_z", "a y"), per_class=1)
    ds = read(root)
    assert ds.classes == ("a y", "a z", "b x")   # sorted as folder names: 'a y' < 'a_z' < 'b_x'
    make_imagefolder(tmp_path / "clash", classes=("a_b", "a b"), per_class=1)
    with pytest.raises(ValueError, match="both give class name"):
        read(tmp_path / "clash")


def test_bad_files_skipped_with_paths_or_strict(folder):
    (folder / "owl" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "owl" / "empty.jpg").write_bytes(b"")
    (folder / "owl" / "notes.txt").write_text("ignored: not an image extension")
    shape_image(0).save(folder / "stray.png")
    with pytest.warns(UserWarning, match="skipped 3 unusable"):
        ds = read(folder)
    assert ds.counts() == [6, 6, 6]
    reasons = dict(ds.skipped)
    assert set(reasons) == {str(folder / "owl" / "broken.png"), str(folder / "owl" / "empty.jpg"),
                            str(folder / "stray.png")}
    assert "empty file" in reasons[str(folder / "owl" / "empty.jpg")]
    with pytest.raises(ValueError, match="3 unusable") as err:
        read(folder, strict=True)
    assert "broken.png" in str(err.value) and "empty.jpg" in str(err.value)


def test_max_pixels_and_too_few_classes(folder, tmp_path):
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="at least 2"):
        read(folder, max_pixels=10)   # every 16x16 image is refused -> no class left
    make_imagefolder(tmp_path / "one", classes=("only",), per_class=3)
    with pytest.raises(ValueError, match="needs at least 2"):
        read(tmp_path / "one")
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "missing")


def test_csv_dataset(folder, tmp_path):
    rows = ["path,label", "Black_footed_Albatross/img_000.png,albatross", "owl/img_000.png,owl",
            "owl/img_001.png,owl", "owl/missing.png,owl", "cardinal/img_002.png, cardinal "]
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match="missing.png"):
        ds = read(folder / "list.csv")
    assert ds.classes == ("albatross", "cardinal", "owl") and ds.counts() == [1, 1, 2]
    assert ds.root == folder.resolve() and ds.items[0].id == "Black_footed_Albatross/img_000.png"
    assert dict(ds.skipped)[str(folder / "owl" / "missing.png")] == "file not found"
    (tmp_path / "bad.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(ValueError, match="path,label"):
        read(tmp_path / "bad.csv")


def test_hf_imagefolder_metadata_and_split_folders(tmp_path):
    root = tmp_path / "hf"
    (root / "train").mkdir(parents=True)
    rows = []
    for j in range(4):
        for c in ("sparrow", "heron"):
            name = f"{c}-{j}.png"
            shape_image(j + (50 if c == "heron" else 0)).save(root / "train" / name)
            rows.append({"file_name": name, "label": c})
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_imagefolder(root / "test", classes=("heron", "sparrow"), per_class=2)  # class folders, no metadata
    ds = read(root)
    assert ds.classes == ("heron", "sparrow") and ds.counts() == [6, 6]
    assert {it.id for it in ds.items} >= {"train/heron-0.png", "test/sparrow/img_001.png"}
    # metadata.jsonl at the root, labels from the folders (the datasets library's rule)
    flat = tmp_path / "flat"
    make_imagefolder(flat, classes=("a_cat", "dog"), per_class=2)
    (flat / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{c}/img_00{j}.png"}) + "\n"
                                                 for c in ("a_cat", "dog") for j in range(2)))
    assert read(flat).classes == ("a cat", "dog")
    # a broken datasets.save_to_disk() folder (its splits' Arrow files missing): refused, saying what it is
    (tmp_path / "arrow").mkdir()
    (tmp_path / "arrow" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ValueError, match="save_to_disk"):
        read(tmp_path / "arrow")


# --------------------------------------------------------------------------- splits
@pytest.fixture
def big(tmp_path):
    """6 classes x 20 images, built as Dataset objects without files (splits are pure)."""
    from pathlib import Path

    from diffmix_core.data import Item

    classes = tuple(f"c{i}" for i in range(6))
    items = tuple(Item(f"{c}/{j:02d}.png", Path(f"/x/{c}/{j:02d}.png"), i, c)
                  for i, c in enumerate(classes) for j in range(20))
    return Dataset(root=tmp_path, classes=classes, items=items)


def _counts(ds, ids):
    return ds.subset(ids).counts()


def test_splits_disjoint_stratified_deterministic(big):
    cfg = SplitConfig(seed=3, val_fraction=0.1, test_fraction=0.25)
    a, b = make_splits(big, cfg), make_splits(big, cfg)
    assert a == b
    assert _counts(big, a["test"]) == [5] * 6 and _counts(big, a["val"]) == [2] * 6
    assert _counts(big, a["train"]) == [13] * 6
    assert set(a["train"]).isdisjoint(a["test"]) and set(a["train"]).isdisjoint(a["val"])
    assert set(a["val"]).isdisjoint(a["test"])
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(it.id for it in big.items)
    other = make_splits(big, SplitConfig(seed=4, val_fraction=0.1, test_fraction=0.25))
    assert other["test"] != a["test"]


def test_few_shot_and_long_tail_counts_are_exact(big):
    base = make_splits(big, SplitConfig(seed=1))
    shot = make_splits(big, SplitConfig(seed=1, shots=5))
    assert _counts(big, shot["train"]) == [5] * 6
    assert shot["test"] == base["test"] and shot["val"] == base["val"]   # held-out images never move
    assert set(shot["train"]) <= set(base["train"])
    lt = make_splits(big, SplitConfig(seed=1, imbalance=0.1))
    pool = min(_counts(big, base["train"]))   # 14
    assert _counts(big, lt["train"]) == long_tail_counts(pool, 6, 0.1) == [14, 8, 5, 3, 2, 1]
    assert lt["test"] == base["test"]
    both = make_splits(big, SplitConfig(seed=1, shots=10, imbalance=0.01))
    assert _counts(big, both["train"]) == [10, 3, 1, 1, 1, 1]
    assert long_tail_counts(10, 2, 0.3) == [10, 3]   # 10 * 0.3 = 2.9999999999999996 still counts as 3
    with pytest.raises(ValueError, match="fewer than the 15"):
        make_splits(big, SplitConfig(shots=15))


def test_split_config_validation():
    for bad in (dict(val_fraction=1.0), dict(val_fraction=0.5, test_fraction=0.5), dict(shots=0),
                dict(imbalance=0.0), dict(imbalance=1.5)):
        with pytest.raises(ValueError):
            SplitConfig(**bad)


def test_resolve_splits_writes_reads_and_refuses(folder, tmp_path):
    ds = read(folder)
    cfg = SplitConfig(seed=7, shots=3)
    splits = resolve_splits(ds, config=cfg)
    path = folder / "diffmix_split.json"
    data = json.loads(path.read_text())
    assert data["format_version"] == 1 and data["classes"] == list(ds.classes) and data["config"]["shots"] == 3
    assert data["splits"] == splits and read_split_file(path)["splits"] == splits
    assert resolve_splits(ds) == splits == resolve_splits(ds, path, cfg)   # later stages read the same split
    assert split_subset(ds, splits, "train").counts() == [3, 3, 3]
    test_ids = set(split_subset(ds, splits, "test").subset(splits["test"]).items)
    assert test_ids.isdisjoint(split_subset(ds, splits, "train").items)
    with pytest.raises(ValueError, match="shots: file 3 vs given 2"):
        resolve_splits(ds, path, SplitConfig(seed=7, shots=2))
    with pytest.raises(ValueError, match="unknown split"):
        split_subset(ds, splits, "training")
    # another dataset (other classes) must not reuse this file
    other = read(make_imagefolder(tmp_path / "other", classes=("x", "y"), per_class=6))
    with pytest.raises(ValueError, match="made for classes"):
        resolve_splits(other, path)
    # an image listed in the split file has gone
    (folder / splits["test"][0]).unlink()
    with pytest.raises(ValueError, match="does not have"):
        resolve_splits(read(folder), path)


def test_split_file_rejects_overlap(folder, tmp_path):
    ds = read(folder)
    splits = make_splits(ds, SplitConfig())
    splits["train"] = splits["train"] + splits["test"][:1]
    path = write_split_file(tmp_path / "s.json", ds, splits, SplitConfig())
    with pytest.raises(ValueError, match="both train and test"):
        read_split_file(path)


def test_cli_split_makes_then_checks_the_file(folder, capsys):
    from diffmix_core.cli import main

    assert main(["split", "--data", str(folder), "--shots", "2", "--split-seed", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "cardinal" in out and "diffmix_split.json" in out
    assert json.loads((folder / "diffmix_split.json").read_text())["config"]["seed"] == 5
    # later stages: no option -> the file as it is; the same option -> fine; another -> refused
    assert main(["split", "--data", str(folder), "--quiet"]) == 0
    assert main(["split", "--data", str(folder), "--shots", "2", "--quiet"]) == 0
    with pytest.raises(SystemExit) as err:
        main(["split", "--data", str(folder), "--shots", "3", "--quiet"])
    assert err.value.code == 2 and "shots: file 2 vs given 3" in capsys.readouterr().err
