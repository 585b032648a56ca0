"""Scoring: metrics on constructed cases with known answers, the recommendation rule,
CLIP present / absent, and `diffmix score` end to end on `diffmix translate` output."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from diffmix_core import cli
from diffmix_core.config import ScoreConfig
from diffmix_core.records import read_jsonl
from diffmix_core.reference import ReferenceClassifier, load_reference, save_reference
from diffmix_core.scoring import (SCORE_KEYS, ClipScorer, class_prompt, load_clip, plot_sweep, recommend_strength, score_images,
                                  summarize, tiny_clip_dir, vendi_score)
from helpers import smooth_image

CLASSES = ("owl", "duck", "crow")


def random_reference(classes=CLASSES, seed: int = 0) -> ReferenceClassifier:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=len(classes)).eval()
    return ReferenceClassifier(model, "test_resnet", tuple(classes), 32, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tiny_clip_dir(tmp_path_factory.mktemp("clip") / "tiny-clip")
    clip = load_clip(f"local-dir:{folder}", device="cpu")
    assert clip.available, clip.reason
    return clip


# --------------------------------------------------------------------------- constructed cases
def test_vendi_identities():
    x = np.random.default_rng(0).normal(size=(1, 8))
    assert vendi_score(np.repeat(x, 5, axis=0)) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(np.eye(4)) == pytest.approx(4.0, abs=1e-9)
    assert vendi_score(np.eye(6)[:, :6] * 3.0) == pytest.approx(6.0, abs=1e-9)   # scale does not matter
    two_clusters = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    assert vendi_score(two_clusters) == pytest.approx(2.0, abs=1e-9)
    with pytest.raises(ValueError):
        vendi_score(np.zeros((0, 3)))


def test_identical_image_has_distance_zero_and_ssim_one(tmp_path, tiny_clip):
    src = smooth_image(1, with_disc=True)
    src.save(tmp_path / "src.png")
    recs = [{"source_path": str(tmp_path / "src.png"), "source_class": "owl", "target_class": "duck"}] * 2
    images = [src.copy(), smooth_image(2, with_disc=True)]
    for clip in (tiny_clip, ClipScorer("", reason="test")):   # CLIP embeddings, then the reference's features
        scores, emb = score_images(images, recs, reference=random_reference(), clip=clip, config=ScoreConfig())
        assert scores[0]["distance"] == pytest.approx(0.0, abs=1e-5)
        assert scores[0]["ssim"] == pytest.approx(1.0, abs=1e-9)
        assert scores[1]["distance"] > 1e-4 and scores[1]["ssim"] < 0.99
        assert set(scores[0]) == set(SCORE_KEYS)
        assert scores[0]["top1"] in CLASSES and 0 <= scores[0]["p_target"] <= 1
        assert (scores[0]["clip_target"] is None) == (not clip.available)
        assert emb[0] is not None


def test_reference_probabilities_match_the_model():
    ref = random_reference()
    images = [smooth_image(3, with_disc=True), smooth_image(4, with_disc=True)]
    recs = [{"source_path": None, "source_class": "crow", "target_class": "owl"}] * 2
    scores, _ = score_images(images, recs, reference=ref, clip=None)
    probs = ref.predict(images)[0]
    for i, s in enumerate(scores):
        assert s["p_target"] == pytest.approx(float(probs[i, 0]), abs=1e-6)
        assert s["p_source"] == pytest.approx(float(probs[i, 2]), abs=1e-6)
        assert s["top1"] == CLASSES[int(probs[i].argmax())]
        assert s["distance"] is None and s["ssim"] is None   # no source image (text-to-image)


def rows(p_target, distance, ssim=None):
    return [{"strength": s, "p_target": p, "distance": d, "ssim": None if ssim is None else ssim[i], "clip_win": None}
            for i, (s, p, d) in enumerate(zip((0.3, 0.5, 0.7, 0.9), p_target, distance))]


def test_recommendation_rule_and_fallbacks():
    # P(target) >= 0.5 at 0.5, 0.7, 0.9; distance largest at 0.7 among those
    s, why = recommend_strength(rows([0.2, 0.6, 0.8, 0.9], [0.1, 0.2, 0.5, 0.4]), 0.5)
    assert s == 0.7 and "distance" in why
    assert recommend_strength(rows([0.2, 0.6, 0.8, 0.9], [0.1, 0.2, 0.3, 0.4]), 0.5)[0] == 0.9
    assert recommend_strength(rows([0.2, 0.6, 0.8, 0.9], [0.1, 0.2, 0.3, 0.4]), 0.85)[0] == 0.9
    # nothing reaches the threshold: the most faithful strength
    s, why = recommend_strength(rows([0.1, 0.3, 0.2, 0.25], [0.1, 0.2, 0.3, 0.4]), 0.5)
    assert s == 0.5 and "no strength reaches" in why
    # no embedding distance: 1 - SSIM decides
    assert recommend_strength(rows([0.6, 0.6, 0.6, 0.1], [None] * 4, ssim=[0.9, 0.5, 0.7, 0.1]), 0.5)[0] == 0.5
    # no reference classifier: CLIP preference (clip_win) is the faithfulness measure
    r = [{"strength": s, "p_target": None, "clip_win": w, "distance": d} for s, w, d in
         ((0.3, 0.2, 0.1), (0.5, 0.7, 0.2), (0.7, 0.4, 0.9))]
    assert recommend_strength(r, 0.5) == (0.5, pytest.approx(recommend_strength(r, 0.5)[1]))
    s, why = recommend_strength([{"strength": 0.5, "p_target": None, "clip_win": None, "distance": 0.3}])
    assert s is None and "no faithfulness measure" in why


def test_summary_means_vendi_and_plot(tmp_path):
    recs, embs = [], []
    for strength, p in ((0.3, 0.2), (0.7, 0.9)):
        for target in ("duck", "crow"):
            for seed in range(3):
                recs.append({"strength": strength, "target_class": target, "source_class": "owl",
                             "source_path": "/src.png", "scores": {"p_target": p, "distance": strength,
                                                                   "ssim": 1 - strength, "clip_target": None}})
                # 0.3: identical embeddings across seeds (Vendi 1); 0.7: orthogonal (Vendi 3)
                embs.append(np.eye(3)[0] if strength == 0.3 else np.eye(3)[seed])
    summary = summarize(recs, embs, ScoreConfig(recommend_min_p_target=0.5))
    pooled = {r["strength"]: r for r in summary["strengths"]}
    assert pooled[0.3]["n"] == 6 and pooled[0.3]["p_target"] == pytest.approx(0.2)
    assert pooled[0.3]["vendi"] == pytest.approx(1.0) and pooled[0.7]["vendi"] == pytest.approx(3.0)
    assert pooled[0.7]["vendi_groups"] == 2 and pooled[0.7]["clip_target"] is None
    assert set(summary["by_target"]) == {"duck", "crow"}
    assert summary["recommended_strength"] == 0.7
    fig = plot_sweep(summary)
    fig.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert [ax.get_ylabel() for ax in fig.axes] == ["faithfulness", "diversity", "Vendi score"]
    # one seed per strength: Vendi cannot be had; the plot says so instead of an empty axis
    one = recs[::3]
    single = summarize(one, embs[::3], ScoreConfig(recommend_min_p_target=0.5))
    assert all(r["vendi"] is None for r in single["strengths"])
    fig = plot_sweep(single)
    assert [ax.get_ylabel() for ax in fig.axes] == ["faithfulness", "diversity"]
    assert "needs >= 2 seeds" in " ".join(t.get_text() for t in fig.axes[1].texts)
    assert "0 to 2" in " ".join(t.get_text() for t in fig.axes[1].get_legend().get_texts())


# --------------------------------------------------------------------------- CLIP
def test_clip_unavailable_gives_reasons_not_numbers(tmp_path):
    assert "no CLIP model given" in load_clip("").status
    assert "no weights named" in load_clip("ViT-B-32", "").reason
    offline = load_clip("ViT-B-32", "openai", device="cpu")        # HF_HUB_OFFLINE=1, no cache
    assert not offline.available and offline.status.startswith("CLIP unavailable: ViT-B-32/openai")
    folder = tiny_clip_dir(tmp_path / "c")
    (folder / "open_clip_model.safetensors").unlink()               # config without weights: refuse
    assert not load_clip(f"local-dir:{folder}").available
    assert not load_clip("ViT-B-32", str(tmp_path / "missing.pt")).available


def test_tiny_clip_embeddings(tiny_clip):
    img = tiny_clip.encode_images([smooth_image(1, with_disc=True), smooth_image(2, with_disc=True)])
    txt = tiny_clip.encode_texts(["a photo of a owl", "a photo of a duck"])
    assert img.shape == (2, 16) and txt.shape == (2, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_clip_checkpoint_file(tmp_path):
    """A plain architecture name plus a local checkpoint file (the --clip-checkpoint path)."""
    import open_clip

    folder = tiny_clip_dir(tmp_path / "c")
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "diffmix-tiny-clip.json").write_text(json.dumps(cfg["model_cfg"]))
    open_clip.add_model_config(tmp_path / "cfgs")
    clip = load_clip("diffmix-tiny-clip", str(folder / "open_clip_model.safetensors"), device="cpu")
    assert clip.available, clip.reason
    ref = load_clip(f"local-dir:{folder}", device="cpu")
    x = [smooth_image(5, with_disc=True)]
    assert torch.allclose(clip.encode_images(x), ref.encode_images(x), atol=1e-6)


# --------------------------------------------------------------------------- the CLI end to end
@pytest.fixture(scope="module")
def translated(tiny_model_dir, tmp_path_factory):
    """A real-mix sweep from `diffmix translate`: 1 source x 2 targets x 2 strengths x 2 seeds."""
    root = tmp_path_factory.mktemp("sweep")
    smooth_image(7, with_disc=True).save(root / "bird.png")
    out = root / "out"
    assert cli.main(["translate", "--base", str(tiny_model_dir), "--strategy", "real-mix", "--image",
                     str(root / "bird.png"), "--source-class", "owl", "--target", "duck", "crow", "--strength",
                     "0.5", "1.0", "--seed", "1", "2", "--steps", "4", "--superclass", "bird", "--out", str(out),
                     "--quiet"]) == 0
    ref_dir = save_reference(random_reference(), root / "ref", {"model_name": "test_resnet",
                                                                "classes": list(CLASSES),
                                                                "preprocessing": {"input_size": 32}})
    return out, ref_dir


def test_score_cli_end_to_end(translated, tiny_clip, capsys):
    out, ref_dir = translated
    clip_dir = tiny_clip.name.removeprefix("local-dir:")
    assert cli.main(["score", "--input", str(out), "--reference", str(ref_dir), "--clip-model",
                     f"local-dir:{clip_dir}", "--superclass", "bird", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "recommended strength:" in text and "CLIP: local-dir:" in text
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 8
    for rec in records:
        assert set(rec["scores"]) == set(SCORE_KEYS)
        assert all(rec["scores"][k] is not None for k in SCORE_KEYS), rec["scores"]
        assert rec["strength"] in (0.5, 1.0) and rec["soft_label"]   # the rest of the record is kept
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert [r["strength"] for r in summary["strengths"]] == [0.5, 1.0]
    assert all(r["vendi"] is not None and 1 <= r["vendi"] <= 2 + 1e-6 for r in summary["strengths"])
    assert summary["embedding"] == "clip" and summary["recommended_strength"] in (0.5, 1.0)
    assert summary["unknown_to_reference"] == [] and summary["missing_sources"] == []
    assert (out / "scores.png").stat().st_size > 1000 and (out / "scores.svg").is_file()
    # the scores match a direct computation for one record
    direct, _ = score_images([Image.open(out / records[0]["file_name"]).convert("RGB")], [records[0]],
                             reference=load_reference(ref_dir, device="cpu"), clip=tiny_clip,
                             prompt=lambda c: class_prompt(c, superclass="bird"))
    assert direct[0]["p_target"] == pytest.approx(records[0]["scores"]["p_target"], abs=1e-5)
    assert direct[0]["clip_target"] == pytest.approx(records[0]["scores"]["clip_target"], abs=1e-5)


def test_score_cli_without_clip_computes_the_rest(translated, capsys):
    out, ref_dir = translated
    assert cli.main(["score", "--input", str(out), "--reference", str(ref_dir), "--quiet"]) == 0   # default CLIP, offline
    text = capsys.readouterr().out
    assert "CLIP unavailable: ViT-B-32/openai" in text
    for rec in read_jsonl(out / "records.jsonl"):
        s = rec["scores"]
        assert s["clip_target"] is None and s["clip_source"] is None
        assert None not in (s["p_target"], s["p_source"], s["top1"], s["distance"], s["ssim"])
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert summary["clip"].startswith("CLIP unavailable") and summary["embedding"] == "reference"


def test_score_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["score", "--input", str(tmp_path), "--clip-model", "none"])
    assert exc.value.code == 2 and "records.jsonl" in capsys.readouterr().err


def test_score_cli_with_a_bundle_reference_and_set_recommended(translated, tiny_model_dir, tmp_path, capsys):
    from diffmix_core.bundle import load_bundle, save_bundle
    from diffmix_core.reference import attach_reference

    out, ref_dir = translated
    tokens = [f"<c{i}>" for i in range(len(CLASSES))]
    save_bundle(tmp_path / "b", classes=list(CLASSES), tokens=tokens, embeddings={t: torch.randn(32) for t in tokens},
                lora_state_dict=None, base_model=str(tiny_model_dir), superclass="bird", resolution=32)
    attach_reference(tmp_path / "b", ref_dir)
    assert cli.main(["score", "--input", str(out), "--bundle", str(tmp_path / "b"), "--clip-model", "none",
                     "--set-recommended", "--min-p-target", "0", "--out", str(tmp_path / "report"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "CLIP unavailable: no CLIP model given" in text
    summary = json.loads((tmp_path / "report" / "sweep_summary.json").read_text())
    assert summary["reference"]["path"].endswith("reference") and summary["recommended_strength"] in (0.5, 1.0)
    assert load_bundle(tmp_path / "b").meta["recommended_strength"] == summary["recommended_strength"]
    assert all(r["scores"]["p_target"] is not None for r in read_jsonl(out / "records.jsonl"))


def test_score_cli_defaults_to_the_clip_the_bundle_names(translated, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A bundle naming its CLIP (the demo world's) is scored with it when --clip-model is not given;
    DIFFMIX_CLIP_MODEL and --clip-model still choose another."""
    from diffmix_core.bundle import save_bundle
    from diffmix_core.config import DemoClipConfig
    from diffmix_core.demo.clip import CLIP_LABEL, attach_clip, build_model, save_clip
    from diffmix_core.reference import attach_reference

    out, ref_dir = translated
    tokens = [f"<c{i}>" for i in range(len(CLASSES))]
    save_bundle(tmp_path / "b", classes=list(CLASSES), tokens=tokens, embeddings={t: torch.randn(32) for t in tokens},
                lora_state_dict=None, base_model=str(tiny_model_dir), superclass="bird", resolution=32)
    attach_reference(tmp_path / "b", ref_dir)
    config = DemoClipConfig(embed_dim=16, image_size=32, vision_width=32, vision_layers=1, text_width=32,
                            text_layers=1)
    attach_clip(tmp_path / "b", save_clip(build_model(config), tmp_path / "clip", config, {}))
    monkeypatch.delenv("DIFFMIX_CLIP_MODEL", raising=False)
    args = ["score", "--input", str(out), "--bundle", str(tmp_path / "b"), "--out", str(tmp_path / "r"), "--quiet"]
    assert cli.main(args) == 0
    assert f"CLIP: {CLIP_LABEL}" in capsys.readouterr().out
    assert all(r["scores"]["clip_target"] is not None for r in read_jsonl(out / "records.jsonl"))
    assert json.loads((tmp_path / "r" / "sweep_summary.json").read_text())["clip"] == f"CLIP: {CLIP_LABEL}"
    assert cli.main(args + ["--clip-model", "none"]) == 0
    assert "CLIP unavailable: no CLIP model given" in capsys.readouterr().out
    monkeypatch.setenv("DIFFMIX_CLIP_MODEL", "none")
    assert cli.main(args) == 0
    assert "CLIP unavailable: no CLIP model given" in capsys.readouterr().out
