"""`diffmix experiment`: settings x arms x seeds on any dataset; synthesize, train, tabulate.

A YAML file names the arms (baseline, mixup, cutmix, real-*/diff-*/ti-* at
chosen strengths), the data regimes (few-shot, long-tail) and the seeds. For
every (setting, arm, strength, seed) the runner makes the synthetic set it
needs through the synthesize stage (one plan, the same multiplier for every
arm: equal synthetic budgets), trains through the classify stage, and writes::

    <out>/<setting>/split.json                        the one split of the setting (shared by all arms)
    <out>/<setting>/synth/<strategy>-s<s>-seed<n>/    plan, images, records, export/imagefolder
    <out>/<setting>/runs/<arm>[-s<s>]/seed<n>/        classifier checkpoint + report.json
    <report_dir>/<name>.md, <name>.json, <name>.png   the table (mean ± std over seeds) and the plot

Everything is resumable: a finished run (its report.json) or synthetic set is
reused. Seeds drive the synthesis plan and the classifier; the split seed is
one for all stages (the generator never sees validation or test images).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from pathlib import Path

import numpy as np

from .config import (ClassifyConfig, ExperimentArm, ExperimentConfig, ExperimentSetting, PipelineConfig,
                     SplitConfig, SynthesizeConfig, TranslateConfig, get_strategy)

# --quick: what the built-in quick variant changes unless the file's `quick:` section says otherwise.
QUICK_DEFAULTS = {"seeds_max": 2, "train": {"epochs": 1}, "synthesize": {"multiplier": 1.0},
                  "translate": {"num_inference_steps": 4}}
NESTED = {"split": SplitConfig, "train": ClassifyConfig, "synthesize": SynthesizeConfig, "translate": TranslateConfig}


# --------------------------------------------------------------------------- config file
def _build(cls, values: dict, where: str):
    """A config dataclass from a YAML mapping; unknown keys are an error naming the known ones."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    fixed = {k: tuple(v) if isinstance(v, list) and "tuple" in str(hints[k]) else v for k, v in values.items()}
    return cls(**fixed)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) and k in NESTED else v
    return out


def experiment_from_dict(raw: dict, *, quick: bool = False, **overrides) -> ExperimentConfig:
    """Build an ExperimentConfig from the YAML mapping; ``quick`` merges the ``quick:`` section
    (default :data:`QUICK_DEFAULTS`); ``overrides`` (non-None values) replace top-level keys."""
    raw = dict(raw or {})
    quick_over = raw.pop("quick", None) or {}
    if quick:
        q = _merge(QUICK_DEFAULTS, quick_over)
        seeds_max = q.pop("seeds_max", None)
        raw = _merge(raw, q)
        if seeds_max and "seeds" not in quick_over:
            raw["seeds"] = list(raw.get("seeds", ExperimentConfig.seeds))[:seeds_max]
    raw.update({k: v for k, v in overrides.items() if v is not None})
    values = {k: _build(NESTED[k], v, k) if k in NESTED else v for k, v in raw.items()}
    if "settings" in values:
        values["settings"] = tuple(_build(ExperimentSetting, s, f"settings[{i}]")
                                   for i, s in enumerate(values["settings"]))
    if "arms" in values:
        values["arms"] = tuple(_build(ExperimentArm, a, f"arms[{i}]") for i, a in enumerate(values["arms"]))
    return _build(ExperimentConfig, values, "experiment")


def load_experiment(path: str | os.PathLike, *, quick: bool = False, **overrides) -> ExperimentConfig:
    """Read an experiment YAML file (relative paths in it are relative to the current directory)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({err})") from None
    return experiment_from_dict(raw, quick=quick, **overrides)


# --------------------------------------------------------------------------- the runs
def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-") or "x"


@dataclasses.dataclass(frozen=True)
class Run:
    """One cell of the design: a classifier trained under (setting, arm, strength, seed)."""

    setting: ExperimentSetting
    arm: ExperimentArm
    strength: float | None
    seed: int

    @property
    def label(self) -> str:
        return self.arm.name if self.strength is None else f"{self.arm.name}-s{self.strength:g}"


def plan_runs(config: ExperimentConfig) -> list[Run]:
    """Every run, settings outermost, seeds innermost."""
    runs = []
    for setting in config.settings:
        for arm in config.arms:
            gen = arm.strategy is not None and get_strategy(arm.strategy).pairing == "gen"
            strengths = (1.0,) if gen else (arm.strengths or (None,))
            runs += [Run(setting, arm, s, seed) for s in strengths for seed in config.seeds]
    return runs


class Pipelines:
    """At most two pipelines, loaded on first use: the untuned base (real-*) and the bundle's (diff-*, ti-*)."""

    def __init__(self, config: ExperimentConfig, device: str | None):
        self.config, self.device, self.cache = config, device, {}
        self.bundle = None
        if config.bundle:
            from .bundle import load_bundle

            self.bundle = load_bundle(config.bundle)

    def source(self, tokens: bool) -> PipelineConfig:
        """The pipeline of the diff-*/ti-* arms (tokens: the bundle's base) or of the real-* arms (the
        config's base, else the bundle's)."""
        return PipelineConfig(model="" if tokens else self.config.base, dtype=self.config.dtype or None,
                              device=self.device, scheduler=self.config.scheduler)

    def model(self, tokens: bool) -> str:
        from .models import pipeline_source

        return pipeline_source(self.source(tokens), self.bundle)[0]

    def get(self, tokens: bool):
        if tokens not in self.cache:
            from .models import load_pipeline_for

            # the bundle names the base; translate applies it to the diff-*/ti-* arms' calls
            self.cache[tokens] = load_pipeline_for(self.source(tokens), self.bundle, apply=False)
        return self.cache[tokens]


def make_synthetic(config: ExperimentConfig, pipes: Pipelines, train, split_file: Path, folder: Path,
                   strategy: str, strength: float, plan_seed: int, long_tail: bool, show_progress: bool) -> Path:
    """The synthetic set of one (setting, strategy, strength, plan seed), through the synthesize
    stage; an already merged folder is reused. Returns the folder (its export/imagefolder is read)."""
    from .synthesize import run_synthesis

    if (folder / "summary.json").is_file() and (folder / "export" / "imagefolder" / "metadata.jsonl").is_file():
        return folder
    sconfig = dataclasses.replace(config.synthesize, strength_strategy="fixed", strength=strength, seed=plan_seed,
                                  long_tail=long_tail)
    tconfig = dataclasses.replace(config.translate, strategy=strategy)
    tokens = get_strategy(strategy).tokens
    superclass = config.superclass or (pipes.bundle.superclass if pipes.bundle is not None else "")
    run_synthesis(train, folder, sconfig, tconfig, PipelineConfig(model=pipes.model(tokens), scheduler=config.scheduler),
                  split_file=split_file, bundle=pipes.bundle if tokens else None, superclass=superclass, shard=(0, 1),
                  export=("imagefolder",), pipe=pipes.get(tokens), show_progress=show_progress)
    return folder


def run_one(config: ExperimentConfig, run: Run, dataset, pipes: Pipelines, *, device: str | None,
            show_progress: bool) -> dict:
    """Synthesize what ``run`` needs, train (or reuse a finished run), return its result row."""
    from .classify import REPORT_FILE, train_classifier
    from .data import resolve_splits, split_subset

    root = Path(config.out) / slug(run.setting.name)
    split_file = Path(run.setting.split_file) if run.setting.split_file else root / "split.json"
    if run.setting.split_file and not split_file.is_file():
        raise FileNotFoundError(f"setting {run.setting.name!r}: split file {split_file} does not exist")
    split = dataclasses.replace(config.split, shots=run.setting.shots, imbalance=run.setting.imbalance)
    splits = resolve_splits(dataset, split_file, split)
    out = root / "runs" / slug(run.label) / f"seed{run.seed}"
    if not (out / REPORT_FILE).is_file():
        synthetic = None
        if run.arm.strategy is not None:
            plan_seed = run.seed if config.resynthesize_per_seed else config.seeds[0]
            folder = root / "synth" / f"{slug(run.arm.strategy)}-s{run.strength:g}-seed{plan_seed}"
            synthetic = make_synthetic(config, pipes, split_subset(dataset, splits, "train"), split_file, folder,
                                       run.arm.strategy, run.strength, plan_seed, run.setting.imbalance is not None,
                                       show_progress)
        p = run.setting.replace_prob if run.setting.replace_prob is not None else config.train.replace_prob
        tconfig = dataclasses.replace(config.train, seed=run.seed, mixup=run.arm.mixup, cutmix=run.arm.cutmix,
                                      replace_prob=p if synthetic is not None else 0.0)
        train_classifier(dataset, out, tconfig, synthetic=synthetic, split_file=split_file, device=device,
                         show_progress=show_progress)
    report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    row = {"setting": run.setting.name, "arm": run.arm.name, "strategy": run.arm.strategy, "strength": run.strength,
           "seed": run.seed, "test_accuracy": report["test_accuracy"],
           "mean_class_accuracy": report["mean_class_accuracy"], "val_accuracy": report["val_accuracy"],
           "run": str(out)}
    for group, value in (report.get("long_tail") or {}).items():
        if group != "thresholds":
            row[group] = value["accuracy"]
    return row


# --------------------------------------------------------------------------- results
METRICS = ("test_accuracy", "mean_class_accuracy", "many", "medium", "few")


def summarize(rows: list[dict], config: ExperimentConfig | None = None, n_boot: int = 2000) -> list[dict]:
    """Mean and sample std (n - 1; None for one seed) over seeds of each (setting, arm, strength);
    with ``config``, each arm's ``paired`` difference to the setting's baseline arm
    (:func:`paired_difference` over the seeds both have, on the same test images)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["arm"], r["strength"]), []).append(r)
    out = []
    for (setting, arm, strength), rs in groups.items():
        entry = {"setting": setting, "arm": arm, "strategy": rs[0]["strategy"], "strength": strength,
                 "seeds": [r["seed"] for r in rs]}
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                entry[m] = {"mean": float(np.mean(vals)),
                            "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None}
        out.append(entry)
    if config is not None:
        base = baseline_arm(config)
        for entry in out:
            if base is None or entry["arm"] == base:
                continue
            mine = groups[(entry["setting"], entry["arm"], entry["strength"])]
            theirs = groups.get((entry["setting"], base, None), [])
            entry["paired"] = _paired(mine, theirs, n_boot)
    return out


def baseline_arm(config: ExperimentConfig) -> str | None:
    """The arm every other is compared with: the one named 'baseline', else the first arm with no
    synthetic data, mixup or cutmix; None when there is none."""
    plain = [a.name for a in config.arms if a.strategy is None and not a.mixup and not a.cutmix]
    return "baseline" if "baseline" in plain else (plain[0] if plain else None)


def _per_image(row: dict) -> tuple[list[str], np.ndarray] | None:
    """(test ids, 0/1 correctness) of a finished run from its report.json; None when the report
    predates per-image results."""
    from .classify import REPORT_FILE

    file = Path(row["run"]) / REPORT_FILE
    report = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    if "test_correct" not in report:
        return None
    return report["test_ids"], np.asarray(report["test_correct"], dtype=np.float64)


def _paired(mine: list[dict], theirs: list[dict], n_boot: int) -> dict | None:
    """paired_difference of two arms' runs over their common seeds (None when it cannot be had)."""
    base = {r["seed"]: r for r in theirs}
    seeds = sorted(r["seed"] for r in mine if r["seed"] in base)
    arm = {r["seed"]: r for r in mine}
    a, b, ids = [], [], None
    for seed in seeds:
        pa, pb = _per_image(arm[seed]), _per_image(base[seed])
        if pa is None or pb is None or pa[0] != pb[0] or (ids is not None and pa[0] != ids):
            return None
        ids = pa[0]
        a.append(pa[1])
        b.append(pb[1])
    if not seeds:
        return None
    return dict(paired_difference(np.stack(a), np.stack(b), n_boot), seed_list=seeds)


def paired_difference(arm: np.ndarray, base: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """The paired difference in accuracy between an arm and the baseline and its 95 % interval.

    Args:
        arm, base: (seeds, test images) 0/1 correctness; row i of both comes from the same seed
            (same data order and initial weights), column j from the same test image.
        n_boot: bootstrap replicates. Each resamples the seeds and, independently, the test
            images (with replacement), keeping every (seed, image) pair together, and takes the
            mean difference: the interval covers both seed-to-seed and test-set noise.
    Returns:
        {"diff": mean of arm - base, "ci": [2.5 %, 97.5 %] percentiles, "seeds", "images",
        "significant": the interval excludes 0}.
    """
    d = np.asarray(arm, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"need (seeds, images) arrays of equal shape, got {np.shape(arm)} and {np.shape(base)}")
    n_seeds, n_images = d.shape
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for lo in range(0, n_boot, 500):
        k = min(500, n_boot - lo)
        weights = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=k)   # (k, images)
        per_seed = d @ weights.T / n_images                                               # (seeds, k)
        pick = rng.integers(0, n_seeds, size=(k, n_seeds))
        reps[lo:lo + k] = per_seed[pick, np.arange(k)[:, None]].mean(axis=1)
    ci = [float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))]
    return {"diff": float(d.mean()), "ci": ci, "seeds": n_seeds, "images": n_images,
            "significant": bool(ci[0] > 0 or ci[1] < 0)}


def _cell(stat: dict | None) -> str:
    if not stat:
        return "-"
    std = "" if stat["std"] is None else f" ± {100 * stat['std']:.1f}"
    return f"{100 * stat['mean']:.1f}{std}"


def _diff_cell(paired: dict | None) -> str:
    if not paired:
        return "-"
    d, (lo, hi) = 100 * paired["diff"], (100 * v for v in paired["ci"])
    return f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" + (" *" if paired["significant"] else "")


def markdown_table(summary: list[dict], config: ExperimentConfig) -> str:
    """One table per setting: arm, strength, test accuracy (% mean ± std over seeds), the paired
    difference to the baseline with its 95 % bootstrap interval, mean class accuracy (+ long-tail groups)."""
    base = baseline_arm(config)
    lines = [f"# {config.name}", "",
             f"Data `{config.data}`; {len(config.seeds)} seed(s) {list(config.seeds)}; classifier "
             f"{config.train.model_name} at {config.train.resolution} px, {config.train.epochs} epoch(s); "
             f"synthetic budget {config.synthesize.multiplier:g} x train images per arm and strength. "
             "Accuracy on the TEST split in %, mean ± sample std over seeds; selection on validation.", ""]
    if base is not None:
        lines += [f"Δ: the paired difference to `{base}` in points (same seeds, so the same data order, "
                  "augmentation and initial weights; the same test images), with a 95 % interval from a "
                  "bootstrap over seeds and test images; * = the interval excludes 0.", ""]
    for setting in config.settings:
        entries = [e for e in summary if e["setting"] == setting.name]
        cols = list(METRICS if setting.imbalance is not None else METRICS[:2])   # many/medium/few: long-tail
        header = " | ".join(c.replace("_", " ") for c in cols[1:])
        n_test = next((e["paired"]["images"] for e in entries if e.get("paired")), None)
        lines += [f"## {setting.name}" + (f" ({n_test} test images)" if n_test else ""), "",
                  f"| arm | strength | test accuracy | Δ vs {base} [95 % CI] | {header} |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in cols[1:]) + " |"]
        for e in entries:
            s = "-" if e["strength"] is None else f"{e['strength']:g}"
            lines.append(f"| {e['arm']} | {s} | {_cell(e.get(cols[0]))} | {_diff_cell(e.get('paired'))} | "
                         + " | ".join(_cell(e.get(c)) for c in cols[1:]) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_accuracy(summary: list[dict], config: ExperimentConfig, path: Path) -> Path:
    """Top row: test accuracy against strength (one panel per setting), a line per synthetic arm
    with its seed std as a band, a dashed level per arm without synthetic data. Bottom row: each
    arm's paired difference to the baseline with its 95 % interval (zero: no difference).
    Matplotlib Agg PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .records import atomic_path

    n = len(config.settings)
    rows_per = max(1, max((sum(1 for e in summary if e["setting"] == st.name and e.get("paired"))
                           for st in config.settings), default=1))
    fig, axes = plt.subplots(2, n, figsize=(5.5 * n, 4 + 0.28 * rows_per + 1.2), squeeze=False,
                             gridspec_kw={"height_ratios": [4, 0.28 * rows_per + 1.2]})
    for ax, setting in zip(axes[0], config.settings):
        entries = [e for e in summary if e["setting"] == setting.name]
        for arm in config.arms:
            pts = sorted(((e["strength"], e["test_accuracy"]) for e in entries if e["arm"] == arm.name
                          and "test_accuracy" in e), key=lambda t: -1 if t[0] is None else t[0])
            if not pts:
                continue
            if pts[0][0] is None:
                ax.axhline(100 * pts[0][1]["mean"], ls="--", lw=1, label=arm.name, color=f"C{config.arms.index(arm)}")
                continue
            x = [s for s, _ in pts]
            y = np.array([100 * st["mean"] for _, st in pts])
            sd = np.array([100 * (st["std"] or 0.0) for _, st in pts])
            color = f"C{config.arms.index(arm)}"
            ax.plot(x, y, marker="o", label=arm.name, color=color)
            ax.fill_between(x, y - sd, y + sd, alpha=0.15, color=color)
        ax.set(title=setting.name, xlabel="translation strength s", ylabel="test accuracy (%, mean ± std)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    base = baseline_arm(config)
    for ax, setting in zip(axes[1], config.settings):
        entries = [e for e in summary if e["setting"] == setting.name and e.get("paired")]
        for i, e in enumerate(entries):
            p = e["paired"]
            d, lo, hi = (100 * v for v in (p["diff"], *p["ci"]))
            color = f"C{[a.name for a in config.arms].index(e['arm'])}"
            ax.errorbar(d, i, xerr=[[d - lo], [hi - d]], fmt="o", color=color, capsize=3,
                        mfc=color if p["significant"] else "white")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(entries)), [e["arm"] + ("" if e["strength"] is None else f" s={e['strength']:g}")
                                             for e in entries], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"Δ test accuracy vs {base} (points, 95 % CI; filled: excludes 0)")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def run_experiment(config: ExperimentConfig, *, device: str | None = None, show_progress: bool = True) -> dict:
    """Run every (setting, arm, strength, seed), then write the table, the JSON and the plot.

    Returns {"rows", "summary", "files"}.
    """
    from tqdm.auto import tqdm

    from .data import read_dataset
    from .records import write_text_atomic

    dataset = read_dataset(config.data, show_progress=show_progress)
    pipes = Pipelines(config, device)
    runs = plan_runs(config)
    rows = []
    for run in tqdm(runs, desc="experiment", unit="run", disable=not show_progress):
        rows.append(run_one(config, run, dataset, pipes, device=device, show_progress=False))
    summary = summarize(rows, config)
    report_dir = Path(config.report_dir or config.out)
    files = {"markdown": report_dir / f"{config.name}.md", "json": report_dir / f"{config.name}.json",
             "plot": report_dir / f"{config.name}.png"}
    write_text_atomic(files["markdown"], markdown_table(summary, config) + f"\n![accuracy against strength]"
                      f"({files['plot'].name})\n")
    result = {"config": dataclasses.asdict(config), "rows": rows, "summary": summary}
    write_text_atomic(files["json"], json.dumps(result, indent=1, ensure_ascii=False, default=str) + "\n")
    plot_accuracy(summary, config, files["plot"])
    return {"rows": rows, "summary": summary, "files": files}
