"""Why `layers.TemporalConv` exists: convolutions trained inside `lax.scan` on XLA's CPU.

For each layer shape it times `--steps` SGD steps of a single 1-D convolution, run
inside one `lax.scan` (as `train.train_epoch` runs an epoch) and as a Python loop of
jitted steps, once with `flax.linen.Conv` and once with `layers.TemporalConv` (the
same computation as matrix products). JSON on stdout: milliseconds per step.

  python benchmarks/conv_in_scan.py --batch=8 --length=16
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import linen as nn

from surgfusion_jax.models import layers

_BATCH = flags.DEFINE_integer("batch", 8, "Batch size B.")
_LENGTH = flags.DEFINE_integer("length", 16, "Sequence length T.")
_STEPS = flags.DEFINE_integer("steps", 4, "SGD steps per scan (an epoch).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls after one warm-up call.")

# (kernel size, in channels, out channels, groups): the branch embedding, a residual
# stage conv at d=64 and a FusionNet FFN (K=4 groups).
SHAPES = ((1, 1024, 128, 1), (3, 64, 64, 1), (3, 256, 256, 4))


def _ms_per_step(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(_REPEATS.value):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / _REPEATS.value / _STEPS.value * 1e3


def _time_module(module: nn.Module, x: jax.Array) -> dict[str, float]:
    params = module.init(jax.random.PRNGKey(0), x)

    def sgd(p, _):
        grads = jax.grad(lambda q: jnp.sum(module.apply(q, x) ** 2))(p)
        return jax.tree.map(lambda a, g: a - 1e-6 * g, p, grads), None

    scanned = jax.jit(lambda p: jax.lax.scan(sgd, p, None, length=_STEPS.value)[0])
    step = jax.jit(lambda p: sgd(p, None)[0])

    def looped(p):
        for _ in range(_STEPS.value):
            p = step(p)
        return p

    return {"scan_ms_per_step": _ms_per_step(scanned, params),
            "loop_ms_per_step": _ms_per_step(looped, params)}


def main(argv):
    del argv
    rows = []
    for k, c_in, c_out, groups in SHAPES:
        x = jax.random.normal(jax.random.PRNGKey(1), (_BATCH.value, _LENGTH.value, c_in))
        row = {"kernel_size": k, "in": c_in, "out": c_out, "groups": groups}
        row["flax_conv"] = _time_module(
            nn.Conv(c_out, (k,), padding="SAME", feature_group_count=groups, use_bias=False), x)
        row["temporal_conv"] = _time_module(
            layers.TemporalConv(c_out, k, feature_group_count=groups), x)
        rows.append(row)
    print(json.dumps({"benchmark": "conv_in_scan", "backend": jax.default_backend(),
                      "batch": _BATCH.value, "length": _LENGTH.value, "steps": _STEPS.value,
                      "results": rows}, indent=1))


if __name__ == "__main__":
    app.run(main)
