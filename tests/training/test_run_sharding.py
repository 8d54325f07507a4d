"""The run axis sharded over devices (`phase.place_runs`, `NamedSharding`): 4 forced host
devices, one run each, give the results of the same group on one device (`group_run`,
tests/training/conftest.py, shared with test_run_groups.py)."""
import json
import os
import subprocess
import sys

from cv_testutil import GROUP, assert_same_predictions


def test_runs_sharded_over_four_devices_match_one_device(group_run, data_dir, tmp_path):
    """The group's run axis sharded over 4 (forced host) devices, one run each, gives the
    results of one device (round-off as in `test_a_group_of_runs_equals_each_run_alone`)."""
    _, one = group_run
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
    assert_same_predictions(four, one, lambda model: 1e-5 if model != "fused" else 1e-3)
