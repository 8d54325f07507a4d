"""`surgfusion_jax.errors` (one base for user errors, shared exit codes) and
`surgfusion_jax.io` (atomic writes, plain JSON)."""
import io
import json
import math
import os

import numpy as np
import pytest

from data_prep.common import PrepError
from data_prep.synthskill_setup import SetupError
from experiments.spec import ExperimentError
from experiments.thumbnails import ThumbnailError
from surgfusion_jax import errors
from surgfusion_jax.data.feature_dataset import DatasetError
from surgfusion_jax.data.splits import SplitError
from surgfusion_jax.evaluation.paper_results import PaperLookupError
from surgfusion_jax.io import atomic_write, read_json, to_jsonable, write_json
from surgfusion_jax.predict import PredictError
from surgfusion_jax.training.cross_validation import ConfigError
from surgfusion_jax.training.runs import MissingRunError


@pytest.mark.parametrize("cls", [DatasetError, SplitError, ConfigError, PredictError,
                                 MissingRunError, PaperLookupError, PrepError, SetupError,
                                 ExperimentError, ThumbnailError])
def test_every_user_error_shares_the_base_and_exit_code(cls):
    assert issubclass(cls, errors.UserError)
    stream = io.StringIO()
    assert errors.report(cls("fix the thing"), stream=stream) == errors.EXIT_USER_ERROR == 2
    assert stream.getvalue() == "error: fix the thing\n"


def test_stop_is_a_user_error_with_its_own_code():
    stream = io.StringIO()
    code = errors.report(errors.StopRequested("stopped at epoch 4"), hint="re-run", stream=stream)
    assert code == errors.EXIT_STOPPED == 3
    assert stream.getvalue() == "stopped: stopped at epoch 4\nre-run\n"


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "results.md"
    atomic_write(str(path), "first")
    atomic_write(str(path), b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path / "sub") == ["results.md"]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write(str(path), "old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        atomic_write(str(path), "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_json_is_plain_and_nan_becomes_null(tmp_path):
    value = {"a": np.float32(0.5), "b": (1, np.int64(2)), "c": float("nan"), "d": np.arange(2),
             "e": np.bool_(True), 3: math.inf}
    assert to_jsonable(value) == {"a": 0.5, "b": [1, 2], "c": None, "d": [0, 1], "e": True,
                                  "3": None}
    path = write_json(str(tmp_path / "x.json"), value, sort_keys=True)
    assert read_json(path) == to_jsonable(value)
    assert json.loads(open(path).read()) == read_json(path)
