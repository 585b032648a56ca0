"""Fine-tuning: a short run makes a bundle the engine uses; resume == uninterrupted;
the text encoder stays frozen but for the class rows; two accelerate processes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmix_core.bundle import load_bundle, save_bundle
from diffmix_core.cli import main
from diffmix_core.config import FinetuneConfig, TranslateConfig
from diffmix_core.data import read_dataset, read_split_file
from diffmix_core.finetune import StepBatches, TrainImages, add_class_tokens, finetune, latest_checkpoint
from diffmix_core.translate import Job, Source, translate

from helpers import bundle_weights, make_imagefolder, shape_image

FAST = ["--resolution", "32", "--rank", "2", "--lora-alpha", "2", "--num-workers", "0", "--quiet"]
FAST_CONFIG = dict(resolution=32, rank=2, lora_alpha=2.0, num_workers=0, superclass="bird")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """3 classes x 6 images, 16 px coloured squares (resized to 32 for training)."""
    return make_imagefolder(tmp_path_factory.mktemp("data") / "birds")


@pytest.fixture(scope="module")
def trained(dataset_dir, tiny_model_dir, tmp_path_factory):
    """One CLI run (3 steps, 2-shot split, checkpoints + grids); records every image training read."""
    import diffmix_core.finetune as ft

    out = tmp_path_factory.mktemp("runs") / "bundle"
    seen: list[str] = []
    real = ft.load_image
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft, "load_image", lambda path, **kw: (seen.append(str(path)), real(path, **kw))[1])
        code = main(["finetune", "--data", str(dataset_dir), "--base", str(tiny_model_dir), "--out", str(out),
                     "--superclass", "bird", "--max-steps", "3", "--checkpoint-every", "2", "--sample-steps", "2",
                     "--lr", "1e-2", "--ti-lr", "1e-1", "--shots", "2", "--split-file", str(out.parent / "split.json"),
                     *FAST])
    assert code == 0
    return out, seen


def test_cli_run_writes_a_complete_bundle(trained, tiny_model_dir, dataset_dir):
    out, _ = trained
    bundle = load_bundle(out)
    assert bundle.classes == ("Black footed Albatross", "cardinal", "owl")
    assert bundle.tokens == ("<class_0>", "<class_1>", "<class_2>")
    assert bundle.prompt("owl") == "a photo of a <class_2> bird"
    meta = bundle.meta
    assert meta["steps"] == 3 and meta["resolution"] == 32 and meta["lora"] == {"rank": 2, "alpha": 2.0}
    assert meta["base_model"] == {"model": str(Path(tiny_model_dir).resolve()), "revision": None}
    t = meta["training"]
    assert t["lr"] == 1e-2 and t["ti_lr"] == 1e-1 and t["max_steps"] == 3 and t["adam_beta2"] == 0.999
    assert t["weight_decay"] == 1e-2 and t["max_grad_norm"] == 1.0 and t["seed"] == 42 and t["batch_size"] == 2
    assert t["split_config"]["shots"] == 2 and t["train_counts"] == [2, 2, 2]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-000002", "step-000003"]            # every 2 steps + the last one
    assert load_bundle(out / "checkpoints" / "step-000002" / "bundle").meta["steps"] == 2
    from diffmix_core.records import read_png_record
    from PIL import Image

    grid = out / "checkpoints" / "step-000002" / "samples.png"
    assert Image.open(grid).size == (64, 64)                  # 3 samples of 32 px in a 2x2 grid
    assert read_png_record(grid)["classes"] == list(bundle.classes)


def test_training_reads_only_the_train_split(trained, dataset_dir):
    out, seen = trained
    split = read_split_file(out.parent / "split.json")
    train = {str(dataset_dir / i) for i in split["splits"]["train"]}
    assert len(train) == 6 and seen and set(seen) <= train
    held_out = {str(dataset_dir / i) for i in split["splits"]["test"] + split["splits"]["val"]}
    assert held_out.isdisjoint(seen)


def test_bundle_changes_the_engine(trained, tiny_model_dir):
    from diffmix_core.models import load_pipeline

    bundle = load_bundle(trained[0])
    pipe = load_pipeline(tiny_model_dir, device="cpu", dtype="fp32")
    src = Source(shape_image(7, 32), "owl", "x")
    jobs = [Job(src, "cardinal", 0.9, 1)]
    run = lambda strategy: np.asarray(translate(pipe, jobs, TranslateConfig(strategy=strategy, num_inference_steps=4),
                                                bundle=bundle, show_progress=False)[0].image, np.int16)
    lora_on = run("diff-mix")
    with pytest.raises(ValueError, match="diffmix finetune --mode ti-only"):   # ti-*: a TI-only bundle only
        run("ti-mix")
    vectors, _ = bundle.weights()
    ti_only = save_bundle(bundle.path.parent / "ti-copy", classes=bundle.classes, tokens=bundle.tokens,
                          embeddings=dict(zip(bundle.tokens, vectors)), lora_state_dict=None,
                          base_model=bundle.base_model, superclass=bundle.superclass, template=bundle.template,
                          resolution=bundle.resolution)
    lora_off = np.asarray(translate(pipe, jobs, TranslateConfig(strategy="ti-mix", num_inference_steps=4),
                                    bundle=ti_only, show_progress=False)[0].image, np.int16)
    assert np.abs(lora_on - lora_off).max() > 0                # the learned LoRA changes the image
    # the token moved away from its start (the super-class word's embedding)
    emb = pipe.text_encoder.get_input_embeddings().weight
    bird = emb[pipe.tokenizer("bird", add_special_tokens=False).input_ids].mean(0)
    tid = pipe.tokenizer.convert_tokens_to_ids("<class_1>")
    assert not torch.allclose(emb[tid], bird)


def test_text_encoder_frozen_but_class_rows(dataset_dir, tiny_model_dir):
    from accelerate import Accelerator

    from diffmix_core.finetune import _Trainer
    from diffmix_core.models import load_pipeline

    pipe = load_pipeline(tiny_model_dir, device="cpu", dtype="fp32", scheduler="native")
    ds = read_dataset(dataset_dir, show_progress=False)
    trainer = _Trainer(Accelerator(), pipe, ds, FinetuneConfig(**FAST_CONFIG, ti_lr=1e-1), {"model": "m", "revision": None}, {})
    emb = pipe.text_encoder.get_input_embeddings().weight
    bird_ids = pipe.tokenizer("bird", add_special_tokens=False).input_ids
    assert torch.allclose(emb[trainer.token_ids[0]], emb[bird_ids].mean(0))   # tokens start at 'bird'
    before = emb.detach().clone()
    unet_before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora" not in n}
    images = TrainImages(ds, 32)
    batch = torch.utils.data.default_collate([images[(0, False)], images[(10, True)]])
    for step in range(2):
        trainer.acc.backward(trainer.loss(batch, step))
        trainer.update()
    changed = (emb.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(trainer.token_ids)                  # only the class rows moved, others exact
    assert all(torch.equal(p, unet_before[n]) for n, p in pipe.unet.named_parameters() if "lora" not in n)
    assert all(not p.requires_grad for n, p in pipe.text_encoder.named_parameters() if "token_embedding" not in n)


def test_resume_equals_uninterrupted(dataset_dir, tiny_model_dir, tmp_path):
    config = FinetuneConfig(**FAST_CONFIG, max_steps=4, checkpoint_every=2, sample_steps=0, lr=1e-2, ti_lr=1e-1)
    whole = finetune(dataset_dir, tiny_model_dir, tmp_path / "whole", config, show_progress=False)
    part = finetune(dataset_dir, tiny_model_dir, tmp_path / "part", config, show_progress=False, stop_after=2)
    assert part.meta["steps"] == 2 and not (tmp_path / "part" / "adapter.json").exists()
    assert latest_checkpoint(tmp_path / "part").name == "step-000002"
    resumed = finetune(dataset_dir, tiny_model_dir, tmp_path / "part", config, show_progress=False, resume=True)
    a, b = bundle_weights(whole.path), bundle_weights(resumed.path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    first = bundle_weights(tmp_path / "part" / "checkpoints" / "step-000002" / "bundle")
    assert any(not torch.equal(first[k], b[k]) for k in a)        # steps 3-4 did train
    logs = [[json.loads(x)["loss"] for x in (p / "train_log.jsonl").read_text().splitlines()]
            for p in (whole.path, resumed.path)]
    np.testing.assert_allclose(logs[0], logs[1], atol=1e-6)


def test_output_folder_guards_and_errors(trained, dataset_dir, tiny_model_dir, tmp_path, capsys):
    out, _ = trained
    base = ["finetune", "--data", str(dataset_dir), "--base", str(tiny_model_dir), "--superclass", "bird",
            "--max-steps", "1", "--checkpoint-every", "0", "--sample-steps", "0", *FAST]

    def fails(args, match):
        with pytest.raises(SystemExit) as err:
            main(args)
        assert err.value.code == 2
        message = capsys.readouterr().err
        assert match in message, message

    fails(base + ["--out", str(out), "--split-file", str(out.parent / "split.json")], "not empty")
    fails(base + ["--out", str(out), "--split-file", str(out.parent / "split.json"), "--resume", "--rank", "3"],
          "different run")
    fails(base + ["--out", str(tmp_path / "o"), "--base", str(tmp_path / "no-model")], "does not exist")
    make_imagefolder(tmp_path / "one", classes=("only",), per_class=3)
    fails(base + ["--out", str(tmp_path / "o"), "--data", str(tmp_path / "one")], "at least 2")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(base + ["--out", str(copy), "--split-file", str(out.parent / "split.json"), "--overwrite",
                        "--mode", "ti-only"]) == 0
    again = load_bundle(copy)
    assert again.meta["steps"] == 1 and again.lora_file is None and not (copy / "checkpoints").exists()
    assert not (copy / "pytorch_lora_weights.safetensors").exists()


def test_token_collisions_refused(tiny_pipe):
    tok, enc = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    ids = add_class_tokens(tok, enc, ["<class_0>", "<class_1>"], ["bird", "owl"])
    assert tok("a <class_1> bird", add_special_tokens=False).input_ids[1] == ids[1]
    with pytest.raises(ValueError, match="already exist"):
        add_class_tokens(tok, enc, ["<class_1>"], ["bird"])


def test_step_batches_epochs_ranks_and_balance():
    labels = [0] * 8 + [1] * 2                                  # long-tailed: 8 vs 2
    ranks = [StepBatches(labels, 2, seed=1, start=0, stop=5, rank=r, world=2) for r in range(2)]
    seen = [i for m in range(5) for s in ranks for i, _ in s.batch_at(m)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))   # each epoch once
    tail = StepBatches(labels, 2, seed=1, start=3, stop=5, rank=1, world=2)
    assert list(tail) == [ranks[1].batch_at(3), ranks[1].batch_at(4)]          # resuming mid-run
    assert list(StepBatches(labels, 2, 1, 0, 5, flip=False))[0][0][1] is False
    balanced = StepBatches(labels, 4, seed=0, start=0, stop=500, balanced=True)
    drawn = np.array([labels[i] for b in balanced for i, _ in b])
    assert 0.45 < drawn.mean() < 0.55                           # classes drawn uniformly, not 80/20


@pytest.mark.slow
def test_two_process_accelerate_run(dataset_dir, tiny_model_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU machine: 2 gloo processes, one bundle."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29533", "-m", "diffmix_core", "finetune", "--data", str(dataset_dir),
           "--base", str(tiny_model_dir), "--out", str(out), "--superclass", "bird", "--max-steps", "2",
           "--checkpoint-every", "1", "--sample-steps", "2", "--split-file", str(tmp_path / "split.json"), *FAST]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = load_bundle(out)
    assert bundle.meta["steps"] == 2 and bundle.meta["training"]["num_processes"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2
