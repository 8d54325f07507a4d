"""Session-wide fixtures of the training tests (tests/cv_testutil.py): the tiny feature
datasets and finished runs of the tiny config, built once for all xdist workers."""
import json

import pytest

from cv_testutil import GROUP, shared_dir, tiny_config, write_features
from surgfusion_jax.training import cross_validation as cv


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Datasets 'noise' (scores unrelated to the features) and 'linear' (a skill signal)."""
    def build(path):
        write_features(path, "noise", seed=0, signal=False)
        write_features(path, "linear", seed=1, signal=True)
    return shared_dir(tmp_path_factory, "cv_features", build)


@pytest.fixture(scope="session")
def full_run(data_dir, tmp_path_factory):
    """(workdir, results) of `tiny_config(data_dir, 'noise')` trained to the end. Shared
    by the test files that read a finished run; they must not write into it."""
    path = shared_dir(tmp_path_factory, "cv_full_run",
                      lambda p: cv.run_cross_validation(tiny_config(data_dir, "noise"), str(p)))
    return str(path), _results(path)


@pytest.fixture(scope="session")
def group_run(data_dir, tmp_path_factory):
    """(workdir, results) of `tiny_config(data_dir, 'noise', **GROUP)`: 2 seeds x 2 folds
    trained as one batched program (run_axis='vmap', one device), the reference of the
    run-group and sharding tests (two files, so two workers can run them side by side)."""
    path = shared_dir(tmp_path_factory, "cv_group_run", lambda p: cv.run_cross_validation(
        tiny_config(data_dir, "noise", **GROUP), str(p)))
    return path, _results(path)


def _results(workdir):
    with open(workdir / "results.json", encoding="utf-8") as f:
        return json.load(f)
