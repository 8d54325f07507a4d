"""`surgfusion_jax.errors` (one base for user errors, shared exit codes) and atomic
writes (`surgfusion_jax.io`, the feature dataset, the prep cache), also on a full disk."""
import errno
import io
import json
import math
import os

import numpy as np
import pytest

from data_prep import cache
from data_prep.common import PrepError
from data_prep.synthskill_setup import SetupError
from experiments.spec import ExperimentError
from experiments.thumbnails import ThumbnailError
from surgfusion_jax import errors
from surgfusion_jax.data.feature_dataset import (DatasetError, load_feature_dataset,
                                                 write_feature_dataset)
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


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_old_results_file_and_names_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "run" / "results.json"
    write_json(str(path), {"scc": 0.5})
    monkeypatch.setattr(os, "replace", _no_space)
    with pytest.raises(errors.DiskFullError) as info:
        write_json(str(path), {"scc": 0.9})
    monkeypatch.undo()
    assert read_json(str(path)) == {"scc": 0.5} and os.listdir(path.parent) == ["results.json"]
    line = f"{info.value}"
    assert line.startswith(f"the disk is full: could not write in {path.parent} (")
    assert "\n" not in line and isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOSPC and errors.is_disk_full(info.value)


def test_a_full_disk_keeps_the_old_feature_dataset(tmp_path, monkeypatch):
    import tensorflow as tf

    meta = dict(backbone="test", fps=10, segment_length=32, modalities=["rgb"])

    def examples(score):
        return [dict(video_id=f"v{i}", score=score, rgb=np.ones((3, 4)) * i) for i in range(3)]

    write_feature_dataset(str(tmp_path), "d", examples(10.0), meta, feature_dim=4)
    real = tf.io.TFRecordWriter

    class FillsUp(real):
        def write(self, record):  # the second record does not fit
            self.count = getattr(self, "count", 0) + 1
            if self.count == 2:
                _no_space()
            super().write(record)

    monkeypatch.setattr(tf.io, "TFRecordWriter", FillsUp)
    with pytest.raises(errors.DiskFullError, match=f"could not write in {tmp_path}"):
        write_feature_dataset(str(tmp_path), "d", examples(20.0), meta, feature_dim=4)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["d"]  # no staging folder left
    old = load_feature_dataset(str(tmp_path), "d")
    assert [s["score"] for s in old.samples] == [10.0] * 3


def test_a_full_disk_keeps_the_old_prep_cache_entry(tmp_path, monkeypatch):
    cache.save(str(tmp_path), "vid 1", "aaaa", {"rgb": np.ones((2, 4), np.float32)})
    monkeypatch.setattr(np, "savez", _no_space)
    with pytest.raises(errors.DiskFullError, match=str(tmp_path)):
        cache.save(str(tmp_path), "vid 1", "bbbb", {"rgb": np.zeros((2, 4), np.float32)})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [os.path.basename(cache.entry_path(str(tmp_path), "vid 1",
                                                                      "aaaa"))]
    assert cache.load(str(tmp_path), "vid 1", "aaaa", ["rgb"])["rgb"].sum() == 8
