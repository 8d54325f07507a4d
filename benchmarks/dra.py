"""DRA at long sequences: time and peak memory against Flax's attention (docs/design.md §3.8).

Self-attention over q = k = L tokens (default 1k, 4k, 16k) for three layers with the same
projections: Flax's `MultiHeadDotProductAttention`, DRA dense and DRA with
`query_block_size` (the memory-bounded two-pass path), all in the adaptive, diversified
form for DRA unless `--mixing/--no-diversify` say otherwise. Each (layer, L) runs in a
fresh subprocess, so its peak resident memory (CPU) or peak device memory (GPU) is its
own: `peak_memory_bytes` is the high-water mark (resident memory on CPU, device memory
otherwise) over the warm-up and timed calls, reset after compiling, and
`peak_above_baseline_bytes` what the calls added to the memory in use before them
(the JAX runtime, parameters and inputs make the baseline). A dense layer whose XLA
buffer plan does not fit in the available memory is reported as skipped, with the plan's
size. Before timing, the blockwise output is checked against
the dense one at every length where the dense layer runs (max |diff| <= --tolerance).
JSON on stdout; any failure of the DRA paths exits non-zero.

  python benchmarks/dra.py                        # L = 1024, 4096, 16384
  python benchmarks/dra.py --lengths=512 --repeats=2 --warmup=0
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import linen as nn

from surgfusion_jax.models.dra import DRA

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "4096", "16384"], "Sequence lengths q = k.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 32, "Features per head.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_BLOCK = flags.DEFINE_integer("block", 512, "query_block_size of the blockwise path.")
_MIXING = flags.DEFINE_enum("mixing", "adaptive", ["adaptive", "positive", "negative"],
                            "DRA mixing.")
_DIVERSIFY = flags.DEFINE_bool("diversify", True, "DRA diversification (Eqs. 14-17).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per layer (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls before the timed ones.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-5, "Max |blockwise - dense| allowed.")
_MEMORY_FRACTION = flags.DEFINE_float(
    "memory_fraction", 0.6, "Skip a layer whose XLA buffer plan exceeds this fraction of "
    "the available memory.")
_ONE = flags.DEFINE_string("one", None, "Internal: run one 'layer:length' and print JSON.")

LAYERS = ("flax_mha", "dra_dense", "dra_blockwise")


def _module(layer: str) -> nn.Module:
    features = _HEADS.value * _HEAD_DIM.value
    if layer == "flax_mha":
        return nn.MultiHeadDotProductAttention(num_heads=_HEADS.value, qkv_features=features)
    block = _BLOCK.value if layer == "dra_blockwise" else None
    return DRA(num_heads=_HEADS.value, qkv_features=features, mixing=_MIXING.value,
               diversify=_DIVERSIFY.value, query_block_size=block)


def _inputs(length: int) -> jax.Array:
    features = _HEADS.value * _HEAD_DIM.value
    return jax.random.normal(jax.random.key(0), (_BATCH.value, length, features))


def _params(length: int):
    # One set of parameters (DRA's: Flax's layer ignores `alpha_mlp`), from a short input.
    short = _inputs(min(length, 8))
    return DRA(num_heads=_HEADS.value, qkv_features=_HEADS.value * _HEAD_DIM.value,
               mixing="adaptive").init(jax.random.key(1), short)


def _available_bytes() -> int:
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return int(stats.get("bytes_limit", 0)) - int(stats.get("bytes_in_use", 0))
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status[field].split()[0]) * 1024


def _reset_peak() -> int:
    """Starts a new peak-memory window; returns the memory in use now (bytes)."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return int((device.memory_stats() or {}).get("bytes_in_use", -1))
    try:  # Linux: writing 5 resets the resident high-water mark (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _proc_status("VmRSS")


def _peak_bytes() -> int:
    """Peak device memory (GPU/TPU) or peak resident memory (CPU) since `_reset_peak`."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return int((device.memory_stats() or {}).get("peak_bytes_in_use", -1))
    try:
        return _proc_status("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_one(spec: str) -> dict:
    layer, length = spec.split(":")
    length = int(length)
    module, x, variables = _module(layer), _inputs(length), _params(length)
    if layer == "flax_mha":
        variables = {"params": {k: v for k, v in variables["params"].items()
                                if k != "alpha_mlp"}}
    fn = jax.jit(lambda v, x: module.apply(v, x))
    start = time.perf_counter()
    compiled = fn.lower(variables, x).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    plan = int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
               + memory.output_size_in_bytes) if memory is not None else -1
    result = {"layer": layer, "length": length, "compile_s": round(compile_s, 3),
              "xla_buffer_plan_bytes": plan}
    if plan > _MEMORY_FRACTION.value * _available_bytes():
        if layer == "dra_blockwise":
            raise MemoryError(f"the blockwise path's buffer plan ({plan} B) does not fit")
        result["skipped"] = (f"buffer plan {plan / 2**30:.1f} GiB exceeds "
                             f"{_MEMORY_FRACTION.value:.0%} of the available memory")
        return result
    baseline = _reset_peak()
    for _ in range(_WARMUP.value):
        jax.block_until_ready(compiled(variables, x))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(variables, x))
        times.append(time.perf_counter() - start)
    if not np.all(np.isfinite(np.asarray(out))):
        raise FloatingPointError(f"{layer} at L={length}: non-finite output")
    peak = _peak_bytes()
    result.update(time_s=round(statistics.median(times), 4), peak_memory_bytes=peak,
                  peak_above_baseline_bytes=peak - baseline)
    return result


def _check(length: int) -> dict:
    """Blockwise vs dense DRA on the same parameters (run in its own subprocess)."""
    x, variables = _inputs(length), _params(length)
    dense = jax.jit(lambda v, x: _module("dra_dense").apply(v, x)).lower(variables, x).compile()
    memory = dense.memory_analysis()
    plan = memory.temp_size_in_bytes + memory.argument_size_in_bytes if memory else 0
    if plan > _MEMORY_FRACTION.value * _available_bytes():
        return {"length": length, "max_abs_diff": None, "skipped": "dense DRA does not fit"}
    want = dense(variables, x)
    got = jax.jit(lambda v, x: _module("dra_blockwise").apply(v, x))(variables, x)
    diff = float(jnp.max(jnp.abs(got - want)))
    if not diff <= _TOLERANCE.value:
        raise AssertionError(f"blockwise DRA differs from dense by {diff} at L={length}")
    return {"length": length, "max_abs_diff": diff}


def _child(spec: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), f"--one={spec}"] + [
        a for a in sys.argv[1:] if not a.startswith("--one")]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if _ONE.value:
        kind, length = _ONE.value.split(":")
        result = _check(int(length)) if kind == "check" else _run_one(_ONE.value)
        print(json.dumps(result))
        return
    report = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
              "heads": _HEADS.value, "head_dim": _HEAD_DIM.value, "batch": _BATCH.value,
              "block": _BLOCK.value, "mixing": _MIXING.value, "diversify": _DIVERSIFY.value,
              "repeats": _REPEATS.value, "warmup": _WARMUP.value, "checks": [], "runs": []}
    for length in map(int, _LENGTHS.value):
        report["checks"].append(_child(f"check:{length}"))
        for layer in LAYERS:
            report["runs"].append(_child(f"{layer}:{length}"))
            print(json.dumps(report["runs"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
