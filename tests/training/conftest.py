"""Session-wide fixtures of the training tests (tests/cv_testutil.py): the tiny feature
datasets and one finished run of the tiny config, built once for all xdist workers."""
import json

import pytest

from cv_testutil import shared_dir, tiny_config, write_features
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
    with open(path / "results.json", encoding="utf-8") as f:
        return str(path), json.load(f)
