"""A run's data in memory, and the one way to restore and evaluate its checkpoints.

A *run* is what `python -m surgfusion_jax.main` leaves in its workdir (layout in
`cross_validation`): `config.json`, `splits.json` and orbax checkpoints per fold and
phase. Training (`cross_validation`), prediction (`predict`) and the experiments
(recomputing tables from checkpoints, Fig. 4) all need the same things: the dataset on
the device, the folds, the model, a checkpoint restored and scored. `RunData` holds them;

  * `prepare(config, workdir, dataset, folds)` builds it from what a caller already holds
    (training builds it once and hands it on to prediction: nothing is read twice);
  * `load_run(workdir)` builds it from a finished run's files;
  * `restore(run, fold, phase, which)` reads one checkpoint ('last' or 'best');
  * `evaluate(run, variables, indices, phase)` scores videos with the training engine's
    own evaluation (`train.evaluate`: same device data and bucketed plan), so a number
    recomputed from a checkpoint is the number training reported, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from surgfusion_jax import errors
from surgfusion_jax.data import feature_dataset, input_pipeline, splits
from surgfusion_jax.models.surgfusion import SurgFusionNet
from surgfusion_jax.training import checkpoints, train


class MissingRunError(errors.UserError):
    """The run, or one of its checkpoints, does not exist (yet); the message names the fix."""


@dataclasses.dataclass(eq=False)
class RunData:
    """Everything needed to train or score the folds of one run."""

    workdir: str
    config: ml_collections.ConfigDict
    dataset: feature_dataset.FeatureDataset
    folds: list[splits.Fold]
    data: input_pipeline.DeviceData
    model: SurgFusionNet

    @property
    def samples(self) -> list[dict[str, Any]]:
        return self.dataset.samples

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.config.data.modalities)

    @property
    def feature_dim(self) -> int:
        return int(next(iter(self.data.features.values())).shape[-1])

    @functools.cached_property
    def position(self) -> dict[str, int]:
        """video id -> index in `samples` (and in the device data)."""
        return {s["video_id"]: i for i, s in enumerate(self.samples)}

    @functools.cached_property
    def template(self) -> Any:
        """Shapes of the model's variables (restores need the structure)."""
        return train.abstract_variables(self.model, self.feature_dim)

    def selected_folds(self) -> list[tuple[int, splits.Fold]]:
        """(0-based index, fold) of the folds the run trains (`config.cv.folds`)."""
        chosen = set(self.config.cv.folds or range(1, len(self.folds) + 1))
        return [(k, f) for k, f in enumerate(self.folds) if k + 1 in chosen]

    def eval_set(self, video_ids: Sequence[str]) -> train.EvalSet:
        """The bucketed evaluation plan and true scores of `video_ids`."""
        lengths = [int(s["num_segments"]) for s in self.samples]
        scores = [float(s["score"]) for s in self.samples]
        return train.EvalSet.make(lengths, [self.position[v] for v in video_ids], scores,
                                  self.config.eval_batch_size, self.config.min_bucket)

    def checkpoint_dir(self, fold: str, phase: str) -> str:
        return os.path.join(self.workdir, "checkpoints", fold, phase)


def prepare(config: ml_collections.ConfigDict, workdir: str,
            dataset: feature_dataset.FeatureDataset, folds: Sequence[splits.Fold]) -> RunData:
    """RunData from a loaded dataset and folds: the features go to the device once."""
    modalities = tuple(config.data.modalities)
    missing = [m for m in modalities if m not in dataset.modalities]
    if missing:
        raise MissingRunError(
            f"dataset {dataset.path!r} lacks modalities {missing} the run uses (it has "
            f"{list(dataset.modalities)}); prepare them, or drop them with "
            "--config.data.modalities.")
    data = input_pipeline.make_device_data(dataset.samples, modalities, config.data.score_max,
                                           window=config.data.window,
                                           min_bucket=config.min_bucket)
    return RunData(workdir, config, dataset, list(folds), data,
                   train.build_model(config.model, modalities))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (`<workdir>/config.json`)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise MissingRunError(f"{path} not found: {workdir!r} is not the workdir of a "
                              "`python -m surgfusion_jax.main` run (train it first).")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, data_dir: str | None = None, name: str | None = None) -> RunData:
    """RunData of the finished (or partly trained) run in `workdir`.

    `data_dir` / `name` point to the feature dataset when it moved (default: the run's).
    """
    config = load_config(workdir)
    dataset = feature_dataset.load_feature_dataset(data_dir or config.data.data_dir,
                                                   name or config.data.name)
    folds = splits.load_splits(os.path.join(workdir, "splits.json"))
    return prepare(config, workdir, dataset, folds)


def restore(run: RunData, fold: str, phase: str, which: str
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """({'params', 'batch_stats'}, meta) of checkpoint `which` ('last' | 'best') of one
    fold and phase; MissingRunError when it was not written."""
    ckpt = checkpoints.PhaseCheckpoints(run.checkpoint_dir(fold, phase), read_only=True)
    try:
        return ckpt.restore_variables(which, run.template)
    except FileNotFoundError as e:
        raise MissingRunError(str(e)) from None
    finally:
        ckpt.close()


def evaluate(run: RunData, variables: Mapping[str, Any], indices: Sequence[int],
             phase: str = "fusion", plan: Sequence[input_pipeline.EvalBatch] | None = None
             ) -> dict[str, np.ndarray]:
    """Normalised predictions per head of `phase` for the videos `indices`, in that order."""
    cfg = run.config[phase]
    if plan is None:
        lengths = [int(s["num_segments"]) for s in run.samples]
        plan = input_pipeline.make_eval_plan(lengths, indices, run.config.eval_batch_size,
                                             run.config.min_bucket)
    state = train.create_train_state(run.model, variables, train.make_optimizer(phase, cfg),
                                     phase, learning_rate=cfg.learning_rate,
                                     loss_alpha=run.config.loss_alpha)
    return train.evaluate(state, run.data, plan, indices)
