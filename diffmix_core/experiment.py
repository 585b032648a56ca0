"""`diffmix experiment`: settings x arms x seeds on any dataset; synthesize, train, tabulate.

A YAML file names the arms (baseline, mixup, cutmix, real-*/diff-*/ti-* at
chosen strengths), the data regimes (few-shot, long-tail) and the seeds. For
every (setting, arm, strength, seed) the runner makes the synthetic set it
needs through the synthesize stage (one plan, the same multiplier for every
arm: equal synthetic budgets), trains through the classify stage, and writes::

    <out>/<setting>/split.json                        the one split of the setting (shared by all arms)
    <out>/<setting>/synth/<strategy>-s<s>-seed<n>/    plan, images, records, export/imagefolder
    <out>/<setting>/runs/<arm>[-s<s>]/seed<n>/        classifier checkpoint + report.json
    <report_dir>/<name>.md, <name>.json, <name>.png   the table, the results (per-image too) and the plot

Everything is resumable: a finished run (its report.json) or synthetic set is
reused. Seeds drive the synthesis plan and the classifier; the split seed is
one for all stages (the generator never sees validation or test images).

Statistics: the seed is the unit of replication. Each arm is compared with the
baseline through the per-seed paired differences (t-interval, two-sided p),
and the p-values of every comparison in the report are Holm-adjusted
(:func:`summarize`). ``--report-only`` (:func:`recompute_report`) rebuilds
everything from the results JSON, ``--pool`` (:func:`pool_reports`) makes one report of runs of
one design on disjoint seeds; ``--dry-run`` (:func:`describe_runs`) lists
the runs without loading anything.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from pathlib import Path

import numpy as np

from .apply import load_pipeline_for
from .classify import REPORT_FILE, check_pretrained, train_classifier
from .config import (ClassifyConfig, ExperimentArm, ExperimentConfig, ExperimentContrast, ExperimentSetting, PipelineConfig, SplitConfig,
                     SynthesizeConfig, TranslateConfig, get_strategy, with_recipe)
from .data import long_tail_counts, read_dataset, resolve_splits, split_subset
from .hub import open_bundle
from .models import pipeline_source
from .records import atomic_path, write_text_atomic
from .stats import t_mean
from .synthesize import run_synthesis
from .translate import check_bundle_for

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
    if isinstance(raw.get("train"), dict):   # train: {recipe: longtail, ...}: the recipe fills what is not given
        raw["train"] = with_recipe(raw["train"])
    values = {k: _build(NESTED[k], v, k) if k in NESTED else v for k, v in raw.items()}
    if "settings" in values:
        values["settings"] = tuple(_build(ExperimentSetting, s, f"settings[{i}]")
                                   for i, s in enumerate(values["settings"]))
    if "arms" in values:
        values["arms"] = tuple(_build(ExperimentArm, a, f"arms[{i}]") for i, a in enumerate(values["arms"]))
    if "contrasts" in values:
        values["contrasts"] = tuple(_build(ExperimentContrast, c, f"contrasts[{i}]")
                                    for i, c in enumerate(values["contrasts"] or ()))
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
    """Every run, seeds outermost (then settings, arms, strengths): a run stopped part-way has every
    arm of its finished seeds, so `--seeds` over those gives complete paired comparisons."""
    runs = []
    for seed in config.seeds:
        for setting in config.settings:
            for arm in config.arms:
                gen = arm.strategy is not None and get_strategy(arm.strategy).pairing == "gen"
                strengths = (1.0,) if gen else (arm.strengths or (None,))
                runs += [Run(setting, arm, s, seed) for s in strengths]
    return runs


def train_images(config: ExperimentConfig, setting: ExperimentSetting) -> int | None:
    """Real train images of a setting, known before the data is read when the config gives the number
    of classes: shots per class, or the long-tail counts n_i; None for full data or unknown classes."""
    if not config.classes or setting.shots is None:
        return None
    if setting.imbalance is None:
        return setting.shots * config.classes
    return sum(long_tail_counts(setting.shots, config.classes, setting.imbalance))


def describe_runs(config: ExperimentConfig) -> list[str]:
    """``--dry-run``: the design and one line per run (setting, data, bundle, arm, strategy, strength,
    seed, hyper-parameters, synthetic budget in images, published number); loads no model and no data."""
    t, tr = config.train, config.translate
    runs = plan_runs(config)
    lines = [f"experiment {config.name}: {len(runs)} run(s); data {config.data}; bundle {config.bundle or '-'}; "
             f"base {config.base or '(the bundle’s)'}; out {config.out}; seeds {list(config.seeds)}; "
             f"torch threads {config.threads or 'default'}",
             f"classifier {t.model_name} (pretrained {t.pretrained}) at {t.resolution} px: batch {t.batch_size}, "
             f"lr {t.lr:g}, {t.epochs} epochs, wd {t.weight_decay:g}, "
             + (f"step lr x{t.lr_decay:g} after each of epochs {'/'.join(map(str, t.lr_milestones))}"
                if t.lr_schedule == "step" else f"{t.lr_schedule} lr") + f", augment {t.augment}, "
             f"gamma {t.label_gamma:g}, k {t.label_scale:g}; "
             f"synthesis: {tr.num_inference_steps} steps, guidance {tr.guidance_scale:g}, {config.scheduler}, "
             f"multiplier {config.synthesize.multiplier:g}, "
             + ("a new set per seed" if config.resynthesize_per_seed else "one set per arm and strength for all seeds")]
    sets: dict[tuple, int | None] = {}
    for run in runs:
        n = train_images(config, run.setting)
        budget = None if n is None else int(round(config.synthesize.multiplier * n))
        p = run.setting.replace_prob if run.setting.replace_prob is not None else t.replace_prob
        hp = (f"{t.model_name}@{t.resolution} bs {t.batch_size} lr {t.lr:g} ep {t.epochs} wd {t.weight_decay:g} "
              f"gamma {t.label_gamma:g} k {t.label_scale:g}")
        if run.arm.strategy is None:
            extra, synth = f"mixup {run.arm.mixup:g} cutmix {run.arm.cutmix:g}", "synthetic 0"
        else:
            plan_seed = run.seed if config.resynthesize_per_seed else config.seeds[0]
            sets[(run.setting.name, run.arm.strategy, run.strength, plan_seed)] = budget
            extra = f"p {p:g}"
            synth = (f"synthetic {budget:,} images" if budget is not None else
                     f"synthetic {config.synthesize.multiplier:g} x |train| images") + f" (plan seed {plan_seed})"
        lines.append(f"{run.setting.name} | data {config.data} | train {'?' if n is None else n} | "
                     f"bundle {config.bundle or '-'} | {run.label} | "
                     f"strategy {run.arm.strategy or '-'} | s {'-' if run.strength is None else f'{run.strength:g}'} | "
                     f"seed {run.seed} | {hp} {extra} | {synth} | published {_published(run.arm, run.strength)}")
    known = [b for b in sets.values() if b is not None]
    lines.append(f"synthetic sets: {len(sets)}; images to synthesize: "
                 + (f"{sum(known):,}" if len(known) == len(sets) else f"{sum(known):,} + {len(sets) - len(known)} "
                    "set(s) of M x |train| (|train| known once the data is read)"))
    return lines


def _published(arm: ExperimentArm, strength: float | None) -> str:
    """The published number for an arm at a strength ('-' when the config has none, '?' when unknown)."""
    pub = arm.published
    if not pub:
        return "-"
    value = pub[arm.strengths.index(strength)] if strength in arm.strengths else pub[0]
    return "?" if value is None else f"{value:g}"


class Pipelines:
    """At most two pipelines, loaded on first use: the untuned base (real-*) and the bundle's (diff-*, ti-*)."""

    def __init__(self, config: ExperimentConfig, device: str | None):
        self.config, self.device, self.cache = config, device, {}
        self.bundle = open_bundle(config.bundle) if config.bundle else None
        self.ti_bundle = open_bundle(config.ti_bundle) if config.ti_bundle else None
        for arm in config.arms:   # refuse a joint bundle for ti-* before any work
            if arm.strategy and get_strategy(arm.strategy).tokens:
                check_bundle_for(arm.strategy, self.bundle_for(arm.strategy))

    def bundle_for(self, strategy: str):
        """The bundle a strategy's synthesis uses: the TI-only one for ti-*, the joint one for diff-*."""
        s = get_strategy(strategy)
        return None if not s.tokens else self.bundle if s.lora else self.ti_bundle

    def source(self, tokens: bool) -> PipelineConfig:
        """The pipeline of the diff-*/ti-* arms (tokens: the bundle's base) or of the real-* arms (the
        config's base, else the bundle's)."""
        return PipelineConfig(model="" if tokens else self.config.base, dtype=self.config.dtype or None,
                              device=self.device, scheduler=self.config.scheduler)

    def model(self, tokens: bool) -> str:
        return pipeline_source(self.source(tokens), self.bundle or self.ti_bundle)[0]

    def get(self, tokens: bool):
        if tokens not in self.cache:
            # the bundle names the base; translate applies it to the diff-*/ti-* arms' calls
            self.cache[tokens] = load_pipeline_for(self.source(tokens), self.bundle or self.ti_bundle, apply=False)
        return self.cache[tokens]


def make_synthetic(config: ExperimentConfig, pipes: Pipelines, train, split_file: Path, folder: Path,
                   strategy: str, strength: float, plan_seed: int, long_tail: bool, show_progress: bool) -> Path:
    """The synthetic set of one (setting, strategy, strength, plan seed), through the synthesize
    stage; an already merged folder is reused. Returns the folder (its export/imagefolder is read)."""
    if (folder / "summary.json").is_file() and (folder / "export" / "imagefolder" / "metadata.jsonl").is_file():
        return folder
    sconfig = dataclasses.replace(config.synthesize, strength_strategy="fixed", strength=strength, seed=plan_seed,
                                  long_tail=long_tail)
    tconfig = dataclasses.replace(config.translate, strategy=strategy)
    tokens = get_strategy(strategy).tokens
    known = pipes.bundle or pipes.ti_bundle
    superclass = config.superclass or (known.superclass if known is not None else "")
    run_synthesis(train, folder, sconfig, tconfig, PipelineConfig(model=pipes.model(tokens), scheduler=config.scheduler),
                  split_file=split_file, bundle=pipes.bundle_for(strategy), superclass=superclass, shard=(0, 1),
                  export=("imagefolder",), pipe=pipes.get(tokens), show_progress=show_progress)
    return folder


def run_one(config: ExperimentConfig, run: Run, dataset, pipes: Pipelines, *, device: str | None,
            show_progress: bool) -> dict:
    """Synthesize what ``run`` needs, train (or reuse a finished run), return its result row."""
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
    if "test_correct" in report:   # per test image, in test order (the ids go once per setting into the JSON)
        row.update(test_correct="".join(str(int(c)) for c in report["test_correct"]), test_ids=report["test_ids"])
    for group, value in (report.get("long_tail") or {}).items():
        if group != "thresholds":
            row[group] = value["accuracy"]
    return row


# --------------------------------------------------------------------------- results
METRICS = ("test_accuracy", "mean_class_accuracy", "many", "medium", "few")


def summarize(rows: list[dict], config: ExperimentConfig | None = None) -> list[dict]:
    """Mean and sample std (n - 1; None for one seed) over seeds of each (setting, arm, strength);
    with ``config``, each arm's ``paired`` difference to the setting's baseline arm over the seeds
    both have (:func:`paired_t`) and, for each of ``config.contrasts`` that names it, a paired
    difference to another arm (``contrasts``: the same fields + ``versus``/``versus_strength``);
    every p-value Holm-adjusted across all comparisons of the table (:func:`holm`);
    ``significant`` = Holm-adjusted p < 0.05."""
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
    base = baseline_arm(config) if config is not None else None
    compared = []
    for entry in out:
        theirs = groups.get((entry["setting"], base, None), [])
        if base is None or entry["arm"] == base or not theirs:
            continue
        entry["paired"] = _paired(groups[(entry["setting"], entry["arm"], entry["strength"])], theirs)
        compared += [entry["paired"]] if entry["paired"]["p"] is not None else []
    for c in (config.contrasts if config is not None else ()):
        for entry in out:
            theirs = groups.get((entry["setting"], c.versus, c.versus_strength), [])
            if entry["arm"] != c.arm or c.strength not in (None, entry["strength"]) or not theirs:
                continue
            paired = dict(_paired(groups[(entry["setting"], entry["arm"], entry["strength"])], theirs),
                          versus=c.versus, versus_strength=c.versus_strength)
            entry.setdefault("contrasts", []).append(paired)
            compared += [paired] if paired["p"] is not None else []
    for paired, adjusted in zip(compared, holm([c["p"] for c in compared])):
        paired.update(p_holm=adjusted, comparisons=len(compared), significant=bool(adjusted < ALPHA))
    return out


ALPHA = 0.05   # two-sided level of every interval and test in the table


def baseline_arm(config: ExperimentConfig) -> str | None:
    """The arm every other is compared with: the one named 'baseline', else the first arm with no
    synthetic data, mixup or cutmix; None when there is none."""
    plain = [a.name for a in config.arms if a.strategy is None and not a.mixup and not a.cutmix]
    return "baseline" if "baseline" in plain else (plain[0] if plain else None)


def _paired(mine: list[dict], theirs: list[dict]) -> dict:
    """:func:`paired_t` of two arms' test accuracies over their common seeds (each seed's runs
    are tested on the same images, so a seed's accuracy difference is its mean per-image one)."""
    base = {r["seed"]: r["test_accuracy"] for r in theirs}
    seeds = sorted(r["seed"] for r in mine if r["seed"] in base)
    arm = {r["seed"]: r["test_accuracy"] for r in mine}
    images = {len(r["test_correct"]) for r in mine + theirs if r.get("test_correct")}
    result = paired_t([arm[s] for s in seeds], [base[s] for s in seeds])
    return dict(result, seed_list=seeds, images=images.pop() if len(images) == 1 else None,
                p_holm=None, comparisons=None, significant=False)


def paired_t(arm: typing.Sequence[float], base: typing.Sequence[float]) -> dict:
    """The paired difference between an arm and the baseline over seeds, with its t-interval.

    Each seed gives one difference d_i = arm_i - base_i (same seed: same data order and initial
    weights; same test images). The interval is mean(d) ± t(0.975, n - 1) · sd(d) / sqrt(n), the
    two-sided p-value that of H0: E[d] = 0. It treats the seeds as the unit of replication, so the
    variance of training (and of synthesis, when every seed has its own synthetic set) is in it;
    with few seeds it is wide, as it should be.

    Returns:
        {"diff": mean(d), "ci": [low, high] (None for one seed), "p": two-sided p (None for one
        seed), "seeds": n, "per_seed": d}.
    """
    d = np.asarray(arm, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or np.shape(arm) != np.shape(base):
        raise ValueError(f"need two equal-length lists of per-seed accuracies, got shapes {np.shape(arm)} "
                         f"and {np.shape(base)}")
    t = t_mean(d, 1 - ALPHA)
    ci = None if t["half"] is None else [t["mean"] - t["half"], t["mean"] + t["half"]]
    return {"diff": t["mean"], "ci": ci, "p": t["p"], "seeds": t["n"], "per_seed": [float(v) for v in d]}


def holm(pvalues: typing.Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control over every comparison):
    the i-th smallest p times (m - i + 1), made non-decreasing, capped at 1; in input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.size == 0:
        return []
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, np.maximum.accumulate(p[order] * (p.size - np.arange(p.size))))
    adjusted = np.empty_like(p)
    adjusted[order] = scaled
    return [float(v) for v in adjusted]


def _at(s: float | None) -> str:
    return "" if s is None else f" s={s:g}"


def _strength(s: float | None) -> str:
    return "-" if s is None else f"{s:g}"


def _cell(stat: dict | None) -> str:
    if not stat:
        return "-"
    std = "" if stat["std"] is None else f" ± {100 * stat['std']:.1f}"
    return f"{100 * stat['mean']:.1f}{std}"


def _diff_cell(paired: dict | None) -> str:
    if not paired:
        return "-"
    d = f"{100 * paired['diff']:+.1f}"
    if paired["ci"] is None:
        return d
    lo, hi = (100 * v for v in paired["ci"])
    return f"{d} [{lo:+.1f}, {hi:+.1f}]" + (" *" if paired["significant"] else "")


def _p_cells(paired: dict | None) -> str:
    def fmt(p: float | None) -> str:
        return "-" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")

    return "- | -" if not paired else f"{fmt(paired['p'])} | {fmt(paired['p_holm'])}"


def _design_lines(config: ExperimentConfig, environment: dict | None) -> list[str]:
    """The paragraph under the title: data, seeds, classifier, budget, synthesis, threads, machine."""
    synth = ("a new synthetic set per seed (synthesis variance is in the intervals)" if config.resynthesize_per_seed
             else "ONE synthetic set per arm and strength, shared by all seeds (the variance of synthesis is "
             "NOT in the intervals)")
    env = ("thread count and machine not recorded" if not environment else
           f"{environment['torch_threads']} torch thread(s), torch {environment['torch']}, "
           f"{environment['cpu']}")
    return [f"Data `{config.data}`; {len(config.seeds)} seed(s) {list(config.seeds)}; classifier "
            f"{config.train.model_name} at {config.train.resolution} px, {config.train.epochs} epoch(s); "
            f"synthetic budget {config.synthesize.multiplier:g} x train images per arm and strength; {synth}; "
            f"{env}. Accuracy on the TEST split in %, mean ± sample std over seeds; selection on validation.", ""]


def markdown_table(summary: list[dict], config: ExperimentConfig, environment: dict | None = None) -> str:
    """One table per setting: arm, strength, test accuracy (% mean ± std over seeds), the paired
    difference to the baseline with its 95 % t-interval over seeds, its raw and Holm-adjusted
    p-values, mean class accuracy (+ long-tail groups)."""
    base = baseline_arm(config)
    m = next((e["paired"]["comparisons"] for e in summary if e.get("paired", {}).get("comparisons")), 0)
    lines = [f"# {config.name}", "", *_design_lines(config, environment)]
    if base is not None:
        lines += [f"Δ: the paired difference to `{base}` in points (same seeds, so the same data order, "
                  "augmentation and initial weights; the same test images), with a 95 % t-interval over the "
                  "per-seed differences (seeds are the unit of replication; the interval is per comparison, not "
                  "adjusted); p: two-sided paired t-test; p Holm: adjusted across all "
                  f"{m} comparisons of this report; * = p Holm < 0.05.", ""]
    arms = {a.name: a for a in config.arms}
    published = any(a.published for a in config.arms)   # a column for the published numbers, when there are some
    for setting in config.settings:
        entries = [e for e in summary if e["setting"] == setting.name]
        cols = list(METRICS if setting.imbalance is not None else METRICS[:2])   # many/medium/few: long-tail
        header = " | ".join(c.replace("_", " ") for c in cols[1:]) + (" | published" if published else "")
        n_test = next((e["paired"]["images"] for e in entries if (e.get("paired") or {}).get("images")), None)
        lines += [f"## {setting.name}" + (f" ({n_test} test images)" if n_test else ""), "",
                  f"| arm | strength | test accuracy | Δ vs {base} [95 % CI] | p | p Holm | {header} |",
                  "| --- | --- | --- | --- | --- | --- | " + " | ".join(["---"] * (len(cols) - 1 + published)) + " |"]
        for e in entries:
            lines.append(f"| {e['arm']} | {_strength(e['strength'])} | {_cell(e.get(cols[0]))} | {_diff_cell(e.get('paired'))} | "
                         f"{_p_cells(e.get('paired'))} | " + " | ".join(_cell(e.get(c)) for c in cols[1:])
                         + (f" | {_published(arms[e['arm']], e['strength']) if e['arm'] in arms else '-'}"
                            if published else "")
                         + " |")
        lines.append("")
        contrasts = [(e, c) for e in entries for c in e.get("contrasts", [])]
        if contrasts:
            lines += [f"Contrasts ({setting.name}): the same paired t-interval and test between two arms, in the "
                      "same Holm family.", "",
                      "| arm | strength | versus | Δ [95 % CI] | p | p Holm |", "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {e['arm']} | {_strength(e['strength'])} | {c['versus']}"
                      f"{'' if c['versus_strength'] is None else ' s=' + _strength(c['versus_strength'])} | "
                      f"{_diff_cell(c)} | {_p_cells(c)} |" for e, c in contrasts]
            lines.append("")
    return "\n".join(lines)


def plot_accuracy(summary: list[dict], config: ExperimentConfig, path: Path) -> Path:
    """Top row: test accuracy against strength (one panel per setting), a line per synthetic arm
    with its seed std as error bars, a dashed level per arm without synthetic data. Bottom row: each
    arm's paired difference to the baseline (circles) and each contrast between two arms (squares),
    with its 95 % interval (zero: no difference).
    Matplotlib Agg PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(config.settings)
    rows_per = max(1, max((sum(bool(e.get("paired")) + len(e.get("contrasts", [])) for e in summary
                               if e["setting"] == st.name) for st in config.settings), default=1))
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
            ax.errorbar(x, y, yerr=sd, marker="o", capsize=3, label=arm.name, color=color)
        xlabel = "translation strength s" + (" (diff-ii: share of steps with a context suffix)" if any(
            a.strategy == "diff-ii" for a in config.arms) else "")
        ax.set(title=setting.name, ylabel="test accuracy (%, mean ± std)")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    base = baseline_arm(config)
    names = [a.name for a in config.arms]
    for ax, setting in zip(axes[1], config.settings):
        rows = [(e, e["paired"], f"{e['arm']}{_at(e['strength'])}") for e in summary
                if e["setting"] == setting.name and e.get("paired")]
        rows += [(e, c, f"{e['arm']}{_at(e['strength'])} − {c['versus']}{_at(c['versus_strength'])}")
                 for e in summary if e["setting"] == setting.name for c in e.get("contrasts", [])]
        for i, (e, p, _) in enumerate(rows):
            d, lo, hi = (100 * v for v in (p["diff"], *(p["ci"] or (p["diff"], p["diff"]))))
            color = f"C{names.index(e['arm'])}"
            ax.errorbar(d, i, xerr=[[d - lo], [hi - d]], fmt="s" if "versus" in p else "o", color=color, capsize=3,
                        mfc=color if p["significant"] else "white")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(rows)), [label for *_, label in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"Δ vs {base} (●) or between two arms (■), points, 95 % t-interval;\n"
                      "filled: Holm-adjusted p < 0.05", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def environment() -> dict:
    """What the numbers may depend on beyond the config: torch's thread count and version, the CPU
    model, the platform (recorded in the report: the same seeds can give other numbers elsewhere)."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(encoding="utf-8", errors="replace"), re.M)
        cpu = f"{names[0].strip()} ({len(names)} logical CPUs)" if names else cpu
    return {"torch_threads": torch.get_num_threads(), "torch": torch.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None, "cpu": cpu,
            "platform": platform.platform(), "python": platform.python_version()}


def write_report(config: ExperimentConfig, rows: list[dict], *, raw_config: dict | None = None,
                 environment: dict | None = None, test_ids: dict | None = None,
                 stem: Path | None = None, test_sizes: dict | None = None) -> dict[str, Path]:
    """Summarize ``rows`` and write the table (.md), the results (.json: config, environment, the
    test ids of each setting once, every run's row with its per-image 0/1 correctness, the summary)
    and the plot (.png) as ``stem``.* (default: <report_dir>/<name>). ``test_sizes``: test images per
    setting for results that predate per-image rows."""
    stem = stem or Path(config.report_dir or config.out) / config.name
    files = {"markdown": stem.with_suffix(".md"), "json": stem.with_suffix(".json"), "plot": stem.with_suffix(".png")}
    summary = summarize(rows, config)
    sizes = dict(test_sizes or {}, **{k: len(v) for k, v in (test_ids or {}).items()})
    for entry in summary:
        if entry.get("paired") and entry["paired"]["images"] is None:
            entry["paired"]["images"] = sizes.get(entry["setting"])
    write_text_atomic(files["markdown"], markdown_table(summary, config, environment)
                      + f"\n![accuracy against strength]({files['plot'].name})\n")
    result = {"config": raw_config or dataclasses.asdict(config), "environment": environment,
              "test_ids": test_ids or {}, "rows": rows, "summary": summary}
    write_text_atomic(files["json"], json.dumps(result, indent=1, ensure_ascii=False, default=str) + "\n")
    plot_accuracy(summary, config, files["plot"])
    return files


def _read_results(path: str | os.PathLike) -> dict:
    """A results JSON as written by :func:`write_report` (needs its 'config' and 'rows')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist: run the experiment first")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        result["config"], result["rows"]   # noqa: B018: both must be there
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not an experiment results file (needs 'config' and 'rows'): {err}") from None
    return result


def recompute_report(path: str | os.PathLike) -> dict:
    """Rebuild the table, the summary and the plot from a results JSON alone (its config and
    per-seed rows; no model, no data): ``diffmix experiment --config X --report-only``. Writes
    the .md/.json/.png beside it. Returns {"rows", "summary", "files"}."""
    path = Path(path)
    result = _read_results(path)
    raw, rows = result["config"], result["rows"]
    config = experiment_from_dict(raw)
    sizes = {e["setting"]: e["paired"].get("images") for e in result.get("summary") or [] if e.get("paired")}
    files = write_report(config, rows, raw_config=raw, environment=result.get("environment"),
                         test_ids=result.get("test_ids"), stem=path.with_suffix(""), test_sizes=sizes)
    return {"rows": rows, "summary": json.loads(files["json"].read_text(encoding="utf-8"))["summary"],
            "files": files}


# what may differ between the results files of one design that are pooled
POOL_FREE = ("name", "out", "report_dir", "seeds", "threads", "arms", "contrasts", "quick")


def pool_reports(paths: typing.Sequence[str | os.PathLike], stem: str | os.PathLike) -> dict:
    """One report over several results files of ONE design run on disjoint seeds (e.g. a second run
    with other seeds and another thread count): ``--report-only --pool OTHER.json``.

    Everything but the seeds, thread count, work folder, name and arm list must be equal (data,
    splits, classifier, synthesis), and every setting tested on the same images. The pooled
    design keeps the arms and strengths every file has (and the first file's contrasts among them);
    its rows are all those files' rows of these cells; a seed in two files is an error. The
    environment lists each file's. Writes ``stem``.md/.json/.png; returns {"rows", "summary", "files"}.
    """
    if len(paths) < 2:
        raise ValueError("pooling needs at least two results files")
    results = [_read_results(p) for p in paths]
    first = results[0]["config"]
    for path, result in zip(paths[1:], results[1:]):
        diff = sorted(k for k in set(first) | set(result["config"])
                      if k not in POOL_FREE and first.get(k) != result["config"].get(k))
        if diff:
            raise ValueError(f"{path} is another design than {paths[0]} (differs in {', '.join(diff)}); only "
                             "runs of one design on other seeds can be pooled")
        for setting, ids in (result.get("test_ids") or {}).items():
            theirs = (results[0].get("test_ids") or {}).get(setting)
            if theirs is not None and theirs != ids:
                raise ValueError(f"{path}: setting {setting!r} was tested on other images than in {paths[0]}")
    configs = [experiment_from_dict(r["config"]) for r in results]
    cells = [{(a.name, s) for a in c.arms for s in (a.strengths or (None,))} for c in configs]
    shared = set.intersection(*cells)
    arms = []
    for arm in configs[0].arms:
        keep = [i for i, s in enumerate(arm.strengths or (None,)) if (arm.name, s) in shared]
        if keep:
            pub = arm.published
            arms.append(dict(dataclasses.asdict(arm), strengths=[arm.strengths[i] for i in keep if arm.strengths],
                             published=[pub[i] for i in keep] if arm.strengths and len(pub) > 1 else list(pub)))
    names = {a["name"]: a for a in arms}
    contrasts = [dataclasses.asdict(c) for c in configs[0].contrasts if c.arm in names and c.versus in names
                 and (c.versus_strength is None or c.versus_strength in names[c.versus]["strengths"])
                 and (c.strength is None or c.strength in names[c.arm]["strengths"])]
    rows, seen = [], {}
    for path, result in zip(paths, results):
        for row in result["rows"]:
            if (row["arm"], row["strength"]) not in shared:
                continue
            key = (row["setting"], row["arm"], row["strength"], row["seed"])
            if key in seen:
                raise ValueError(f"seed {row['seed']} of {row['arm']} ({row['setting']}) is in both {seen[key]} "
                                 f"and {path}: pool runs on disjoint seeds")
            seen[key] = path
            rows.append(row)
    stem = Path(stem)
    seeds = sorted({r["seed"] for r in rows})
    raw = dict(first, name=stem.name, seeds=seeds, arms=arms, contrasts=contrasts)
    envs = [r.get("environment") or {} for r in results]
    by_file = [{"file": str(p), "seeds": sorted({row["seed"] for row in r["rows"]}), "environment": e}
               for p, r, e in zip(paths, results, envs)]
    environment = {"torch_threads": " / ".join(f"{e.get('torch_threads', '?')} (seeds {min(f['seeds'])}-"
                                               f"{max(f['seeds'])})" for e, f in zip(envs, by_file)),
                   "torch": " / ".join(sorted({str(e.get("torch", "?")) for e in envs})),
                   "cpu": " / ".join(sorted({str(e.get("cpu", "?")) for e in envs})), "pooled": by_file}
    test_ids = dict(results[0].get("test_ids") or {})
    files = write_report(experiment_from_dict(raw), rows, raw_config=raw, environment=environment,
                         test_ids=test_ids, stem=stem)
    return {"rows": rows, "summary": json.loads(files["json"].read_text(encoding="utf-8"))["summary"],
            "files": files}


def _test_ids_once(rows: list[dict]) -> dict[str, list[str]]:
    """Pop every row's test ids into one list per setting (each run of a setting is tested on the same
    images, in the same order: what the paired statistics rely on)."""
    ids: dict[str, list[str]] = {}
    for row in rows:
        mine = row.pop("test_ids", None)
        if mine is None:
            continue
        if ids.setdefault(row["setting"], mine) != mine:
            raise ValueError(f"setting {row['setting']!r}: run {row['run']} was tested on other images than the "
                             "setting's other runs; delete its folder and run again")
    return ids


def run_experiment(config: ExperimentConfig, *, device: str | None = None, show_progress: bool = True) -> dict:
    """Run every (setting, arm, strength, seed) with torch pinned to ``config.threads``, then write
    the table, the JSON and the plot (:func:`write_report`).

    Returns {"rows", "summary", "files"}.
    """
    import torch
    from tqdm.auto import tqdm

    check_pretrained(config.train)   # offline without the classifier's weights: say so before any synthesis
    dataset = read_dataset(config.data, show_progress=show_progress)
    if config.classes and config.classes != len(dataset.classes):
        raise ValueError(f"the config says classes: {config.classes}, but {config.data} has {len(dataset.classes)}")
    pipes = Pipelines(config, device)
    before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        env = environment()
        rows = [run_one(config, run, dataset, pipes, device=device, show_progress=False)
                for run in tqdm(plan_runs(config), desc="experiment", unit="run", disable=not show_progress)]
    finally:
        torch.set_num_threads(before)
    files = write_report(config, rows, environment=env, test_ids=_test_ids_once(rows))
    return {"rows": rows, "summary": json.loads(files["json"].read_text(encoding="utf-8"))["summary"], "files": files}
