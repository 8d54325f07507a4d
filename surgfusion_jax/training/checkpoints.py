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

Faults. A step that cannot be read (truncated or missing files) is skipped with one
warning line naming its folder, and the previous step is used; when no step can be read,
`CheckpointError` names the folder, the cause and how to retrain that fold and phase. A
save that fills the disk removes its temporary folder and raises `errors.DiskFullError`:
the newest complete step stays the newest.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from surgfusion_jax import errors

TRAIN_COMMAND = "python -m surgfusion_jax.main --config=<the run's config>"


class CheckpointError(errors.UserError):
    """No step of a checkpoint can be read; the message says how to retrain it.

    `command` (the training command line) is filled in by the entry point that knows it."""

    def __init__(self, folder: str, cause: BaseException | str,
                 command: str = TRAIN_COMMAND):
        super().__init__(folder, cause)
        self.folder, self.cause, self.command = folder, errors.first_line(cause), command

    def __str__(self) -> str:
        phase_dir = os.path.normpath(self.folder)  # .../<fold>/<phase>[/last|best[/<step>]]
        for _ in range(2):
            if os.path.basename(phase_dir) in ("last", "best") or \
                    os.path.basename(os.path.dirname(phase_dir)) in ("last", "best"):
                phase_dir = os.path.dirname(phase_dir)
        return (f"cannot read the checkpoint {self.folder} ({self.cause}); to retrain that "
                f"fold and phase, delete {phase_dir} and re-run {self.command}")


def _drop_closed_loop_noise(unraisable: Any) -> None:
    # When one read of a damaged step fails, orbax closes its event loop while TensorStore
    # still completes the other reads; their callbacks then raise "Event loop is closed"
    # in TensorStore's threads (dozens of tracebacks that hide the real cause).
    if isinstance(unraisable.exc_value, RuntimeError) and \
            str(unraisable.exc_value) == "Event loop is closed":
        return
    _previous_hook(unraisable)


_previous_hook: Callable[[Any], None] = sys.unraisablehook
_damaged: set[str] = set()  # steps found unreadable in this process


class _DropDamagedReads(logging.Filter):
    """asyncio's 'Future exception was never retrieved' for the other failed reads of a
    step already reported as damaged."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and any(d in str(error) for d in _damaged))


def _quiet_failed_reads() -> None:
    global _previous_hook
    if sys.unraisablehook is not _drop_closed_loop_noise:
        _previous_hook = sys.unraisablehook
        sys.unraisablehook = _drop_closed_loop_noise
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropDamagedReads) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropDamagedReads())


def _manager(directory: str, read_only: bool, keep: int = 1) -> ocp.CheckpointManager:
    # read_only only stops folder creation here (orbax's own read_only mode logs warnings).
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "meta"))


def _remove_step(folder: str, epoch: int, settle_s: float = 0.2, timeout_s: float = 10.0
                 ) -> None:
    """Removes step `epoch`'s (temporary) folders under `folder` until they stay gone: when
    one orbax writer thread fails, the others may still be writing into the step."""
    deadline = time.monotonic() + timeout_s
    while True:
        names = [n for n in os.listdir(folder) if n == str(epoch) or n.startswith(f"{epoch}.")]
        for name in names:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        if not names or time.monotonic() > deadline:
            return
        time.sleep(settle_s)  # then look again: a late writer may have recreated it


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
        self._save(self._last, "last", epoch, ocp.args.Composite(
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
        if not self._last.all_steps():
            return None
        template = _to_host({"params": state.params, "batch_stats": state.batch_stats,
                             "opt_state": state.opt_state, "step": state.step,
                             "rng": jax.random.PRNGKey(0)})
        epoch, restored = self._restore(self._last, "last", lambda: ocp.args.Composite(
            state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()), epoch)
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
        self._save(self._best, "best", epoch, ocp.args.Composite(
            state=ocp.args.StandardSave(_to_host(item)),
            meta=ocp.args.JsonSave(dict(meta, epoch=epoch))))

    # -------------------------------------------------------------------- both
    def restore_variables(self, which: str, variables: Mapping[str, Any]
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
        """({'params', 'batch_stats'}, meta) of `which` in ('last', 'best'): its newest
        readable step (meta's 'epoch' tells which).

        `variables` (e.g. a fresh `train.init_variables`) must have the same structure.
        FileNotFoundError when there is no step, CheckpointError when none can be read.
        """
        if which not in ("last", "best"):
            raise ValueError(f"checkpoint must be 'last' or 'best', got {which!r}")
        manager = self._last if which == "last" else self._best
        if manager.latest_step() is None:
            raise FileNotFoundError(f"no {which!r} checkpoint under {self.directory}; "
                                    "train this fold first (python -m surgfusion_jax.main).")
        _, restored = self._restore(manager, which, lambda: ocp.args.Composite(
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

    # -------------------------------------------------------------------- faults
    def _restore(self, manager: ocp.CheckpointManager, which: str,
                 args: Callable[[], Any], epoch: int | None = None) -> tuple[int, Any]:
        """(step, restored) of the newest step <= `epoch` (default: any) that can be read;
        one warning line per unreadable step skipped."""
        steps = sorted((s for s in manager.all_steps() if epoch is None or s <= epoch),
                       reverse=True)
        folder = os.path.join(self.directory, which)
        if not steps:
            raise CheckpointError(folder, f"no step at or before epoch {epoch}")
        _quiet_failed_reads()
        for i, step in enumerate(steps):
            try:
                return step, manager.restore(step, args=args())
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable file means damaged
                damaged = os.path.join(folder, str(step))
                _damaged.add(os.path.abspath(damaged))
                if i + 1 == len(steps):
                    raise CheckpointError(damaged, e) from None
                errors.warn(f"checkpoint {damaged} is damaged ({errors.first_line(e, 200)}); "
                            f"using epoch {steps[i + 1]} instead.")
        raise AssertionError("unreachable")

    def _save(self, manager: ocp.CheckpointManager, which: str, epoch: int, args: Any
              ) -> None:
        """`manager.save`, with a full disk turned into DiskFullError after removing the
        step's temporary folder (so the previous step stays the newest)."""
        try:
            manager.save(epoch, args=args)
        except Exception as e:
            if not errors.is_disk_full(e):
                raise
            folder = os.path.join(self.directory, which)
            _remove_step(folder, epoch)
            manager.reload()
            raise errors.DiskFullError(folder, e) from None

    def close(self) -> None:
        self._last.close()
        self._best.close()
