"""The finished-run loader (`training.runs`): what it restores and scores is exactly what
training reported, and a missing run or checkpoint is a clear `UserError`."""
import json
import os
import shutil

import numpy as np
import pytest

from cv_testutil import DIM, META, tiny_config
from surgfusion_jax import errors
from surgfusion_jax.data import feature_dataset as fd
from surgfusion_jax.evaluation import metrics
from surgfusion_jax.training import cross_validation as cv, runs

@pytest.fixture(scope="module")
def trained(full_run, data_dir, tmp_path_factory):
    """The session's finished tiny run (tests/training/conftest.py), copied and run again:
    cross-validation of a finished workdir resumes every fold at its last epoch, returns
    the results it wrote before and the run in memory."""
    finished, results = full_run
    workdir = str(tmp_path_factory.mktemp("runs") / "run")
    shutil.copytree(finished, workdir)
    again, run = cv.run_cross_validation(tiny_config(data_dir, "noise"), workdir)
    assert json.loads(json.dumps(again)) == results
    return workdir, results, run


def test_load_run_restores_and_scores_what_training_reported(trained):
    workdir, results, in_memory = trained
    loaded = runs.load_run(workdir)
    assert [f.name for f in loaded.folds] == [f.name for f in in_memory.folds]
    assert loaded.model == in_memory.model
    (group,) = loaded.groups()
    assert [m.name for m in group] == [f["name"] for f in results["folds"]]
    for phase, heads in (("unimodal", ("rgb", "flow", "mask")), ("fusion", ("fused",))):
        restored = [runs.restore(loaded, m.name, phase, "last") for m in group]
        assert all(meta["epoch"] == 3 for _, meta in restored)
        preds = runs.evaluate(loaded, group, [v for v, _ in restored], phase)
        for fold, member, pred in zip(results["folds"], group, preds):
            test = loaded.eval_set(member.fold.test)
            for head in heads:
                reported = fold["models"][head]["predictions"]["final"]
                assert reported["video_ids"] == [loaded.samples[i]["video_id"] for i in test.indices]
                got = metrics.to_score_units(pred[head][test.indices], loaded.config.data.score_max,
                                              loaded.config.data.target_max)
                np.testing.assert_array_equal(got, reported["pred"])  # bit for bit


def test_prepare_holds_the_same_run_as_load(trained):
    workdir, _, in_memory = trained
    loaded = runs.load_run(workdir)
    assert in_memory.workdir == workdir and in_memory.position == loaded.position
    np.testing.assert_array_equal(np.asarray(in_memory.data.targets), np.asarray(loaded.data.targets))
    assert [k for k, _ in in_memory.selected_folds()] == [0, 1]


def test_missing_run_and_checkpoint_are_user_errors(trained, tmp_path):
    workdir, _, run = trained
    with pytest.raises(runs.MissingRunError, match="config.json not found"):
        runs.load_run(str(tmp_path / "nothing"))
    with pytest.raises(runs.MissingRunError, match="no 'best' checkpoint"):
        runs.restore(run, "fold_9", "fusion", "best")
    assert issubclass(runs.MissingRunError, errors.UserError)


def test_load_run_names_a_missing_dataset(trained, tmp_path):
    workdir, _, run = trained
    with pytest.raises(fd.DatasetError, match="noise"):
        runs.load_run(workdir, data_dir=str(tmp_path))  # the features were moved away
    moved = runs.load_run(workdir, data_dir=run.config.data.data_dir, name="noise")
    assert [s["video_id"] for s in moved.samples] == [s["video_id"] for s in run.samples]


def test_a_run_refuses_features_made_differently(trained, tmp_path):
    """The run records its dataset's feature metadata; loading it with features from
    another backbone (e.g. new videos prepared with other --backbones) is refused."""
    workdir, _, run = trained
    saved = os.path.join(workdir, runs.FEATURES_FILE)
    with open(saved) as f:
        assert json.load(f)["backbone"] == META["backbone"]
    other = dict(META, backbone="another_backbone")
    rng = np.random.default_rng(1)
    fd.write_feature_dataset(str(tmp_path), "other", [
        dict(video_id="x", score=10.0, **{m: rng.normal(size=(3, DIM)) for m in fd.MODALITIES})],
        other, feature_dim=DIM)
    with pytest.raises(fd.DatasetError, match="made differently"):
        runs.load_run(workdir, data_dir=str(tmp_path), name="other")
