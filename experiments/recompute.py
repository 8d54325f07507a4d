"""Recompute a run's test-fold predictions from its saved checkpoints (no training).

For every fold of `<run workdir>/splits.json` that the run trained (`config.cv.folds`),
and for both phases, the 'best' and the 'last' checkpoints are restored
(`training.runs.restore`) and evaluated on the fold's test
videos with `training.runs.evaluate`, the evaluation training itself reports with (same
device data and bucketed plan as `cross_validation.run_fold`). The
result has the layout of `cross_validation`'s fold records:

  {'name', 'test', 'models': {head: {'predictions': {
      'checkpoint_best': {'epoch', 'video_ids', 'true', 'pred'},   # 'best' state
      'final':           {'epoch', 'video_ids', 'true', 'pred'}}}}}  # 'last' state

with predictions in score units, so `evaluation.summary.summarise(source='predictions')` gives the numbers of
the run that wrote the checkpoints, bit for bit (XLA evaluation is deterministic for the
same program and inputs). The run's own `config.json` is used (it is what the
checkpoints were trained with); `data_dir` may point to a moved feature folder.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from absl import logging

from experiments.spec import flatten
from surgfusion_jax.evaluation import metrics
from surgfusion_jax.training import cross_validation, runs, train

STATES = {"checkpoint_best": "best", "final": "last"}
HINT = "run the experiment without --from_checkpoints to train it"


def _differences(saved: ml_collections.ConfigDict, expected: Any) -> list[str]:
    a = flatten(saved)
    b = flatten(ml_collections.ConfigDict(cross_validation.run_config_dict(expected)))
    return sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and k != "data.data_dir")


def fold_records(workdir: str, data_dir: str | None = None, expected: Any = None
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(saved config as a dict, fold records) of the run in `workdir` (module docstring).

    `expected`: the config the caller would train with; differences are logged (the
    saved config wins: it produced the checkpoints).
    """
    try:
        run = runs.load_run(workdir, data_dir)
    except runs.MissingRunError as e:
        raise runs.MissingRunError(f"{e} ({HINT}, or restrict it with --variants/--datasets)"
                                   ) from None
    config = run.config
    if expected is not None:
        diff = _differences(config, expected)
        if diff:
            logging.warning("run %s was trained with other values of %s than requested; "
                            "reporting the saved run", workdir, diff)
    records = []
    for _, fold in run.selected_folds():
        test = run.eval_set(fold.test)
        video_ids = [run.samples[i]["video_id"] for i in test.indices]
        record: dict[str, Any] = {"name": fold.name, "train": list(fold.train),
                                  "test": list(fold.test), "models": {}}
        for phase in train.PHASES:
            for key, which in STATES.items():
                preds, epoch = _evaluate(run, fold.name, phase, which, test)
                for head, pred in preds.items():
                    record["models"].setdefault(head, {"predictions": {}})
                    record["models"][head]["predictions"][key] = {
                        "epoch": epoch, "video_ids": video_ids, "true": test.scores.tolist(),
                        "pred": metrics.to_score_units(pred, config.data.score_max).tolist()}
        records.append(record)
    return cross_validation.run_config_dict(config), records


def _evaluate(run: runs.RunData, fold: str, phase: str, which: str, test: train.EvalSet
              ) -> tuple[dict[str, np.ndarray], int]:
    """Normalised test predictions per head of one checkpoint, and its epoch."""
    try:
        variables, meta = runs.restore(run, fold, phase, which)
    except runs.MissingRunError as e:
        raise runs.MissingRunError(f"{e} ({HINT} to the end)") from None
    num_epochs = run.config[phase].num_epochs
    if which == "last" and int(meta["epoch"]) != int(num_epochs):
        raise runs.MissingRunError(
            f"{run.checkpoint_dir(fold, phase)}: the last checkpoint is epoch {meta['epoch']} "
            f"of {num_epochs}; the run was interrupted, finish it by running the experiment "
            "without --from_checkpoints.")
    preds = runs.evaluate(run, variables, test.indices, phase, plan=test.plan)
    return preds, int(meta["epoch"])
