"""`diffmix translate` and `diffmix import-diffmix` driven as a user would."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmix_core.cli import main
from diffmix_core.records import read_jsonl, read_png_record
from helpers import authors_checkpoint, make_world, to_old_keys


def make_image(path, size=(40, 30), colour=(200, 40, 40)):
    rng = np.random.default_rng(sum(colour))
    arr = np.clip(np.array(colour) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_translate_cli_writes_pngs_and_records(tiny_model_dir, tmp_path, capsys):
    img = make_image(tmp_path / "duck 1.jpg")
    out = tmp_path / "out"
    args = ["translate", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--superclass", "bird",
            "--image", str(img), "--source-class", "duck", "--target", "owl", "crow",
            "--strength", "0", "0.5", "0.9", "--seed", "1", "2", "--steps", "6", "--out", str(out), "--quiet"]
    assert main(args) == 0
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 2 * 3 * 2
    for rec in records:
        png = out / rec["file_name"]
        assert read_png_record(png) == rec
        with Image.open(png) as im:
            assert im.size == (40, 30)
        assert rec["source_class"] == "duck" and rec["strategy"] == "real-mix"
        assert rec["prompt"] == f"a photo of a {rec['target_class']} bird"
        assert sum(rec["soft_label"].values()) == pytest.approx(1.0)
    # same command again: same bytes (determinism), records not duplicated
    first = {r["file_name"]: (out / r["file_name"]).read_bytes() for r in records}
    assert main(args) == 0
    assert {r["file_name"]: (out / r["file_name"]).read_bytes() for r in read_jsonl(out / "records.jsonl")} == first
    assert "wrote 12 image(s)" in capsys.readouterr().out


def test_translate_cli_errors_are_specific(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    base = ["translate", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--source-class", "duck",
            "--target", "owl", "--out", str(tmp_path / "o")]
    cases = [
        (["--image", str(bad)], "broken.png"),
        (["--image", str(make_image(tmp_path / "ok.png")), "--strength", "0.01"], "smallest usable strength"),
        (["--image", str(tmp_path / "ok.png"), "--strength", "1.5"], "between 0 and 1"),
        (["--image", str(tmp_path / "missing.png")], "does not exist"),
    ]
    for extra, message in cases[1:]:
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    # one case through a real process: exit status and a message, no traceback
    proc = subprocess.run([sys.executable, "-m", "diffmix_core", *base, *cases[0][0]], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert cases[0][1] in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_help_explains_options():
    proc = subprocess.run([sys.executable, "-m", "diffmix_core", "translate", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for option in ("--bundle", "--strength", "--seed", "--steps", "--guidance", "--strategy", "--resize"):
        assert option in proc.stdout


def test_import_then_translate_with_the_bundle(tiny_model_dir, tmp_path, capsys):
    from diffmix_core.bundle import load_bundle
    from diffmix_core.weights import lora_state_dict_from_unet
    from diffmix_core.models import load_pipeline

    pipe = load_pipeline(tiny_model_dir, device="cpu")
    import torch
    from peft import LoraConfig

    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    emb = authors_checkpoint(tmp_path / "ckpt", to_old_keys(lora_state_dict_from_unet(pipe.unet)))
    assert main(["import-diffmix", "--embeddings", str(emb), "--lora", str(tmp_path / "ckpt"), "--base",
                 str(tiny_model_dir), "--superclass", "bird", "--resolution", "32", "--out", str(tmp_path / "b")]) == 0
    assert "3 classes" in capsys.readouterr().out
    bundle = load_bundle(tmp_path / "b")
    # the embeddings alone: a TI-only bundle (the authors' ti-mix uses a separate TI-only fine-tune)
    assert main(["import-diffmix", "--embeddings", str(emb), "--base", str(tiny_model_dir), "--superclass", "bird",
                 "--out", str(tmp_path / "ti")]) == 0
    ti_bundle = load_bundle(tmp_path / "ti")
    assert ti_bundle.resolution == 32      # no --resolution: the base's own (sample_size 16 x VAE factor 2), not 512
    img = make_image(tmp_path / "src.png", size=(32, 32))
    outs = {}
    for strategy in ("diff-mix", "ti-mix", "real-mix"):
        out = tmp_path / strategy
        used = ti_bundle if strategy == "ti-mix" else bundle
        assert main(["translate", "--bundle", str(used.path), "--strategy", strategy, "--image", str(img),
                     "--source-class", "Sparrow", "--target", "Tern", "--strength", "0.8", "--steps", "5",
                     "--out", str(out), "--quiet"]) == 0
        (rec,) = read_jsonl(out / "records.jsonl")
        assert rec["bundle_hash"] == used.hash and rec["strategy"] == strategy
        assert rec["bundle_mode"] == ("ti-only" if strategy == "ti-mix" else "joint")
        assert rec["resolution"] == 32     # the base pipeline's default
        outs[strategy] = (out / rec["file_name"]).read_bytes()
        expected = "a photo of a <class_10> bird" if strategy != "real-mix" else "a photo of a Tern bird"
        assert rec["prompt"] == expected
    assert len(set(outs.values())) == 3   # LoRA and tokens each change the image
    capsys.readouterr()
    with pytest.raises(SystemExit):        # ti-* refuse a joint bundle, saying how to make a TI-only one
        main(["translate", "--bundle", str(bundle.path), "--strategy", "ti-aug", "--image", str(img),
              "--source-class", "Sparrow", "--target", "Sparrow", "--out", str(tmp_path / "y"), "--quiet"])
    assert "diffmix finetune --mode ti-only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["translate", "--bundle", str(bundle.path), "--image", str(img), "--source-class", "Sparrow",
              "--target", "Penguin", "--out", str(tmp_path / "x"), "--quiet"])
    assert "unknown class 'Penguin'" in capsys.readouterr().err


def test_config_options_tell_written_from_default():
    from diffmix_core.cli import build_parser, config_from_args, given_values
    from diffmix_core.config import SynthesizeConfig, TranslateConfig

    args = build_parser().parse_args(["synthesize", "--bundle", "b", "--data", "d", "--out", "o", "--steps", "25",
                                      "--strength=0.5"])
    assert given_values(TranslateConfig, args) == {"num_inference_steps": 25}   # written, even at its default
    assert given_values(SynthesizeConfig, args) == {"strength": 0.5}
    # written options win over a profile's values, which win over the defaults
    config = config_from_args(TranslateConfig, args, base={"num_inference_steps": 5, "guidance_scale": 2.0})
    assert (config.num_inference_steps, config.guidance_scale, config.batch_size) == (25, 2.0, 8)


@pytest.mark.parametrize("command, classes", [
    ("translate", ("TranslateConfig", "PipelineConfig")),
    ("synthesize", ("SynthesizeConfig", "TranslateConfig", "PipelineConfig", "Thresholds", "SplitConfig")),
    ("finetune", ("FinetuneConfig", "SplitConfig")), ("split", ("SplitConfig",)),
    ("train-reference", ("ReferenceConfig", "SplitConfig")), ("score", ("ScoreConfig",)),
    ("train", ("ClassifyConfig", "SplitConfig")), ("selftest", ("SelftestConfig",)),
])
def test_every_config_option_is_in_its_command_help_with_its_default(command, classes, capsys, monkeypatch):
    """The options are generated from config.py: each field declared with config.option shows up in
    its command's --help with its flag, its help and its default (one place for each); a setting a
    bundle's profile may set (the sampler settings, thresholds) says that the profile comes first."""
    import dataclasses
    import re

    from diffmix_core import config as cfg
    from diffmix_core.commands.options import PROFILED

    monkeypatch.setenv("COLUMNS", "2000")   # no line wrapping (argparse breaks words at hyphens)
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in classes:
        for f in dataclasses.fields(getattr(cfg, name)):
            if "help" not in f.metadata:
                continue
            flags = f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)
            shown = f.default if f.metadata["shown"] is None else f.metadata["shown"]
            expected = " ".join(f.metadata["help"].split())
            profiled = name == "Thresholds" or (name == "TranslateConfig" and f.name in cfg.PROFILE_SETTINGS)
            default = f"{PROFILED} {'none' if shown is None else shown}" if profiled else f"default: {shown}"
            expected += f" ({default})" if f.metadata["shown"] != "" else ""
            assert all(re.search(rf"{re.escape(flag)}\b", text) for flag in flags), (command, flags)
            assert expected in text, (command, f.name, expected)


def test_synthesize_starts_from_the_bundle_profile(tmp_path, capsys):
    from diffmix_core.demo import placeholder_bundle
    from diffmix_core.records import read_jsonl
    from diffmix_core.bundle import update_bundle_meta

    bundle = placeholder_bundle(tmp_path / "ph")
    update_bundle_meta(bundle.path, profile={"strength": 0.8, "num_inference_steps": 5, "guidance_scale": 3.0})
    for cls, colour in (("owl", (200, 30, 30)), ("duck", (30, 30, 200))):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            make_image(tmp_path / "data" / cls / f"{i}.png", size=(32, 32), colour=colour)
    out = tmp_path / "synth"
    assert main(["synthesize", "--bundle", str(bundle.path), "--data", str(tmp_path / "data"), "--out", str(out),
                 "--multiplier", "0.5", "--guidance", "2.0", "--quiet"]) == 0
    assert "from the bundle's profile: strength=0.8, num_inference_steps=5" in capsys.readouterr().out
    records = read_jsonl(out / "records.jsonl")
    assert records and {r["strength"] for r in records} == {0.8}
    assert {(r["num_inference_steps"], r["guidance_scale"]) for r in records} == {(5, 2.0)}   # written wins


def test_real_strategies_ignore_a_bundle_left_on_the_pipe(tiny_model_dir, tmp_path):
    """A library user who applied a bundle, then asks for real-mix without one, gets the untuned base."""
    from diffmix_core.config import TranslateConfig
    from diffmix_core.demo import placeholder_bundle
    from diffmix_core.models import load_pipeline
    from diffmix_core.translate import Job, Source, translate

    bundle = placeholder_bundle(tmp_path / "ph")
    src = Source(Image.open(make_image(tmp_path / "s.png", size=(32, 32))).convert("RGB"), "owl", "s")
    config = TranslateConfig(strategy="real-mix", num_inference_steps=3)
    plain = translate(load_pipeline(bundle.base_model, device="cpu"), [Job(src, "duck", 0.9, 1)], config,
                      superclass="bird", show_progress=False)[0]
    pipe = load_pipeline(bundle.base_model, device="cpu")
    translate(pipe, [Job(src, "duck", 0.9, 1)], TranslateConfig(strategy="diff-mix", num_inference_steps=3),
              bundle=bundle, show_progress=False)
    again = translate(pipe, [Job(src, "duck", 0.9, 1)], config, superclass="bird", show_progress=False)[0]
    assert np.abs(np.asarray(again.image, np.int16) - np.asarray(plain.image, np.int16)).max() <= 2


def test_translate_and_synthesize_start_from_the_saved_profile_and_score_finds_the_bundle(tmp_path, capsys,
                                                                                          monkeypatch):
    """The app's saved profile (a user overlay under DIFFMIX_OUTPUT) comes first for every option not
    written: translate's strength / steps / guidance, synthesize's thresholds; the bundle is untouched.
    `diffmix score` without --bundle scores with the bundle the records name (its reference: P(target))."""
    from diffmix_core.bundle import load_bundle
    from diffmix_core.profiles import save_profile
    from diffmix_core.bundle import update_bundle_meta

    bundle_dir = make_world(tmp_path / "world", tmp_path / "cache")
    update_bundle_meta(bundle_dir, profile={"strength": 0.8, "num_inference_steps": 4, "guidance_scale": 3.0})
    bundle = load_bundle(bundle_dir)
    adapter = (bundle_dir / "adapter.json").read_bytes()
    monkeypatch.setenv("DIFFMIX_OUTPUT", str(tmp_path / "outputs"))
    save_profile(bundle, 0.6, {"max_ssim": -1.0}, {"guidance_scale": 2.0})
    img = make_image(tmp_path / "owl.png", size=(32, 32))
    out = tmp_path / "tr"
    assert main(["translate", "--bundle", str(bundle_dir), "--image", str(img), "--source-class", "owl",
                 "--target", "duck", "--seed", "-1", "--out", str(out), "--quiet"]) == 0
    assert "from your saved profile" in capsys.readouterr().out
    (rec,) = read_jsonl(out / "records.jsonl")
    assert (rec["strength"], rec["num_inference_steps"], rec["guidance_scale"]) == (0.6, 4, 2.0)
    assert 0 <= rec["seed"] < 2**31                                     # -1: a random seed, recorded
    assert main(["score", "--input", str(out), "--quiet"]) == 0
    assert f"bundle: {bundle_dir} (named in the records)" in capsys.readouterr().out
    assert read_jsonl(out / "records.jsonl")[0]["scores"]["p_target"] is not None
    # synthesize: the profile's max_ssim = -1 rejects every image (the filter reads the same thresholds)
    for cls, colour in (("owl", (200, 30, 30)), ("duck", (30, 30, 200))):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            make_image(tmp_path / "data" / cls / f"{i}.png", size=(32, 32), colour=colour)
    synth = tmp_path / "synth"
    assert main(["synthesize", "--bundle", str(bundle_dir), "--data", str(tmp_path / "data"), "--out", str(synth),
                 "--multiplier", "0.5", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "max_ssim=-1.0" in text and "merged 0 image(s)" in text
    assert (bundle_dir / "adapter.json").read_bytes() == adapter and load_bundle(bundle_dir).hash == bundle.hash


# --------------------------------------------------------------------------- the parser's shape
SNAPSHOT = Path(__file__).with_name("cli_options.json")   # every subcommand's option strings, taken before the
                                                          # CLI was split into cli.py + diffmix_core/commands
HEAVY = ("torch", "diffusers", "transformers", "gradio", "timm", "open_clip", "accelerate")


def _subcommands(parser, name=()):
    """{"demo grid": its parser, ...}: every (nested) subcommand of ``parser``."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                nested = _subcommands(p, (*name, sub))
                out.update(nested or {" ".join((*name, sub)): p})
    return out


def _option_strings(parser) -> set[str]:
    return {s for a in parser._actions if not isinstance(a, argparse._HelpAction)
            for s in (a.option_strings or [a.dest])}


def test_no_option_is_lost():
    """Every subcommand still takes every option string it took before the split (new ones may join)."""
    from diffmix_core.cli import build_parser

    snapshot = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    commands = _subcommands(build_parser())
    assert set(snapshot) <= set(commands), set(snapshot) - set(commands)
    lost = {c: sorted(set(opts) - _option_strings(commands[c])) for c, opts in snapshot.items()}
    assert not any(lost.values()), {c: o for c, o in lost.items() if o}


@pytest.mark.parametrize("command", sorted(json.loads(SNAPSHOT.read_text(encoding="utf-8"))))
def test_every_subcommand_help_lists_its_options(command, capsys, monkeypatch):
    from diffmix_core.cli import build_parser

    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: diffmix {command}")
    parser = _subcommands(build_parser())[command]
    for action in parser._actions:
        shown = action.option_strings or [action.metavar or action.dest]
        assert all(s in text for s in shown), (command, shown)
        if action.help and action.help is not argparse.SUPPRESS:
            assert " ".join(action.help.replace("%%", "%").split())[:40] in " ".join(text.split()), (command, shown)


def test_help_imports_no_heavy_library():
    """`diffmix --help` and a subcommand's --help stay fast: torch, diffusers, gradio ... load only
    inside the command that needs them."""
    code = ("import sys\nfrom diffmix_core.cli import main\nfor argv in (['--help'], ['synthesize', '--help'], "
            "['demo', 'evaluate', '--help']):\n    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-300:]


def test_shared_options_are_declared_once_and_read_the_same_everywhere():
    """--quiet, --device and --out come from one declaration (cli.SHARED): the same action and type in
    every subcommand that takes them."""
    from diffmix_core.cli import SHARED, build_parser

    commands = _subcommands(build_parser())
    for name in ("quiet", "device", "out"):
        flag = SHARED[name][0][0]
        actions = [a for p in commands.values() for a in p._actions if flag in a.option_strings]
        assert len(actions) >= 4, (flag, len(actions))
        assert len({type(a) for a in actions}) == 1, flag
    quiet = [c for c, p in commands.items() if "--quiet" in _option_strings(p)]
    assert {"translate", "synthesize", "split", "finetune", "train", "score", "calibrate", "experiment"} <= set(quiet)


def test_translate_defaults_do_not_depend_on_the_folder_and_the_record_names_their_source(tmp_path, capsys,
                                                                                          monkeypatch):
    """Saved profiles live under the output root (DIFFMIX_OUTPUT, else the per-user data folder), never
    ./outputs of the working folder: the same command gives the same settings from any folder, an old
    ./outputs/profiles/ file is not read (and said so), --help says where the defaults come from, and
    each record's settings_from names the source of every setting (cli, profile, bundle, default)."""

    from diffmix_core.bundle import load_bundle, update_bundle_meta
    from diffmix_core.profiles import output_root, profile_path, save_profile

    monkeypatch.delenv("DIFFMIX_OUTPUT", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert output_root() == (tmp_path / "xdg" / "diffmix").resolve()          # not ./outputs
    monkeypatch.setenv("DIFFMIX_OUTPUT", str(tmp_path / "root"))
    assert output_root() == (tmp_path / "root").resolve()
    with pytest.raises(SystemExit):
        main(["translate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "s in [0, 1] (default: the bundle's profile, else its recommended strength, else 0.5;" in text
    assert "(paper: 7.5) (default: the bundle's profile, else 7.5)" in text

    bundle_dir = make_world(tmp_path / "world", tmp_path / "cache")
    update_bundle_meta(bundle_dir, profile={"strength": 0.9, "guidance_scale": 2.5, "num_inference_steps": 4})
    bundle = load_bundle(bundle_dir)
    clone = tmp_path / "clone"                     # a folder with an older app's profile in ./outputs
    old = clone / "outputs" / "profiles" / profile_path(bundle).name
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"strength": 0.7, "thresholds": {}}))
    img = make_image(tmp_path / "owl.png", size=(32, 32))
    command = ["translate", "--bundle", str(bundle_dir), "--image", str(img), "--source-class", "owl",
               "--target", "duck", "--quiet"]
    records = {}
    for where in (tmp_path, clone):
        monkeypatch.chdir(where)
        assert main([*command, "--out", str(tmp_path / f"out-{where.name}")]) == 0
        records[where.name] = read_jsonl(tmp_path / f"out-{where.name}" / "records.jsonl")[0]
    err = capsys.readouterr().err
    assert f"not read: {old.resolve()}" in err and str(tmp_path / "root" / "profiles") in err
    for rec in records.values():
        assert (rec["strength"], rec["guidance_scale"], rec["num_inference_steps"]) == (0.9, 2.5, 4)
        assert rec["settings_from"] == {"strength": "bundle", "strategy": "default",
                                        "num_inference_steps": "bundle", "guidance_scale": "bundle"}
    save_profile(bundle, 0.6, {}, {"guidance_scale": 2.0})              # the app's save, in the output root
    assert profile_path(bundle).is_relative_to(tmp_path / "root")
    assert main([*command, "--steps", "5", "--out", str(tmp_path / "out-saved")]) == 0
    rec = read_jsonl(tmp_path / "out-saved" / "records.jsonl")[0]
    assert (rec["strength"], rec["guidance_scale"], rec["num_inference_steps"]) == (0.6, 2.0, 5)
    assert rec["settings_from"] == {"strength": "profile", "strategy": "default", "num_inference_steps": "cli",
                                    "guidance_scale": "profile"}
    assert read_png_record(tmp_path / "out-saved" / rec["file_name"])["settings_from"] == rec["settings_from"]


def test_export_without_bundle_finds_the_records_bundle(tmp_path, capsys, monkeypatch):
    """`diffmix export` of a translate folder without --bundle takes the bundle the records name (as
    `diffmix score` does): the imagefolder rows get label / source_label / soft_label_vector and the
    dataset card lists the classes; without that bundle it says what is missing."""
    import shutil


    from diffmix_core.bundle import load_bundle

    monkeypatch.setenv("DIFFMIX_OUTPUT", str(tmp_path / "root"))
    bundle_dir = make_world(tmp_path / "world", tmp_path / "cache")
    classes = load_bundle(bundle_dir).classes
    img = make_image(tmp_path / "owl.png", size=(32, 32))
    out = tmp_path / "tr"
    assert main(["translate", "--bundle", str(bundle_dir), "--image", str(img), "--source-class", "owl",
                 "--target", "duck", "--strength", "0.5", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    assert main(["export", "--from", str(out), "--format", "imagefolder", "--quiet"]) == 0
    assert f"bundle: {bundle_dir} (named in the records)" in capsys.readouterr().out
    (row,) = read_jsonl(out / "export" / "imagefolder" / "metadata.jsonl")
    assert row["label"] == classes.index("duck") and row["source_label"] == classes.index("owl")
    assert len(row["soft_label_vector"]) == len(classes) and sum(row["soft_label_vector"]) == pytest.approx(1.0)
    card = (out / "export" / "imagefolder" / "README.md").read_text()
    assert all(c in card for c in classes)
    shutil.move(bundle_dir, tmp_path / "moved")
    assert main(["export", "--from", str(out), "--out", str(tmp_path / "e2"), "--format", "imagefolder",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "is not there" in text and "no label / soft_label_vector" in text
    assert "soft_label_vector" not in read_jsonl(tmp_path / "e2" / "imagefolder" / "metadata.jsonl")[0]
