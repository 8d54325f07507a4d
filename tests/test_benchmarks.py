"""Smoke test: the train-step benchmark runs the library's own step and epoch (tiny shapes)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_measures_the_library(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"), "--batch=2",
           "--length=4", "--features=8", "--embed_features=8", "--candidates=2",
           "--feature_dim=8", "--steps=1", "--warmup=0", "--epoch_steps=1", "--epochs=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["train_step_impl"].startswith("surgfusion_jax.training.train")
    assert report["matmul_ceiling_gflops"] > 0
    for phase in ("unimodal", "fusion"):
        step, epoch = report["phases"][phase]["step"], report["phases"][phase]["epoch"]
        assert step["median_ms"] > 0 and step["flops_per_step"] > 0
        assert 0 < step["fraction_of_matmul_ceiling"]
        assert epoch["steps"] == 1 and epoch["ms_per_step"] > 0
    assert "pamfn" not in report  # only with --pamfn_dir
