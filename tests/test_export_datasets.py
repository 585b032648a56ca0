"""Exports load as labelled datasets: the imagefolder export's `label` is a ClassLabel in the
bundle's class order (through its dataset card), a classifier trains from it, and the
project's reader gives the same soft labels from both layouts."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmix_core.cli import main

STEPS = 10   # strength 0.75 runs 7 of 10 steps: asked 0.75, ran 0.7 (labels must use 0.7)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, object]:
    """`diffmix translate` on the placeholder bundle, then `diffmix export --from` (both layouts)."""
    from diffmix_core.demo import placeholder_bundle

    root = tmp_path_factory.mktemp("exp-ds")
    bundle = placeholder_bundle(root / "ph")
    image = sorted((bundle.path / "examples" / "owl").glob("*.png"))[0]
    assert main(["translate", "--bundle", str(bundle.path), "--image", str(image), "--source-class", "owl",
                 "--target", "duck", "penguin", "owl", "--strength", "0.75", "0.35", "--seed", "0",
                 "--steps", str(STEPS), "--out", str(root / "gen"), "--device", "cpu", "--dtype", "fp32"]) == 0
    assert main(["export", "--from", str(root / "gen"), "--format", "imagefolder,authors", "--bundle", str(bundle.path),
                 "--quiet"]) == 0
    return root / "gen" / "export", bundle


def test_label_is_a_classlabel_in_the_bundle_order(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    from diffmix_core.export import dataset_features

    out, bundle = exported
    folder = out / "imagefolder"
    ds = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "c1"))["train"]
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == list(bundle.classes)
    assert len(ds) == 6
    for row in ds:
        assert ds.features["label"].int2str(row["label"]) == row["target_class"]
        assert row["label"] == row["target_label"] and row["source_label"] == bundle.classes.index("owl")
        vec = row["soft_label_vector"]
        assert len(vec) == len(bundle.classes) and sum(vec) == pytest.approx(1.0)
        assert vec[row["label"]] == pytest.approx(row["strength_run"] ** 0.5 if row["target_class"] != "owl" else 1.0)
    assert sorted({r["strength"] for r in ds}) == [0.35, 0.75] and sorted({r["strength_run"] for r in ds}) == [0.3, 0.7]
    # The plain imagefolder builder ignores dataset cards; the same features can be passed to it.
    plain = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(tmp_path / "c2"),
                                  features=dataset_features(folder / "metadata.jsonl", bundle.classes))["train"]
    assert plain.features["label"].names == list(bundle.classes) and plain[0]["label"] == ds[0]["label"]


def test_one_training_step_from_the_loaded_dataset(exported, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    import timm

    out, bundle = exported
    ds = datasets.load_dataset(str(out / "imagefolder"), cache_dir=str(tmp_path / "c"))["train"]
    num_classes = ds.features["label"].num_classes
    x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32) / 255)
                     .permute(2, 0, 1) for im in ds["image"]])                      # (B, 3, 32, 32)
    soft = torch.tensor(ds["soft_label_vector"])                                 # (B, C)
    hard = torch.tensor(ds["label"])                                             # (B,)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = -(soft * torch.log_softmax(model(x), -1)).sum(-1).mean() + torch.nn.functional.cross_entropy(model(x), hard)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_both_layouts_give_the_same_soft_labels(exported):
    from diffmix_core.classify import synthetic_targets
    from diffmix_core.export import read_synthetic

    out, bundle = exported
    layout_i, items_i = read_synthetic(out / "imagefolder", bundle.classes)
    layout_a, items_a = read_synthetic(out / "authors", bundle.classes)
    assert (layout_i, layout_a) == ("imagefolder", "authors")
    key = lambda it: (it.source_class, it.target_class, it.strength)  # noqa: E731
    assert sorted(map(key, items_i)) == sorted(map(key, items_a))
    assert sorted({it.strength for it in items_a}) == [0.3, 0.7]      # the strengths that ran
    for gamma, k in ((0.5, 1.0), (0.8, 0.9)):
        ti = synthetic_targets(sorted(items_i, key=key), bundle.classes, gamma, k)
        ta = synthetic_targets(sorted(items_a, key=key), bundle.classes, gamma, k)
        assert torch.allclose(ti, ta)
    # ... and equal to the labels the engine stored with each image (gamma 0.5, k 1).
    rows = [json.loads(line) for line in (out / "imagefolder" / "metadata.jsonl").read_text().splitlines()]
    stored = {(r["source_class"], r["target_class"], r["strength_run"]): r["soft_label_vector"] for r in rows}
    for it, vec in zip(sorted(items_a, key=key), synthetic_targets(sorted(items_a, key=key), bundle.classes, 0.5, 1.0)):
        assert vec.tolist() == pytest.approx(stored[key(it)])
    # The authors' meta.csv is untouched: their five columns, the strength asked for.
    with open(out / "authors" / "meta.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["First Directory", "Second Directory", "Number", "Strength", "Path"]
        assert sorted({r["Strength"] for r in reader}) == ["0.35", "0.75"]
