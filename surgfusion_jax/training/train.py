"""Two-phase training of SurgFusion-Net: pure, jitted steps and epochs (paper §IV-B; docs/design.md §4).

Phase (a) 'unimodal': the three branches, loss summed over their heads, SGD (momentum
0.9, weight decay 1e-4), cosine learning rate 1e-2 -> 5e-6. Phase (b) 'fusion': the
fusion branch on the frozen branches, AdamW (weight decay 1e-4), cosine 1e-3 -> 5e-6,
the fusion regression head at `head_lr_factor` x the rate (MAQA). Both phases clip the
global norm of the gradient of the parameters they train (MAQA: 2; the others' gradients
are zero) and minimise Eq. 19 (`losses.skill_loss`) against the targets
0.5 * score / score_max.

Decisions:
  * Parameters a phase does not train get no update at all (`optax.multi_transform` with
    `optax.set_to_zero`, so no weight decay or momentum either): in phase (a) the fusion
    branch, in phase (b) the branches (but those of `model.trainable_branches`, PAMFN's
    undetached third branch, which train with the fusion optimiser; `phase_optimizer`).
    Phase (b) also keeps the frozen branches' BatchNorm statistics as they were (the
    model runs them with running averages).
  * The cosine schedule is stepped once per epoch, like PyTorch's CosineAnnealingLR in
    MAQA: lr(e) = end + (peak - end) (1 + cos(pi e / num_epochs)) / 2 for epoch e, i.e.
    `optax.cosine_decay_schedule(peak, num_epochs, alpha=end / peak)` at the epoch index
    (`learning_rate_schedule`), passed to the epoch as an injected hyperparameter.
  * The trained parameters (each branch alone under `clip_per_branch`) are updated
    raveled into one vector (`optax.flatten`), once per step: the clip, momentum or Adam
    and weight decay are elementwise or global, so the update is the same, in a few large
    XLA kernels instead of several per parameter array, which made tracing and compiling
    the optimizer cost more than the model's own step. The fusion head's lower rate is a
    per-array scale after it.
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
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax.training import train_state

from surgfusion_jax.data import feature_dataset, input_pipeline
from surgfusion_jax.errors import StopRequested
from surgfusion_jax.evaluation import metrics
from surgfusion_jax.models import init_schemes, losses
from surgfusion_jax.models.surgfusion import SurgFusionNet

Array = jax.Array
PHASES = ("unimodal", "fusion")


class TrainState(train_state.TrainState):
    """flax TrainState plus BatchNorm statistics and the (static) training phase."""

    batch_stats: Any = None
    phase: str = flax.struct.field(pytree_node=False, default="unimodal")
    loss_alpha: float = flax.struct.field(pytree_node=False, default=0.5)
    # False: training windows' zero padding is data (PAMFN's literal zero padding); the
    # model then sees every step of a window as valid. Evaluation stays masked.
    mask_padding: bool = flax.struct.field(pytree_node=False, default=True)
    # The model's `trainable_branches`: which gradients `train_step`'s grad_norm reads.
    trainable_branches: tuple = flax.struct.field(pytree_node=False, default=())


# config.model fields -> SurgFusionNet fields they set (and their type); a field missing
# from a config (a run saved before it existed) keeps the module's default.
_MODEL_FIELDS = {
    "features": int, "embed_features": int, "num_candidates": int, "num_heads": int,
    "fusion": str, "use_dfb": bool, "embed_dropout": float, "branch_head_dropout": float,
    "feature_dropout": float, "modality_dropout": float, "head_dropout": float,
    "head_hidden_dropout": float, "head_hidden_ratio": int, "attention_dropout": float, "broadcast_dropout": bool,
    "attention_output_projection": bool, "alpha_bias_init": float, "gumbel_at_test": bool,
    "tau_init": float, "frozen_branch_train": bool, "dra_relative_eps": float,
    "trainable_branches": tuple, "fused_score": str, "pool_odd_step": str,
    "bn_unbiased_running_var": bool,
}


def build_model(model_config: Mapping[str, Any], modalities: Sequence[str]) -> SurgFusionNet:
    """SurgFusionNet from `config.model` (a resolved config: `config_lib.resolve`)."""
    fields = {name: kind(model_config[name]) for name, kind in _MODEL_FIELDS.items()
              if model_config.get(name) is not None}
    return SurgFusionNet(modalities=tuple(modalities), dtype=jnp.dtype(model_config["dtype"]),
                         **fields)


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


def init_variables(model: SurgFusionNet, rng: Array, feature_dim: int, length: int = 8,
                   scheme: str = "flax") -> dict[str, Any]:
    """Every parameter and BatchNorm statistic of the model (phase='all'), initialised by
    `scheme` ('flax' | 'torch', `init_schemes.reinit`; config field `model.init`)."""
    variables = _init(model, rng, int(feature_dim), int(length))
    params = init_schemes.reinit(variables["params"], jax.random.fold_in(rng, 1), scheme)
    return {"params": params, "batch_stats": variables.get("batch_stats", {})}


def abstract_variables(model: SurgFusionNet, feature_dim: int, length: int = 8) -> Any:
    """Shapes and dtypes of `init_variables` (traced, not compiled or run)."""
    return jax.eval_shape(lambda rng: init_variables(model, rng, feature_dim, length),
                          jax.random.PRNGKey(0))


def param_labels(params: Any, phase: str, trainable_branches: Sequence[str] = ()) -> Any:
    """'train' / 'head' / 'frozen' per parameter for `phase` (see module docstring); in
    phase 'fusion' the `trainable_branches` train too (their unused regression heads not)."""
    trainable = {f"branch_{m}" for m in trainable_branches}

    def label(path, _):
        top = path[0].key
        if phase == "unimodal":
            return "train" if top.startswith("branch_") else "frozen"
        if top in trainable:
            return "frozen" if path[1].key == "head" else "train"
        if top != "fusion":
            return "frozen"
        return "head" if any("head" in str(getattr(k, "key", "")).lower() for k in path[1:]) \
            else "train"
    return jax.tree_util.tree_map_with_path(label, params)


def _branch_labels(params: Any) -> Any:
    """Each branch's parameters labelled with its name ('branch_rgb', ...); the rest
    'frozen' (phase 'unimodal' with `clip_per_branch`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key if path[0].key.startswith("branch_") else "frozen", params)


def learning_rate_schedule(cfg: Mapping[str, Any]):
    """epoch index (0-based) -> learning rate: cosine from `learning_rate` to
    `end_learning_rate` over `num_epochs` (PyTorch CosineAnnealingLR, stepped per epoch)."""
    peak = float(cfg["learning_rate"])
    return optax.cosine_decay_schedule(peak, max(int(cfg["num_epochs"]), 1),
                                       alpha=float(cfg["end_learning_rate"]) / peak)


def make_optimizer(phase: str, cfg: Mapping[str, Any], trainable_branches: Sequence[str] = ()
                   ) -> optax.GradientTransformation:
    """The optimizer of `phase` from `config.unimodal` / `config.fusion` (module docstring);
    in phase 'fusion' it also trains the branches of `trainable_branches` (config field
    `model.trainable_branches`, which the model must be built with too), at the fusion
    rate and weight decay, as PAMFN's AdamW does with its undetached branch.

    The learning rate is an injected hyperparameter (`optax.inject_hyperparams`), set by
    `create_train_state` and at the start of each epoch by `train_epoch`, so neither the
    optimizer nor the compiled epoch depends on the learning rates or the epoch count.
    Equal arguments return the same object: the jitted functions, whose cache keys
    include it, compile once per process for all folds and runs.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    keys = ("weight_decay", "grad_clip")
    keys += ("momentum", "clip_per_branch") if phase == "unimodal" else ("head_lr_factor",)
    trainable = tuple(trainable_branches or ()) if phase == "fusion" else ()
    return _make_optimizer(phase, tuple((k, float(cfg.get(k) or 0)) for k in keys), trainable)


def phase_optimizer(config: Mapping[str, Any], phase: str) -> optax.GradientTransformation:
    """`make_optimizer` of `phase` for a resolved run config: its `config[phase]` section
    and the model's `trainable_branches` (both must agree with the model built from it)."""
    return make_optimizer(phase, config[phase], config["model"].get("trainable_branches") or ())


def _raveled(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optax.flatten(tx)`; `tx` itself for a group without parameters (a model without
    some modality's branch), which `optax.flatten` cannot ravel."""
    raveled = optax.flatten(tx)
    pick = lambda tree: raveled if jax.tree.leaves(tree) else tx
    return optax.GradientTransformation(
        lambda params: pick(params).init(params),
        lambda updates, state, params=None: pick(updates).update(updates, state, params))


@functools.lru_cache(maxsize=64)
def _make_optimizer(phase: str, items: tuple, trainable_branches: tuple = ()
                    ) -> optax.GradientTransformation:
    cfg = dict(items)

    clip = [optax.clip_by_global_norm(cfg["grad_clip"])] if cfg["grad_clip"] > 0 else []

    def build(learning_rate):
        if phase == "unimodal":
            sgd = _raveled(optax.chain(*clip, optax.add_decayed_weights(cfg["weight_decay"]),
                                       optax.sgd(learning_rate, momentum=cfg["momentum"])))
        if phase == "unimodal" and cfg["clip_per_branch"]:
            # PAMFN trains each branch in its own run, clipping that branch's gradient.
            transforms = {f"branch_{m}": sgd for m in feature_dataset.MODALITIES}
            return optax.multi_transform({**transforms, "frozen": optax.set_to_zero()},
                                         _branch_labels)
        labels = functools.partial(param_labels, phase=phase,
                                   trainable_branches=trainable_branches)
        if phase == "unimodal":  # no parameter is labelled 'head' (`param_labels`)
            trained = sgd
        else:
            # optax.adamw's chain, on the trained parameters raveled once; the regression
            # head's learning rate is the rate x head_lr_factor, applied per array after
            # (it fuses into the parameter update; the clip's norm and Adam's moments are
            # elementwise or global, the same as for two groups).
            trained = optax.chain(
                _raveled(optax.chain(*clip, optax.scale_by_adam(),
                                     optax.add_decayed_weights(cfg["weight_decay"]),
                                     optax.scale_by_learning_rate(learning_rate))),
                optax.masked(optax.scale(cfg["head_lr_factor"]),
                             lambda params: jax.tree.map(lambda l: l == "head", labels(params))))
        # Frozen parameters stay out of the raveled vector: their gradients are zero, and
        # raveling them would copy every frozen array each step.
        return optax.multi_transform(
            {"trained": trained, "frozen": optax.set_to_zero()},
            lambda params: jax.tree.map(lambda l: "frozen" if l == "frozen" else "trained",
                                        labels(params)))

    return optax.inject_hyperparams(build)(learning_rate=0.0)  # see create_train_state


def with_learning_rate(state: "TrainState", learning_rate: Array) -> "TrainState":
    """`state` whose optimizer uses `learning_rate` from now on (head: x head_lr_factor)."""
    hyper = dict(state.opt_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(learning_rate, hyper["learning_rate"].dtype)
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def create_train_state(model: SurgFusionNet, variables: Mapping[str, Any],
                       tx: optax.GradientTransformation, phase: str, *,
                       learning_rate: float, loss_alpha: float = 0.5,
                       mask_padding: bool = True) -> TrainState:
    """TrainState of `phase` whose optimizer (`make_optimizer`) starts at `learning_rate`."""
    state = TrainState.create(apply_fn=_canonical(model).apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=tx, phase=phase,
                              loss_alpha=float(loss_alpha), mask_padding=bool(mask_padding),
                              trainable_branches=tuple(getattr(model, "trainable_branches", ())))
    state = state.replace(step=jnp.zeros((), jnp.int32))  # not weakly typed: no retrace
    return with_learning_rate(state, learning_rate)


def create_train_states(model: SurgFusionNet, variables: Mapping[str, Any],
                        tx: optax.GradientTransformation, phase: str, *,
                        learning_rate: float, loss_alpha: float = 0.5,
                        mask_padding: bool = True) -> TrainState:
    """The TrainStates of R runs stacked on a leading axis, from their variables stacked
    the same way: `create_train_state` of every run in one vmapped call."""
    return jax.vmap(lambda v: create_train_state(model, v, tx, phase, learning_rate=learning_rate,
                                                 loss_alpha=loss_alpha,
                                                 mask_padding=mask_padding))(variables)


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

    # In phase 'fusion' the frozen branches run on their running averages and return them
    # unchanged, unless the model's `frozen_branch_train` updates them (PAMFN).
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    # The gradient's norm over the parameters the phase trains (the frozen ones' gradients
    # are zero): one reduction over them raveled in tree order, as the optimizer ravels
    # them, so XLA shares that copy; raveling every gradient copied ~18 M frozen zeros per
    # unimodal step (docs/performance.md).
    labels = jax.tree.leaves(param_labels(grads, state.phase, state.trainable_branches))
    trained = [g for g, label in zip(jax.tree.leaves(grads), labels) if label != "frozen"]
    grad_norm = jnp.linalg.norm(jax.flatten_util.ravel_pytree(trained)[0])
    return state, {"loss": loss, "grad_norm": grad_norm}


def eval_step(state: TrainState, batch: Mapping[str, Any]) -> dict[str, Array]:
    """The phase's scores (in (0, 1)) with BatchNorm running averages, no dropout."""
    return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          batch["inputs"], batch["valid"], train=False, phase=state.phase)


def _epoch(state: TrainState, data: input_pipeline.DeviceData, train_idx: Array,
           num_train: Array, rng: Array, learning_rate: Array, num_steps: Array | None, *,
           window: int, batch_size: int, steps: int) -> tuple[TrainState, dict[str, Array]]:
    state = with_learning_rate(state, learning_rate)
    order_rng, step_rng = jax.random.split(rng)
    idx, weight = input_pipeline.epoch_batches(order_rng, train_idx, num_train, batch_size,
                                               steps)

    def body(state, xs):
        step, idx_b, weight_b, key = xs
        window_rng, key = jax.random.split(key)
        inputs, valid = input_pipeline.sample_windows(window_rng, data, idx_b, window)
        if not state.mask_padding:
            valid = jnp.ones_like(valid)
        batch = {"inputs": inputs, "valid": valid, "target": data.targets[idx_b],
                 "weight": weight_b}
        new_state, metrics = train_step(state, batch, key)
        if num_steps is not None:  # a step past this run's own epoch changes nothing
            active = step < num_steps
            new_state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new_state, state)
            metrics = jax.tree.map(lambda m: jnp.where(active, m, 0.0), metrics)
        return new_state, metrics

    xs = (jnp.arange(steps), idx, weight, jax.random.split(step_rng, steps))
    state, per_step = jax.lax.scan(body, state, xs)
    count = steps if num_steps is None else jnp.maximum(num_steps, 1)
    return state, jax.tree.map(lambda m: jnp.sum(m) / count, per_step)


@functools.partial(jax.jit, static_argnames=("window", "batch_size", "steps"))
def train_epoch(state: TrainState, data: input_pipeline.DeviceData, train_idx: Array,
                num_train: Array, rng: Array, learning_rate: Array, *, window: int,
                batch_size: int, steps: int) -> tuple[TrainState, dict[str, Array]]:
    """One epoch at `learning_rate`: shuffle, windows and `steps` steps in one `lax.scan`.

    train_idx: int32 [N_pad], the first `num_train` entries are the training videos.
    Returns the new state and the epoch's mean loss / gradient norm.
    """
    return _epoch(state, data, train_idx, num_train, rng, learning_rate, None,
                  window=window, batch_size=batch_size, steps=steps)


RUN_AXES = ("vmap", "map")


def over_runs(fn: Callable[..., Any], run_axis: str, *args: Any) -> Any:
    """`fn` applied to every run of the stacked `args` (leading run axis R) in one program.

    'vmap' batches the runs (fast: one matrix product serves all runs). 'map' runs them one
    after another in a loop (`jax.lax.map`): every run executes the same compiled body
    whatever R is, so a run gives the same numbers in a group as alone, bit for bit
    (batched products round differently from single ones, docs/design.md §4.9).
    """
    if run_axis == "vmap":
        return jax.vmap(fn)(*args)
    if run_axis == "map":
        return jax.lax.map(lambda xs: fn(*xs), args)
    raise ValueError(f"run_axis must be one of {RUN_AXES}, got {run_axis!r} "
                     "(config field `run_axis`).")


@functools.partial(jax.jit, static_argnames=("window", "batch_size", "steps", "run_axis"))
def train_epochs(states: TrainState, data: input_pipeline.DeviceData, train_idx: Array,
                 num_train: Array, num_steps: Array, rngs: Array, learning_rates: Array, *,
                 window: int, batch_size: int, steps: int, run_axis: str = "vmap"
                 ) -> tuple[TrainState, dict[str, Array]]:
    """`train_epoch` of R runs in one program: `states` stacked on a leading run axis,
    train_idx [R, N_pad], num_train / num_steps / learning_rates [R], rngs [R, 2].

    Every run scans `steps` steps (the largest epoch of the group); steps past a run's
    own `num_steps` leave it unchanged, so each run gets exactly the updates it would get
    alone. Metrics are [R] means over each run's own steps. `run_axis`: `over_runs`.
    """
    epoch = functools.partial(_epoch, data=data, window=window, batch_size=batch_size,
                              steps=steps)
    return over_runs(lambda s, i, n, r, lr, k: epoch(s, train_idx=i, num_train=n, rng=r,
                                                     learning_rate=lr, num_steps=k),
                     run_axis, states, train_idx, num_train, rngs, learning_rates, num_steps)


@functools.partial(jax.jit, static_argnames=("length", "run_axis"))
def predict_batches(states: TrainState, data: input_pipeline.DeviceData, idx: Array, *,
                    length: int, run_axis: str = "vmap") -> dict[str, Array]:
    """Scores [R, E] of the R stacked `states`, all segments padded to the bucket
    `length`: of the videos `idx` [E] under every run, or with `idx` [R, E] of row r's
    videos under run r."""
    if idx.ndim == 1:  # one gather serves every run
        inputs, valid = input_pipeline.gather_eval_batch(data, idx, length)
        return over_runs(lambda s: eval_step(s, {"inputs": inputs, "valid": valid}),
                         run_axis, states)

    def run_scores(state, run_idx):
        inputs, valid = input_pipeline.gather_eval_batch(data, run_idx, length)
        return eval_step(state, {"inputs": inputs, "valid": valid})

    return over_runs(run_scores, run_axis, states, idx)


def evaluate_stacked(states: TrainState, data: input_pipeline.DeviceData,
                     plan: Sequence[input_pipeline.EvalBatch | input_pipeline.RunsEvalBatch],
                     run_axis: str = "vmap") -> dict[str, np.ndarray]:
    """Predictions (normalised, float64) {head: [R, N]} of the R stacked `states` for the
    videos of `plan`, at their dataset index (entries a run was not asked to score: NaN).
    `plan`: `make_eval_plan`'s batches (the same videos for every run) or
    `make_runs_eval_plan`'s (each run its own).

    Each run's predictions do not depend on the other runs' values, so scoring a
    checkpoint again in a group of the same size and plan reproduces them bit for bit.
    """
    outputs = [(b, predict_batches(states, data, jnp.asarray(b.idx), length=b.length,
                                   run_axis=run_axis))
               for b in plan]  # dispatch all batches before reading any back
    result: dict[str, np.ndarray] = {}
    for b, out in outputs:
        for head, values in jax.device_get(out).items():
            values = np.asarray(values, np.float64)
            col = result.setdefault(head, np.full((values.shape[0], data.num_videos), np.nan))
            runs = values.shape[0]  # a shared batch's videos are every run's
            idx = np.broadcast_to(b.idx, (runs, b.idx.shape[-1]))
            for r, count in enumerate(np.broadcast_to(b.count, (runs,))):
                col[r, idx[r, :count]] = values[r, :count]
    return result


def evaluate(state: TrainState, data: input_pipeline.DeviceData,
             plan: Sequence[input_pipeline.EvalBatch], indices: Sequence[int]
             ) -> dict[str, np.ndarray]:
    """Predictions (normalised, float64) of one run for the videos `indices`, in order."""
    stacked = jax.tree.map(lambda a: a[None], state)
    preds = evaluate_stacked(stacked, data, plan)
    return {h: p[0, np.asarray(indices, np.int64)] for h, p in preds.items()}


def stack(trees: Sequence[Any]) -> Any:
    """The pytrees `trees` stacked on a new leading (run) axis."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def unstack(tree: Any, index: int) -> Any:
    """Run `index` of a stacked pytree."""
    return jax.tree.map(lambda a: a[index], tree)
