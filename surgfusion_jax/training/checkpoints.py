"""Orbax checkpoints per cross-validation fold and training phase (docs/design.md §4-5).

Layout under a run's workdir:

  checkpoints/<fold name>/<phase>/last/<epoch>/  state (params, batch_stats, opt_state,
                                                 step, rng) + meta (epoch, history, best)
  checkpoints/<fold name>/<phase>/best/<epoch>/  state (params, batch_stats) + meta
                                                 (epoch, metrics and test predictions of
                                                 the best test-fold epoch: paper protocol)

`last` is written every `checkpoint_every_epochs` epochs, at the end of the phase and on
a requested stop; the best epoch so far is written to `best` just before each `last`
step (`phase.run_phase`). `last` keeps the two newest steps (a group of runs resumes
from the newest epoch all of them saved), `best` one. A killed run resumes
from `last`: the optimizer state, rng, epoch counter and per-epoch history come back,
and the epochs after it are replayed exactly (they are deterministic given the rng), so
the finished run ends with the same numbers as an uninterrupted one. `best` steps newer
than the resumed `last` step are deleted on resume (they are written again by the
replay). Orbax writes each step into a temporary folder and renames it when complete.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp


def _manager(directory: str, read_only: bool, keep: int = 1) -> ocp.CheckpointManager:
    # read_only only stops folder creation here (orbax's own read_only mode logs warnings).
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "meta"))


def _to_host(tree: Any) -> Any:
    return jax.tree.map(np.asarray, jax.device_get(tree))


class PhaseCheckpoints:
    """The `last` and `best` checkpoints of one fold and phase (`read_only`: creates no
    folders; for prediction, which only restores)."""

    def __init__(self, directory: str, *, read_only: bool = False):
        self.directory = os.fspath(directory)
        self._last = _manager(os.path.join(self.directory, "last"), read_only, keep=2)
        self._best = _manager(os.path.join(self.directory, "best"), read_only)

    # -------------------------------------------------------------------- last
    def last_epoch(self) -> int | None:
        return self._last.latest_step()

    def save_last(self, epoch: int, state: Any, rng: Any, meta: Mapping[str, Any]) -> None:
        """Full training state after `epoch` epochs (1-based), with the rng and history."""
        item = {"params": state.params, "batch_stats": state.batch_stats,
                "opt_state": state.opt_state, "step": state.step, "rng": rng}
        self._last.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_host(item)),
            meta=ocp.args.JsonSave(dict(meta, epoch=epoch))))

    def discard_after(self, epoch: int) -> None:
        """Deletes the `last` and `best` steps newer than `epoch` (a resumed group of runs
        replays from there and writes them again)."""
        for manager in (self._last, self._best):
            for step in manager.all_steps():
                if step > epoch:
                    manager.delete(step)

    def restore_last(self, state: Any, epoch: int | None = None
                     ) -> tuple[Any, Any, dict[str, Any]] | None:
        """(state, rng, meta) from the `last` step `epoch` (default: the newest), `state`
        giving the structure.

        None when there is none. Deletes the steps newer than the restored epoch.
        """
        epoch = self._last.latest_step() if epoch is None else epoch
        if epoch is None:
            return None
        template = {"params": state.params, "batch_stats": state.batch_stats,
                    "opt_state": state.opt_state, "step": state.step,
                    "rng": jax.random.PRNGKey(0)}
        restored = self._last.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_to_host(template)), meta=ocp.args.JsonRestore()))
        item = restored["state"]
        self.discard_after(epoch)
        state = state.replace(params=item["params"], batch_stats=item["batch_stats"],
                              opt_state=item["opt_state"], step=item["step"])
        return state, item["rng"], dict(restored["meta"])

    # -------------------------------------------------------------------- best
    def save_best(self, epoch: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Model variables of the best epoch so far (skipped if already written)."""
        if epoch in self._best.all_steps():  # a replay after resuming: identical content
            return
        item = {"params": state.params, "batch_stats": state.batch_stats}
        self._best.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_host(item)),
            meta=ocp.args.JsonSave(dict(meta, epoch=epoch))))

    # -------------------------------------------------------------------- both
    def restore_variables(self, which: str, variables: Mapping[str, Any]
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
        """({'params', 'batch_stats'}, meta) of `which` in ('last', 'best').

        `variables` (e.g. a fresh `train.init_variables`) must have the same structure.
        """
        if which not in ("last", "best"):
            raise ValueError(f"checkpoint must be 'last' or 'best', got {which!r}")
        manager = self._last if which == "last" else self._best
        epoch = manager.latest_step()
        if epoch is None:
            raise FileNotFoundError(f"no {which!r} checkpoint under {self.directory}; "
                                    "train this fold first (python -m surgfusion_jax.main).")
        restored = manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        item = {}
        for key in ("params", "batch_stats"):
            want = jax.tree.structure(variables[key])
            got = restored["state"].get(key, {})
            if jax.tree.structure(got) != want:
                raise ValueError(f"checkpoint {self.directory}/{which} does not fit this model "
                                 f"({key} differ); was it trained with another config.model?")
            item[key] = jax.tree.map(jax.numpy.asarray, got)
        return item, dict(restored["meta"])

    def close(self) -> None:
        self._last.close()
        self._best.close()
