"""`diffmix experiment`: config files, the design, the summary, and a quick end-to-end run
on generated data with the tiny offline pipeline and the placeholder bundle."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmix_core import classify
from diffmix_core.cli import main
from diffmix_core.experiment import (experiment_from_dict, holm, load_experiment, markdown_table, paired_t, plan_runs,
                                     recompute_report, summarize)
from diffmix_core.records import read_jsonl
from helpers import disc

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"owl": (200, 40, 40), "duck": (40, 170, 60), "peacock": (40, 60, 210)}   # demo.DEMO_CLASSES names


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shipped_config_and_its_quick_variant():
    full = load_experiment(ROOT / "configs" / "experiment_demo.yaml")
    assert [a.name for a in full.arms] == ["baseline", "diff-mix", "diff-ii"]
    assert full.arms[1].strengths == (0.9,) and full.arms[-1].strengths == (0.3, 0.5)
    assert [(c.arm, c.versus, c.versus_strength) for c in full.contrasts] == [("diff-ii", "diff-mix", 0.9)]
    assert full.seeds == (0, 1, 2, 3, 4) and len(full.settings) == 2 and full.settings[1].imbalance == 0.1
    assert full.settings[0].shots == 10   # the split the shipped bundle was fine-tuned on
    assert full.resynthesize_per_seed and full.threads == 2 and full.classes == 10
    runs = plan_runs(full)   # 5 seeds x 2 settings x (baseline + diff-mix 0.9 + diff-ii x 2), seeds outermost
    assert len(runs) == 5 * 2 * 4 and [r.seed for r in runs[:8]] == [0] * 8 and runs[8].seed == 1
    assert [r.label for r in runs[:4]] == ["baseline", "diff-mix-s0.9", "diff-ii-s0.3", "diff-ii-s0.5"]
    # the second run: another seed set and thread count, the same everything else
    rerun = load_experiment(ROOT / "configs" / "experiment_demo_rerun.yaml")
    assert rerun.seeds == (5, 6, 7, 8, 9) and rerun.threads == 1 and rerun.out != full.out
    assert set(rerun.seeds).isdisjoint(full.seeds)
    assert (rerun.train, rerun.synthesize, rerun.translate, rerun.settings, rerun.data, rerun.bundle) == \
        (full.train, full.synthesize, full.translate, full.settings, full.data, full.bundle)
    assert [(a.name, a.strengths) for a in rerun.arms] == [("baseline", ()), ("diff-mix", (0.9,)), ("diff-ii", (0.3,))]
    quick = load_experiment(ROOT / "configs" / "experiment_demo.yaml", quick=True, out="elsewhere")
    assert quick.seeds == (0, 1) and quick.train.epochs == 1 and quick.translate.num_inference_steps == 4
    assert quick.train.model_name == full.train.model_name and quick.out == "elsewhere"
    assert load_experiment(ROOT / "configs" / "experiment_demo.yaml", seeds=[7, 8]).seeds == (7, 8)   # --seeds


def test_shipped_config_runs_on_the_shipped_birds_without_a_data_build():
    """Its data and split files are in the repository: every setting's split resolves (read only)."""
    from diffmix_core.data import SplitConfig, long_tail_counts, read_dataset, resolve_splits

    full = load_experiment(ROOT / "configs" / "experiment_demo.yaml")
    dataset = read_dataset(ROOT / full.data, show_progress=False)
    splits = {}
    for setting in full.settings:
        split = SplitConfig(seed=full.split.seed, val_fraction=full.split.val_fraction,
                            test_fraction=full.split.test_fraction, shots=setting.shots, imbalance=setting.imbalance)
        splits[setting.name] = resolve_splits(dataset, ROOT / setting.split_file, split)
    few, lt = splits["10-shot"], splits["long-tail IF 0.1"]
    assert len(few["train"]) == 100 and len(few["val"]) == 100 and len(few["test"]) == 1000
    assert few["test"] == lt["test"] and few["val"] == lt["val"] and set(lt["train"]) < set(few["train"])
    assert len(lt["train"]) == sum(long_tail_counts(10, 10, 0.1)) == 36     # n_i = 10, 7, 5, 4, 3, 2, 2, 1, 1, 1


def test_paired_t_interval_and_p_value():
    base, arm = [0.50, 0.52, 0.47, 0.55, 0.51], [0.56, 0.55, 0.50, 0.60, 0.52]
    res = paired_t(arm, base)
    d = np.subtract(arm, base)
    half = 2.7764451051977987 * d.std(ddof=1) / np.sqrt(5)          # t(0.975, 4)
    assert res["diff"] == pytest.approx(d.mean()) and res["seeds"] == 5
    assert res["ci"] == pytest.approx([d.mean() - half, d.mean() + half])
    t = d.mean() / (d.std(ddof=1) / np.sqrt(5))
    from scipy import stats
    assert res["p"] == pytest.approx(2 * stats.t.sf(t, 4)) and res["p"] < 0.05 < paired_t(arm[:2], base[:2])["p"]
    assert paired_t(base, base) == {"diff": 0.0, "ci": [0.0, 0.0], "p": 1.0, "seeds": 5, "per_seed": [0.0] * 5}
    one = paired_t([0.6], [0.5])
    assert one["ci"] is None and one["p"] is None and one["diff"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="per-seed accuracies"):
        paired_t([0.5, 0.6], [0.5])


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []
    assert holm([0.02]) == [0.02]


def test_t_interval_holds_95_percent_coverage_under_the_null():
    """5 seeds, no true difference: each seed's accuracy varies (training + synthesis) and is measured on
    1,000 test images. The t-interval covers 0 in ~95 % of 4,000 replicates; a percentile bootstrap over
    the 5 seeds (what the table used before) covers far less."""
    rng = np.random.default_rng(12345)
    reps, n_seeds, n_images = 4000, 5, 1000
    level = 0.55 + rng.normal(0, 0.03, size=(reps, 2, n_seeds))          # seed-level accuracy, arm and base
    acc = rng.binomial(n_images, np.clip(level, 0, 1)) / n_images          # + test-set noise
    covered = [paired_t(a, b)["ci"][0] <= 0 <= paired_t(a, b)["ci"][1] for a, b in zip(acc[:, 0], acc[:, 1])]
    coverage = float(np.mean(covered))
    d = acc[:, 0] - acc[:, 1]
    boot = d[np.arange(reps)[:, None, None], rng.integers(0, n_seeds, size=(reps, 1000, n_seeds))].mean(axis=2)
    lo, hi = np.percentile(boot, 2.5, axis=1), np.percentile(boot, 97.5, axis=1)
    boot_coverage = float(np.mean((lo <= 0) & (0 <= hi)))
    print(f"coverage at nominal 95 %: t-interval {coverage:.3f}, seed percentile bootstrap {boot_coverage:.3f}")
    assert 0.93 <= coverage <= 0.97
    assert boot_coverage < 0.9


def test_summary_pairs_arms_with_the_baseline_and_holm_corrects_the_table():
    def rows(setting, arm, strategy, strength, accs):
        return [{"setting": setting, "arm": arm, "strategy": strategy, "strength": strength, "seed": s,
                 "test_accuracy": a, "mean_class_accuracy": a, "test_correct": "01" * 5} for s, a in enumerate(accs)]
    base = [0.50, 0.52, 0.47, 0.55, 0.51]
    data = (rows("a", "baseline", None, None, base) + rows("a", "diff-mix", "diff-mix", 0.9, [0.60, 0.63, 0.57, 0.66, 0.60])
            + rows("a", "mixup", None, None, [0.51, 0.50, 0.49, 0.56, 0.50])
            + rows("b", "baseline", None, None, base) + rows("b", "diff-mix", "diff-mix", 0.9, [0.56, 0.55, 0.50, 0.60, 0.52]))
    config = experiment_from_dict({"data": "d", "bundle": "b", "settings": [{"name": "a"}, {"name": "b"}],
                                   "arms": [{"name": "baseline"}, {"name": "mixup", "mixup": 0.2},
                                            {"name": "diff-mix", "strategy": "diff-mix", "strengths": [0.9],
                                             "published": [59.4]}]})
    summary = {(e["setting"], e["arm"]): e for e in summarize(data, config)}
    assert "paired" not in summary[("a", "baseline")]
    paired = [summary[k]["paired"] for k in (("a", "diff-mix"), ("a", "mixup"), ("b", "diff-mix"))]
    assert [p["p_holm"] for p in paired] == pytest.approx(holm([p["p"] for p in paired]))
    assert all(p["comparisons"] == 3 and p["images"] == 10 and p["seed_list"] == [0, 1, 2, 3, 4] for p in paired)
    assert [p["significant"] for p in paired] == [p["p_holm"] < 0.05 for p in paired]
    assert paired[0]["significant"] and not paired[1]["significant"]
    assert paired[2]["p"] < 0.05 and paired[2]["p_holm"] > paired[2]["p"]       # raw and adjusted both reported
    table = markdown_table(list(summary.values()), config)
    assert "| p | p Holm | mean class accuracy | published |" in table and "adjusted across all 3 comparisons" in table
    row = next(line for line in table.splitlines() if line.startswith("| diff-mix | 0.9 |"))
    assert row.endswith("| 59.4 |") and " * |" in row and row.count("|") == 9


def test_contrasts_compare_two_arms_in_the_same_holm_family():
    """`contrasts:` (e.g. diff-ii vs diff-mix 0.9): the paired t of the two arms' per-seed accuracies,
    in every setting, its p-value adjusted together with the baseline comparisons; a table of its own."""
    def rows(arm, strategy, strength, accs):
        return [{"setting": "a", "arm": arm, "strategy": strategy, "strength": strength, "seed": s,
                 "test_accuracy": a, "mean_class_accuracy": a} for s, a in enumerate(accs)]
    mix = [0.60, 0.63, 0.57, 0.66, 0.60]
    ii = {0.3: [0.64, 0.66, 0.62, 0.69, 0.65], 0.5: [0.59, 0.64, 0.57, 0.65, 0.61]}
    data = (rows("baseline", None, None, [0.50, 0.52, 0.47, 0.55, 0.51]) + rows("diff-mix", "diff-mix", 0.9, mix)
            + rows("diff-mix", "diff-mix", 0.5, [0.5] * 5)
            + rows("diff-ii", "diff-ii", 0.3, ii[0.3]) + rows("diff-ii", "diff-ii", 0.5, ii[0.5]))
    raw = {"data": "d", "bundle": "b", "settings": [{"name": "a"}],
           "arms": [{"name": "baseline"}, {"name": "diff-mix", "strategy": "diff-mix", "strengths": [0.5, 0.9]},
                    {"name": "diff-ii", "strategy": "diff-ii", "strengths": [0.3, 0.5]}],
           "contrasts": [{"arm": "diff-ii", "versus": "diff-mix", "versus_strength": 0.9}]}
    config = experiment_from_dict(raw)
    summary = summarize(data, config)
    by = {(e["arm"], e["strength"]): e for e in summary}
    for s in (0.3, 0.5):
        (c,) = by[("diff-ii", s)]["contrasts"]
        expected = paired_t(ii[s], mix)
        assert c["versus"] == "diff-mix" and c["versus_strength"] == 0.9
        assert c["diff"] == pytest.approx(expected["diff"]) and c["ci"] == pytest.approx(expected["ci"])
    assert "contrasts" not in by[("diff-mix", 0.9)]
    family = [e["paired"] for e in summary if e.get("paired")] + [c for e in summary for c in e.get("contrasts", [])]
    assert len(family) == 6 and all(p["comparisons"] == 6 for p in family)
    assert [p["p_holm"] for p in family] == pytest.approx(holm([p["p"] for p in family]))
    table = markdown_table(summary, config)
    assert "adjusted across all 6 comparisons" in table and "| arm | strength | versus | Δ [95 % CI] | p | p Holm |" in table
    row = next(line for line in table.splitlines() if line.startswith("| diff-ii | 0.3 | diff-mix s=0.9 |"))
    assert f"{100 * paired_t(ii[0.3], mix)['diff']:+.1f} [" in row
    # one strength only; and the arm names are checked when the config is read
    one = summarize(data, experiment_from_dict(dict(raw, contrasts=[{"arm": "diff-ii", "strength": 0.3,
                                                                     "versus": "diff-mix", "versus_strength": 0.9}])))
    assert [e["strength"] for e in one if e.get("contrasts")] == [0.3]
    for bad, match in (({"arm": "diff-ii", "versus": "dm", "versus_strength": 0.9}, "no arm named 'dm'"),
                       ({"arm": "diff-ii", "versus": "diff-mix", "versus_strength": 0.7}, "versus_strength must be"),
                       ({"arm": "diff-ii", "versus": "baseline", "versus_strength": 0.7}, "versus_strength must be"),
                       ({"arm": "diff-ii", "strength": 0.9, "versus": "baseline"}, "has strengths")):
        with pytest.raises(ValueError, match=match):
            experiment_from_dict(dict(raw, contrasts=[bad]))


@pytest.mark.parametrize("stem", ["experiment_demo", "experiment_demo_rerun"])
def test_shipped_results_are_recomputed_from_their_json(tmp_path, stem):
    """docs/<stem>.* are what --report-only makes of the shipped JSON (its rows and config alone), and
    the JSON holds what recomputing needs: every run's per-image results, the thread count it ran with."""
    import shutil

    shutil.copy(ROOT / "docs" / f"{stem}.json", tmp_path / f"{stem}.json")
    result = recompute_report(tmp_path / f"{stem}.json")
    shipped = json.loads((ROOT / "docs" / f"{stem}.json").read_text())
    assert result["summary"] == shipped["summary"]
    assert (tmp_path / f"{stem}.md").read_text() == (ROOT / "docs" / f"{stem}.md").read_text()
    config = load_experiment(ROOT / "configs" / f"{stem}.yaml")
    assert shipped["environment"]["torch_threads"] == config.threads
    assert sorted({r["seed"] for r in shipped["rows"]}) == list(config.seeds)
    assert len(shipped["rows"]) == len(plan_runs(config))
    for setting, ids in shipped["test_ids"].items():
        assert len(ids) == 1000 and all(len(r["test_correct"]) == 1000 for r in shipped["rows"]
                                        if r["setting"] == setting)
    for row in shipped["rows"]:   # the accuracy of a run is the mean of its per-image results
        assert row["test_accuracy"] == pytest.approx(row["test_correct"].count("1") / 1000, abs=1e-6)


def test_pool_two_runs_of_one_design_on_other_seeds(tmp_path, capsys):
    """`--report-only --pool OTHER.json`: one report over the seeds of both runs, for the arms both
    have; the statistics are those of the union of seeds; another design or a shared seed is refused."""
    from diffmix_core.experiment import pool_reports, write_report

    def rows(arm, strategy, strength, accs, seeds):
        return [{"setting": "a", "arm": arm, "strategy": strategy, "strength": strength, "seed": s,
                 "test_accuracy": a, "mean_class_accuracy": a, "test_correct": "1" * round(10 * a) + "0" * (10 - round(10 * a))}
                for s, a in zip(seeds, accs)]
    design = {"data": "d", "bundle": "b", "settings": [{"name": "a"}], "report_dir": str(tmp_path),
              "arms": [{"name": "baseline"}, {"name": "diff-mix", "strategy": "diff-mix", "strengths": [0.9]},
                       {"name": "diff-ii", "strategy": "diff-ii", "strengths": [0.3, 0.5]}],
              "contrasts": [{"arm": "diff-ii", "versus": "diff-mix", "versus_strength": 0.9}]}
    one = dict(design, name="one", seeds=[0, 1, 2], threads=2)
    two = dict(design, name="two", seeds=[5, 6], threads=1,
               arms=[*design["arms"][:2], {"name": "diff-ii", "strategy": "diff-ii", "strengths": [0.3]}])
    base, mix, ii = [0.5, 0.4, 0.5, 0.6, 0.5], [0.7, 0.6, 0.6, 0.8, 0.6], [0.6, 0.5, 0.6, 0.6, 0.7]
    ids = {"a": [f"img{i}" for i in range(10)]}
    for raw, sl, seeds in ((one, slice(0, 3), [0, 1, 2]), (two, slice(3, 5), [5, 6])):
        data = (rows("baseline", None, None, base[sl], seeds) + rows("diff-mix", "diff-mix", 0.9, mix[sl], seeds)
                + rows("diff-ii", "diff-ii", 0.3, ii[sl], seeds))
        if raw is one:
            data += rows("diff-ii", "diff-ii", 0.5, [0.5] * 3, seeds)
        write_report(experiment_from_dict(raw), data, raw_config=raw, test_ids=ids,
                     environment={"torch_threads": raw["threads"], "torch": "t", "cpu": "c"})
    cfg = tmp_path / "one.yaml"
    cfg.write_text(json.dumps(one))
    assert main(["experiment", "--config", str(cfg), "--report-only", "--pool", str(tmp_path / "two.json")]) == 0
    pooled = json.loads((tmp_path / "one_pooled.json").read_text())
    assert pooled["config"]["seeds"] == [0, 1, 2, 5, 6] and "2 (seeds 0-2) / 1 (seeds 5-6)" in (tmp_path / "one_pooled.md").read_text()
    by = {(e["arm"], e["strength"]): e for e in pooled["summary"]}
    assert set(by) == {("baseline", None), ("diff-mix", 0.9), ("diff-ii", 0.3)}   # diff-ii 0.5: in one file only
    assert by[("diff-mix", 0.9)]["paired"]["ci"] == pytest.approx(paired_t(mix, base)["ci"])
    assert by[("diff-ii", 0.3)]["contrasts"][0]["diff"] == pytest.approx(paired_t(ii, mix)["diff"])
    assert by[("diff-mix", 0.9)]["paired"]["comparisons"] == 3
    assert recompute_report(tmp_path / "one_pooled.json")["summary"] == pooled["summary"]   # a results file itself
    with pytest.raises(ValueError, match="in both"):
        pool_reports([tmp_path / "one.json", tmp_path / "one.json"], tmp_path / "x")
    other = json.loads((tmp_path / "two.json").read_text())
    other["config"]["train"] = {"epochs": 3}
    (tmp_path / "three.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another design .*differs in train"):
        pool_reports([tmp_path / "one.json", tmp_path / "three.json"], tmp_path / "x")
    with pytest.raises(SystemExit):
        main(["experiment", "--config", str(cfg), "--pool", str(tmp_path / "two.json")])
    assert "--pool goes with --report-only" in capsys.readouterr().err


def test_shipped_pooled_report_is_the_two_shipped_runs_pooled(tmp_path):
    """docs/experiment_demo_pooled.* is what `--report-only --pool docs/experiment_demo_rerun.json` makes
    of the two shipped runs (10 seeds, the arms both have), and it recomputes to itself."""
    from diffmix_core.experiment import pool_reports

    result = pool_reports([ROOT / "docs" / "experiment_demo.json", ROOT / "docs" / "experiment_demo_rerun.json"],
                          tmp_path / "experiment_demo_pooled")
    shipped = json.loads((ROOT / "docs" / "experiment_demo_pooled.json").read_text())
    assert result["summary"] == shipped["summary"] and shipped["config"]["seeds"] == list(range(10))
    assert (tmp_path / "experiment_demo_pooled.md").read_text() == \
        (ROOT / "docs" / "experiment_demo_pooled.md").read_text()
    assert {(e["arm"], e["strength"]) for e in shipped["summary"]} == {("baseline", None), ("diff-mix", 0.9),
                                                                         ("diff-ii", 0.3)}
    assert [f["environment"]["torch_threads"] for f in shipped["environment"]["pooled"]] == [2, 1]


def test_report_only_needs_a_results_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the experiment first"):
        recompute_report(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not an experiment results file"):
        recompute_report(tmp_path / "bad.json")


PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


def test_paper_configs_cover_the_papers_settings():
    assert {f.stem for f in PAPER} == {f"{d}_{k}shot" for d in ("cub", "aircraft", "flowers") for k in (5, 10)} | {
        "cub_full", "cub_lt_if10", "cub_lt_if20", "cub_lt_if100"}
    cub5 = {a.name: a for a in load_experiment(ROOT / "configs" / "paper" / "cub_5shot.yaml").arms}
    assert cub5["diff-mix"].strengths == (0.5, 0.7, 0.9) and cub5["diff-mix"].published == (52.9, 57.6, 59.4)
    assert cub5["mixup"].published == (None,)
    lt = load_experiment(ROOT / "configs" / "paper" / "cub_lt_if100.yaml")
    assert lt.settings[0].imbalance == 0.01 and lt.train.lr == 0.005 and lt.synthesize.multiplier == 10
    with pytest.raises(ValueError, match="one value per strength"):
        experiment_from_dict({"data": "d", "base": "m", "arms": [{"name": "r", "strategy": "real-mix",
                                                                   "strengths": [0.5, 0.9], "published": [50.0]}]})


@pytest.mark.parametrize("config", PAPER, ids=[f.stem for f in PAPER])
def test_dry_run_lists_every_run_of_a_paper_config_without_loading_anything(config, capsys, monkeypatch):
    from diffmix_core import apply, data, experiment

    for module, name in ((data, "read_dataset"), (apply, "load_pipeline_for"), (experiment, "read_dataset"),
                         (experiment, "load_pipeline_for")):   # where they live, and where experiment.py calls them
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("--dry-run loaded data or a model"))
    assert main(["experiment", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    design = load_experiment(config)
    runs = [line for line in out if " | seed " in line]
    assert len(runs) == len(plan_runs(design)) and out[0].startswith(f"experiment {design.name}: {len(runs)} run(s)")
    for line in runs:
        assert f"data {design.data} |" in line and f"bundle {design.bundle} |" in line and "published " in line
        assert f"{design.train.model_name}@{design.train.resolution} bs {design.train.batch_size} lr " in line
    synthetic = [line for line in runs if "strategy -" not in line]
    assert synthetic and all("synthetic " in line and "(plan seed " in line for line in synthetic)
    if config.stem == "cub_5shot":   # 200 classes x 5 shots x multiplier 5; the paper's number beside the run
        assert any("diff-mix-s0.9 |" in line and "seed 2 |" in line and "synthetic 5,000 images" in line
                   and line.endswith("published 59.4") for line in runs)
    assert out[-1].startswith("synthetic sets: ")


def test_replacement_does_not_change_the_data_order():
    """Every arm of a seed sees the real images in the same order (paired runs)."""
    orders = []
    for n_synth, p in ((0, 0.0), (50, 0.3), (50, 1.0)):
        rng, swap = np.random.default_rng([3, 0]), np.random.default_rng([3, 1])
        orders.append([classify.replacement_plan(40, n_synth, p, rng, swap)[0].tolist() for _ in range(3)])
    assert orders[0] == orders[1] == orders[2]


def test_config_errors_are_actionable():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epoch'\]"):
        experiment_from_dict({"data": "d", "train": {"epoch": 3}})
    with pytest.raises(ValueError, match="needs a bundle"):
        experiment_from_dict({"data": "d", "base": "m", "arms": [{"name": "d", "strategy": "diff-mix",
                                                                   "strengths": [0.5]}]})
    with pytest.raises(ValueError, match="needs strengths"):
        experiment_from_dict({"data": "d", "base": "m", "arms": [{"name": "r", "strategy": "real-mix"}]})
    with pytest.raises(ValueError, match="not combined"):
        experiment_from_dict({"data": "d", "base": "m", "arms": [{"name": "x", "strategy": "real-mix",
                                                                   "strengths": [0.5], "mixup": 0.2}]})


def test_ti_arms_take_a_ti_only_bundle():
    """ti-* arms need ti_bundle (a TI-only fine-tune); a joint bundle there is refused before any work,
    with the command that makes a TI-only one; a train recipe fills the train settings not given."""
    from diffmix_core.experiment import Pipelines

    ti_arm = [{"name": "ti", "strategy": "ti-mix", "strengths": [0.5]}]
    with pytest.raises(ValueError, match="needs ti_bundle"):
        experiment_from_dict({"data": "d", "bundle": "assets/demo/bundle", "arms": ti_arm})
    joint = experiment_from_dict({"data": "d", "ti_bundle": "assets/demo/bundle", "arms": ti_arm,
                                  "train": {"recipe": "longtail", "epochs": 5}})
    assert (joint.train.lr, joint.train.epochs, joint.train.lr_schedule) == (0.005, 5, "step")
    with pytest.raises(ValueError, match="diffmix finetune --mode ti-only"):
        Pipelines(joint, "cpu")


def test_summary_mean_and_sample_std():
    rows = [{"setting": "a", "arm": "m", "strategy": "diff-mix", "strength": 0.5, "seed": s, "test_accuracy": v,
             "mean_class_accuracy": v} for s, v in enumerate((0.5, 0.6, 0.7))]
    rows.append({"setting": "a", "arm": "base", "strategy": None, "strength": None, "seed": 0, "test_accuracy": 0.4,
                 "mean_class_accuracy": 0.4})
    s = {e["arm"]: e for e in summarize(rows)}
    assert s["m"]["test_accuracy"]["mean"] == pytest.approx(0.6)
    assert s["m"]["test_accuracy"]["std"] == pytest.approx(np.std([0.5, 0.6, 0.7], ddof=1))
    assert s["base"]["test_accuracy"] == {"mean": 0.4, "std": None} and s["m"]["seeds"] == [0, 1, 2]


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def demo_like(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, placeholder bundle): 3 demo classes x 8 discs at 32 px; the tiny random SD pipeline."""
    from diffmix_core.demo import placeholder_bundle

    root = tmp_path_factory.mktemp("exp")
    data = root / "data"
    for k, (name, colour) in enumerate(COLOURS.items()):
        (data / name).mkdir(parents=True)
        for i in range(8):
            disc(colour, 100 * k + i).save(data / name / f"{i}.png")
    return data, placeholder_bundle(root / "placeholder").path


QUICK_YAML = """
name: quick_table
seeds: [0, 1, 2]
resynthesize_per_seed: false
threads: 1
split: {seed: 0, val_fraction: 0.125, test_fraction: 0.25}
settings:
  - {name: 3-shot, shots: 3, replace_prob: 0.5}
  - {name: long-tail IF 0.5, shots: 4, imbalance: 0.5, replace_prob: 0.5}
arms:
  - {name: baseline}
  - {name: real-mix, strategy: real-mix, strengths: [1.0]}
  - {name: diff-mix, strategy: diff-mix, strengths: [0.5, 1.0]}
train: {model_name: test_resnet, pretrained: none, resolution: 32, batch_size: 8, lr: 0.05, epochs: 3,
        many_threshold: 3, few_threshold: 2}
synthesize: {multiplier: 3}
translate: {num_inference_steps: 10, batch_size: 8}
quick:
  seeds: [0, 1]
  train: {epochs: 1}
  synthesize: {multiplier: 1}
  translate: {num_inference_steps: 2}
"""


def test_runs_are_pinned_to_the_thread_count_and_it_is_recorded(demo_like, tmp_path, monkeypatch):
    import torch

    from diffmix_core import experiment

    seen = []

    def fake_run(config, run, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return {"setting": run.setting.name, "arm": run.arm.name, "strategy": None, "strength": None, "seed": run.seed,
                "test_accuracy": 0.5 + run.seed / 100, "mean_class_accuracy": 0.5, "val_accuracy": 0.5, "run": "x",
                "test_correct": "0110", "test_ids": ["a", "b", "c", "d"]}

    monkeypatch.setattr(experiment, "run_one", fake_run)
    config = experiment_from_dict({"data": str(demo_like[0]), "out": str(tmp_path), "threads": 3, "seeds": [0, 1],
                                   "arms": [{"name": "baseline"}, {"name": "mixup", "mixup": 0.2}],
                                   "train": {"pretrained": "none"}})   # offline: no resnet50.tv_in1k weights
    before = torch.get_num_threads()
    result = experiment.run_experiment(config, show_progress=False)
    assert seen == [3] * 4 and torch.get_num_threads() == before
    saved = json.loads(result["files"]["json"].read_text())
    assert saved["environment"]["torch_threads"] == 3 and saved["environment"]["cpu"]
    assert saved["test_ids"] == {"5-shot": ["a", "b", "c", "d"]} and "test_ids" not in saved["rows"][0]
    with pytest.raises(ValueError, match="classes: 7"):
        experiment.run_experiment(dataclasses.replace(config, classes=7), show_progress=False)


def test_quick_experiment_writes_table_json_and_plot(demo_like, tmp_path, capsys, monkeypatch):
    data, bundle = demo_like
    cfg = tmp_path / "quick.yaml"
    cfg.write_text(QUICK_YAML)
    out, docs = tmp_path / "work", tmp_path / "docs"
    args = ["experiment", "--config", str(cfg), "--quick", "--data", str(data), "--bundle", str(bundle),
            "--out", str(out), "--report-dir", str(docs), "--seeds", "0", "1", "--quiet"]
    assert main(args) == 0
    table = (docs / "quick_table.md").read_text()
    assert "## 3-shot" in table and "## long-tail IF 0.5" in table and "| diff-mix | 0.5 |" in table
    assert table.count("±") >= 2 * 4 * 2      # 2 seeds -> a std in every cell (4 rows per setting)
    assert table.count("| test accuracy | Δ vs baseline [95 % CI] | p | p Holm | mean class accuracy |") == 2
    assert "1 torch thread(s), torch " in table and "ONE synthetic set per arm and strength" in table
    assert table.count("| many | medium | few |") == 1          # long-tail groups only where there is a tail
    result = json.loads((docs / "quick_table.json").read_text())
    assert len(result["rows"]) == 2 * (2 + 2 + 2 * 2) and {r["seed"] for r in result["rows"]} == {0, 1}
    # paired statistics: every arm against the baseline on the same seeds and test images
    for e in result["summary"]:
        if e["arm"] == "baseline":
            assert "paired" not in e
            continue
        p = e["paired"]
        assert p["seeds"] == 2 and p["seed_list"] == [0, 1] and p["images"] == 6
        assert p["ci"][0] <= p["diff"] <= p["ci"][1] and 0 <= p["p"] <= p["p_holm"] <= 1
        assert p["comparisons"] == 2 * 3 and p["significant"] == (p["p_holm"] < 0.05)
        acc = e["test_accuracy"]["mean"]
        base = next(b for b in result["summary"] if b["arm"] == "baseline" and b["setting"] == e["setting"])
        assert p["diff"] == pytest.approx(acc - base["test_accuracy"]["mean"])   # the same images, paired
    runs = {(r["arm"], r["strength"], r["seed"]): r for r in result["rows"] if r["setting"] == "3-shot"}
    base0 = json.loads((Path(runs[("baseline", None, 0)]["run"]) / "report.json").read_text())
    mix0 = json.loads((Path(runs[("diff-mix", 0.5, 0)]["run"]) / "report.json").read_text())
    assert base0["test_ids"] == mix0["test_ids"] and len(base0["test_correct"]) == 6
    # per-image results and the machine are in the JSON: the table can be rebuilt from it alone
    assert result["environment"]["torch_threads"] == 1 and result["environment"]["torch"]
    assert set(result["test_ids"]) == {"3-shot", "long-tail IF 0.5"} and len(result["test_ids"]["3-shot"]) == 6
    row = next(r for r in result["rows"] if r["setting"] == "3-shot" and r["arm"] == "diff-mix")
    assert set(row["test_correct"]) <= {"0", "1"} and len(row["test_correct"]) == 6
    assert row["test_accuracy"] == pytest.approx(row["test_correct"].count("1") / 6)
    with Image.open(docs / "quick_table.png") as im:
        assert im.format == "PNG" and im.size[0] > 600
    assert "quick_table.md" in capsys.readouterr().out
    # the synthetic arms trained on their own sets: diff-mix through the bundle, real-mix without it
    run = json.loads((out / "3-shot" / "runs" / "diff-mix-s0.5" / "seed1" / "report.json").read_text())
    assert run["counts"]["synthetic"] == 9 and run["config"]["replace_prob"] == 0.5 and run["config"]["seed"] == 1
    synth = read_jsonl(out / "3-shot" / "synth" / "diff-mix-s0.5-seed0" / "records.jsonl")
    assert synth[0]["bundle_hash"] and synth[0]["strategy"] == "diff-mix"
    real = read_jsonl(out / "3-shot" / "synth" / "real-mix-s1-seed0" / "records.jsonl")
    assert real[0]["bundle_hash"] is None and {r["strength"] for r in real} == {1.0}
    base = json.loads((out / "3-shot" / "runs" / "baseline" / "seed0" / "report.json").read_text())
    assert base["counts"]["synthetic"] == 0 and base["counts"]["train"] == 9
    # long-tail synthesis draws targets with p ~ 1/(n_c + 1); its split: n_i = 4 * 0.5**(i/2)
    lt = json.loads((out / "long-tail-IF-0.5" / "runs" / "baseline" / "seed0" / "report.json").read_text())
    assert sorted(v["n_train"] for v in lt["per_class"].values()) == [2, 2, 4] and "long_tail" in lt
    # a rerun reuses every finished run: nothing is trained again
    monkeypatch.setattr(classify, "train_classifier", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert main(args) == 0
    assert json.loads((docs / "quick_table.json").read_text())["summary"] == result["summary"]
    (docs / "quick_table.md").unlink()
    assert main(args + ["--report-only"]) == 0          # from the JSON alone: same summary, table rewritten
    assert json.loads((docs / "quick_table.json").read_text())["summary"] == result["summary"]
    assert (docs / "quick_table.md").read_text() == table
