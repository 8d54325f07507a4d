"""All runs of a protocol as one program (`training/phase.py`): every seed x fold of a
group trained together, looped (`run_axis='map'`), batched (`'vmap'`) or sharded over
devices, gives each run's results as that run trained alone.

Its own file (not `test_cross_validation.py`) so that `make test`'s workers run these
four trainings beside that file's; the batched run is shared by the two tests."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cv_testutil import SCORE_MAX, tiny_config
from surgfusion_jax.training import cross_validation as cv

GROUP = dict(num_seeds=2, unimodal__num_epochs=2, fusion__num_epochs=2, checkpoint_every_epochs=10)
NORMALISED = 2 * SCORE_MAX  # score units per unit of model output


@pytest.fixture(scope="module")
def alone(data_dir, tmp_path_factory):
    """Each of the 2 seeds x 2 folds trained alone (one run per program)."""
    workdir = str(tmp_path_factory.mktemp("alone"))
    return cv.run_cross_validation(tiny_config(data_dir, "noise", max_runs_per_program=1,
                                           run_axis="map", **GROUP), workdir)[0]


@pytest.fixture(scope="module")
def together(data_dir, tmp_path_factory):
    """The same 4 runs as one batched program (the default, run_axis='vmap')."""
    workdir = tmp_path_factory.mktemp("together")
    results, run = cv.run_cross_validation(tiny_config(data_dir, "noise", **GROUP), str(workdir))
    return workdir, results, run


def _assert_same_predictions(got, want, tol):
    for a, b in zip(got["folds"], want["folds"]):
        assert (a["seed"], a["name"]) == (b["seed"], b["name"])
        for model in ("rgb", "flow", "mask", "fused"):
            np.testing.assert_allclose(a["models"][model]["predictions"]["final"]["pred"],
                                       b["models"][model]["predictions"]["final"]["pred"],
                                       atol=tol(model) * NORMALISED)


def test_a_group_of_runs_equals_each_run_alone(alone, together, data_dir, tmp_path):
    """Two seeds x two folds trained as one program give, per run, the history and
    predictions of that fold and seed trained alone (max_runs_per_program=1).

    run_axis='map' (a loop over the runs inside the program): to 1e-6, every model.
    run_axis='vmap' (the default, batched): batched and single matrix products round
    differently (~1e-7). The unimodal phase carries that along: equal to 1e-5 of the
    normalised output. In the fusion phase Adam's first steps turn round-off in near-zero
    gradients into +-lr steps and the PolicyNet's hard argmax into an occasional other
    candidate mask, so the fused model agrees in loss and predictions to 1e-3 (its loss
    moved by 1.2e-4 on an AMD EPYC host where an Intel one stayed within 1e-4)."""
    mapped, _ = cv.run_cross_validation(tiny_config(data_dir, "noise", run_axis="map", **GROUP),
                                        str(tmp_path / "mapped"))
    for a, b in zip(mapped["folds"], alone["folds"]):
        for model in ("rgb", "flow", "mask", "fused"):
            for ha, hb in zip(a["models"][model]["history"], b["models"][model]["history"]):
                for key in ("loss", "scc", "mae", "val_scc", "val_mae"):
                    assert ha[key] == pytest.approx(hb[key], abs=1e-6), (model, key)
    _assert_same_predictions(mapped, alone, lambda model: 1e-6)

    workdir, batched, run = together
    assert [len(g) for g in run.groups()] == [4]
    assert [(f["seed"], f["name"]) for f in batched["folds"]] == [
        (0, "fold_1"), (0, "fold_2"), (1, "fold_1"), (1, "fold_2")]
    assert os.path.isdir(workdir / "checkpoints" / "seed_1" / "fold_2" / "fusion")
    for a, b in zip(batched["folds"], alone["folds"]):
        assert (a["seed"], a["name"], a["val"]) == (b["seed"], b["name"], b["val"])
        for model in ("rgb", "flow", "mask", "fused"):
            tol = 1e-5 if model != "fused" else 1e-3
            for ha, hb in zip(a["models"][model]["history"], b["models"][model]["history"]):
                assert ha["loss"] == pytest.approx(hb["loss"], abs=tol)
                if model != "fused":
                    assert ha["scc"] == pytest.approx(hb["scc"], abs=1e-5)
                for key in ("mae", "val_mae"):
                    assert ha[key] == pytest.approx(hb[key], abs=tol * NORMALISED)
    _assert_same_predictions(batched, alone, lambda model: 1e-5 if model != "fused" else 1e-3)
    # the two seeds are different runs of the same folds
    assert batched["folds"][0]["models"]["fused"]["history"][-1]["loss"] != \
        batched["folds"][2]["models"]["fused"]["history"][-1]["loss"]


def test_runs_sharded_over_four_devices_match_one_device(together, data_dir, tmp_path):
    """The group's run axis sharded over 4 (forced host) devices, one run each, gives the
    results of one device (round-off as in `test_a_group_of_runs_equals_each_run_alone`)."""
    _, one, _ = together
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys, json; sys.path.insert(0, {tests_dir!r})\n"
            "import jax, numpy as np; assert jax.device_count() == 4, jax.devices()\n"
            "from surgfusion_jax.training import phase\n"
            "assert len(phase.place_runs(np.zeros((4, 2)), 4).sharding.device_set) == 4\n"
            "import cv_testutil as t\n"
            "from surgfusion_jax.training import cross_validation as cv\n"
            f"r, _ = cv.run_cross_validation(t.tiny_config({str(data_dir)!r}, 'noise', **{GROUP!r}), "
            f"{str(tmp_path / 'four')!r})\n")
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "four" / "results.json") as f:
        four = json.load(f)
    _assert_same_predictions(four, one, lambda model: 1e-5 if model != "fused" else 1e-3)
