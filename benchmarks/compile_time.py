r"""Time to the first epoch: how long one tiny cross-validation spends tracing and
compiling the library's programs, as JSON on stdout.

  python benchmarks/compile_time.py [--features=16] [--candidates=3] [--epochs=2]
  XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" \
      python benchmarks/compile_time.py   # the test suite's flags (tests/conftest.py)

The run is tiny (12 videos of 3-8 segments, 2 folds, `config_lib.small` widths), so
nearly all of its wall time is JAX tracing and XLA compilation, which every run of
`python -m surgfusion_jax.main` pays before its first epoch whatever the data size
(the program is the same size at paper shapes). Reported: wall seconds, and per jitted
function (`train_epochs` twice: the unimodal then the fusion phase) the seconds spent
tracing, lowering to StableHLO and compiling, from JAX's own monitoring events.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from jax import monitoring

from surgfusion_jax import config_lib
from surgfusion_jax.data import feature_dataset
from surgfusion_jax.training import cross_validation

_FEATURES = flags.DEFINE_integer("features", 0, "Model width d (0: config_lib.small's).")
_CANDIDATES = flags.DEFINE_integer("candidates", 0, "FusionNets per DFB (0: small's).")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs per phase.")

_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
           "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
           "/jax/core/compile/backend_compile_duration": "compile_s"}


def main(argv):
    del argv
    calls: list[dict] = []
    totals: collections.Counter = collections.Counter()

    def listen(event, duration, **kwargs):
        if event in _EVENTS:
            totals[_EVENTS[event]] += duration
            if duration >= 0.2:  # the large programs; the rest is summed in `totals`
                calls.append({"function": kwargs.get("fun_name", "?"),
                              "stage": _EVENTS[event], "seconds": round(duration, 2)})

    monitoring.register_event_duration_secs_listener(listen)
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        dim = 8
        meta = dict(backbone="synthetic", fps=10, segment_length=32,
                    modalities=list(feature_dataset.MODALITIES),
                    **feature_dataset.ScoreScale("custom", 0.0, 30.0).metadata())
        lengths = rng.integers(3, 9, size=12)
        examples = [dict(video_id=f"v{i:02d}", score=float(rng.uniform(8, 28)),
                         **{m: rng.normal(size=(int(n), dim))
                            for m in feature_dataset.MODALITIES})
                    for i, n in enumerate(lengths)]
        feature_dataset.write_feature_dataset(os.path.join(root, "features"), "toy", examples,
                                              meta, feature_dim=dim)
        config = config_lib.small(config_lib.get_config())
        config.data.data_dir, config.data.name, config.data.window = (
            os.path.join(root, "features"), "toy", 4)
        if _FEATURES.value:
            config.model.features = _FEATURES.value
        if _CANDIDATES.value:
            config.model.num_candidates = _CANDIDATES.value
        config.cv.num_folds = 2
        config.unimodal.num_epochs = config.fusion.num_epochs = _EPOCHS.value
        config.unimodal.batch_size = config.fusion.batch_size = 4
        config.eval_batch_size, config.min_bucket, config.progress_bar = 4, 8, False
        t0 = time.perf_counter()
        cross_validation.run_cross_validation(config, os.path.join(root, "run"))
        wall = time.perf_counter() - t0
    print(json.dumps({
        "wall_s": round(wall, 1), **{k: round(v, 1) for k, v in totals.items()},
        "programs": calls, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_version": jax.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    app.run(main)
