"""Recompute a run's test-fold predictions from its saved checkpoints (no training).

For every fold of `<run workdir>/splits.json` that the run trained (`config.cv.folds`),
and for both phases, the 'best' and the 'last' checkpoints are restored
(`checkpoints.PhaseCheckpoints.restore_variables`) and evaluated on the fold's test
videos with the training engine's own evaluation (`train.evaluate` on the same
`input_pipeline` device data and bucketed plan as `cross_validation.run_fold`). The
result has the layout of `cross_validation`'s fold records:

  {'name', 'test', 'models': {head: {'predictions': {
      'checkpoint_best': {'epoch', 'video_ids', 'true', 'pred'},   # 'best' state
      'final':           {'epoch', 'video_ids', 'true', 'pred'}}}}}  # 'last' state

with predictions in score units, so `experiments.common.summarise` gives the numbers of
the run that wrote the checkpoints, bit for bit (XLA evaluation is deterministic for the
same program and inputs). The run's own `config.json` is used (it is what the
checkpoints were trained with); `data_dir` may point to a moved feature folder.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from surgfusion_jax import (checkpoints, cross_validation, feature_dataset, input_pipeline,
                            metrics, splits, train)

STATES = {"checkpoint_best": "best", "final": "last"}


class MissingRunError(FileNotFoundError):
    """The run has not been trained (fully) yet; the message names the fix."""


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise MissingRunError(f"{path} not found: run {os.path.basename(workdir)!r} was never "
                              "trained; run the experiment without --from_checkpoints first "
                              "(or restrict it with --variants/--datasets).")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def _differences(saved: ml_collections.ConfigDict, expected: Any) -> list[str]:
    from experiments.common import flatten

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
    config = load_config(workdir)
    if expected is not None:
        diff = _differences(config, expected)
        if diff:
            logging.warning("run %s was trained with other values of %s than requested; "
                            "reporting the saved run", workdir, diff)
    dataset = feature_dataset.load_feature_dataset(data_dir or config.data.data_dir,
                                                   config.data.name)
    modalities = tuple(config.data.modalities)
    samples = dataset.samples
    folds = splits.load_splits(os.path.join(workdir, "splits.json"))
    selected = set(config.cv.folds or range(1, len(folds) + 1))
    data = input_pipeline.make_device_data(samples, modalities, config.data.score_max,
                                           window=config.data.window,
                                           min_bucket=config.min_bucket)
    model = train.build_model(config.model, modalities)
    template = train.abstract_variables(model, next(iter(data.features.values())).shape[-1])
    position = {s["video_id"]: i for i, s in enumerate(samples)}
    lengths = [int(s["num_segments"]) for s in samples]
    scores = [float(s["score"]) for s in samples]
    records = []
    for k, fold in enumerate(folds):
        if k + 1 not in selected:
            continue
        test = train.EvalSet.make(lengths, [position[v] for v in fold.test], scores,
                                  config.eval_batch_size, config.min_bucket)
        video_ids = [samples[i]["video_id"] for i in test.indices]
        record: dict[str, Any] = {"name": fold.name, "train": list(fold.train),
                                  "test": list(fold.test), "models": {}}
        for phase in train.PHASES:
            directory = os.path.join(workdir, "checkpoints", fold.name, phase)
            ckpt = checkpoints.PhaseCheckpoints(directory)
            try:
                for key, which in STATES.items():
                    preds, epoch = _evaluate(ckpt, which, model, template, config, phase,
                                             data, test)
                    for head, pred in preds.items():
                        record["models"].setdefault(head, {"predictions": {}})
                        record["models"][head]["predictions"][key] = {
                            "epoch": epoch, "video_ids": video_ids,
                            "true": test.scores.tolist(),
                            "pred": metrics.to_score_units(pred, config.data.score_max).tolist()}
            finally:
                ckpt.close()
        records.append(record)
    return cross_validation.run_config_dict(config), records


def _evaluate(ckpt: checkpoints.PhaseCheckpoints, which: str, model: Any, template: Any,
              config: ml_collections.ConfigDict, phase: str, data: Any, test: Any
              ) -> tuple[dict[str, np.ndarray], int]:
    """Normalised test predictions per head of one checkpoint, and its epoch."""
    try:
        variables, meta = ckpt.restore_variables(which, template)
    except FileNotFoundError as e:
        raise MissingRunError(f"{e} (run the experiment without --from_checkpoints to "
                              "finish training)") from None
    cfg = config[phase]
    if which == "last" and int(meta["epoch"]) != int(cfg.num_epochs):
        raise MissingRunError(f"{ckpt.directory}: the last checkpoint is epoch {meta['epoch']} "
                              f"of {cfg.num_epochs}; the run was interrupted, finish it by "
                              "running the experiment without --from_checkpoints.")
    state = train.create_train_state(model, variables, train.make_optimizer(phase, cfg), phase,
                                     learning_rate=cfg.learning_rate,
                                     loss_alpha=config.loss_alpha)
    return train.evaluate(state, data, test.plan, test.indices), int(meta["epoch"])
