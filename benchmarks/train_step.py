"""Train-step benchmark of SurgFusion-Net: time, throughput and XLA FLOPs, as JSON on stdout.

For each training phase (docs/design.md §4; 'unimodal' = the three branches with SGD, 'fusion' =
the fusion branch on frozen branches with AdamW) it jits one optimisation step on random
features [B, T, F] (all steps valid) and reports

  median_ms / mean_ms / min_ms   wall time per step after `--warmup` steps, over `--steps`
  samples_per_s                  B / median
  flops_per_step                 XLA's count: jitted.lower(...).compile().cost_analysis()
  achieved_tflops                flops_per_step / median

The step is `surgfusion_jax.training.train.train_step` with the optimiser of
`surgfusion_jax.training.train.make_optimizer` and `configs/default.py` when those import;
otherwise a local step with the same structure (Eq. 19 loss, optax SGD / AdamW) is used.
The JSON says which ("train_step_impl").

  python benchmarks/train_step.py --batch=16 --length=64 --features=256 --candidates=10
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from surgfusion_jax.models.surgfusion import SurgFusionNet

_BATCH = flags.DEFINE_integer("batch", 16, "Batch size B.")
_LENGTH = flags.DEFINE_integer("length", 64, "Segments per sample T (the training window).")
_FEATURES = flags.DEFINE_integer("features", 256, "Model width d.")
_CANDIDATES = flags.DEFINE_integer("candidates", 10, "FusionNets per DFB (K).")
_HEADS = flags.DEFINE_integer("heads", 2, "Attention heads of CSFB / DFB.")
_FEATURE_DIM = flags.DEFINE_integer("feature_dim", 1024, "Backbone feature size F.")
_FUSION = flags.DEFINE_string("fusion", "dra", "Fusion strategy.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Computation dtype (float32 | bfloat16).")
_PHASES = flags.DEFINE_list("phases", ["unimodal", "fusion"], "Phases to benchmark.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_IMPL = flags.DEFINE_enum("impl", "auto", ["auto", "library", "local"],
                          "Train step: surgfusion_jax.training.train (library), the local optax step, or library "
                          "when it imports (auto).")

_FALLBACK_OPT = {  # docs/design.md §4, used only when configs/default.py does not import
    "unimodal": dict(learning_rate=1e-2, end_learning_rate=5e-6, momentum=0.9, weight_decay=1e-4,
                     grad_clip=2.0, num_epochs=300),
    "fusion": dict(learning_rate=1e-3, end_learning_rate=5e-6, weight_decay=1e-4, grad_clip=2.0,
                   head_lr_factor=0.1, num_epochs=300),
}


def _phase_config(phase: str) -> dict:
    try:
        from configs import default
        return dict(getattr(default.get_config(), phase).to_dict())
    except Exception:  # noqa: BLE001 - the benchmark must run without the configs package
        return dict(_FALLBACK_OPT[phase])


def _library_step(model, variables, phase):
    """(state, step_fn, impl name) from surgfusion_jax.training.train, or None when unavailable."""
    try:
        from surgfusion_jax.training import train
        tx = train.make_optimizer(phase, _phase_config(phase), steps_per_epoch=1)
        state = train.create_train_state(model, variables, tx, phase)
        return state, train.train_step, "surgfusion_jax.training.train.train_step"
    except (ImportError, AttributeError, TypeError, KeyError):
        return None


def _local_step(model, variables, phase):
    """A minimal step with the same structure: Eq. 19 loss, phase optimiser, frozen branches."""
    cfg = _phase_config(phase)
    if phase == "unimodal":
        opt = optax.chain(optax.add_decayed_weights(cfg["weight_decay"]),
                          optax.sgd(cfg["learning_rate"], momentum=cfg.get("momentum", 0.9)))
        trainable = lambda top: top.startswith("branch_")  # noqa: E731
    else:
        opt = optax.adamw(cfg["learning_rate"], weight_decay=cfg["weight_decay"])
        trainable = lambda top: top == "fusion"  # noqa: E731
    labels = {k: ("train" if trainable(k) else "frozen") for k in variables["params"]}
    tx = optax.chain(optax.clip_by_global_norm(cfg["grad_clip"]),
                     optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()},
                                           lambda p: {k: jax.tree.map(lambda _: labels[k], v) for k, v in p.items()}))
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
             "opt_state": tx.init(variables["params"])}

    def step(state, batch, rng):
        d_rng, g_rng = jax.random.split(rng)

        def loss_fn(params):
            out, upd = model.apply({"params": params, "batch_stats": state["batch_stats"]}, batch["inputs"],
                                   batch["valid"], train=True, phase=phase, rngs={"dropout": d_rng, "gumbel": g_rng},
                                   mutable=["batch_stats"])
            loss = 0.0
            for score in out.values():
                err = score.astype(jnp.float32) - batch["target"]
                loss = loss + 0.5 * jnp.mean(err ** 2) + 0.5 * jnp.mean(jnp.abs(err))  # Eq. 19
            return loss, upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats, "opt_state": opt_state}
        return new, {"loss": loss}

    return state, step, "benchmarks/train_step.py local step (optax)"


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def bench_phase(phase: str, model, variables, batch) -> dict:
    variables = jax.tree.map(jnp.copy, variables)  # the step donates its state: keep ours intact
    made = _library_step(model, variables, phase) if _IMPL.value != "local" else None
    if made is None and _IMPL.value == "library":
        raise RuntimeError("--impl=library: surgfusion_jax.training.train.train_step / create_train_state / "
                           "make_optimizer are not importable.")
    state, step_fn, impl = made or _local_step(model, variables, phase)
    jitted = jax.jit(step_fn, donate_argnums=0)
    rng = jax.random.PRNGKey(_SEED.value + 1)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch, rng).compile()
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
    loss = float(jax.device_get(metrics["loss"]))
    return {"train_step_impl": impl, "median_ms": 1e3 * median, "mean_ms": 1e3 * statistics.fmean(times),
            "min_ms": 1e3 * min(times), "samples_per_s": _BATCH.value / median, "flops_per_step": flops,
            "achieved_tflops": (flops / median / 1e12) if flops else None, "compile_s": compile_s,
            "final_loss": loss, "loss_finite": bool(np.isfinite(loss))}


def main(argv):
    del argv
    b, t, f = _BATCH.value, _LENGTH.value, _FEATURE_DIM.value
    modalities = feature_dataset.MODALITIES
    model = SurgFusionNet(modalities=modalities, features=_FEATURES.value, num_candidates=_CANDIDATES.value,
                          num_heads=_HEADS.value, fusion=_FUSION.value, dtype=jnp.dtype(_DTYPE.value))
    keys = jax.random.split(jax.random.PRNGKey(_SEED.value), len(modalities) + 4)
    inputs = {m: jax.random.normal(k, (b, t, f), jnp.float32) for m, k in zip(modalities, keys)}
    valid = jnp.ones((b, t), bool)
    batch = {"inputs": inputs, "valid": valid, "weight": jnp.ones((b,), jnp.float32),
             "target": jax.random.uniform(keys[-1], (b,), jnp.float32, 0.1, 0.5)}
    variables = jax.jit(lambda r: model.init({"params": r[0], "dropout": r[1], "gumbel": r[2]},
                                             inputs, valid, train=False, phase="all"))(keys[-4:-1])
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    n_params = {top: int(sum(x.size for x in jax.tree.leaves(v))) for top, v in variables["params"].items()}
    device = jax.devices()[0]
    report = {"device": getattr(device, "device_kind", str(device)), "platform": device.platform,
              "num_devices": jax.device_count(), "jax_version": jax.__version__,
              "config": {"batch": b, "length": t, "features": _FEATURES.value, "candidates": _CANDIDATES.value,
                         "heads": _HEADS.value, "feature_dim": f, "fusion": _FUSION.value, "dtype": _DTYPE.value,
                         "steps": _STEPS.value, "warmup": _WARMUP.value},
              "params": n_params, "phases": {}}
    for phase in _PHASES.value:
        report["phases"][phase] = bench_phase(phase, model, variables, batch)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
