"""Two-phase training of SurgFusion-Net: pure, jitted steps and epochs (paper §IV-B; docs/design.md §4).

Phase (a) 'unimodal': the three branches, loss summed over their heads, SGD (momentum
0.9, weight decay 1e-4), cosine learning rate 1e-2 -> 5e-6. Phase (b) 'fusion': the
fusion branch on the frozen branches, AdamW (weight decay 1e-4), cosine 1e-3 -> 5e-6,
the fusion regression head at `head_lr_factor` x the rate (MAQA). Both phases clip the
gradient's global norm (MAQA: 2) and minimise Eq. 19 (`losses.skill_loss`) against the
targets 0.5 * score / score_max.

Decisions:
  * Parameters a phase does not train get no update at all (`optax.multi_transform` with
    `optax.set_to_zero`, so no weight decay or momentum either): in phase (a) the fusion
    branch, in phase (b) the branches. Phase (b) also keeps the branches' BatchNorm
    statistics as they were (the model runs them with running averages).
  * The cosine schedule is stepped once per epoch, like PyTorch's CosineAnnealingLR in
    MAQA: lr(e) = end + (peak - end) (1 + cos(pi e / num_epochs)) / 2 for epoch e, i.e.
    `optax.cosine_decay_schedule(peak, num_epochs, alpha=end / peak)` at the epoch index
    (`learning_rate_schedule`), passed to the epoch as an injected hyperparameter.
  * One jitted `train_epoch` shuffles, samples windows and runs all steps of an epoch
    with `lax.scan` (no host round trip per step). Its arguments have the same shapes
    for every fold (training indices padded to the dataset size, their count traced),
    so it compiles once per phase, and it is free of side effects: folds or seeds can be
    `vmap`ped over state, indices, count, key and learning rate.
  * Evaluation runs per length bucket (`input_pipeline.make_eval_plan`); `predict_batch`
    compiles at most once per bucket and phase.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax.training import train_state

from surgfusion_jax.data import input_pipeline
from surgfusion_jax.errors import StopRequested
from surgfusion_jax.evaluation import metrics
from surgfusion_jax.models import losses
from surgfusion_jax.models.surgfusion import SurgFusionNet

Array = jax.Array
PHASES = ("unimodal", "fusion")


class TrainState(train_state.TrainState):
    """flax TrainState plus BatchNorm statistics and the (static) training phase."""

    batch_stats: Any = None
    phase: str = flax.struct.field(pytree_node=False, default="unimodal")
    loss_alpha: float = flax.struct.field(pytree_node=False, default=0.5)


def build_model(model_config: Mapping[str, Any], modalities: Sequence[str]) -> SurgFusionNet:
    """SurgFusionNet from `config.model`."""
    return SurgFusionNet(
        modalities=tuple(modalities), features=int(model_config["features"]),
        embed_features=int(model_config["embed_features"]),
        num_candidates=int(model_config["num_candidates"]),
        num_heads=int(model_config["num_heads"]), fusion=str(model_config["fusion"]),
        use_dfb=bool(model_config["use_dfb"]), dtype=jnp.dtype(model_config["dtype"]))


@functools.lru_cache(maxsize=16)
def _canonical(model: Any) -> Any:
    """One object per distinct (hashable, value-compared) module: `model.apply` of equal
    models is then the same bound method, a static part of every TrainState, so the
    jitted functions do not recompile for a new but equal model."""
    return model


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init(model: SurgFusionNet, rng: Array, feature_dim: int, length: int) -> Any:
    inputs = {m: jnp.zeros((1, length, feature_dim), jnp.float32) for m in model.modalities}
    p, d, g = jax.random.split(rng, 3)
    return model.init({"params": p, "dropout": d, "gumbel": g}, inputs,
                      jnp.ones((1, length), bool), train=False, phase="all")


def init_variables(model: SurgFusionNet, rng: Array, feature_dim: int, length: int = 8
                   ) -> dict[str, Any]:
    """Every parameter and BatchNorm statistic of the model (phase='all')."""
    variables = _init(model, rng, int(feature_dim), int(length))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def abstract_variables(model: SurgFusionNet, feature_dim: int, length: int = 8) -> Any:
    """Shapes and dtypes of `init_variables` (traced, not compiled or run)."""
    return jax.eval_shape(lambda rng: init_variables(model, rng, feature_dim, length),
                          jax.random.PRNGKey(0))


def param_labels(params: Any, phase: str) -> Any:
    """'train' / 'head' / 'frozen' per parameter for `phase` (see module docstring)."""
    def label(path, _):
        top = path[0].key
        if phase == "unimodal":
            return "train" if top.startswith("branch_") else "frozen"
        if top != "fusion":
            return "frozen"
        return "head" if any("head" in str(getattr(k, "key", "")).lower() for k in path[1:]) \
            else "train"
    return jax.tree_util.tree_map_with_path(label, params)


def learning_rate_schedule(cfg: Mapping[str, Any]):
    """epoch index (0-based) -> learning rate: cosine from `learning_rate` to
    `end_learning_rate` over `num_epochs` (PyTorch CosineAnnealingLR, stepped per epoch)."""
    peak = float(cfg["learning_rate"])
    return optax.cosine_decay_schedule(peak, max(int(cfg["num_epochs"]), 1),
                                       alpha=float(cfg["end_learning_rate"]) / peak)


def make_optimizer(phase: str, cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    """The optimizer of `phase` from `config.unimodal` / `config.fusion` (module docstring).

    The learning rate is an injected hyperparameter (`optax.inject_hyperparams`), set by
    `create_train_state` and at the start of each epoch by `train_epoch`, so neither the
    optimizer nor the compiled epoch depends on the learning rates or the epoch count.
    Equal arguments return the same object: the jitted functions, whose cache keys
    include it, compile once per process for all folds and runs.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    keys = ("weight_decay", "grad_clip")
    keys += ("momentum",) if phase == "unimodal" else ("head_lr_factor",)
    return _make_optimizer(phase, tuple((k, float(cfg[k])) for k in keys))


@functools.lru_cache(maxsize=64)
def _make_optimizer(phase: str, items: tuple) -> optax.GradientTransformation:
    cfg = dict(items)

    def build(learning_rate):
        if phase == "unimodal":
            train = optax.chain(optax.add_decayed_weights(cfg["weight_decay"]),
                                optax.sgd(learning_rate, momentum=cfg["momentum"]))
            head = train
        else:
            train = optax.adamw(learning_rate, weight_decay=cfg["weight_decay"])
            head = optax.adamw(learning_rate * cfg["head_lr_factor"],
                               weight_decay=cfg["weight_decay"])
        tx = optax.multi_transform({"train": train, "head": head, "frozen": optax.set_to_zero()},
                                   functools.partial(param_labels, phase=phase))
        if cfg["grad_clip"] > 0:
            tx = optax.chain(optax.clip_by_global_norm(cfg["grad_clip"]), tx)
        return tx

    return optax.inject_hyperparams(build)(learning_rate=0.0)  # see create_train_state


def with_learning_rate(state: "TrainState", learning_rate: Array) -> "TrainState":
    """`state` whose optimizer uses `learning_rate` from now on (head: x head_lr_factor)."""
    hyper = dict(state.opt_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(learning_rate, hyper["learning_rate"].dtype)
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def create_train_state(model: SurgFusionNet, variables: Mapping[str, Any],
                       tx: optax.GradientTransformation, phase: str, *,
                       learning_rate: float, loss_alpha: float = 0.5) -> TrainState:
    """TrainState of `phase` whose optimizer (`make_optimizer`) starts at `learning_rate`."""
    state = TrainState.create(apply_fn=_canonical(model).apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=tx, phase=phase,
                              loss_alpha=float(loss_alpha))
    state = state.replace(step=jnp.zeros((), jnp.int32))  # not weakly typed: no retrace
    return with_learning_rate(state, learning_rate)


def phase_loss(outputs: Mapping[str, Array], target: Array, weight: Array,
               alpha: float) -> Array:
    """Eq. 19 summed over the phase's heads (one head, 'fused', in the fusion phase)."""
    return sum(losses.skill_loss(outputs[k].astype(jnp.float32), target, alpha=alpha,
                                 weights=weight) for k in sorted(outputs))


def train_step(state: TrainState, batch: Mapping[str, Any], rng: Array
               ) -> tuple[TrainState, dict[str, Array]]:
    """One optimisation step. batch: inputs {m: [B,T,F]}, valid [B,T], target [B], weight [B]."""
    dropout_rng, gumbel_rng = jax.random.split(rng)

    def loss_fn(params):
        outputs, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["inputs"],
            batch["valid"], train=True, phase=state.phase,
            rngs={"dropout": dropout_rng, "gumbel": gumbel_rng}, mutable=["batch_stats"])
        loss = phase_loss(outputs, batch["target"], batch["weight"], state.loss_alpha)
        return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if state.phase == "fusion":  # frozen branches keep their statistics
        batch_stats = {**state.batch_stats, "fusion": batch_stats.get("fusion", {})}
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


def eval_step(state: TrainState, batch: Mapping[str, Any]) -> dict[str, Array]:
    """The phase's scores (in (0, 1)) with BatchNorm running averages, no dropout."""
    return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          batch["inputs"], batch["valid"], train=False, phase=state.phase)


@functools.partial(jax.jit, static_argnames=("window", "batch_size", "steps"))
def train_epoch(state: TrainState, data: input_pipeline.DeviceData, train_idx: Array,
                num_train: Array, rng: Array, learning_rate: Array, *, window: int,
                batch_size: int, steps: int) -> tuple[TrainState, dict[str, Array]]:
    """One epoch at `learning_rate`: shuffle, windows and `steps` steps in one `lax.scan`.

    train_idx: int32 [N_pad], the first `num_train` entries are the training videos.
    Returns the new state and the epoch's mean loss / gradient norm.
    """
    state = with_learning_rate(state, learning_rate)
    order_rng, step_rng = jax.random.split(rng)
    idx, weight = input_pipeline.epoch_batches(order_rng, train_idx, num_train, batch_size,
                                               steps)

    def body(state, xs):
        idx_b, weight_b, key = xs
        window_rng, key = jax.random.split(key)
        inputs, valid = input_pipeline.sample_windows(window_rng, data, idx_b, window)
        batch = {"inputs": inputs, "valid": valid, "target": data.targets[idx_b],
                 "weight": weight_b}
        return train_step(state, batch, key)

    state, per_step = jax.lax.scan(body, state, (idx, weight, jax.random.split(step_rng, steps)))
    return state, jax.tree.map(jnp.mean, per_step)


@functools.partial(jax.jit, static_argnames=("length",))
def predict_batch(state: TrainState, data: input_pipeline.DeviceData, idx: Array, *,
                  length: int) -> dict[str, Array]:
    """Scores of the videos `idx` [E], all segments, padded to the bucket `length`."""
    inputs, valid = input_pipeline.gather_eval_batch(data, idx, length)
    return eval_step(state, {"inputs": inputs, "valid": valid})


def evaluate(state: TrainState, data: input_pipeline.DeviceData,
             plan: Sequence[input_pipeline.EvalBatch], indices: Sequence[int]
             ) -> dict[str, np.ndarray]:
    """Predictions (normalised, float64) of the videos `indices`, in that order."""
    outputs = [(b, predict_batch(state, data, jnp.asarray(b.idx), length=b.length))
               for b in plan]  # dispatch all batches before reading any back
    by_video: dict[str, dict[int, float]] = {}
    for b, out in outputs:
        for head, values in jax.device_get(out).items():
            col = by_video.setdefault(head, {})
            for i, v in zip(b.idx[:b.count], np.asarray(values)[:b.count]):
                col[int(i)] = float(v)
    return {h: np.array([col[int(i)] for i in indices]) for h, col in by_video.items()}


# ----------------------------------------------------------------------------- phase runner

@dataclasses.dataclass
class EvalSet:
    """Videos evaluated after every epoch: dataset indices, bucketed plan, true scores."""

    indices: np.ndarray
    plan: list[input_pipeline.EvalBatch]
    scores: np.ndarray

    @classmethod
    def make(cls, lengths: Sequence[int], indices: Sequence[int], scores: Sequence[float],
             batch_size: int, min_bucket: int) -> "EvalSet":
        indices = np.asarray(indices, np.int64)
        return cls(indices, input_pipeline.make_eval_plan(lengths, indices, batch_size,
                                                          min_bucket),
                   np.asarray([scores[i] for i in indices], np.float64))


@dataclasses.dataclass
class EpochBudget:
    """Epochs this process may still train (None: unlimited); for interruption tests."""

    remaining: int | None = None

    @property
    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def spend(self) -> bool:
        """Counts one epoch; True when the budget is used up."""
        if self.remaining is not None:
            self.remaining -= 1
        return self.exhausted


def score_metrics(preds: Mapping[str, np.ndarray], scores: np.ndarray, score_max: float
                  ) -> dict[str, dict[str, float]]:
    """SCC and MAE (score units) per head (docs/design.md §5)."""
    return {h: {"scc": metrics.spearman(p, scores),
                "mae": metrics.mae(metrics.to_score_units(p, score_max), scores)}
            for h, p in sorted(preds.items())}


def selection_value(head_metrics: Mapping[str, Mapping[str, float]]) -> float:
    """Mean SCC over the heads (one head, 'fused', in the fusion phase); NaN -> -inf."""
    value = float(np.mean([m["scc"] for m in head_metrics.values()]))
    return value if np.isfinite(value) else -np.inf


def run_phase(state: TrainState, data: input_pipeline.DeviceData, *, rng: Array,
              num_epochs: int, batch_size: int, window: int, train_idx: Sequence[int],
              eval_sets: Mapping[str, EvalSet], score_max: float,
              learning_rate, checkpoints: Any = None, checkpoint_every: int = 1,
              writer: Any = None, desc: str = "", progress: bool = True,
              budget: EpochBudget | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Trains one phase for `num_epochs`, evaluating `eval_sets` ('test', 'val') each epoch.

    Resumes from `checkpoints.restore_last` when a `last` step exists. The epoch-e key
    is `fold_in(rng, e)`, so a resumed run replays exactly. The best epoch (paper
    protocol: highest test-fold `selection_value`) is saved to `checkpoints` 'best',
    just before the next 'last' step is (every `checkpoint_every` epochs, at the end and
    on a stop), so a resumed run finds the best of the epochs it does not replay.

    Returns (state, meta) with meta = {'history': [per-epoch dict], 'best': dict}; a
    history entry holds epoch (1-based), loss, grad_norm, lr and, per eval set, per head
    {'scc', 'mae'}.
    """
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "selection": None}
    best_state = None  # host copy of the best epoch's variables, not yet on disk
    if checkpoints is not None:
        restored = checkpoints.restore_last(state)
        if restored is not None:
            state, rng, meta = restored
            history, best = list(meta["history"]), dict(meta["best"])
    train_idx = np.asarray(train_idx)
    steps = input_pipeline.steps_per_epoch(len(train_idx), batch_size)
    padded = jnp.asarray(input_pipeline.pad_indices(train_idx, data.num_videos))
    num_train = jnp.int32(len(train_idx))
    start = len(history)
    bar = tqdm.tqdm(total=num_epochs, initial=start, desc=desc, disable=not progress,
                    dynamic_ncols=True, leave=True)
    for epoch in range(start + 1, num_epochs + 1):
        if budget is not None and budget.exhausted:
            bar.close()
            raise StopRequested(f"stopped before epoch {epoch} of {desc or 'a phase'} "
                                "(debug.stop_after_epochs); re-run the same command to resume.")
        lr = float(learning_rate(epoch - 1))
        state, train_metrics = train_epoch(state, data, padded, num_train,
                                           jax.random.fold_in(rng, epoch), jnp.float32(lr),
                                           window=window, batch_size=batch_size, steps=steps)
        # Evaluation is dispatched before the training metrics are read back, so the
        # host waits once per epoch, not once for training and again for evaluation.
        preds = {name: evaluate(state, data, es.plan, es.indices)
                 for name, es in eval_sets.items()}
        entry: dict[str, Any] = {"epoch": epoch, "lr": lr}
        entry.update({k: float(v) for k, v in jax.device_get(train_metrics).items()})
        for name, es in eval_sets.items():
            entry[name] = score_metrics(preds[name], es.scores, score_max)
        history.append(entry)
        if "test" in entry:
            value = selection_value(entry["test"])
            if best["selection"] is None or value > best["selection"]:
                best = {"epoch": epoch, "selection": value, "test": entry["test"],
                        "predictions": {h: metrics.to_score_units(p, score_max).tolist()
                                        for h, p in preds["test"].items()}}
                if checkpoints is not None:  # written with the next `last` step
                    best_state = jax.device_get(state.replace(opt_state=None))
        if writer is not None:
            _write_scalars(writer, entry)
        stop = budget is not None and budget.spend()
        persist = stop or epoch == num_epochs or epoch % max(checkpoint_every, 1) == 0
        if checkpoints is not None and persist:
            if best_state is not None:
                checkpoints.save_best(best["epoch"], best_state, best)
                best_state = None
            checkpoints.save_last(epoch, state, rng, {"history": history, "best": best})
        if writer is not None and persist:
            writer.flush()  # with the checkpoints, not every epoch
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.4f}",
                        scc=f"{selection_value(entry['test']):.3f}" if "test" in entry else "-")
    bar.close()
    return state, {"history": history, "best": best}


def _write_scalars(writer: Any, entry: Mapping[str, Any]) -> None:
    values = {}
    for key, value in entry.items():
        if isinstance(value, Mapping):
            for head, per_head in value.items():
                values.update({f"{key}/{head}/{name}": v for name, v in per_head.items()})
        elif key != "epoch":
            values[f"train/{key}"] = value
    writer.scalars(values, entry["epoch"])
