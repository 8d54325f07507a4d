r"""Where a train step's time goes: XLA op durations of the library's `train.train_step`,
summed by the model scope recorded in each op's metadata, as JSON on stdout.

  python benchmarks/profile_step.py --phase=fusion [--batch=16 --length=64 --steps=3]

Traces `--steps` steps with `jax.profiler` (a perfetto trace under `--logdir`), maps every
executed XLA op to the `op_name` metadata of the compiled HLO (e.g.
`fusion/stage1/dfb/fusion_nets/ffn1/conv/...`), and reports milliseconds per step for the
first `--depth` levels of the scope, largest first, plus the largest single ops.

It also reports the floor that the step's matrix products set (`xla_products.py`: every
dot of the compiled step, run as one program of nothing else: `products_alone_ms`)
beside the untraced step's own median (`step_ms`); whatever else the step does
(normalisation, masks, activations, the optimizer) takes the difference (`rest_ms`).
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

import collections
import glob
import gzip
import json
import re
import shutil

import jax
import jax.numpy as jnp
from absl import app, flags

from surgfusion_jax import config_lib
from surgfusion_jax.data import feature_dataset
from surgfusion_jax.training import train

import xla_products  # benchmarks/xla_products.py, beside this script

_PHASE = flags.DEFINE_enum("phase", "fusion", list(train.PHASES), "Training phase.")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size B.")
_LENGTH = flags.DEFINE_integer("length", 64, "Segments per sample T.")
_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps.")
_DEPTH = flags.DEFINE_integer("depth", 4, "Scope levels to group by.")
_TOP = flags.DEFINE_integer("top", 25, "Scopes and ops to report.")
_LOGDIR = flags.DEFINE_string("logdir", "/tmp/surgfusion_profile", "Trace folder (replaced).")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed runs of the step and of its products alone.")

_OP = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"")
_SKIP = ("jvp(", "transpose(", "while", "body", "checkpoint", "jit(")


def main(argv):
    del argv
    b, t, f = _BATCH.value, _LENGTH.value, feature_dataset.FEATURE_DIM
    config = config_lib.resolve(config_lib.get_config())
    modalities = feature_dataset.MODALITIES
    model = train.build_model(config.model, modalities)
    keys = jax.random.split(jax.random.PRNGKey(0), len(modalities) + 2)
    batch = {"inputs": {m: jax.random.normal(k, (b, t, f)) for m, k in zip(modalities, keys)},
             "valid": jnp.ones((b, t), bool), "weight": jnp.ones((b,)),
             "target": jax.random.uniform(keys[-1], (b,), minval=0.1, maxval=0.5)}
    cfg = config[_PHASE.value]
    state = train.create_train_state(model, train.init_variables(model, keys[-2], f, length=t),
                                     train.phase_optimizer(config, _PHASE.value), _PHASE.value,
                                     learning_rate=cfg.learning_rate)
    compiled = jax.jit(train.train_step).lower(state, batch, keys[0]).compile()
    scope = {m.group(1): m.group(2) for m in map(_OP.match, compiled.as_text().splitlines()) if m}
    step_s = xla_products.median_s(compiled, state, batch, keys[0], repeats=_REPEATS.value)
    floor = xla_products.products_alone(xla_products.products(compiled.as_text()),
                                        _REPEATS.value)
    shutil.rmtree(_LOGDIR.value, ignore_errors=True)
    with jax.profiler.trace(_LOGDIR.value, create_perfetto_trace=True):
        for _ in range(_STEPS.value):
            jax.block_until_ready(compiled(state, batch, keys[0]))
    (path,) = glob.glob(f"{_LOGDIR.value}/**/*.trace.json.gz", recursive=True)
    events = json.load(gzip.open(path))["traceEvents"]
    by_scope, by_op = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name not in scope:  # XLA ops only (no runtime wrappers)
            continue
        by_op[name] += e["dur"]
        parts = [p for p in scope[name].split("/") if p and not p.startswith(_SKIP)]
        by_scope["/".join(parts[:_DEPTH.value])] += e["dur"]
    per_step = lambda us: us / _STEPS.value / 1e3  # noqa: E731
    print(json.dumps({
        "phase": _PHASE.value, "batch": b, "length": t, "steps": _STEPS.value,
        "step_ms": 1e3 * step_s, **floor,
        "rest_ms": 1e3 * step_s - floor["products_alone_ms"],
        "xla_ops_ms_per_step": per_step(sum(by_op.values())),
        "by_scope_ms": {k: per_step(v) for k, v in by_scope.most_common(_TOP.value)},
        "top_ops_ms": {f"{k} {scope[k]}": per_step(v) for k, v in by_op.most_common(_TOP.value)},
    }, indent=1))


if __name__ == "__main__":
    app.run(main)
