"""The same config run twice gives identical results files on CPU (docs/design.md §9:
what is and is not deterministic on a GPU).

The fast test re-runs the tiny config of the session's `full_run` (tests/training/
conftest.py; often trained by another test process, whose compiled programs it then reads
from the suite's compilation cache); the slow one compiles afresh, twice in one process."""
import json
import os

import jax
import pytest

from cv_testutil import tiny_config, write_features
from surgfusion_jax.training import cross_validation as cv

# Keys that describe the run rather than its numbers (another engineer's provenance
# block: versions, git commit, time) and wall-clock timings.
VOLATILE = ("provenance", "time", "timing", "timings", "seconds", "wall_s", "created",
            "started", "finished", "duration_s")


def _numbers(path):
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in VOLATILE}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    with open(path, encoding="utf-8") as f:
        return json.dumps(strip(json.load(f)), sort_keys=True)


def _same_results(a, b):
    assert _numbers(a / "results.json") == _numbers(b / "results.json")
    for name in ("splits.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    md = [(d / "results.md").read_text().replace(str(d), "<workdir>") for d in (a, b)]
    assert md[0] == md[1]
    assert "predictions" in _numbers(a / "results.json")  # per-video numbers are compared


def test_the_same_config_twice_gives_identical_results(full_run, data_dir, tmp_path):
    reference, _ = full_run
    cv.run_cross_validation(tiny_config(data_dir, "noise"), str(tmp_path))
    _same_results(tmp_path, type(tmp_path)(reference))


@pytest.mark.slow
def test_the_same_config_compiled_twice_gives_identical_results(tmp_path):
    write_features(tmp_path / "features", "noise", seed=0, signal=False)
    config = tiny_config(tmp_path / "features", "noise", unimodal__num_epochs=2,
                     fusion__num_epochs=2)
    written = []
    for name in ("a", "b"):
        jax.clear_caches()  # the second run compiles afresh, as a new process would
        cv.run_cross_validation(config, str(tmp_path / name))
        written.append(tmp_path / name)
    _same_results(*written)
    assert os.path.exists(written[0] / "checkpoints")
