"""A run's data in memory, and the one way to restore and evaluate its checkpoints.

A *run* is what `python -m surgfusion_jax.main` leaves in its workdir (layout in
`cross_validation`): `config.json`, `splits.json` and orbax checkpoints per fold and
phase. Training (`cross_validation`), prediction (`predict`) and the experiments
(recomputing tables from checkpoints, Fig. 4) all need the same things: the dataset on
the device, the folds, the model, a checkpoint restored and scored. `RunData` holds them;

  * `prepare(config, workdir, dataset, folds)` builds it from what a caller already holds
    (training builds it once and hands it on to prediction: nothing is read twice);
  * `load_run(workdir)` builds it from a finished run's files;
  * `RunData.groups()` lists the run's members (fold x seed, `MemberSpec`) in the groups
    that train together as one program;
  * `restore(run, member, phase, which)` reads one member's checkpoint ('last' | 'best');
  * `evaluate(run, group, variables, phase)` scores a group's checkpoints with the
    training engine's own stacked evaluation (`train.evaluate_stacked`, same device
    data, same group size, same bucketed plan), so a number recomputed from checkpoints
    is the number training reported, bit for bit.

Members. Seeds are `config.seed + i` for i < `config.num_seeds`; member (seed s, fold k)
initialises from `fold_in(fold_in(PRNGKey(s), k), 0)` and trains phase p with
`fold_in(fold_in(PRNGKey(s), k), p + 1)`. Its checkpoints live under
`checkpoints/<fold>/<phase>` (one seed) or `checkpoints/seed_<s>/<fold>/<phase>`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from surgfusion_jax import errors
from surgfusion_jax.io import read_json, write_json
from surgfusion_jax.data import feature_dataset, input_pipeline, splits
from surgfusion_jax.models.surgfusion import SurgFusionNet
from surgfusion_jax.training import checkpoints, phase as phase_lib, train


class MissingRunError(errors.UserError):
    """The run, or one of its checkpoints, does not exist (yet); the message names the fix."""


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """One member of a run: a fold trained with one seed."""

    name: str  # '<fold>' (one seed) or 'seed_<s>/<fold>'
    seed: int
    fold_index: int  # 0-based position among all folds (keys, inner split seed)
    fold: splits.Fold
    train: tuple[str, ...]
    val: tuple[str, ...]

    @property
    def key(self) -> Any:
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), self.fold_index)


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

    @functools.cached_property
    def scores(self) -> list[float]:
        """The score (score units) of every sample."""
        return [float(s["score"]) for s in self.samples]

    def eval_set(self, video_ids: Sequence[str]) -> phase_lib.EvalSet:
        """The dataset indices and true scores of `video_ids`."""
        return phase_lib.EvalSet.make([self.position[v] for v in video_ids], self.scores)

    def eval_sets(self, member: MemberSpec) -> dict[str, phase_lib.EvalSet]:
        """A member's evaluation sets: 'test' and, with an inner split, 'val'."""
        sets = {"test": self.eval_set(member.fold.test)}
        if member.val:
            sets["val"] = self.eval_set(member.val)
        return sets

    @property
    def seeds(self) -> list[int]:
        return [int(self.config.seed) + i for i in range(int(self.config.get("num_seeds", 1)))]

    def members(self) -> list[MemberSpec]:
        """Every (seed, selected fold) of the run, seed-major."""
        out = []
        for seed in self.seeds:
            for k, fold in self.selected_folds():
                train_ids, val_ids = list(fold.train), []
                if self.config.cv.inner_val_fraction > 0:
                    train_ids, val_ids = splits.inner_validation_split(
                        fold.train, self.samples, self.config.cv.inner_val_fraction,
                        seed=self.config.cv.seed + k)
                name = fold.name if len(self.seeds) == 1 else f"seed_{seed}/{fold.name}"
                out.append(MemberSpec(name, seed, k, fold, tuple(train_ids), tuple(val_ids)))
        return out

    def groups(self) -> list[list[MemberSpec]]:
        """The members in the groups that train as one program each."""
        members, size = self.members(), int(self.config.get("max_runs_per_program", 0))
        size = size if size > 0 else len(members)
        return [members[i:i + size] for i in range(0, len(members), size)]

    def checkpoint_dir(self, member: str, phase: str) -> str:
        return os.path.join(self.workdir, "checkpoints", member, phase)


def check_modalities(config: ml_collections.ConfigDict,
                     dataset: feature_dataset.FeatureDataset) -> None:
    """Raises DatasetError when `dataset` lacks a modality of `config.data.modalities`."""
    missing = [m for m in config.data.modalities if m not in dataset.modalities]
    if missing:
        raise feature_dataset.DatasetError(
            f"config.data.modalities: {missing} not in dataset {dataset.path!r} (it has "
            f"{list(dataset.modalities)}); prepare them, or drop them with "
            "--config.data.modalities.")


def prepare(config: ml_collections.ConfigDict, workdir: str,
            dataset: feature_dataset.FeatureDataset, folds: Sequence[splits.Fold]) -> RunData:
    """RunData from a loaded dataset and folds: the features go to the device once."""
    check_modalities(config, dataset)
    modalities = tuple(config.data.modalities)
    data = input_pipeline.make_device_data(dataset.samples, modalities, config.data.score_max,
                                           window=config.data.window,
                                           min_bucket=config.min_bucket,
                                           target_max=config.data.get("target_max", 0.5))
    return RunData(workdir, config, dataset, list(folds), data,
                   train.build_model(config.model, modalities))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (`<workdir>/config.json`)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise MissingRunError(f"{path} not found: {workdir!r} is not the workdir of a "
                              "`python -m surgfusion_jax.main` run (train it first).")
    return ml_collections.ConfigDict(read_json(path))


FEATURES_FILE = "dataset_metadata.json"


def check_or_write_features(workdir: str, dataset: feature_dataset.FeatureDataset, *,
                            write: bool = True) -> None:
    """Refuses a dataset whose features were prepared differently (backbone, checkpoint,
    preprocessing: `feature_dataset.check_same_features`) from those the run in
    `workdir` trained on, recorded in `<workdir>/dataset_metadata.json` on first use."""
    path = os.path.join(workdir, FEATURES_FILE)
    if os.path.exists(path):
        feature_dataset.check_same_features({f"the run in {workdir}": read_json(path),
                                             dataset.path: dataset.metadata})
    elif write:
        write_json(path, dataset.metadata, sort_keys=True)


def load_run(workdir: str, data_dir: str | None = None, name: str | None = None) -> RunData:
    """RunData of the finished (or partly trained) run in `workdir`.

    `data_dir` / `name` point to the feature dataset when it moved (default: the run's).
    """
    config = load_config(workdir)
    dataset = feature_dataset.load_feature_dataset(data_dir or config.data.data_dir,
                                                   name or config.data.name)
    check_or_write_features(workdir, dataset, write=False)
    config.data.score_max = feature_dataset.resolve_score_max(dataset, config.data.score_max)
    folds = splits.load_splits(os.path.join(workdir, "splits.json"))
    return prepare(config, workdir, dataset, folds)


def restore(run: RunData, member: str, phase: str, which: str
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """({'params', 'batch_stats'}, meta) of checkpoint `which` ('last' | 'best') of one
    member (its name, e.g. 'fold_1') and phase; MissingRunError when it was not written."""
    ckpt = checkpoints.PhaseCheckpoints(run.checkpoint_dir(member, phase), read_only=True)
    try:
        return ckpt.restore_variables(which, run.template)
    except FileNotFoundError as e:
        raise MissingRunError(str(e)) from None
    except checkpoints.CheckpointError as e:  # the entry point may name its own command
        e.command = ("the training command of this run (python -m surgfusion_jax.main "
                     f"--config=<its config> --config.workdir={run.workdir})")
        raise
    finally:
        ckpt.close()


def evaluate(run: RunData, group: Sequence[MemberSpec], variables: Sequence[Mapping[str, Any]],
             phase: str = "fusion", plan: Sequence[input_pipeline.EvalBatch] | None = None
             ) -> list[dict[str, np.ndarray]]:
    """Normalised predictions {head: [N]} (NaN outside the plan) of each member of `group`
    with its `variables`, scored together as training scores them (module docstring).

    `plan` defaults to the group's training plan: each member's own evaluation videos."""
    cfg = run.config[phase]
    states = train.create_train_states(run.model, train.stack(variables),
                                       train.phase_optimizer(run.config, phase), phase,
                                       learning_rate=cfg.learning_rate,
                                       loss_alpha=run.config.loss_alpha)
    if plan is None:
        plan = phase_lib.eval_plan(run.data, [run.eval_sets(m) for m in group],
                                   run.config.eval_batch_size, run.config.min_bucket)
    preds = train.evaluate_stacked(states, run.data, plan,
                                   run_axis=run.config.get("run_axis", "vmap"))
    return [{h: p[r] for h, p in preds.items()} for r in range(len(group))]
