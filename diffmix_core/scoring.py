"""Scoring: is a translation faithful to its target class, and different enough
from its source? (docs/method.md §6)

Per image (``record["scores"]``; a metric that cannot be had is None, never a guess):

- ``p_target`` / ``p_source``: the reference classifier's probability of the
  target / source class; ``top1``: its top class name (reference.py).
- ``clip_target`` / ``clip_source``: CLIP cosine similarity between the image and
  the prompt of the target / source class (the class NAME in the bundle's
  template: CLIP does not know the learned tokens).
- ``distance``: 1 - cosine similarity of the image's and its source's embeddings
  (CLIP image embeddings when CLIP is available, else the reference
  classifier's pooled features): 0 for the same picture, 1 for unrelated
  (orthogonal) embeddings, at most 2 (opposite ones), so values a little over 1 occur.
- ``ssim``: structural similarity to the source, grayscale, both squashed to
  ``ScoreConfig.ssim_size``.

Per sweep: the mean of each metric per strength (pooled and per target class),
set diversity across seeds (the Vendi score of the embeddings of the images
sharing source, target and strength), and a recommended strength
(:func:`recommend_strength`). Everything is batched; each source image is read
and embedded once.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .bundle import DEFAULT_TEMPLATE, make_prompt
from .config import ScoreConfig
from .data import ImageError, load_image
from .models import default_device
from .records import atomic_path, read_jsonl, write_jsonl_atomic, write_text_atomic

SCORE_KEYS = ("p_target", "p_source", "top1", "clip_target", "clip_source", "distance", "ssim")
METRICS = ("p_target", "p_source", "clip_target", "clip_source", "clip_win", "distance", "ssim")
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "sweep_summary.json"
PLOT_STEM = "scores"


# --------------------------------------------------------------------------- CLIP
@dataclass
class ClipScorer:
    """open_clip model + tokenizer, or the reason there is none (``available`` False)."""

    name: str
    reason: str = ""                 # why CLIP is unavailable ("" when available)
    model: torch.nn.Module | None = field(default=None, repr=False)
    preprocess: Callable | None = field(default=None, repr=False)
    tokenizer: Callable | None = field(default=None, repr=False)

    @property
    def available(self) -> bool:
        return self.model is not None

    @property
    def status(self) -> str:
        return f"CLIP: {self.name}" if self.available else f"CLIP unavailable: {self.reason}"

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings (B, D) on the CPU."""
        device = next(self.model.parameters()).device
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(device)
        return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (T, D) on the CPU."""
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(texts)).to(device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


CLIP_ENV = ("DIFFMIX_CLIP_MODEL", "DIFFMIX_CLIP_PRETRAINED")   # open_clip model / weights; "none" = off
LOCAL_DIR = "local-dir:"
CLIP_CONFIG_FILE = "open_clip_config.json"   # open_clip's folder config; its optional "label" names the model


def load_clip(model_name: str, pretrained: str = "", device: str | None = None) -> ClipScorer:
    """An open_clip scorer, or an unavailable one with the reason. Never random weights:
    open_clip's ``create_model_from_pretrained`` refuses a model whose weights did not load.

    Args:
        model_name: open_clip architecture (``ViT-B-32``), ``local-dir:DIR`` (open_clip_config.json
            + weights) or ``hf-hub:ORG/REPO``; "" or "none" = no CLIP. A local folder whose config
            has a ``label`` (the demo CLIP's) is named by it.
        pretrained: weights tag (``openai``) or a local checkpoint file (architectures only).
    """
    if not model_name or model_name.lower() == "none":
        return ClipScorer("", reason="no CLIP model given (--clip-model NAME --clip-pretrained TAG, or "
                                     "--clip-checkpoint FILE)")
    schema = model_name.split(":", 1)[0] if model_name.startswith((LOCAL_DIR, "hf-hub:")) else None
    if schema is None and not pretrained:
        return ClipScorer(model_name, reason=f"no weights named for {model_name} (give a pretrained tag or a "
                                             "checkpoint file; diffmix never scores with random weights)")
    name = model_name if schema else f"{model_name}/{pretrained}"
    try:
        if schema == LOCAL_DIR[:-1]:
            label = json.loads((Path(model_name[len(LOCAL_DIR):]) / CLIP_CONFIG_FILE).read_text(encoding="utf-8")
                               ).get("label")
            name = label if isinstance(label, str) and label else name
        import open_clip

        model, preprocess = open_clip.create_model_from_pretrained(
            model_name, pretrained=None if schema else pretrained, device=device or default_device())
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as err:  # offline, unknown tag, missing/broken file, no cache
        return ClipScorer(name, reason=f"{name} could not be loaded ({_first_line(err)})")
    return ClipScorer(name, model=model.eval(), preprocess=preprocess, tokenizer=tokenizer)


def bundle_clip_path(bundle) -> Path | None:
    """The open_clip folder a bundle names in adapter.json's optional ``clip`` (relative to the
    bundle: the demo world's ``../clip``), or None when it names none."""
    rel = bundle.meta.get("clip") if bundle is not None else None
    return (Path(bundle.path) / rel).resolve() if rel else None


def default_clip(bundle=None) -> tuple[str, str]:
    """(model, pretrained) for :func:`load_clip`: ``DIFFMIX_CLIP_MODEL`` / ``_PRETRAINED`` when set;
    else the CLIP the bundle names (the demo world's demo CLIP, as ``local-dir:``); else
    ScoreConfig's default (OpenAI's ViT-B-32)."""
    if os.environ.get(CLIP_ENV[0]) is not None:
        return os.environ[CLIP_ENV[0]], os.environ.get(CLIP_ENV[1], ScoreConfig.clip_pretrained)
    path = bundle_clip_path(bundle)
    if path is not None:
        return f"{LOCAL_DIR}{path}", ""
    return ScoreConfig.clip_model, os.environ.get(CLIP_ENV[1], ScoreConfig.clip_pretrained)


TINY_CLIP_CONFIG = {  # a ~0.2 M-parameter open_clip CLIP for tests (random weights: code paths only)
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip_dir(out: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random-weight open_clip model as a ``local-dir:`` folder (tests, benchmarks)."""
    import open_clip
    from safetensors.torch import save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    save_model(model, str(out / "open_clip_model.safetensors"))
    cfg = {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                                             "std": list(open_clip.OPENAI_DATASET_STD)}}
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    return out


# --------------------------------------------------------------------------- metrics
def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity along the last dim, clamped to [0, 2]."""
    sim = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return (1.0 - sim).clamp(0.0, 2.0)


def gray_array(image: Image.Image, size: int) -> np.ndarray:
    """Grayscale float array squashed to (size, size): the SSIM input."""
    return np.asarray(image.convert("L").resize((size, size), Image.BICUBIC), dtype=np.float64)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two grayscale arrays in [0, 255] (skimage, 7x7 window)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, data_range=255.0))


def vendi_score(embeddings: np.ndarray | torch.Tensor) -> float:
    """Vendi score (Friedman & Dieng 2023) with the cosine kernel: exp of the Shannon
    entropy of the eigenvalues of K/n. n identical embeddings -> 1, n orthogonal -> n."""
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"vendi_score needs an (n, d) array with n >= 1, got shape {tuple(x.shape)}")
    x = torch.nn.functional.normalize(x, dim=-1)
    eig = torch.linalg.eigvalsh(x @ x.T / x.shape[0]).clamp(min=0)
    eig = eig[eig > 1e-12]
    return float(torch.exp(-(eig * eig.log()).sum()))


# --------------------------------------------------------------------------- per image
def class_prompt(class_name: str, bundle=None, superclass: str = "") -> str:
    """CLIP prompt of a class: its name in the bundle's template (or the paper's)."""
    if bundle is not None:
        return make_prompt(class_name, bundle.superclass, bundle.template)
    return make_prompt(class_name, superclass, DEFAULT_TEMPLATE)


class _Embedder:
    """The one embedding space for distances and Vendi: CLIP if available, else the reference's features."""

    def __init__(self, reference, clip: ClipScorer | None):
        self.clip = clip if clip is not None and clip.available else None
        self.reference = reference
        self.kind = "clip" if self.clip else ("reference" if reference is not None else None)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor | None:
        if self.clip:
            return self.clip.encode_images(images)
        if self.reference is not None:
            return self.reference.predict(images)[1]
        return None


class _Sources:
    """Source images, read and embedded once each (keyed by their path)."""

    def __init__(self, embed: _Embedder, ssim_size: int):
        self.embed, self.size, self.cache, self.missing = embed, ssim_size, {}, []

    def fetch(self, paths: list[str | None]) -> dict[str, tuple[np.ndarray, torch.Tensor | None] | None]:
        new = [p for p in dict.fromkeys(paths) if p and p not in self.cache]
        loaded = []
        for p in new:
            try:
                loaded.append((p, load_image(p)))
            except (FileNotFoundError, ImageError) as err:
                self.cache[p] = None
                self.missing.append(f"{p} ({err})")
        emb = self.embed([im for _, im in loaded]) if loaded else None
        for i, (p, im) in enumerate(loaded):
            self.cache[p] = (gray_array(im, self.size), None if emb is None else emb[i])
        return self.cache


def _r(x) -> float | None:
    return None if x is None else round(float(x), 6)


def score_images(images: list[Image.Image], records: list[dict], *, reference=None, clip: ClipScorer | None = None,
                 config: ScoreConfig = ScoreConfig(), prompt: Callable[[str], str] = class_prompt,
                 sources: _Sources | None = None, embed: _Embedder | None = None) -> tuple[list[dict], list]:
    """Scores of one batch of generated images with their records (source_path, classes).

    Returns (one ``scores`` dict per image, one embedding per image or None).
    """
    embed = embed or _Embedder(reference, clip)
    sources = sources or _Sources(embed, config.ssim_size)
    probs = reference.predict(images)[0] if reference is not None else None
    emb = embed(images)
    srcs = sources.fetch([r.get("source_path") for r in records])
    texts = None
    if embed.clip is not None:
        names = list(dict.fromkeys(c for r in records for c in (r["target_class"], r["source_class"])))
        t = embed.clip.encode_texts([prompt(n) for n in names])
        texts = {n: t[i] for i, n in enumerate(names)}
    out = []
    for i, rec in enumerate(records):
        s = dict.fromkeys(SCORE_KEYS)
        if probs is not None:
            for key, cls in (("p_target", rec["target_class"]), ("p_source", rec["source_class"])):
                j = reference.class_index(cls)
                s[key] = None if j is None else _r(probs[i, j])
            s["top1"] = reference.classes[int(probs[i].argmax())]
        if texts is not None:
            s["clip_target"] = _r(emb[i] @ texts[rec["target_class"]])
            s["clip_source"] = _r(emb[i] @ texts[rec["source_class"]])
        src = srcs.get(rec.get("source_path")) if rec.get("source_path") else None
        if src is not None:
            s["ssim"] = _r(ssim(gray_array(images[i], config.ssim_size), src[0]))
            if emb is not None and src[1] is not None:
                s["distance"] = _r(cosine_distance(emb[i], src[1]))
        out.append(s)
    return out, [None if emb is None else emb[i].numpy() for i in range(len(records))]


def score_records(records: list[dict], folder: str | os.PathLike, *, reference=None, clip: ClipScorer | None = None,
                  config: ScoreConfig = ScoreConfig(), prompt: Callable[[str], str] = class_prompt,
                  show_progress: bool = True) -> tuple[list[dict], list, dict]:
    """Score every record's image (``folder / file_name``) in batches.

    Returns (scores per record, embedding per record, info: embedding kind and missing sources).
    """
    embed = _Embedder(reference, clip)
    sources = _Sources(embed, config.ssim_size)
    scores, embeddings = [], []
    bar = tqdm(total=len(records), desc="score", unit="img", disable=not show_progress)
    for i in range(0, len(records), config.batch_size):
        chunk = records[i:i + config.batch_size]
        images = [load_image(Path(folder) / rec["file_name"]) for rec in chunk]
        s, e = score_images(images, chunk, reference=reference, clip=clip, config=config, prompt=prompt,
                            sources=sources, embed=embed)
        scores += s
        embeddings += e
        bar.update(len(chunk))
    bar.close()
    known = set(reference.classes) if reference is not None else None
    unknown = sorted({c for r in records for c in (r["source_class"], r["target_class"])} - known) if known else []
    return scores, embeddings, {"embedding": embed.kind, "missing_sources": sources.missing,
                                "unknown_to_reference": unknown}


# --------------------------------------------------------------------------- per sweep
def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(sum(vals) / len(vals), 6) if vals else None


def _row(strength: float, recs: list[dict], embs: list) -> dict:
    """Means of one strength's images; Vendi per (source, target) group of >= 2 seeds, averaged."""
    sc = [r.get("scores") or {} for r in recs]
    row = {"strength": strength, "n": len(recs)}
    for key in ("p_target", "p_source", "clip_target", "clip_source", "distance", "ssim"):
        row[key] = _mean(s.get(key) for s in sc)
    row["clip_win"] = _mean(None if s.get("clip_target") is None or s.get("clip_source") is None
                            else float(s["clip_target"] > s["clip_source"]) for s in sc)
    groups = defaultdict(list)
    for rec, e in zip(recs, embs):
        if e is not None:
            groups[(rec.get("source_path") or rec.get("source_id"), rec["target_class"])].append(e)
    vendis = [vendi_score(np.stack(g)) for g in groups.values() if len(g) >= 2]
    row["vendi"] = _mean(vendis)
    row["vendi_groups"] = len(vendis)
    return row


def _rows(recs: list[dict], embs: list) -> list[dict]:
    by_s = defaultdict(list)
    for rec, e in zip(recs, embs):
        by_s[float(rec["strength"])].append((rec, e))
    return [_row(s, [r for r, _ in v], [e for _, e in v]) for s, v in sorted(by_s.items())]


def recommend_strength(rows: list[dict], bar: float = 0.5) -> tuple[float | None, str]:
    """The recommended strength of a sweep and why.

    Rule: faithfulness f(s) is the mean P(target) when the reference classifier scored
    the images, else the share of images CLIP finds closer to the target prompt than to
    the source prompt (``clip_win``). Diversity d(s) is the mean distance to the source,
    else 1 - mean SSIM. Among strengths with f(s) >= ``bar`` (ScoreConfig.recommend_min_p_target),
    take the one with the largest d(s) (ties: the smaller strength). Fallbacks: no strength reaches the
    threshold -> the most faithful strength; no diversity measure -> the most faithful
    eligible strength; no faithfulness measure -> None.
    """
    f_key = next((k for k in ("p_target", "clip_win") if any(r.get(k) is not None for r in rows)), None)
    if f_key is None:
        return None, "no faithfulness measure (no reference classifier and CLIP unavailable)"
    d_key = next((k for k in ("distance", "ssim") if any(r.get(k) is not None for r in rows)), None)
    diversity = (lambda r: r.get("distance")) if d_key == "distance" else (  # noqa: E731
        lambda r: None if r.get("ssim") is None else 1 - r["ssim"])
    scored = [r for r in rows if r.get(f_key) is not None]
    eligible = [r for r in scored if r[f_key] >= bar]
    if not eligible:
        best = max(scored, key=lambda r: (r[f_key], -r["strength"]))
        return best["strength"], (f"no strength reaches mean {f_key} >= {bar}; the most faithful "
                                  f"strength ({f_key} = {best[f_key]:.3f})")
    with_d = [r for r in eligible if diversity(r) is not None]
    if not with_d:
        best = max(eligible, key=lambda r: (r[f_key], -r["strength"]))
        return best["strength"], f"no diversity measure; the most faithful strength with {f_key} >= {bar}"
    best = max(with_d, key=lambda r: (diversity(r), -r["strength"]))
    d_name = "distance" if d_key == "distance" else "1 - SSIM"
    return best["strength"], (f"largest mean {d_name} to the source ({diversity(best):.3f}) among strengths "
                              f"with mean {f_key} >= {bar}")


def summarize(records: list[dict], embeddings: list | None = None, config: ScoreConfig = ScoreConfig(),
              **info) -> dict:
    """Sweep summary: rows per strength (pooled and per target class) and the recommendation."""
    embeddings = embeddings if embeddings is not None else [None] * len(records)
    pooled = _rows(records, embeddings)
    by_target = defaultdict(lambda: ([], []))
    for rec, e in zip(records, embeddings):
        by_target[rec["target_class"]][0].append(rec)
        by_target[rec["target_class"]][1].append(e)
    strength, reason = recommend_strength(pooled, config.recommend_min_p_target)
    return {"n_images": len(records), "strengths": pooled,
            "by_target": {t: _rows(r, e) for t, (r, e) in sorted(by_target.items())},
            "recommended_strength": strength, "recommendation": reason,
            "recommend_min_p_target": config.recommend_min_p_target, **info}


def recommendation_bar(summary: dict | None) -> float:
    """The mean P(target) a strength had to reach to be recommended in ``summary`` (read also
    from the key summaries written before the rename, ``min_p_target``)."""
    summary = summary or {}
    return summary.get("recommend_min_p_target", summary.get("min_p_target", ScoreConfig.recommend_min_p_target))


def format_summary(summary: dict) -> str:
    """A plain-text table of the pooled rows plus the recommendation."""
    cols = ("strength", "n", "p_target", "p_source", "clip_target", "clip_win", "distance", "ssim", "vendi")
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["  ".join(f"{c:>11}" for c in cols)]
    lines += ["  ".join(f"{fmt(row.get(c)):>11}" for c in cols) for row in summary["strengths"]]
    s = summary.get("recommended_strength")
    lines.append(f"recommended strength: {'none' if s is None else s} ({summary.get('recommendation')})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot
def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["strength"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_strategies(summaries: dict[str, dict | None], title: str = ""):
    """Strategies side by side: faithfulness (left) and distance to the source (right) against
    strength, one curve per strategy (its pooled rows). Returns a matplotlib Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_f, ax_d = fig.subplots(1, 2)
    rows = [r for s in summaries.values() if s for r in s["strengths"]]
    f_key = "p_target" if any(r.get("p_target") is not None for r in rows) else "clip_win"
    f_label = {"p_target": "reference P(target)", "clip_win": "CLIP: closer to target prompt (share)"}[f_key]
    for name, summary in summaries.items():
        if not summary:
            continue
        line = ax_f.plot(*_series(summary["strengths"], f_key), lw=2, marker="o", label=name)[0]
        ax_d.plot(*_series(summary["strengths"], "distance"), lw=2, marker="o", color=line.get_color(), label=name)
    for ax, label in ((ax_f, f_label), (ax_d, "distance to source (1 - cos, 0 to 2)")):
        ax.set_xlabel("strength s")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="best")
    ax_f.set_ylim(-0.02, 1.02)
    ax_d.set_ylim(bottom=0)
    ax_f.set_title("faithfulness to the target class, per strategy")
    ax_d.set_title("diversity from the source, per strategy")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


VENDI_NEEDS_SEEDS = "Vendi (diversity across seeds) needs >= 2 seeds per strength"


def plot_sweep(summary: dict, title: str = ""):
    """Faithfulness (left) and diversity (right) against strength: pooled (thick) and per
    target class (thin). Returns a matplotlib Figure (Agg canvas, no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_f, ax_d = fig.subplots(1, 2)
    pooled, per = summary["strengths"], summary["by_target"]
    f_key = "p_target" if any(r.get("p_target") is not None for r in pooled) else "clip_win"
    f_label = {"p_target": "reference P(target)", "clip_win": "CLIP: closer to target prompt (share)"}[f_key]
    for ax, key, label in ((ax_f, f_key, f_label), (ax_d, "distance", "distance to source (1 - cos, 0 to 2)")):
        for target, rows in per.items():
            ax.plot(*_series(rows, key), lw=1, alpha=0.5, marker=".", label=target if len(per) <= 10 else None)
        ax.plot(*_series(pooled, key), lw=2.5, color="black", marker="o", label=f"all ({label})")
        ax.set_xlabel("strength s")
        ax.set_xlim(-0.02, 1.02)
    ax_f.plot(*_series(pooled, "p_source" if f_key == "p_target" else "clip_source"), ls="--", color="gray",
              label="P(source)" if f_key == "p_target" else "CLIP sim. to source prompt")
    ax_f.axhline(recommendation_bar(summary), color="red", lw=0.8, ls=":")
    ssim_x, ssim_y = _series(pooled, "ssim")
    ax_d.plot(ssim_x, [1 - v for v in ssim_y], ls="--", color="gray", label="1 - SSIM")
    vendi = _series(pooled, "vendi")
    if vendi[0]:   # one seed per strength: no Vendi (it compares seeds), and no empty axis for it
        ax_v = ax_d.twinx()
        ax_v.plot(*vendi, ls=":", color="tab:purple", marker="s", label="Vendi (across seeds)")
        ax_v.set_ylabel("Vendi score", color="tab:purple")
    else:
        ax_d.text(0.02, 0.97, VENDI_NEEDS_SEEDS, transform=ax_d.transAxes, fontsize=7, va="top", color="tab:purple")
    ax_f.set_ylim(-0.02, 1.02)   # probabilities and shares
    ax_d.set_ylim(bottom=0)
    ax_f.set_ylabel("faithfulness")
    ax_d.set_ylabel("diversity")
    ax_f.set_title("faithfulness to the target class")
    ax_d.set_title("diversity from the source")
    if summary.get("recommended_strength") is not None:
        for ax in (ax_f, ax_d):
            ax.axvline(summary["recommended_strength"], color="green", lw=1, ls="-.")
    ax_f.legend(fontsize=7, loc="best")
    handles, labels = ax_d.get_legend_handles_labels()
    if vendi[0]:
        handles, labels = handles + ax_v.get_legend_handles_labels()[0], labels + ax_v.get_legend_handles_labels()[1]
    ax_d.legend(handles, labels, fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def save_figure(fig, stem: str | os.PathLike) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg`` atomically."""
    paths = []
    for fmt in ("png", "svg"):
        path = Path(f"{stem}.{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- a folder
@dataclass
class ScoreReport:
    records: list[dict]    # the records with their scores
    summary: dict          # see summarize
    figure: object         # matplotlib Figure
    files: list[Path]      # what was written


def score_folder(folder: str | os.PathLike, *, reference=None, clip: ClipScorer | None = None,
                 config: ScoreConfig = ScoreConfig(), bundle=None, superclass: str = "",
                 out_dir: str | os.PathLike | None = None, show_progress: bool = True) -> ScoreReport:
    """Score the images of a ``diffmix translate`` folder: adds ``scores`` to every record of
    ``records.jsonl`` (rewritten atomically), writes ``sweep_summary.json`` and the plot
    (``scores.png`` / ``.svg``) into ``out_dir`` (default: the folder)."""
    folder = Path(folder)
    index = folder / RECORDS_FILE
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no {RECORDS_FILE}; score a folder written by `diffmix translate`")
    records = read_jsonl(index)
    bad = [i for i, r in enumerate(records, 1) if not all(r.get(k) is not None for k in
                                                          ("file_name", "source_class", "target_class", "strength"))]
    if bad:
        raise ValueError(f"{index}: record(s) {bad[:5]} lack file_name, source_class, target_class or strength")
    clip = clip if clip is not None else ClipScorer("", reason="no CLIP model given")
    scores, embeddings, info = score_records(records, folder, reference=reference, clip=clip, config=config,
                                             prompt=lambda c: class_prompt(c, bundle, superclass),
                                             show_progress=show_progress)
    for rec, s in zip(records, scores):
        rec["scores"] = s
    write_jsonl_atomic(index, records)
    summary = summarize(records, embeddings, config, clip=clip.status,
                        reference=None if reference is None else {
                            "path": str(reference.path), "model_name": reference.model_name,
                            "val_accuracy": reference.meta.get("val_accuracy")}, **info)
    out = Path(out_dir) if out_dir is not None else folder
    files = [index, write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")]
    fig = plot_sweep(summary, title=f"{folder.name}: {summary['n_images']} images; {clip.status}")
    files += save_figure(fig, out / PLOT_STEM)
    return ScoreReport(records, summary, fig, files)
