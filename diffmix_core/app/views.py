"""What the page shows, as text: the bundle panel, a result's caption, the score table and its
CSV, and the `diffmix translate` command that makes a result again. Text that comes from a
bundle or a user goes through :func:`md_text` / :func:`md_code` (inert in Markdown and HTML).
"""
from __future__ import annotations

import csv
import html
import io
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from ..bundle import Bundle, Profile, bundle_examples
from ..demo import PLACEHOLDER_NOTE, is_placeholder
from ..profiles import load_profile, output_root
from ..records import csv_cell, write_text_atomic
from .cache import OFFLINE

TABLE_COLUMNS = ("id", "source_id", "source", "target", "strength", "ran", "seed", "p_target", "p_source", "top1",
                 "clip_target", "clip_source", "distance", "ssim", "soft_label", "curated", "strategy", "partner_id",
                 "cache_interval")


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def md_text(text: object) -> str:
    """Untrusted text (a class name, a bundle string) made inert in Markdown and HTML: HTML
    characters become entities and Markdown's markup characters are backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(str(text), quote=False)).replace("\n", " ")


def md_code(text: object) -> str:
    """Untrusted text shown as code (file names, ids): a code span, whose content Markdown shows
    literally (HTML included); text that could end the span is shown through :func:`md_text`."""
    text = str(text)
    if "`" in text or "\n" in text or "\r" in text or not text.strip():
        return f"<code>{md_text(text)}</code>"
    return f"`{text}`"


def bundle_status(bundle: Bundle, profile: Profile | None = None, examples: int | None = None) -> dict:
    """Plain facts for the bundle panel (``profile`` / ``examples``: when the caller has them already)."""
    ref = bundle.meta.get("reference_classifier")
    return {"classes": list(bundle.classes), "base_model": bundle.base_model, "revision": bundle.base_revision,
            "steps": bundle.meta.get("steps", 0), "resolution": bundle.resolution,
            "reference": ref, "recommended_strength": bundle.meta.get("recommended_strength"),
            "profile": load_profile(bundle) if profile is None else profile,
            "examples": len(bundle_examples(bundle)) if examples is None else examples,
            "note": PLACEHOLDER_NOTE if is_placeholder(bundle) else ""}


def bundle_markdown(bundle: Bundle, clip_status: str, reference_status: str, profile: Profile | None = None,
                    examples: int | None = None) -> str:
    st = bundle_status(bundle, profile, examples)
    if Path(str(st["base_model"])).is_absolute():   # a local base: as adapter.json names it, not the server path
        stored = str((bundle.meta.get("base_model") or {}).get("model") or "")
        st["base_model"] = stored if stored and not Path(stored).is_absolute() else Path(st["base_model"]).name
    names = ", ".join(md_text(c) for c in st["classes"][:30]) + (
        f" … (+{len(st['classes']) - 30})" if len(st["classes"]) > 30 else "")
    lines = [f"**{len(st['classes'])} classes**: {names}",
             f"base model {md_code(st['base_model'])}" + (f" @ {md_code(st['revision'])}" if st["revision"] else "")
             + f" · trained {st['steps']} steps at {st['resolution']} px",
             f"reference classifier: {reference_status}", clip_status]
    p = st["profile"]
    if p.strength is not None:   # one starting strength, with where it comes from (a calibration: its summary)
        lines.append(f"{md_text(p.strength_source())} · thresholds "
                     f"{p.thresholds.as_dict() or 'none'}")
    elif st["recommended_strength"] is not None:
        lines.append(f"strength **{st['recommended_strength']}** recommended by `diffmix score --set-recommended`")
    else:
        lines.append("no profile or recommended strength yet: run a sweep with scores")
    if st["note"]:
        lines.append(f"⚠️ {st['note']}")
    return "\n\n".join(lines)


def clip_line(scorer) -> str:
    """One short line for the page, the full reason folded under it."""
    if scorer.available:
        return f"CLIP on ({scorer.name})"
    reason = scorer.reason or ""
    short = ("CLIP off: " + OFFLINE if reason.startswith(OFFLINE) else
             "CLIP loading…" if "still loading" in reason else
             "CLIP off: none chosen" if reason.startswith("no CLIP model given") else "CLIP off: could not load")
    return f"<details><summary>{short}</summary>{reason}</details>"


def command_for(record: dict, sweep: Sequence[dict] = (), out: str | os.PathLike | None = None) -> str:
    """The `diffmix translate` command that makes this record's image again, pixel for pixel.

    With ``sweep`` (the records made with it) the command makes the whole sweep: the engine
    batches jobs, and a batch of other size may differ in the last bits of a float, so the
    same jobs in the same order is what gives the same pixels. ``out`` defaults to a folder
    under the output root, ``<root>/translate/sweep-<id>`` (absolute: never the folder the
    command is run from)."""
    group = [r for r in sweep if r.get("source_path") == record.get("source_path")
             and r.get("strategy") == record.get("strategy")] or [record]
    out = out if out is not None else output_root() / "translate" / f"sweep-{group[0]['id'][:8]}"
    targets = list(dict.fromkeys(r["target_class"] for r in group))
    strengths = list(dict.fromkeys(f"{r['strength']:g}" for r in group))
    seeds = list(dict.fromkeys(str(r["seed"]) for r in group))
    parts = ["diffmix", "translate", "--bundle", record["bundle"]]
    if record.get("source_path"):
        parts += ["--image", record["source_path"], "--source-class", record["source_class"]]
    parts += ["--target", *targets, "--strength", *strengths,
              "--seed", *seeds, "--steps", str(record["num_inference_steps"]),
              "--guidance", f"{record['guidance_scale']:g}", "--strategy", record["strategy"],
              "--resize", record["resize"], "--resolution", str(record["resolution"]),
              "--label-gamma", f"{record['label_gamma']:g}", "--label-scale", f"{record['label_scale']:g}"]
    if record.get("scheduler") in ("dpm++", "ddim") and not record.get("partner_path"):
        parts += ["--scheduler", record["scheduler"]]
    return shlex.join(parts + run_options(record) + ["--out", str(out)])


def run_options(record: dict) -> list[str]:
    """The options a record adds to its command: the feature cache, diff-ii's partner and inversion."""
    parts = []
    if record.get("cache_interval", 1) != 1:
        parts += ["--cache-interval", str(record["cache_interval"])]
    if record.get("partner_path"):
        parts += ["--partner", record["partner_path"], "--inversion-steps", str(record["inversion_steps"]),
                  "--inversion-guidance", f"{record['inversion_guidance']:g}"]
    return parts


def caption(record: dict) -> str:
    sc = record.get("scores") or {}
    head = f"→ {record['target_class']} · s={record['strength']:.2f} (ran {record['strength_run']:.2f}) · seed {record['seed']}"
    if record.get("partner_id"):
        head += f" · {record.get('strategy')} with {record['partner_id']}"
    parts = [f"{label} {sc[key]:.2f}" for key, label in (("p_target", "P(target)"), ("p_source", "P(source)"),
                                                        ("clip_target", "CLIP"), ("distance", "dist"))
             if sc.get(key) is not None]
    label = ", ".join(f"{k} {v:.2f}" for k, v in record["soft_label"].items())
    return "\n".join([head, " · ".join(parts) or "no scores", f"label: {label}"])


def table(records: Sequence[dict], curated: set[str]) -> list[list]:
    rows = []
    for r in records:
        sc = r.get("scores") or {}
        label = ", ".join(f"{k} {v:.3f}" for k, v in r["soft_label"].items())
        values = [sc.get(k) for k in ("p_target", "p_source", "top1", "clip_target", "clip_source", "distance", "ssim")]
        values = [round(v, 4) if isinstance(v, float) else v for v in values]
        rows.append([r["id"], r.get("source_id"), r["source_class"], r["target_class"], r["strength"], r["strength_run"], r["seed"],
                     *values, label, r["id"] in curated, r.get("strategy"), r.get("partner_id"),
                     r.get("cache_interval", 1)])
    return rows


def write_csv(path: str | os.PathLike, rows: Sequence[Sequence]) -> Path:
    """The sweep table as CSV; text cells through records.csv_cell (a class name starting with
    ``=`` is not a formula), numbers as numbers; CRLF rows so a CR inside a name is quoted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(TABLE_COLUMNS)
    writer.writerows(["" if v is None else v if isinstance(v, (int, float)) else csv_cell(v) for v in row]
                     for row in rows)
    return write_text_atomic(path, buf.getvalue())
