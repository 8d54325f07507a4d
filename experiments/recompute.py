"""Recompute a run's test-fold predictions from its saved checkpoints (no training).

For every fold of `<run workdir>/splits.json` that the run trained (`config.cv.folds`),
and for both phases, the 'best' and the 'last' checkpoints are restored
(`training.runs.restore`) and evaluated on the fold's test
videos with `training.runs.evaluate`: in the same groups of runs, with the same stacked
evaluation and bucketed plan as training (`cross_validation.run_group`). The
result has the layout of `cross_validation`'s fold records:

  {'name', 'test', 'models': {head: {'predictions': {
      'checkpoint_best': {'epoch', 'video_ids', 'true', 'pred'},   # 'best' state
      'final':           {'epoch', 'video_ids', 'true', 'pred'}},  # 'last' state
      'history': [...]}}}          # per epoch, as saved in the 'last' checkpoint's meta

with predictions in score units, so `evaluation.summary.summarise(source='predictions')` gives the numbers of
the run that wrote the checkpoints, bit for bit (XLA evaluation is deterministic for the
same program and inputs; the history-based readings read the same per-epoch numbers that
training recorded). The ridge baselines are recomputed from the features and folds
(`cross_validation.ridge_baselines`: closed form, deterministic). The run's own `config.json` is used (it is what the
checkpoints were trained with); `data_dir` may point to a moved feature folder.
"""

from __future__ import annotations

from typing import Any

import ml_collections
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
                 ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(saved config as a dict, fold records, ridge baselines) of the run in `workdir`
    (module docstring).

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
    for group in run.groups():  # scored in the groups they trained in: same numbers
        tests = [run.eval_set(m.fold.test) for m in group]
        group_records = [{"name": m.fold.name, "seed": m.seed, "train": list(m.fold.train),
                          "test": list(m.fold.test), "models": {}} for m in group]
        for phase in train.PHASES:
            for key, which in STATES.items():
                restored = [_restore(run, m.name, phase, which) for m in group]
                preds = runs.evaluate(run, group, [v for v, _ in restored], phase)
                for record, test, pred, (_, meta) in zip(group_records, tests, preds, restored):
                    video_ids = [run.samples[i]["video_id"] for i in test.indices]
                    for head, values in pred.items():
                        record["models"].setdefault(head, {"predictions": {}})
                        if which == "last":  # its meta holds the phase's whole history
                            record["models"][head]["history"] = cross_validation.history_rows(
                                meta["history"], head)
                        record["models"][head]["predictions"][key] = {
                            "epoch": int(meta["epoch"]), "video_ids": video_ids,
                            "true": test.scores.tolist(),
                            "pred": metrics.to_score_units(
                                values[test.indices], config.data.score_max,
                                config.data.get("target_max", 0.5)).tolist()}
        records += group_records
    return (cross_validation.run_config_dict(config), records,
            cross_validation.ridge_baselines(run))


def _restore(run: runs.RunData, member: str, phase: str, which: str
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The variables of one checkpoint and its meta (epoch; 'last': the history); the
    'last' one must be the end."""
    try:
        variables, meta = runs.restore(run, member, phase, which)
    except runs.MissingRunError as e:
        raise runs.MissingRunError(f"{e} ({HINT} to the end)") from None
    num_epochs = run.config[phase].num_epochs
    if which == "last" and int(meta["epoch"]) != int(num_epochs):
        raise runs.MissingRunError(
            f"{run.checkpoint_dir(member, phase)}: the last checkpoint is epoch "
            f"{meta['epoch']} of {num_epochs}; the run was interrupted, finish it by running "
            "the experiment without --from_checkpoints.")
    return variables, meta
