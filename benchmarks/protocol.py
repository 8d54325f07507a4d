r"""The whole RARP-shaped protocol timed end to end, as JSON on stdout.

  python benchmarks/protocol.py --seeds=1,10 [--epochs=300] [--max_runs_per_program=0]

A synthetic feature dataset shaped like RARP-skill (33 videos of 4-60 segments, 1024-d
features, scores 18-28) is written to a temporary folder and trained with the paper's
RARP config (`configs/rarp.py`: d = 256, K = 10, 2 heads, batch 16, 4-fold CV, test
evaluation after every epoch), `--epochs` + `--epochs` epochs, once per entry of
`--seeds` (`config.num_seeds`: every fold x seed in one program, `max_runs_per_program`
to split). Reported per entry: wall seconds in all (compilation included), the number
of runs, and seconds per run-epoch. Runs on whatever JAX finds (CPU here; a GPU after
`pip install -e .[cuda12]`).
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from surgfusion_jax import config_lib
from surgfusion_jax.data import feature_dataset
from surgfusion_jax.training import cross_validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SEEDS = flags.DEFINE_list("seeds", ["1", "10"], "Values of config.num_seeds to time.")
_EPOCHS = flags.DEFINE_integer("epochs", 300, "Epochs per phase (the paper: 300).")
_VIDEOS = flags.DEFINE_integer("videos", 33, "Videos (RARP-skill: 33).")
_MAX_RUNS = flags.DEFINE_integer("max_runs_per_program", 0, "Runs per program (0: all).")
_SEED = flags.DEFINE_integer("data_seed", 0, "Seed of the synthetic features.")


def write_dataset(data_dir: str) -> None:
    rng = np.random.default_rng(_SEED.value)
    examples = []
    for i in range(_VIDEOS.value):
        n = int(rng.integers(4, 61))
        examples.append({"video_id": f"rarp{i:02d}", "score": float(rng.uniform(18, 28)),
                         **{m: rng.normal(size=(n, feature_dataset.FEATURE_DIM)).astype(np.float32)
                            for m in feature_dataset.MODALITIES}})
    meta = {"backbone": "synthetic", "fps": 10, "segment_length": 32,
            "modalities": list(feature_dataset.MODALITIES)}
    feature_dataset.write_feature_dataset(data_dir, "rarp_shaped", examples, meta)


def main(argv):
    del argv
    report = {"device": str(jax.devices()[0]), "platform": jax.devices()[0].platform,
              "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
              "jax_version": jax.__version__, "python": platform.python_version(),
              "epochs_per_phase": _EPOCHS.value, "videos": _VIDEOS.value, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp)
        for seeds in map(int, _SEEDS.value):
            config = config_lib.load_config_file(os.path.join(REPO, "configs", "rarp.py"))
            config.data.data_dir, config.data.name = tmp, "rarp_shaped"
            config.num_seeds, config.max_runs_per_program = seeds, _MAX_RUNS.value
            config.unimodal.num_epochs = config.fusion.num_epochs = _EPOCHS.value
            config.checkpoint_every_epochs = _EPOCHS.value
            config.progress_bar = False
            workdir = os.path.join(tmp, f"run_{seeds}")
            start = time.perf_counter()
            results, run = cross_validation.run_cross_validation(config, workdir)
            wall = time.perf_counter() - start
            runs = len(run.members())
            report["runs"].append({
                "num_seeds": seeds, "runs": runs, "programs": len(run.groups()),
                "wall_s": wall, "s_per_run_epoch": wall / (runs * 2 * _EPOCHS.value),
                "fused_final_scc": results["summary"]["fused"]["final"]["scc_mean"]})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
