"""Tiny versions of the experiment entry points (Tables I-V, Fig. 4) on a tiny SynthSkill
(3 surgeons x 3 trials) prepared by the real prep stage with a stand-in extractor.

Every run uses one tiny model shape, so the model compiles once for the file (the compile
dominates); the full-model runs are shared between the tables through one workdir, as
on real data. Extra model variants (other fusion strategies, heads, CSFB only) are slow.
The Fisher z "Across Tasks" check of the paper's Table I lives in
tests/test_paper_results.py (test_table1_across_tasks_is_fisher_z_mean_of_tasks).
"""
import csv
import importlib
import json
import os

import cv2
import numpy as np
import pytest
from absl import flags
from scipy import stats

from surgfusion_jax import config_lib as default
from experiments import (cli, fig4, recompute, runner, spec, table1, table2, table3, table4,
                         table5)
from experiments import thumbnails
from data_prep.prepare import prepare_manifest
from data_prep.synthskill import generate_synthskill
from prep_testutil import StandInExtractor, write_png_masks, write_video
from surgfusion_jax import config_lib
from surgfusion_jax.evaluation import summary
from surgfusion_jax.training import runs
from surgfusion_jax.data import feature_dataset as fd
from surgfusion_jax.evaluation import metrics
from surgfusion_jax.io import to_jsonable

DIM, SEG = 16, 32  # stand-in feature size; frames per segment (the prep's)
SURGEONS = "BCD"
TINY = {"model.features": 16, "model.embed_features": 32, "model.num_candidates": 3,
        "data.window": 8, "unimodal.num_epochs": 2, "fusion.num_epochs": 2,
        "unimodal.batch_size": 12, "fusion.batch_size": 12,  # one step per epoch
        "cv.num_folds": 2, "eval_batch_size": 8, "min_bucket": 16,  # one eval bucket
        "checkpoint_every_epochs": 2, "progress_bar": False,
        # One run per program: every run of the file (2-fold and 3-fold schemes alike)
        # then has the same program shapes and reuses one compile.
        "max_runs_per_program": 1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny SynthSkill (3 surgeons x 3 trials, 32 px, 20-45 s) through the real prep stage
    with a cheap stand-in feature extractor (16-d features): <root>/raw, <root>/features."""
    root = tmp_path_factory.mktemp("synthskill")
    manifest = generate_synthskill(str(root / "raw"), num_surgeons=3, trials_per_surgeon=3,
                                   image_size=32, min_seconds=20, max_seconds=45)
    result = prepare_manifest(manifest, str(root / "features"), "synthskill", image_size=32,
                              extractor=StandInExtractor(32, feature_dim=DIM), progress=False,
                              source="synthskill", score_scale="grs")
    assert result.ok, result.summary()
    return root


@pytest.fixture(scope="module")
def square_manifest(tmp_path_factory):
    """One 10-FPS video of a square moving 1 px/frame right, its PNG masks, a manifest."""
    root = tmp_path_factory.mktemp("square")
    write_video(root / "sq.avi", 40, fps=10.0, seed=1)
    write_png_masks(root / "sq_masks", 40, seed=1)
    (root / "m.csv").write_text("video_id,video_path,score,surgeon_id,mask_path\n"
                                "sq,sq.avi,20,B,sq_masks\n")
    return str(root / "m.csv")


def options(workdir, data_dir, **kw):
    base = default.get_config()
    for path, value in TINY.items():  # as --config.<path>=<value> flags would
        spec._set(base, path, value)
    return spec.Options(workdir=str(workdir), base_config=base, overrides=dict(TINY),
                          data_dir=str(data_dir / "features"), dataset="synthskill", **kw)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def table2_run(workdir, data_dir):
    return table2.run(options(workdir, data_dir))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def model_rows(path):
    """The rows of a table's CSV that are not ridge baselines."""
    return [r for r in read_csv(path) if not r["model"].startswith("ridge")]


BEST, MEAN, FINAL = "best epoch per fold", "best mean epoch", "final epoch, unbiased"
RIDGE = ["ridge (rgb)", "ridge (flow)", "ridge (mask)", "ridge (all)"]


def run_results(workdir, run):
    return summary.load_results(os.path.join(workdir, run.name))


def test_table2_paper_and_ours_columns(table2_run, workdir):
    every = read_csv(table2_run["csv"])
    assert [(r["dataset"], r["model"]) for r in every] == [
        (d, m) for d in ("RAH-skill", "RARP-skill") for m in ["fused"] + RIDGE]
    rows = model_rows(table2_run["csv"])
    assert (float(rows[0]["paper SCC"]), float(rows[0]["paper SCC_std"])) == (0.8294, 0.025)
    assert (float(rows[1]["paper MAE"]), float(rows[1]["paper MAE_std"])) == (1.2974, 0.4222)
    assert all(r["ours on"] == "SynthSkill (synthskill) 4-Fold" and r["folds"] == "2" for r in rows)
    # independent reference: scipy on each fold's predictions of the run's results.json,
    # best epoch = the summary's history selection, final = last epoch
    results = run_results(workdir, spec.Run(spec.SYNTHSKILL, "kfold"))
    sccs = {"checkpoint_best": [], "final": []}
    for fold in results["folds"]:
        for key in sccs:
            p = fold["models"]["fused"]["predictions"][key]
            sccs[key].append((stats.spearmanr(p["pred"], p["true"]).statistic,
                              np.mean(np.abs(np.subtract(p["pred"], p["true"])))))
    for key, col in (("checkpoint_best", BEST), ("final", FINAL)):
        scc, mae = np.array(sccs[key]).T
        assert float(rows[0][f"ours SCC ({col})"]) == pytest.approx(scc.mean(), abs=1e-12)
        assert float(rows[0][f"ours SCC ({col})_std"]) == pytest.approx(scc.std(), abs=1e-12)
        assert float(rows[0][f"ours MAE ({col})"]) == pytest.approx(mae.mean(), abs=1e-9)
    summary = results["summary"]["fused"]
    assert float(rows[0][f"ours SCC ({BEST})"]) == pytest.approx(summary["paper"]["scc_mean"])
    assert float(rows[0][f"ours MAE ({BEST})"]) == pytest.approx(summary["paper"]["mae_mean"])
    assert float(rows[0][f"ours SCC ({FINAL})"]) == pytest.approx(summary["final"]["scc_mean"])
    # the other reading: one epoch for both folds, the best fold-mean test SCC (by hand)
    hist = [{h["epoch"]: h for h in f["models"]["fused"]["history"]} for f in results["folds"]]
    epoch = max(sorted(hist[0]), key=lambda e: np.mean([h[e]["scc"] for h in hist]))
    assert float(rows[0][f"ours SCC ({MEAN})"]) == pytest.approx(
        np.mean([h[epoch]["scc"] for h in hist]), abs=1e-12)
    assert float(rows[0][f"ours MAE ({MEAN})"]) == pytest.approx(
        np.mean([h[epoch]["mae"] for h in hist]), abs=1e-12)
    assert not any("val-selected" in c for c in rows[0])  # no inner split: no empty column
    # ridge rows: the run's baselines, scored by scipy on their own predictions
    ridge = results["baselines"]
    assert list(ridge) == RIDGE
    for row in every[1:5]:
        folds = ridge[row["model"]]["per_fold"]
        assert [f["fold"] for f in folds] == [f["name"] for f in results["folds"]]
        assert [sorted(f["video_ids"]) for f in folds] == [sorted(f["test"]) for f in results["folds"]]
        scc = [stats.spearmanr(f["pred"], f["true"]).statistic for f in folds]
        assert all(0.0 <= p <= 30.0 for f in folds for p in f["pred"])  # clipped to the scale
        for col in (BEST, MEAN, FINAL):  # no epochs: the same number under every reading
            assert float(row[f"ours SCC ({col})"]) == pytest.approx(np.mean(scc), abs=1e-12)
            assert float(row[f"ours SCC ({col})_std"]) == pytest.approx(np.std(scc), abs=1e-12)
        assert row["paper SCC"] == "" and row["folds"] == "2" and row["scheme"] == "4-Fold"
    md = open(table2_run["md"]).read()
    assert "| RAH-skill | 4-Fold | fused | SynthSkill (synthskill) 4-Fold | 0.8294 ± 0.0250 |" in md
    assert "| RAH-skill | 4-Fold | ridge (all) | SynthSkill (synthskill) 4-Fold | — | — |" in md
    assert "ours is trained and evaluated on synthskill" in md.lower()
    assert f"'ours ... ({FINAL})': the last epoch of every fold (unbiased" in md
    assert f"'ours ... ({MEAN})': one epoch for all folds" in md and "optimistic" in md
    assert "\\begin{tabular}" in open(table2_run["tex"]).read()
    folds = read_csv(table2_run["folds_csv"])
    assert {(r["dataset"], r["protocol"]) for r in folds} == {
        (d, p) for d in ("RAH-skill", "RARP-skill") for p in ("paper", "best-mean", "final", "")}
    assert {r["epoch"] for r in folds if r["protocol"] in ("final", "best-mean")} <= {"1", "2"}
    assert {r["epoch"] for r in folds if r["protocol"] == "final"} == {"2"}
    assert {r["model"] for r in folds if r["protocol"] == ""} == set(RIDGE)
    prov = json.load(open(table2_run["provenance"]))
    run = prov["runs"]["synthskill_kfold_rgb+flow+mask_csfb+dfb_dra_h2"]
    assert prov["git_commit"] and prov["from_checkpoints"] is False
    assert run["split_seed"] == 0 and run["config"]["model"]["features"] == 16
    assert sorted(sum(run["splits"]["test"].values(), [])) == sorted(
        f"SynthSkill_{s}{t:03d}" for s in SURGEONS for t in (1, 2, 3))


def test_from_checkpoints_reproduces_every_number(table2_run, workdir, data_dir, monkeypatch):
    before = {k: open(p).read() for k, p in table2_run.items() if k != "provenance"}
    from surgfusion_jax.training import cross_validation

    def no_training(*args, **kwargs):
        raise AssertionError("--from_checkpoints must not train")

    monkeypatch.setattr(cross_validation, "run_cross_validation", no_training)
    again = table2.run(options(workdir, data_dir, from_checkpoints=True))
    for key, text in before.items():
        assert open(again[key]).read() == text, key
    assert json.load(open(again["provenance"]))["from_checkpoints"] is True
    # every head's test predictions of both states equal those of the training run
    run_dir = os.path.join(workdir, spec.Run(spec.SYNTHSKILL, "kfold").name)
    trained = summary.load_results(run_dir)["folds"]
    _, recomputed, ridge = recompute.fold_records(run_dir)
    assert to_jsonable(ridge) == summary.load_results(run_dir)["baselines"]
    differ = 0
    for a, b in zip(trained, recomputed, strict=True):
        assert a["name"] == b["name"] and set(a["models"]) == set(b["models"]) == {
            "rgb", "flow", "mask", "fused"}
        for head, record in a["models"].items():
            for key in ("checkpoint_best", "final"):
                want, got = record["predictions"][key], b["models"][head]["predictions"][key]
                assert got == want, (a["name"], head, key)
            # the history-based readings read the 'last' checkpoint's copy of the history
            assert to_jsonable(b["models"][head]["history"]) == record["history"], head
            differ += record["predictions"]["checkpoint_best"]["epoch"] != 2
    assert differ  # some best epoch is not the last one: a best/last mix-up would show


@pytest.fixture(scope="module")
def table1_run(table2_run, workdir, data_dir):
    return table1.run(options(workdir, data_dir))


def test_table1_synthskill_schemes(table1_run, workdir):
    rows = model_rows(table1_run["csv"])
    assert [(r["task"], r["scheme"], r["folds"]) for r in rows] == [
        ("SU", "LOSO", "3"), ("SU", "LOUO", "3"), ("SU", "4-Fold", "2")]
    assert [float(r["paper SCC"]) for r in rows] == [0.91, 0.84, 0.89]
    assert float(rows[1]["paper MAE_std"]) == 0.776
    splits = {s: json.load(open(os.path.join(workdir, spec.Run(spec.SYNTHSKILL, s).name,
                                             "splits.json"))) for s in ("loso", "louo")}
    assert [f["name"] for f in splits["loso"]["folds"]] == ["supertrial_1", "supertrial_2",
                                                            "supertrial_3"]
    assert [f["test"] for f in splits["louo"]["folds"]][0] == [
        "SynthSkill_B001", "SynthSkill_B002", "SynthSkill_B003"]


def test_table1_across_tasks_combination():
    # the paper's Across-Tasks numbers (and SDs) follow from its task columns
    from surgfusion_jax.evaluation import paper_results as pr
    for scheme in table1.SCHEMES:
        q = dict(scheme=scheme, method="SurgFusion-Net")
        per_task = [{"scc_mean": pr.lookup("I", task=t, **q),
                     "scc_std": pr.lookup("I", task=t, metric="SCC_std", **q),
                     "mae_mean": pr.lookup("I", task=t, metric="MAE", **q),
                     "mae_std": pr.lookup("I", task=t, metric="MAE_std", **q), "n_folds": 5}
                    for t in ("KT", "NP", "SU")]
        got = summary.across_tasks(per_task)
        for key, metric, digits in (("scc_mean", "SCC", 2), ("scc_std", "SCC_std", 3),
                                    ("mae_mean", "MAE", 2), ("mae_std", "MAE_std", 3)):
            assert round(got[key] + 1e-12, digits) == pr.lookup("I", task="across", metric=metric, **q)
        assert got["n_folds"] == 15
    # rows: one per scheme whose three tasks ran, with Fisher z of ours
    opts = spec.Options(workdir="unused", base_config=default.get_config())
    rows = table1.build_rows(opts)
    assert len(rows) == 9 and {r.run.data for r in rows} == {"kt", "np", "su"}
    fake = {"scc_mean": 0.5, "scc_std": 0.1, "mae_mean": 2.0, "mae_std": 0.3, "n_folds": 5}
    summaries = {r.run.name: {"fused": {"paper": dict(fake, scc_mean=0.3 + 0.05 * i), "final": fake}}
                 for i, r in enumerate(rows)}
    across = table1.across_rows([r for r in rows if r.labels["scheme"] != "LOUO"], summaries, opts)
    assert [a["scheme"] for a in across] == ["LOSO", "4-Fold"]
    loso = [0.3 + 0.05 * i for i, r in enumerate(rows) if r.labels["scheme"] == "LOSO"]
    assert across[0][f"ours SCC ({BEST})"][0] == pytest.approx(np.tanh(np.mean(np.arctanh(loso))))
    assert across[0][f"ours SCC ({MEAN})"] is None and across[0]["model"] == "fused"
    assert across[0]["paper SCC"] == (0.92, 0.071) and across[0]["folds"] == 15


def test_table3_single_branches_and_full_model(table1_run, workdir, data_dir):
    paths = table3.run(options(workdir, data_dir, variants=("single", "csfb+dfb:rgb+flow+mask"),
                               datasets=("su", "rarp")))
    every = read_csv(paths["csv"])
    assert [(r["dataset"], r["model"], r["modalities"]) for r in every[:9]] == [
        ("JIGSAWS SU", "rgb", "RGB"), ("JIGSAWS SU", "flow", "Flow"), ("JIGSAWS SU", "mask", "Mask"),
        ("JIGSAWS SU", "fused", "RGB+Flow+Mask")] + [("JIGSAWS SU", m, "") for m in RIDGE] + [
        ("RARP-skill", "rgb", "RGB")]
    rows = model_rows(paths["csv"])
    assert [(r["dataset"], r["modalities"]) for r in rows] == [
        (d, m) for d in ("JIGSAWS SU", "RARP-skill") for m in ("RGB", "Flow", "Mask", "RGB+Flow+Mask")]
    assert float(rows[1]["paper SCC"]) == 0.7539 and float(rows[7]["paper MAE"]) == 1.2974
    assert rows[0]["ours on"] == "SynthSkill (synthskill) LOUO"
    # the single-branch rows are the unimodal heads of the shared full runs
    results = run_results(workdir, spec.Run(spec.SYNTHSKILL, "kfold"))
    per_fold = [metrics.spearman(f["models"]["flow"]["predictions"]["final"]["pred"],
                                 f["models"]["flow"]["predictions"]["final"]["true"])
                for f in results["folds"]]
    assert float(rows[5][f"ours SCC ({FINAL})"]) == pytest.approx(np.mean(per_fold), abs=1e-12)
    assert rows[3][f"ours SCC ({BEST})"] == model_rows(
        os.path.join(workdir, "table1.csv"))[1][f"ours SCC ({BEST})"]  # SU LOUO, shared


def test_table4_and_table5_share_the_full_model_run(table1_run, workdir, data_dir):
    t4 = model_rows(table4.run(options(workdir, data_dir, variants=("dra",)))["csv"])
    t5 = model_rows(table5.run(options(workdir, data_dir, variants=("2",)))["csv"])
    assert [r["dataset"] for r in t4] == ["JIGSAWS SU", "RAH-skill", "RARP-skill"]
    assert [float(r["paper SCC"]) for r in t4] == [0.8355, 0.8294, 0.8486]
    assert [r["fusion"] for r in t4] == ["DRA (ours)"] * 3 and [r["heads"] for r in t5] == ["2"] * 3
    strip = lambda r: {k: v for k, v in r.items() if k not in ("fusion", "heads")}  # noqa: E731
    assert [strip(r) for r in t4] == [strip(r) for r in t5]
    t2 = model_rows(os.path.join(workdir, "table2.csv"))
    assert t4[1][f"ours SCC ({FINAL})"] == t2[0][f"ours SCC ({FINAL})"]


def test_fig4_weights_and_thumbnails(table2_run, workdir, data_dir):
    paths = fig4.run(options(workdir, data_dir, from_checkpoints=True),
                     manifest=str(data_dir / "raw" / "manifest.csv"), times=(0.0, 13.0))
    prov = json.load(open(paths["provenance"]))
    video = prov["video_id"]
    samples = fd.load_feature_dataset(str(data_dir / "features"), "synthskill").samples
    n = int({s["video_id"]: s for s in samples}[video]["num_segments"])
    folds = json.load(open(os.path.join(workdir, prov["runs"].popitem()[0], "splits.json")))
    first = folds["folds"][0]["test"]  # default video: the longest of the first test fold
    assert n == max(int(s["num_segments"]) for s in samples if s["video_id"] in first)
    rows = read_csv(paths["csv"])
    assert len(rows) == -(-n // 4)  # stage 2: ceil(T / 4) steps
    w = np.array([[float(r[m]) for m in ("rgb", "flow", "mask")] for r in rows])
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    assert prov["thumbnail_source"].endswith(f"{video}.avi") and prov["thumbnail_note"] is None
    assert prov["seconds_per_step"] == pytest.approx(4 * SEG / 10.0)
    assert [r["thumbnail"] for r in rows][:3] == ["T1", "T2", ""]
    assert prov["thumbnail_steps"] == [0, 1] and prov["fold"] == folds["folds"][0]["name"]
    with_thumbs = cv2.imread(paths["png"]).shape
    # without the manifest: curves only, and the output says so
    paths = fig4.run(options(workdir, data_dir, from_checkpoints=True), video_id=video)
    prov = json.load(open(paths["provenance"]))
    assert prov["thumbnail_source"] is None and "--manifest" in prov["thumbnail_note"]
    assert cv2.imread(paths["png"]).shape[0] < with_thumbs[0]


def test_thumbnails_match_the_source_frames(square_manifest):
    spec = thumbnails.find_specs({"modalities": list(fd.MODALITIES)}, manifest=square_manifest)["sq"]
    assert thumbnails.frame_index(1, 2, 4, 100) == 24 and thumbnails.frame_index(9, 2, 4, 3) == 11
    # frames 10 -> 11: the square moves 1 px right (0.5 px at 32 px), not down
    rgb, flow, mask = thumbnails.read_frames(spec, 11, image_size=32, fps=10.0, flow_bound=1.0)
    cap = cv2.VideoCapture(spec.video_path)
    cap.set(cv2.CAP_PROP_POS_FRAMES, 11)
    ref = cv2.cvtColor(cv2.resize(cap.read()[1], (32, 32), interpolation=cv2.INTER_AREA),
                       cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(rgb, ref)
    square = mask > 127
    assert mask.shape == (32, 32) and 10 < square.sum() < 60
    hsv = cv2.cvtColor(flow, cv2.COLOR_RGB2HSV).astype(int)
    hue = np.minimum(hsv[..., 0], 180 - hsv[..., 0])  # distance from red (= rightwards)
    assert np.median(hue[square]) < 10  # the square's flow points right
    assert np.median(hsv[..., 2][square]) > 1.5 * np.median(hsv[..., 2][~square])  # and largest
    right = thumbnails.flow_to_rgb(np.tile([[[20.0, 0.0]]], (2, 2, 1)), 20.0)
    down = thumbnails.flow_to_rgb(np.tile([[[0.0, 3.0]]], (2, 2, 1)), 20.0)
    still = thumbnails.flow_to_rgb(np.full((2, 2, 2), 0.01), 20.0)
    assert tuple(right[0, 0]) == (255, 0, 0) and tuple(down[0, 0]) == (127, 255, 0)
    assert still.max() <= 8  # 0.014 px of 0.5 px minimum scale: dark


def test_cli_flags_overrides_and_errors(table2_run, workdir, data_dir, capsys):
    argv = ["table2", f"--workdir={workdir}", f"--data_dir={data_dir / 'features'}",
            "--dataset=synthskill", "--from_checkpoints"] + \
        [f"--config.{k}={v}" for k, v in TINY.items()]
    fv = flags.FlagValues()
    cli.define_flags(fv, argv)
    fv(argv)
    opts = cli.options_from_flags(fv)
    assert opts.overrides["model.features"] == 16 and opts.from_checkpoints
    config = spec.run_config(spec.Run(spec.SYNTHSKILL, "kfold"), opts)
    assert config.unimodal.batch_size == 12 and config.data.name == "synthskill"
    assert cli.run_cli(table2.run, fv) == 0
    assert "RARP-skill" in capsys.readouterr().out
    fv = flags.FlagValues()
    cli.define_flags(fv, argv[:5] + ["--variants=dra"])
    fv(argv[:5] + ["--variants=dra"])
    assert cli.run_cli(table2.run, fv) == 2 and "--variants" in capsys.readouterr().err
    fv = flags.FlagValues()
    cli.define_flags(fv, argv + ["--datasets=su"])
    fv(argv + ["--datasets=su"])
    assert cli.run_cli(table4.run, fv) == 2  # SU LOUO with 'avg'.. untrained -> named fix
    assert "without --from_checkpoints" in capsys.readouterr().err


def test_run_config_precedence():
    base = default.get_config()
    base.unimodal.num_epochs = 7
    opts = spec.Options(workdir="w", base_config=base,
                          overrides={"fusion.batch_size": 5, "model.num_heads": 8})
    c = spec.run_config(spec.Run("rah", "kfold", modalities=("rgb", "mask"), num_heads=4), opts)
    assert (c.data.name, c.unimodal.batch_size, c.fusion.batch_size) == ("rah_skill", 32, 5)
    assert c.unimodal.num_epochs == 7 and c.model.num_heads == 4  # the run's own field wins
    assert c.data.modalities == ("rgb", "mask") and c.workdir == os.path.join(
        "w", "rah_kfold_rgb+mask_csfb+dfb_dra_h4")
    synth = spec.Run(spec.SYNTHSKILL, "louo")
    c = spec.run_config(synth, spec.Options(workdir="w", base_config=base, dataset="synthskill"))
    assert (c.data.name, c.data.paper_dataset, c.unimodal.batch_size) == ("synthskill", "", 16)
    demo = config_lib.load_config_file(os.path.join(spec.REPO_ROOT, "configs", "demo.py"))
    c = spec.run_config(synth, spec.Options(workdir="w", base_config=demo, dataset="synthskill"))
    assert (c.data.name, c.data.data_dir, c.unimodal.batch_size) == (
        demo.data.name, demo.data.data_dir, demo.unimodal.batch_size)  # the file's, not 16
    with pytest.raises(spec.ExperimentError, match="unknown.*choose from avg"):
        table4.build_rows(spec.Options(workdir="w", base_config=base, variants=("sum",)))
    with pytest.raises(runs.MissingRunError, match="without --from_checkpoints"):
        recompute.fold_records("/nonexistent/run")


@pytest.mark.slow
def test_ablation_variants_train_and_recompute_exactly(table1_run, workdir, data_dir):
    runs = [(table4, ("avg",)), (table5, ("1",)), (table3, ("csfb:rgb+flow",))]
    for module, variants in runs:
        paths = module.run(options(workdir, data_dir, variants=variants, datasets=("rah",)))
        before = open(paths["csv"]).read()
        again = module.run(options(workdir, data_dir, variants=variants, datasets=("rah",),
                                   from_checkpoints=True))
        assert open(again["csv"]).read() == before
