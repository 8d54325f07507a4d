"""The phase runner: trains a group of runs (folds x seeds) in lockstep, one program.

`run_phase(states, data, members, ...)` trains R runs whose TrainStates are stacked on a
leading run axis: each epoch is one call of `train.train_epochs` (all runs' steps in one
vmapped `lax.scan`) followed by one evaluation of every run on its own evaluation
videos, side by side (`train.evaluate_stacked`, `eval_plan`); the host then reads each
run's test (and validation) metrics, picks its best epoch (paper protocol: highest test-fold
`selection_value`), and writes its TensorBoard scalars and its own checkpoints. A run
alone is the group of one (`run_single_phase`).

Checkpoints and resume. Every run keeps the two newest `last` steps and its `best` step
(`checkpoints.PhaseCheckpoints`); all runs save at the same epochs. A resumed group
restarts from the newest epoch every run has saved (a kill between two runs' saves
leaves the others one save ahead: they go back to their previous step), and replays the
epochs after it exactly: epoch e of run r uses `fold_in(rng_r, e)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from surgfusion_jax.data import input_pipeline
from surgfusion_jax.errors import StopRequested
from surgfusion_jax.evaluation import metrics
from surgfusion_jax.training import train

Array = jax.Array


@dataclasses.dataclass
class EvalSet:
    """Videos evaluated after every epoch: dataset indices and their true scores."""

    indices: np.ndarray
    scores: np.ndarray

    @classmethod
    def make(cls, indices: Sequence[int], scores: Sequence[float]) -> "EvalSet":
        indices = np.asarray(indices, np.int64)
        return cls(indices, np.asarray([scores[i] for i in indices], np.float64))


@dataclasses.dataclass
class Member:
    """One run of a group: its training videos, evaluation sets, key and outputs."""

    name: str
    train_idx: np.ndarray
    eval_sets: Mapping[str, EvalSet]  # 'test' and optionally 'val'
    rng: Array
    checkpoints: Any = None  # checkpoints.PhaseCheckpoints
    writer: Any = None  # tensorboard.SummaryWriter


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


def score_metrics(preds: Mapping[str, np.ndarray], scores: np.ndarray, score_max: float,
                  target_max: float = 0.5) -> dict[str, dict[str, float]]:
    """SCC and MAE (score units) per head (docs/design.md §5)."""
    return {h: {"scc": metrics.spearman(p, scores),
                "mae": metrics.mae(metrics.to_score_units(p, score_max, target_max), scores)}
            for h, p in sorted(preds.items())}


def selection_value(head_metrics: Mapping[str, Mapping[str, float]]) -> float:
    """Mean SCC over the heads (one head, 'fused', in the fusion phase); NaN -> -inf."""
    value = float(np.mean([m["scc"] for m in head_metrics.values()]))
    return value if np.isfinite(value) else -np.inf


def eval_plan(data: input_pipeline.DeviceData, eval_sets: Sequence[Mapping[str, EvalSet]],
              batch_size: int, min_bucket: int) -> list[input_pipeline.RunsEvalBatch]:
    """The bucketed plan of every run's own evaluation videos (`eval_sets`: each run's
    {'test': ..., 'val': ...}), the runs side by side (`make_runs_eval_plan`)."""
    run_indices = [sorted({int(i) for es in sets.values() for i in es.indices})
                   for sets in eval_sets]
    return input_pipeline.make_runs_eval_plan(np.asarray(data.lengths), run_indices,
                                              batch_size, min_bucket)


def place_runs(tree: Any, num_runs: int) -> Any:
    """`tree` with its leading run axis sharded over all devices (`jax.sharding`: a 1-D
    mesh 'runs', `NamedSharding(mesh, P('runs'))`), so each device trains its share of the
    group; unchanged on one device or when the runs do not divide evenly over the
    devices. After `jax.distributed.initialize()` the devices of every host take part."""
    devices = jax.devices()
    if len(devices) == 1 or num_runs % len(devices):
        return tree
    mesh = jax.sharding.Mesh(np.asarray(devices), ("runs",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("runs"))
    return jax.device_put(tree, sharding)


@jax.jit
def _epoch_keys(rngs: Array, epoch: Array) -> Array:
    """`fold_in(rng, epoch)` of every run's key [R] in one call."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rngs, epoch)


def _resume(states: Any, members: Sequence[Member]) -> tuple[Any, list, list, int]:
    """(states, histories, bests, epoch) from the newest epoch every run has saved."""
    fresh = [[] for _ in members], [{"epoch": 0, "selection": None} for _ in members]
    if any(m.checkpoints is None for m in members):
        return (states, *fresh, 0)
    epoch = min(m.checkpoints.last_epoch() or 0 for m in members)
    if epoch == 0:
        for m in members:
            m.checkpoints.discard_after(0)
        return (states, *fresh, 0)
    template = train.unstack(states, 0)
    while True:  # a damaged step sends its run back one save: the whole group follows
        restored = [m.checkpoints.restore_last(template, epoch=epoch) for m in members]
        if min(r[2]["epoch"] for r in restored) == epoch:
            break
        epoch = min(r[2]["epoch"] for r in restored)
    states = train.stack([r[0] for r in restored])
    for m, r in zip(members, restored):
        m.rng = r[1]
    return (states, [list(r[2]["history"]) for r in restored],
            [dict(r[2]["best"]) for r in restored], epoch)


def run_phase(states: Any, data: input_pipeline.DeviceData, members: Sequence[Member], *,
              num_epochs: int, batch_size: int, window: int, score_max: float,
              target_max: float = 0.5,
              learning_rate, eval_batch_size: int = 8, min_bucket: int = 8,
              checkpoint_every: int = 1, desc: str = "", progress: bool = True,
              budget: EpochBudget | None = None, run_axis: str = "vmap"
              ) -> tuple[Any, list[dict[str, Any]]]:
    """Trains the R runs of `members` (their TrainStates stacked in `states`) for
    `num_epochs`, evaluating each run's eval sets after every epoch.

    Returns (stacked states, [meta per run]) with meta = {'history': [per-epoch dict],
    'best': dict, 'final': {head: normalised predictions [N] of the last epoch}}; a
    history entry holds epoch (1-based), loss, grad_norm, lr and, per eval set, per head
    {'scc', 'mae'}.
    """
    states, histories, bests, start = _resume(states, members)
    states = place_runs(states, len(members))
    n = data.num_videos
    steps = [input_pipeline.steps_per_epoch(len(m.train_idx), batch_size) for m in members]
    padded, num_train, num_steps, rngs, lrs = place_runs(
        (np.stack([input_pipeline.pad_indices(m.train_idx, n) for m in members]),
         np.asarray([len(m.train_idx) for m in members], np.int32),
         np.asarray(steps, np.int32), jnp.stack([m.rng for m in members]),
         np.ones((len(members),), np.float32)), len(members))
    plan = eval_plan(data, [m.eval_sets for m in members], eval_batch_size, min_bucket)
    best_states: list[Any] = [None] * len(members)  # host copies not yet on disk
    diverged = {r for r, h in enumerate(histories)  # warned before the resume
                if any(not _finite(e.get("loss", 0.0)) for e in h)}
    bar = tqdm.tqdm(total=num_epochs, initial=start, desc=desc, disable=not progress,
                    dynamic_ncols=True, leave=True)
    preds = None
    for epoch in range(start + 1, num_epochs + 1):
        if budget is not None and budget.exhausted:
            bar.close()
            raise StopRequested(f"stopped before epoch {epoch} of {desc or 'a phase'} "
                                "(debug.stop_after_epochs); re-run the same command to resume.")
        lr = float(learning_rate(epoch - 1))
        states, train_metrics = train.train_epochs(
            states, data, padded, num_train, num_steps, _epoch_keys(rngs, epoch), lrs * lr,
            window=window, batch_size=batch_size, steps=max(steps), run_axis=run_axis)
        # Evaluation is dispatched before the training metrics are read back, so the
        # host waits once per epoch, not once for training and again for evaluation.
        preds = train.evaluate_stacked(states, data, plan, run_axis)
        train_metrics = jax.device_get(train_metrics)
        stop = budget is not None and budget.spend()
        persist = stop or epoch == num_epochs or epoch % max(checkpoint_every, 1) == 0
        host = _HostCopy(states)  # one transfer per epoch at most, sliced per run on the host
        for r, m in enumerate(members):
            entry: dict[str, Any] = {"epoch": epoch, "lr": lr}
            entry.update({k: float(v[r]) for k, v in train_metrics.items()})
            if not _finite(entry["loss"]) and r not in diverged:
                diverged.add(r)
                logging.warning(divergence_message(m.name, desc, epoch))
            for name, es in m.eval_sets.items():
                entry[name] = score_metrics({h: p[r, es.indices] for h, p in preds.items()},
                                            es.scores, score_max, target_max)
            histories[r].append(entry)
            if "test" in entry:
                value = selection_value(entry["test"])
                if bests[r]["selection"] is None or value > bests[r]["selection"]:
                    test_idx = m.eval_sets["test"].indices
                    bests[r] = {"epoch": epoch, "selection": value, "test": entry["test"],
                                "predictions": {h: metrics.to_score_units(p[r, test_idx],
                                                                          score_max,
                                                                          target_max).tolist()
                                                for h, p in preds.items()}}
                    if m.checkpoints is not None:  # written with the next `last` step
                        best_states[r] = host.variables(r)
            if m.writer is not None:
                _write_scalars(m.writer, entry)
            if m.checkpoints is not None and persist:
                if best_states[r] is not None:
                    m.checkpoints.save_best(bests[r]["epoch"], best_states[r], bests[r])
                    best_states[r] = None
                m.checkpoints.save_last(epoch, host.run(r), m.rng,
                                        {"history": histories[r], "best": bests[r]})
            if m.writer is not None and persist:
                m.writer.flush()  # with the checkpoints, not every epoch
        bar.update(1)
        bar.set_postfix(loss=f"{float(np.mean(train_metrics['loss'])):.4f}")
    bar.close()
    if preds is None:  # resumed after the last epoch: score the restored states
        preds = train.evaluate_stacked(states, data, plan, run_axis)
    return states, [{"history": h, "best": b, "final": {k: p[r] for k, p in preds.items()}}
                    for r, (h, b) in enumerate(zip(histories, bests))]


def _finite(x: Any) -> bool:
    return x is not None and bool(np.isfinite(x))


def divergence_message(run: str, desc: str, epoch: int) -> str:
    """The one line that reports a run whose training loss became NaN or infinite."""
    phase_name = desc.split()[-1] if desc else "training"
    return (f"run {run} diverged in {phase_name} epoch {epoch}: the loss is not finite, so "
            "its later epochs score NaN; the other runs go on. With fusion 'dra' and "
            "model.dra_relative_eps = 0 (the paper's Eq. 15) set --config.model."
            "dra_relative_eps=0.01 (docs/parity.md), else lower the learning rate.")


class _HostCopy:
    """The stacked states copied to the host on first use, sliced per run there: indexing
    every leaf of a stacked TrainState on the device costs one dispatch per leaf. Model
    variables alone (for `best`) skip the optimizer state."""

    def __init__(self, states: Any):
        self._states, self._full, self._variables = states, None, None

    def run(self, index: int) -> Any:
        """Run `index`'s whole TrainState (host arrays)."""
        if self._full is None:
            self._full = jax.device_get(self._states)
        return jax.tree.map(lambda a: a[index], self._full)

    def variables(self, index: int) -> Any:
        """Run `index`'s TrainState without its optimizer state (host arrays)."""
        if self._full is not None:
            return self.run(index).replace(opt_state=None)
        if self._variables is None:
            self._variables = jax.device_get(self._states.replace(opt_state=None))
        return jax.tree.map(lambda a: a[index], self._variables)


def run_single_phase(state: Any, data: input_pipeline.DeviceData, *, rng: Array,
                     train_idx: Sequence[int], eval_sets: Mapping[str, EvalSet],
                     checkpoints: Any = None, writer: Any = None, **kwargs
                     ) -> tuple[Any, dict[str, Any]]:
    """`run_phase` for one run (a group of one); returns (state, meta)."""
    member = Member("run", np.asarray(train_idx), eval_sets, rng, checkpoints, writer)
    states, metas = run_phase(train.stack([state]), data, [member], **kwargs)
    return train.unstack(states, 0), metas[0]


def _write_scalars(writer: Any, entry: Mapping[str, Any]) -> None:
    values = {}
    for key, value in entry.items():
        if isinstance(value, Mapping):
            for head, per_head in value.items():
                values.update({f"{key}/{head}/{name}": v for name, v in per_head.items()})
        elif key != "epoch":
            values[f"train/{key}"] = value
    writer.scalars(values, entry["epoch"])
