"""Results summary (protocols against a hand computation), files, tables and figures."""
import csv
import io
import json
import os

import numpy as np
import pytest

from scipy import stats

from surgfusion_jax.evaluation import metrics, plots, summary, tables

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hist(sccs, maes, val=None):
    out = []
    for i, (s, m) in enumerate(zip(sccs, maes)):
        h = {"epoch": i + 1, "scc": s, "mae": m}
        if val is not None:
            h["val_scc"] = val[i]
        out.append(h)
    return out


def fake_folds():
    return [
        {"name": "fold_1", "models": {
            "rgb": {"history": hist([0.5, 0.8, 0.7], [3.0, 2.0, 2.5], val=[0.1, 0.2, 0.3])},
            "fused": {"history": hist([0.6, 0.9, 0.9], [2.0, 1.5, 1.4], val=[0.9, 0.1, 0.1])}}},
        {"name": "fold_2", "models": {
            "rgb": {"history": hist([0.4, float("nan"), 0.6], [4.0, 9.0, 3.0], val=[0.5, 0.4, 0.3])},
            "fused": {"history": hist([0.7, 0.5, 0.6], [1.0, 2.0, 1.8], val=[0.2, 0.3, 0.25])}}},
    ]


def test_summarise_by_hand():
    s = summary.summarise(fake_folds())
    assert list(s) == ["rgb", "fused"]
    rgb = s["rgb"]
    # paper: fold_1 best epoch 2 (0.8, 2.0); fold_2 NaN skipped, epoch 3 (0.6, 3.0)
    assert [p["epoch"] for p in rgb["paper"]["per_fold"]] == [2, 3]
    assert rgb["paper"]["scc_mean"] == pytest.approx(0.7) and rgb["paper"]["scc_std"] == pytest.approx(0.1)
    assert rgb["paper"]["mae_mean"] == pytest.approx(2.5) and rgb["paper"]["mae_std"] == pytest.approx(0.5)
    # final: epoch 3 in both (0.7, 2.5) and (0.6, 3.0)
    assert rgb["final"]["scc_mean"] == pytest.approx(0.65) and rgb["final"]["mae_mean"] == pytest.approx(2.75)
    # val-selected: fold_1 epoch 3 (0.7, 2.5), fold_2 epoch 1 (0.4, 4.0)
    assert [p["epoch"] for p in rgb["val-selected"]["per_fold"]] == [3, 1]
    assert rgb["val-selected"]["scc_mean"] == pytest.approx(0.55)
    # ties go to the earliest epoch: fused fold_1 best SCC 0.9 at epochs 2 and 3 -> epoch 2 (MAE 1.5)
    assert s["fused"]["paper"]["per_fold"][0] == {"fold": "fold_1", "epoch": 2, "scc": 0.9, "mae": 1.5}
    assert s["fused"]["paper"]["mae_mean"] == pytest.approx((1.5 + 1.0) / 2)
    assert s["fused"]["val-selected"]["per_fold"][1]["epoch"] == 2


def test_val_selected_needs_val_scc():
    folds = fake_folds()
    for h in folds[1]["models"]["rgb"]["history"]:
        del h["val_scc"]
    s = summary.summarise(folds)
    assert "val-selected" not in s["rgb"] and "val-selected" in s["fused"]
    assert s["rgb"]["paper"]["n_folds"] == 2


def test_across_tasks_fisher_mean_and_rms_sd():
    per_task = [{"scc_mean": r, "scc_std": sd, "mae_mean": m, "mae_std": 0.0, "n_folds": 5}
                for r, sd, m in ((0.93, 0.076, 1.88), (0.92, 0.092, 1.49), (0.91, 0.032, 2.13))]
    across = summary.across_tasks(per_task)
    assert round(across["scc_mean"], 2) == 0.92 and round(across["mae_mean"], 2) == 1.83  # Table I, ours LOSO
    assert round(across["scc_std"], 3) == 0.071  # Table I's LOSO Across-Tasks SD from its task SDs
    assert across["n_folds"] == 15


def test_write_results_files(tmp_path):
    results = {"config": {"lr": np.float32(1e-3), "epochs": 3}, "dataset": "SynthSkill", "scheme": "kfold",
               "seed": 0, "folds": fake_folds()}
    results["folds"][0]["models"]["fused"]["predictions"] = {
        "paper": {"epoch": 2, "video_ids": ["a", "b"], "true": np.array([10.0, 20.0]), "pred": [11.0, 19.0]}}
    paths = summary.write_results(str(tmp_path / "run"), results, paper={"fused": {"scc": 0.83, "mae": 1.82}})
    loaded = summary.load_results(str(tmp_path / "run"))
    assert loaded["summary"]["rgb"]["paper"]["scc_mean"] == pytest.approx(0.7)
    assert loaded["folds"][1]["models"]["rgb"]["history"][1]["scc"] is None  # NaN -> null
    assert loaded["config"] == {"lr": pytest.approx(1e-3), "epochs": 3}
    assert loaded["folds"][0]["models"]["fused"]["predictions"]["paper"]["true"] == [10.0, 20.0]
    md = open(paths["markdown"]).read()
    assert "| model | SCC (paper) | MAE (paper) |" in md
    assert "| fused | 0.8000 ± 0.1000 | 1.2500 ± 0.2500 |" in md  # (0.9+0.7)/2, (1.5+1.0)/2
    assert "| 0.8300 | 1.8200 |" in md and "## Per fold" in md
    assert sorted(os.listdir(tmp_path / "run")) == ["results.json", "results.md"]  # no temp leftovers
    assert "mean_of_heads" not in md
    results["config"] = {"model": {"fused_score": "mean_of_heads"}}
    md = tables.results_markdown(summary.write_results(str(tmp_path / "run2"), results)["results"])
    assert "Row 'fused': the mean of the fusion head and the branch heads" in md
    with pytest.raises(ValueError, match="folds"):
        summary.write_results(str(tmp_path), {"summary": {}})


def test_tables():
    rows = [{"method": "SurgFusion-Net", "paper": 0.8294, "ours": (0.81234, 0.0211)},
            {"method": "MAQA_x & co", "paper": None, "ours": (0.7, 0.05)}]
    md = tables.markdown_table(rows)
    assert md.splitlines()[0] == "| method | paper | ours |"
    assert md.splitlines()[2] == "| SurgFusion-Net | 0.8294 | 0.8123 ± 0.0211 |"
    assert "| MAQA_x & co | — | 0.7000 ± 0.0500 |" in md
    tex = tables.latex_table(rows, caption="RAH-skill 4-fold", label="tab:rah")
    assert r"MAQA\_x \& co & -- & 0.7000 $\pm$ 0.0500 \\" in tex
    assert tex.count(r"\\") == 3 and r"\begin{tabular}{lcc}" in tex
    parsed = list(csv.DictReader(io.StringIO(tables.csv_table(rows))))
    assert parsed[0] == {"method": "SurgFusion-Net", "paper": "0.8294", "ours": "0.81234", "ours_std": "0.0211"}
    assert parsed[1]["paper"] == ""
    assert tables.markdown_table(rows, columns=["ours"]).splitlines()[0] == "| ours |"


def _is_png(path):
    with open(path, "rb") as f:
        data = f.read()
    return data[:8] == PNG_MAGIC and len(data) > 2000


def test_plots(tmp_path):
    rng = np.random.default_rng(0)
    true = rng.uniform(6, 30, 20)
    p = plots.plot_predictions(true, true + rng.normal(0, 2, 20), str(tmp_path / "scatter.png"), title="fold 1")
    assert _is_png(p)
    w = rng.dirichlet(np.ones(3), size=40)
    p2 = plots.plot_modality_weights(w, ["rgb", "flow", "mask"], str(tmp_path / "w.png"), seconds_per_step=14.0)
    assert _is_png(p2)
    imgs = [rng.uniform(size=(16, 20, 3)), rng.uniform(size=(16, 20)), rng.uniform(size=(16, 20, 3))]
    p3 = plots.plot_modality_weights(w, ["rgb", "flow", "mask"], str(tmp_path / "w_thumbs.png"),
                                         title="CSFB stage 2", thumbnails=[(5, imgs), (20, imgs[0])])
    assert _is_png(p3) and os.path.getsize(p3) > os.path.getsize(p2)
    with pytest.raises(ValueError, match="weights must be"):
        plots.plot_modality_weights(w, ["rgb", "flow"], str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="equally long"):
        plots.plot_predictions([1, 2], [1], str(tmp_path / "bad.png"))


def _seeded_folds(per_seed):
    """Fold records with 'final' predictions: per_seed = {seed: {model: [fold scc]}}."""
    rng = np.random.default_rng(0)
    folds = []
    for seed, models in per_seed.items():
        for k in range(3):
            rec = {"name": f"fold_{k + 1}", "seed": seed, "models": {}}
            for model, sccs in models.items():
                true = np.arange(8, dtype=float)
                pred = true + (1 - sccs[k]) * 8 * rng.normal(size=8)
                rec["models"][model] = {"predictions": {"final": {
                    "epoch": 5, "true": true.tolist(), "pred": pred.tolist()}}}
            folds.append(rec)
    return folds


def test_several_seeds_give_mean_and_t_interval_over_seeds():
    folds = _seeded_folds({s: {"rgb": [0.5, 0.6, 0.7], "fused": [0.7, 0.8, 0.9]} for s in range(4)})
    s = summary.summarise(folds, source="predictions")
    per_seed = [np.mean([metrics.spearman(f["models"]["fused"]["predictions"]["final"]["pred"],
                                          f["models"]["fused"]["predictions"]["final"]["true"])
                         for f in folds if f["seed"] == seed]) for seed in range(4)]
    fused = s["fused"]["final"]
    assert fused["n_seeds"] == 4 and fused["n_folds"] == 3 and len(fused["per_fold"]) == 12
    assert fused["scc_mean"] == pytest.approx(np.mean(per_seed))
    low, high = stats.t.interval(0.95, 3, loc=np.mean(per_seed), scale=stats.sem(per_seed))
    assert fused["scc_ci95"] == pytest.approx((high - low) / 2)
    diff = summary.paired_differences(folds, source="predictions")["fused - rgb"]["final"]
    assert diff["unit"] == "seed" and diff["n"] == 4
    rgb = [p["scc"] for p in s["rgb"]["final"]["per_seed"]]
    assert diff["scc_diff"] == pytest.approx(np.mean(np.subtract(per_seed, rgb)))
    rows = tables.comparison_rows(s)
    assert rows[-1]["SCC (final)"] == (fused["scc_mean"], fused["scc_ci95"])  # ± is the CI


def test_one_seed_pairs_differences_over_folds():
    folds = _seeded_folds({0: {"rgb": [0.5, 0.6, 0.7], "fused": [0.7, 0.8, 0.9]}})
    diff = summary.paired_differences(folds, source="predictions")["fused - rgb"]["final"]
    per_fold = {m: [p["scc"] for p in summary.summarise(folds, "predictions")[m]["final"]["per_fold"]]
                for m in ("rgb", "fused")}
    d = np.subtract(per_fold["fused"], per_fold["rgb"])
    assert diff["unit"] == "fold" and diff["n"] == 3
    assert diff["scc_diff"] == pytest.approx(d.mean())
    assert diff["scc_diff_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * stats.sem(d))


def test_best_mean_reading_shares_one_epoch_per_seed():
    s = summary.summarise(fake_folds())
    # fused fold means per epoch: 0.65, 0.70, 0.75 -> epoch 3 for both folds
    assert s["fused"]["best-mean"]["per_fold"] == [
        {"fold": "fold_1", "epoch": 3, "scc": 0.9, "mae": 1.4},
        {"fold": "fold_2", "epoch": 3, "scc": 0.6, "mae": 1.8}]
    # rgb: epoch 2 has a NaN fold SCC, so its mean is NaN and never selected -> epoch 3
    assert [p["epoch"] for p in s["rgb"]["best-mean"]["per_fold"]] == [3, 3]
    # two seeds: each seed picks its own shared epoch
    seed0, seed1 = fake_folds(), fake_folds()
    for f in seed1:  # seed 1's fused peaks at epoch 1 in both folds
        f["models"]["fused"]["history"][0]["scc"] = 0.95
    folds = [dict(f, seed=0) for f in seed0] + [dict(f, seed=1) for f in seed1]
    s2 = summary.summarise(folds)["fused"]["best-mean"]
    assert [(p["seed"], p["epoch"]) for p in s2["per_fold"]] == [(0, 3), (0, 3), (1, 1), (1, 1)]
    assert s2["scc_mean"] == pytest.approx(np.mean([0.75, 0.95]))
    diff = summary.paired_differences(folds)["fused - rgb"]["best-mean"]
    assert diff["unit"] == "seed" and diff["scc_diff"] == pytest.approx(np.mean([0.75, 0.95]) - 0.65)
    # source='predictions' reads it from the histories, and drops it without them
    assert "best-mean" in summary.summarise(fake_folds(), source="predictions")["fused"]
    bare = _seeded_folds({0: {"fused": [0.5, 0.6, 0.7]}})
    assert set(summary.summarise(bare, source="predictions")["fused"]) == {"final"}


def _ridge(per_fold):
    sccs, maes = [p[0] for p in per_fold], [p[1] for p in per_fold]
    return {"scc_mean": np.mean(sccs), "scc_std": np.std(sccs), "scc_ci95": 0.5,
            "mae_mean": np.mean(maes), "mae_std": np.std(maes), "mae_ci95": 0.25, "n_folds": 2,
            "per_fold": [{"fold": f"fold_{k + 1}", "alpha": 10.0, "scc": s, "mae": m}
                         for k, (s, m) in enumerate(per_fold)]}


def test_ridge_baselines_in_differences_and_tables(tmp_path):
    ridge = {"ridge (all)": _ridge([(0.5, 2.0), (0.8, 1.0)])}
    folds = fake_folds()
    diff = summary.paired_differences(folds, baselines=ridge)["fused - ridge (all)"]
    # per fold: fused final (0.9, 1.4), (0.6, 1.8) minus ridge (0.5, 2.0), (0.8, 1.0)
    assert diff["final"]["unit"] == "fold" and diff["final"]["n"] == 2
    assert diff["final"]["scc_diff"] == pytest.approx(np.mean([0.4, -0.2]))
    assert diff["final"]["mae_diff"] == pytest.approx(np.mean([-0.6, 0.8]))
    assert set(diff) == {"paper", "best-mean", "final", "val-selected"}
    seeded = [dict(f, seed=s) for s in (0, 1) for f in fake_folds()]
    by_seed = summary.paired_differences(seeded, baselines=ridge)["fused - ridge (all)"]["final"]
    assert by_seed["unit"] == "seed" and by_seed["scc_diff"] == pytest.approx(0.75 - 0.65)
    paths = summary.write_results(str(tmp_path), {"folds": folds, "baselines": ridge})
    assert "fused - ridge (all)" in paths["results"]["comparisons"]
    md = open(paths["markdown"]).read()
    # the same ridge number (mean ± SD over folds) under every reading
    assert "| ridge (all) |" + " 0.6500 ± 0.1500 | 1.5000 ± 0.5000 |" * 4 in md
    assert "| final | the last epoch of every fold | yes |" in md
    assert "| paper | per fold, the epoch with the best test-fold SCC" in md
    assert "| best-mean | one epoch for all folds" in md and "no: selects on the test fold" in md
    assert "| ridge (all) | fold_2 | 10 | 0.8000 | 1.0000 |" in md  # per fold, with its penalty
    rows = tables.comparison_rows(summary.summarise(folds), baselines=ridge, protocols=["final"])
    assert rows[-1] == {"model": "ridge (all)", "SCC (final)": (0.65, pytest.approx(0.15)),
                        "MAE (final)": (1.5, 0.5)}
