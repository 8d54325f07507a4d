r"""Train-step benchmark of the library's own training code, as JSON on stdout.

  python benchmarks/train_step.py --batch=16 --length=64 --features=256 --candidates=10 \
      [--pamfn_dir=/path/to/PAMFN --torch_python=/path/to/python-with-torch]

For each phase (docs/design.md §4: 'unimodal' trains the three branches with SGD,
'fusion' the fusion branch on the frozen branches with AdamW) it builds the model, the
optimizer and the TrainState exactly as training does (`config_lib.get_config`,
`train.build_model`, `train.phase_optimizer`, `train.create_train_state`) and times

  step    one jitted `train.train_step` on a random batch [B, T, F] (all steps valid):
          median / mean / min ms after `--warmup` steps over `--steps`, samples/s,
          XLA's FLOP count of the compiled step, the achieved GFLOP/s and its fraction
          of the measured matmul ceiling (a jitted 2048 x 2048 float32 product on the
          same device), the step's matrix products alone, as one program of nothing
          else (`xla_products.py`: the floor that XLA's product kernels set under this
          step), and the optimizer update alone on the same parameters;
  epoch   the real scanned epoch `train.train_epoch` (shuffle, window sampling and
          `--epoch_steps` steps in one `lax.scan`) on device-resident data: ms per step.

Nothing falls back to a stand-in: if the library's signatures change, this fails.
With `--pamfn_dir`, PAMFN's own PyTorch step (`benchmarks/pamfn_step.py`, run by
`--torch_python`, a Python that has torch; never the project's venv) is timed at the
same shapes in the same run, and the JSON gives the speed ratios PAMFN ms / ours ms
(> 1: ours is faster), and PAMFN ms / (our products alone + our optimizer update alone):
the most that a step built on XLA's product kernels and this optimizer could reach here,
were everything else it does (normalisation, masks, activations, attention) free.
Ours trains the three branches in one step; PAMFN trains one branch per run, so the
unimodal comparison is per branch (ours / 3).
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from surgfusion_jax import config_lib
from surgfusion_jax.data import feature_dataset, input_pipeline
from surgfusion_jax.training import train

import xla_products  # benchmarks/xla_products.py, beside this script

_BATCH = flags.DEFINE_integer("batch", 16, "Batch size B.")
_LENGTH = flags.DEFINE_integer("length", 64, "Segments per sample T (the training window).")
_FEATURES = flags.DEFINE_integer("features", 256, "Model width d.")
_EMBED = flags.DEFINE_integer("embed_features", 512, "Branch embedding width.")
_CANDIDATES = flags.DEFINE_integer("candidates", 10, "FusionNets per DFB (K).")
_HEADS = flags.DEFINE_integer("heads", 2, "Attention heads of CSFB / DFB.")
_FEATURE_DIM = flags.DEFINE_integer("feature_dim", 1024, "Input feature width F.")
_FUSION = flags.DEFINE_string("fusion", "dra", "Fusion strategy.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Computation dtype (float32 | bfloat16).")
_PHASES = flags.DEFINE_list("phases", list(train.PHASES), "Phases to benchmark.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_EPOCH_STEPS = flags.DEFINE_integer("epoch_steps", 8, "Steps of the timed scanned epoch (0: skip).")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Timed epochs (median reported).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_PAMFN_DIR = flags.DEFINE_string("pamfn_dir", None, "Checkout of github.com/qinghuannn/PAMFN.")
_TORCH_PYTHON = flags.DEFINE_string("torch_python", None, "A Python with torch (for PAMFN).")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch threads for PAMFN (0: default).")


def matmul_ceiling_gflops(n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a jitted n x n float32 matrix product on the default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    product = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(product(a, a))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(product(a, a))
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _config():
    config = config_lib.resolve(config_lib.get_config())
    config.model.features = _FEATURES.value
    config.model.embed_features = _EMBED.value
    config.model.num_candidates = _CANDIDATES.value
    config.model.num_heads = _HEADS.value
    config.model.fusion = _FUSION.value
    config.model.dtype = _DTYPE.value
    return config


def _state(config, model, variables, phase):
    cfg = config[phase]
    return train.create_train_state(model, jax.tree.map(jnp.copy, variables),
                                    train.phase_optimizer(config, phase), phase,
                                    learning_rate=cfg.learning_rate,
                                    loss_alpha=config.loss_alpha)


def bench_update(state) -> float:
    """Median ms of the phase's optimizer update alone (`TrainState.apply_gradients`: the
    library's optax chain, donated as in the step) on gradients of ones: work that every
    step does beside its products, bound by memory traffic over the parameters."""
    grads = jax.tree.map(jnp.ones_like, state.params)
    update = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)
    state = update(jax.tree.map(jnp.copy, state), grads)
    times = []
    for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        state = jax.block_until_ready(update(state, grads))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_step(state, batch, ceiling: float) -> dict:
    update_ms = bench_update(state)
    step = jax.jit(train.train_step, donate_argnums=0)
    rng = jax.random.PRNGKey(_SEED.value + 1)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    flops = _flops(compiled)
    times = []
    for i in range(_WARMUP.value + _STEPS.value):
        rng, key = jax.random.split(rng)
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready((state, metrics))
        if i >= _WARMUP.value:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"the benchmarked step gave a non-finite loss {loss}")
    gflops = flops / median / 1e9 if flops else None
    floor = xla_products.products_alone(xla_products.products(compiled.as_text()),
                                        _STEPS.value)
    return {**floor, "optimizer_update_alone_ms": update_ms,
            "median_ms": 1e3 * median, "mean_ms": 1e3 * statistics.fmean(times),
            "min_ms": 1e3 * min(times), "samples_per_s": _BATCH.value / median,
            "flops_per_step": flops, "gflops_per_s": gflops,
            "fraction_of_matmul_ceiling": gflops / ceiling if gflops else None,
            "compile_s": compile_s, "loss": loss}


def bench_epoch(state, data, batch_size: int, window: int) -> dict:
    steps = _EPOCH_STEPS.value
    padded = jnp.asarray(input_pipeline.pad_indices(np.arange(data.num_videos), data.num_videos))
    num_train = jnp.int32(data.num_videos)
    lr = jnp.float32(1e-3)

    def run(state, epoch):
        return train.train_epoch(state, data, padded, num_train,
                                 jax.random.fold_in(jax.random.PRNGKey(_SEED.value), epoch),
                                 lr, window=window, batch_size=batch_size, steps=steps)

    t0 = time.perf_counter()
    state, metrics = run(state, 0)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - t0  # compile + one epoch
    times = []
    for epoch in range(1, _EPOCHS.value + 1):
        t0 = time.perf_counter()
        state, metrics = run(state, epoch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"steps": steps, "ms_per_step": 1e3 * median / steps,
            "samples_per_s": batch_size * steps / median, "first_epoch_s": first_s,
            "loss": float(metrics["loss"])}


def run_pamfn() -> dict:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pamfn_step.py")
    cmd = [_TORCH_PYTHON.value or sys.executable, script, f"--pamfn_dir={_PAMFN_DIR.value}",
           f"--batch={_BATCH.value}", f"--length={_LENGTH.value}",
           f"--features={_FEATURES.value}", f"--feature_dim={_FEATURE_DIM.value}",
           f"--candidates={_CANDIDATES.value}", f"--heads={_HEADS.value}",
           f"--steps={_STEPS.value}", f"--warmup={_WARMUP.value}",
           f"--threads={_THREADS.value}", f"--phases={','.join(_PHASES.value)}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"PAMFN step failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def main(argv):
    del argv
    b, t, f = _BATCH.value, _LENGTH.value, _FEATURE_DIM.value
    modalities = feature_dataset.MODALITIES
    config = _config()
    model = train.build_model(config.model, modalities)
    keys = jax.random.split(jax.random.PRNGKey(_SEED.value), len(modalities) + 2)
    inputs = {m: jax.random.normal(k, (b, t, f), jnp.float32) for m, k in zip(modalities, keys)}
    batch = {"inputs": inputs, "valid": jnp.ones((b, t), bool),
             "weight": jnp.ones((b,), jnp.float32),
             "target": jax.random.uniform(keys[-1], (b,), jnp.float32, 0.1, 0.5)}
    variables = train.init_variables(model, keys[-2], f, length=t)
    rng = np.random.default_rng(_SEED.value)
    samples = [{"video_id": f"v{i}", "score": float(rng.uniform(6, 30)), "num_segments": t,
                **{m: rng.normal(size=(t, f)).astype(np.float32) for m in modalities}}
               for i in range(b * max(_EPOCH_STEPS.value, 1))]
    data = input_pipeline.make_device_data(samples, modalities, 30.0, window=t)
    ceiling = matmul_ceiling_gflops()
    device = jax.devices()[0]
    report = {"device": getattr(device, "device_kind", str(device)), "platform": device.platform,
              "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
              "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              # surgfusion_jax.runtime; PAMFN's process inherits the same environment
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
              "matmul_ceiling_gflops": ceiling,
              "config": {"batch": b, "length": t, "features": _FEATURES.value,
                         "embed_features": _EMBED.value, "candidates": _CANDIDATES.value,
                         "heads": _HEADS.value, "feature_dim": f, "fusion": _FUSION.value,
                         "dtype": _DTYPE.value, "steps": _STEPS.value, "warmup": _WARMUP.value},
              "train_step_impl": "surgfusion_jax.training.train.train_step / train_epoch",
              "params": {top: int(sum(x.size for x in jax.tree.leaves(v)))
                         for top, v in variables["params"].items()},
              "phases": {}}
    for phase in _PHASES.value:
        state = _state(config, model, variables, phase)
        entry = {"step": bench_step(state, batch, ceiling)}
        if _EPOCH_STEPS.value:
            entry["epoch"] = bench_epoch(_state(config, model, variables, phase), data, b, t)
        report["phases"][phase] = entry
    if _PAMFN_DIR.value:
        pamfn = run_pamfn()
        report["pamfn"] = pamfn
        ratios = {}
        ours = report["phases"]
        bounds = {}
        for phase, theirs, branches in (("unimodal", "unimodal_per_branch", len(modalities)),
                                        ("fusion", "fusion", 1)):
            if phase in ours and theirs in pamfn["phases"]:
                step, pamfn_ms = ours[phase]["step"], pamfn["phases"][theirs]["median_ms"]
                ratios[theirs] = pamfn_ms / (step["median_ms"] / branches)
                floor_ms = step["products_alone_ms"] + step["optimizer_update_alone_ms"]
                bounds[theirs] = pamfn_ms / (floor_ms / branches)
        report["speedup_vs_pamfn"] = ratios
        report["speedup_vs_pamfn_if_only_products_and_update"] = bounds
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
