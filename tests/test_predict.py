"""Prediction from a trained run: out-of-fold scores, fold averaging, CSV and Fig. 4 plots.

The run is assembled directly (config.json, splits.json, per-fold fusion checkpoints with
random weights) so the file needs no training; all videos share one length so that one
reference compile checks every score.
"""
import csv
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import run_testutil
from surgfusion_jax import config_lib as default
from surgfusion_jax.data import feature_dataset as fd
from surgfusion_jax.evaluation import metrics
from surgfusion_jax import predict
from surgfusion_jax.training import train

DIM, LENGTH, N = 8, 13, 6
META = dict(backbone="test", fps=10, segment_length=32, modalities=list(fd.MODALITIES))


def _examples(prefix, seed):
    rng = np.random.default_rng(seed)
    return [dict(video_id=f"{prefix}{i}", score=10.0 + i,
                 **{m: rng.normal(size=(LENGTH, DIM)) for m in fd.MODALITIES}) for i in range(N)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data_dir, workdir = str(root / "features"), str(root / "run")
    fd.write_feature_dataset(data_dir, "toy", _examples("vid", 0), META, feature_dim=DIM)
    fd.write_feature_dataset(data_dir, "new", _examples("new", 1), META, feature_dim=DIM)
    config = default.resolve(default.small(default.get_config()))
    config.data.data_dir, config.data.name = data_dir, "toy"
    config.data.score_max = 30.0  # what training fills in from the dataset
    config.min_bucket, config.eval_batch_size = 16, 4
    samples = fd.load_feature_dataset(data_dir, "toy").samples
    model, folds, variables = run_testutil.write_fake_run(workdir, config, samples, DIM)
    apply = jax.jit(lambda v, x: model.apply(v, x, None, train=False, phase="fusion")["fused"])

    def reference(name, fold_name):  # unpadded, all videos in one batch, score units
        ds = fd.load_feature_dataset(data_dir, name)
        x = {m: np.stack([s[m] for s in ds.samples]) for m in fd.MODALITIES}
        return metrics.to_score_units(apply(variables[fold_name], x), config.data.score_max,
                                      config.data.target_max)

    return dict(data_dir=data_dir, workdir=workdir, folds=folds, reference=reference)


def test_videos_of_the_run_get_their_test_fold_model(run):
    out = os.path.join(run["workdir"], "out")
    rows = predict.predict(run["workdir"], output_dir=out)
    assert [r["video_id"] for r in rows] == [f"vid{i}" for i in range(N)]
    refs = {f.name: run["reference"]("toy", f.name) for f in run["folds"]}
    for i, r in enumerate(rows):
        fold = next(f.name for f in run["folds"] if r["video_id"] in f.test)
        assert r["models"] == fold
        assert r["predicted_score"] == pytest.approx(refs[fold][i], abs=1e-4)
        assert r["dataset_score"] == 10.0 + i
        with open(os.path.join(out, f"csfb_{r['video_id']}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "predictions.csv")) as f:
        table = list(csv.DictReader(f))
    assert [t["video_id"] for t in table] == [r["video_id"] for r in rows]
    assert float(table[2]["predicted_score"]) == pytest.approx(rows[2]["predicted_score"])


def test_new_videos_average_the_folds_or_use_the_chosen_one(run):
    out = os.path.join(run["workdir"], "out_new")
    rows = predict.predict(run["workdir"], name="new", output_dir=out, plots=False)
    refs = [run["reference"]("new", f.name) for f in run["folds"]]
    assert all(r["models"] == "mean of 2 folds" for r in rows)
    np.testing.assert_allclose([r["predicted_score"] for r in rows], np.mean(refs, axis=0), atol=1e-4)
    assert not any(n.endswith(".png") for n in os.listdir(out))
    second = run["folds"][1].name
    for fold in ("2", second):
        rows = predict.predict(run["workdir"], name="new", fold=fold, output_dir=out, plots=False)
        assert all(r["models"] == second for r in rows)
        np.testing.assert_allclose([r["predicted_score"] for r in rows], refs[1], atol=1e-4)
    with pytest.raises(predict.PredictError, match="not a fold"):
        predict.predict(run["workdir"], fold="fold_9", plots=False)


def test_max_plots_picks_videos_across_the_score_range(run):
    out = os.path.join(run["workdir"], "out_few")
    rows = predict.predict(run["workdir"], output_dir=out, max_plots=2)
    assert len(rows) == N  # every video is still predicted
    by_score = sorted(rows, key=lambda r: r["dataset_score"])
    expected = {f"csfb_{by_score[0]['video_id']}.png", f"csfb_{by_score[-1]['video_id']}.png"}
    assert {n for n in os.listdir(out) if n.endswith(".png")} == expected


def test_videos_to_plot_spreads_over_the_scores():
    scores = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert predict._videos_to_plot(scores, None) == set(range(5))
    assert predict._videos_to_plot(scores, 9) == set(range(5))
    assert predict._videos_to_plot(scores, 3) == {1, 2, 0}  # scores 1, 3, 5
    assert predict._videos_to_plot(scores, 0) == set()


def test_csfb_weights_per_time_step_sum_to_one(run):
    model = train.build_model(default.resolve(default.small(default.get_config())).model,
                              fd.MODALITIES)
    x = {m: np.ones((1, LENGTH, DIM), np.float32) for m in fd.MODALITIES}
    variables = run_testutil.random_variables(model, DIM, 0)
    weights, valids = predict._csfb_weights(model, variables, x, np.ones((1, LENGTH), bool))
    assert [w.shape for w in weights] == [(1, 7, 3), (1, 4, 3), (1, 1, 3)]  # ceil(T/2), ceil(T/4)
    np.testing.assert_allclose(np.sum(weights[1], -1), 1.0, atol=1e-5)
    assert [int(v.sum()) for v in valids] == [7, 4, 1]


def test_cli_errors_name_the_fix(run, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "surgfusion_jax.predict"]
    missing = subprocess.run(cmd + [f"--workdir={tmp_path}"], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "config.json not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    no_data = subprocess.run(cmd + [f"--workdir={run['workdir']}", f"--data_dir={tmp_path}"],
                             capture_output=True, text=True, env=env)
    assert no_data.returncode == 2 and "data_prep.prepare" in no_data.stderr
    assert "Traceback" not in no_data.stderr


def test_fit_gap_scores_train_and_test_videos_of_each_fold(run):
    """benchmarks/fit_gap.py: per fold, the fused model's SCC on its training and on its
    test videos, against scipy on the unpadded reference predictions."""
    import importlib.util
    from scipy import stats
    spec = importlib.util.spec_from_file_location(
        "fit_gap", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks", "fit_gap.py"))
    fit_gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_gap)
    report = fit_gap.fit_gap(run["workdir"])
    assert set(report["heads"]) == {"fused"}  # the fake run has fusion checkpoints only
    scores = np.array([10.0 + i for i in range(N)])
    ids = [f"vid{i}" for i in range(N)]
    want = []
    for fold in run["folds"]:
        pred = run["reference"]("toy", fold.name)
        tr = [ids.index(v) for v in fold.train]
        te = [ids.index(v) for v in fold.test]
        want.append((stats.spearmanr(pred[tr], scores[tr])[0],
                     stats.spearmanr(pred[te], scores[te])[0]))
    got = report["heads"]["fused"]["members"]
    assert [m["member"] for m in got] == [f.name for f in run["folds"]]
    for (tr, te), m in zip(want, got):
        assert m["train_scc"] == pytest.approx(tr, abs=1e-9)
        assert m["test_scc"] == pytest.approx(te, abs=1e-9)
    assert report["heads"]["fused"]["gap"] == pytest.approx(
        np.mean([w[0] for w in want]) - np.mean([w[1] for w in want]), abs=1e-9)
