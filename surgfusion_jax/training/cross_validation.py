"""Cross-validated two-phase training of SurgFusion-Net (paper §IV-A/B; docs/design.md §4-5).

`run_cross_validation(config, workdir)`:
  1. loads the feature dataset once and keeps it on the device (`input_pipeline`);
  2. makes the folds (`splits.make_splits`: JIGSAWS LOSO/LOUO/k-fold, RAH/RARP k-fold,
     grouped by source video, seeded) and saves them as `<workdir>/splits.json` (a
     resumed run reuses that file);
  3. per fold: phase (a) 'unimodal', then phase (b) 'fusion' initialised from phase
     (a)'s checkpoint of the same fold (`config.fusion.init_from`: 'last', default, or
     'best', the test-selected epoch as in MAQA's code, which leaks test information
     into the fusion phase). Both phases evaluate the test fold (and the inner
     validation split when `cv.inner_val_fraction` > 0) after every epoch;
  4. writes `results.json` / `results.md` (`evaluation.summary.write_results`) with the
     readings of every fold's history (`summary.PROTOCOLS`: best test epoch per fold, the
     epoch of the best fold-mean test SCC, the final epoch and, with an inner validation
     split, the validation-selected epoch) and the ridge baselines of the same folds
     (`ridge_baselines`, computed once before training).

Workdir layout:
  config.json           the run's config (a resumed run must match it)
  splits.json           the folds (video ids)
  checkpoints/<fold>/<phase>/{last,best}/   orbax (see `checkpoints`)
  tensorboard/<fold>/<phase>/               scalars per epoch
  results.json, results.md

PRNG keys: fold k uses fold_in(PRNGKey(seed), k); its parameters are initialised with
fold_in(that, 0) and phase p (0 unimodal, 1 fusion) trains with fold_in(that, p + 1).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from surgfusion_jax import config_lib, errors
from surgfusion_jax.data import feature_dataset, splits
from surgfusion_jax.evaluation import baselines, metrics, paper_results, summary
from surgfusion_jax.io import read_json, to_jsonable, write_json
from surgfusion_jax.models import init_schemes
from surgfusion_jax.training import (checkpoints, initial_weights, phase, runs, tensorboard,
                                     train)

# Fields that may differ between a run and its resumption (they change no number).
RUNTIME_FIELDS = ("workdir", "debug", "progress_bar", "compilation_cache_dir", "csfb_plots")


class ConfigError(errors.UserError, ValueError):
    """A config value is invalid; the message names the field and the fix."""


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the values `run_cross_validation` relies on (after `config_lib.resolve`);
    raises ConfigError or config_lib.PresetError."""
    config = config_lib.resolve(config)
    def need(ok: bool, field: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"config.{field}: {message} (set it with --config.{field}=...).")

    need(bool(config.data.name), "data.name", "empty; name the feature dataset to train on")
    need(config.data.score_max >= 0, "data.score_max",
         f"must be >= 0 (0: from the dataset's score scale), got {config.data.score_max}")
    need(config.data.window >= 1, "data.window", f"must be >= 1, got {config.data.window}")
    mods = tuple(config.data.modalities)
    need(bool(mods) and set(mods) <= set(feature_dataset.MODALITIES)
         and len(set(mods)) == len(mods), "data.modalities",
         f"must be distinct names from {feature_dataset.MODALITIES}, got {mods}")
    need(config.cv.scheme in splits.SCHEMES, "cv.scheme",
         f"must be one of {splits.SCHEMES}, got {config.cv.scheme!r}")
    need(0.0 <= config.cv.inner_val_fraction < 1.0, "cv.inner_val_fraction",
         f"must lie in [0, 1), got {config.cv.inner_val_fraction}")
    need(config.model.fusion in ("avg", "cat", "vanilla_ca", "negative_ca", "dra"),
         "model.fusion", f"unknown fusion strategy {config.model.fusion!r}")
    need(config.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
         f"must be float32, bfloat16 or float16, got {config.model.dtype!r}")
    need(config.model.features % max(config.model.num_heads, 1) == 0 and
         config.model.num_heads >= 1, "model.num_heads",
         f"must be >= 1 and divide model.features={config.model.features}")
    need(0.0 < config.data.target_max <= 1.0, "data.target_max",
         f"must lie in (0, 1] (a sigmoid head), got {config.data.target_max}")
    need(config.model.init in init_schemes.SCHEMES, "model.init",
         f"must be one of {init_schemes.SCHEMES}, got {config.model.init!r}")
    need(config.model.dra_relative_eps >= 0.0, "model.dra_relative_eps",
         f"must be >= 0 (0: the paper's Eq. 15), got {config.model.dra_relative_eps}")
    need(config.get("run_axis", "vmap") in train.RUN_AXES, "run_axis",
         f"must be one of {train.RUN_AXES}, got {config.get('run_axis')!r}")
    need(config.fusion.init_from in ("last", "best"), "fusion.init_from",
         f"must be 'last' or 'best', got {config.fusion.init_from!r}")
    for phase in train.PHASES:
        cfg = config[phase]
        need(cfg.num_epochs >= 1, f"{phase}.num_epochs", f"must be >= 1, got {cfg.num_epochs}")
        need(cfg.batch_size >= 1, f"{phase}.batch_size", f"must be >= 1, got {cfg.batch_size}")
        need(0 < cfg.end_learning_rate <= cfg.learning_rate, f"{phase}.end_learning_rate",
             f"must lie in (0, learning_rate={cfg.learning_rate}], got {cfg.end_learning_rate}")
    for field in ("eval_batch_size", "min_bucket", "checkpoint_every_epochs"):
        need(config[field] >= 1, field, f"must be >= 1, got {config[field]}")


def run_config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON data, without the runtime-only fields."""
    data = to_jsonable(config.to_dict())
    return {k: v for k, v in data.items() if k not in RUNTIME_FIELDS}


def resolve_workdir(config: ml_collections.ConfigDict) -> str:
    return config.workdir or os.path.join("runs", config.data.name)


def _check_or_write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, "config.json")
    current = run_config_dict(config)
    if os.path.exists(path):
        saved = read_json(path)
        for field, default in config_lib.ADDED_FIELDS.items():  # runs saved before them
            section, _, name = field.rpartition(".")
            if isinstance(saved.get(section), dict):
                saved[section].setdefault(name, default)
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ConfigError(f"workdir {workdir!r} holds a run with another config (differs in "
                              f"{diff}); resume with the same config or choose a new "
                              "--config.workdir.")
    write_json(path, current, sort_keys=True)


def load_folds(workdir: str, config: ml_collections.ConfigDict,
               samples: list[dict[str, Any]]) -> list[splits.Fold]:
    """The saved `splits.json` of the run, made (and saved) on first use."""
    path = os.path.join(workdir, "splits.json")
    if os.path.exists(path):
        return splits.load_splits(path)
    scheme = config.cv.scheme
    folds = splits.make_splits(samples, scheme, config.cv.num_folds if scheme == "kfold" else None,
                               seed=config.cv.seed, setup_dir=config.cv.setup_dir or None)
    splits.save_splits(folds, path, {"scheme": scheme, "seed": config.cv.seed,
                                     "dataset": config.data.name})
    return folds


def run_cross_validation(config: ml_collections.ConfigDict, workdir: str | None = None
                         ) -> tuple[dict[str, Any], runs.RunData]:
    """Trains and evaluates every fold; returns (results as written to results.json, the
    run's data in memory for `predict`; `evaluation.summary` has the results schema).

    Raises errors.UserError subclasses (a missing/broken dataset, ConfigError,
    splits.SplitError) and errors.StopRequested (debug.stop_after_epochs reached).
    """
    config = config_lib.resolve(config)  # the run saves and uses the preset's values
    validate_config(config)
    workdir = workdir or resolve_workdir(config)
    dataset = feature_dataset.load_feature_dataset(config.data.data_dir, config.data.name)
    config.data.score_max = feature_dataset.resolve_score_max(dataset, config.data.score_max)
    runs.check_modalities(config, dataset)  # before anything is written
    os.makedirs(workdir, exist_ok=True)
    _check_or_write_config(workdir, config)
    runs.check_or_write_features(workdir, dataset)
    folds = load_folds(workdir, config, dataset.samples)
    selected = set(config.cv.folds or range(1, len(folds) + 1))
    if not selected <= set(range(1, len(folds) + 1)):
        raise ConfigError(f"config.cv.folds: {sorted(selected)} are not all fold numbers of "
                          f"this run (1..{len(folds)}); fix --config.cv.folds.")
    run = runs.prepare(config, workdir, dataset, folds)
    ridge = ridge_baselines(run)  # cheap; before training, so a bad dataset fails first
    budget = phase.EpochBudget(config.debug.stop_after_epochs or None)
    records = [record for group in run.groups() for record in run_group(run, group, budget)]
    results = {"config": run_config_dict(config), "dataset": config.data.name,
               "scheme": config.cv.scheme, "seed": config.seed, "seeds": run.seeds,
               "score_max": config.data.score_max, "folds": records,
               "features_note": feature_dataset.backbone_note(dataset.metadata, config.data.name),
               "baselines": ridge}
    written = summary.write_results(workdir, results, paper=_paper_numbers(config))
    return written["results"], run


def _paper_numbers(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The paper's numbers for this dataset/scheme (default model only)."""
    m = config.model
    if (not config.data.get("paper_dataset")
            or (m.fusion, m.use_dfb, m.num_heads) != ("dra", True, 2)):
        return None
    try:
        return paper_results.reference_scores(
            config.data.paper_dataset, config.cv.scheme, task=config.data.get("paper_task") or None,
            modalities=tuple(config.data.modalities))
    except paper_results.PaperLookupError:
        return None


def _initial_variables(run: runs.RunData, group: Sequence[runs.MemberSpec]) -> list[dict]:
    """The members' starting variables: drawn from each one's key (`model.init`), or the
    file of its seed when `model.init_weights` names one (`initial_weights`; read once
    per seed, checked against one traced template)."""
    config = run.config
    pattern = config.model.get("init_weights") or ""
    if not pattern:
        return [train.init_variables(run.model, jax.random.fold_in(m.key, 0), run.feature_dim,
                                     scheme=config.model.init) for m in group]
    template = train.abstract_variables(run.model, run.feature_dim)
    per_seed = {seed: initial_weights.load(initial_weights.path_for_seed(pattern, seed), template)
                for seed in dict.fromkeys(m.seed for m in group)}
    return [per_seed[m.seed] for m in group]


def run_group(run: runs.RunData, group: list[runs.MemberSpec], budget: phase.EpochBudget
              ) -> list[dict[str, Any]]:
    """Both phases of the members of `group`, trained together as one program (each as
    it would train alone, `phase.run_phase`); returns their fold records
    (`evaluation.summary` schema, with the member's seed)."""
    config, samples = run.config, run.samples
    eval_sets = [run.eval_sets(m) for m in group]
    test_ids = [[samples[i]["video_id"] for i in es["test"].indices] for es in eval_sets]
    variables = train.stack(_initial_variables(run, group))
    records = [{"name": m.fold.name, "seed": m.seed, "train": list(m.train), "val": list(m.val),
                "test": list(m.fold.test), "models": {}} for m in group]
    desc = group[0].name if len(group) == 1 else f"{len(group)} runs"
    for p, phase_name in enumerate(train.PHASES):
        cfg = config[phase_name]
        if p > 0 and config.fusion.init_from == "best":
            variables = train.stack([runs.restore(run, m.name, train.PHASES[p - 1], "best")[0]
                                     for m in group])
        # init_from 'last': `variables` already hold the previous phase's final states
        states = train.create_train_states(run.model, variables,
                                           train.phase_optimizer(config, phase_name),
                                           phase_name,
                                           learning_rate=cfg.learning_rate,
                                           loss_alpha=config.loss_alpha,
                                           mask_padding=config.data.mask_padding)
        members = [phase.Member(
            m.name, np.array([run.position[v] for v in m.train]), es,
            jax.random.fold_in(m.key, p + 1),
            checkpoints.PhaseCheckpoints(run.checkpoint_dir(m.name, phase_name)),
            tensorboard.SummaryWriter(os.path.join(run.workdir, "tensorboard", m.name,
                                                   phase_name)))
            for m, es in zip(group, eval_sets)]
        try:
            states, metas = phase.run_phase(
                states, run.data, members, num_epochs=cfg.num_epochs,
                batch_size=cfg.batch_size, window=config.data.window,
                score_max=config.data.score_max, target_max=config.data.target_max,
                learning_rate=train.learning_rate_schedule(cfg),
                eval_batch_size=config.eval_batch_size, min_bucket=config.min_bucket,
                checkpoint_every=config.checkpoint_every_epochs,
                desc=f"{desc} {phase_name}", progress=config.progress_bar, budget=budget,
                run_axis=config.get("run_axis", "vmap"))
        finally:
            for m in members:
                m.writer.close()
                m.checkpoints.close()
        variables = {"params": states.params, "batch_stats": states.batch_stats}  # stacked
        for record, meta, es, ids in zip(records, metas, eval_sets, test_ids):
            final = {h: p[es["test"].indices] for h, p in meta["final"].items()}
            record["models"].update(_model_records(meta, final, es["test"], ids,
                                                   config.data.score_max,
                                                   config.data.target_max))
    return records


def history_rows(history: Sequence[Mapping[str, Any]], head: str) -> list[dict[str, Any]]:
    """One head's reporting history (epoch, loss, test scc/mae, val_scc/val_mae) from a
    phase's history (`phase.run_phase`, also kept in its 'last' checkpoints)."""
    rows = []
    for entry in history:
        row = {"epoch": entry["epoch"], "loss": entry["loss"],
               "scc": entry["test"][head]["scc"], "mae": entry["test"][head]["mae"]}
        if "val" in entry:
            row.update(val_scc=entry["val"][head]["scc"], val_mae=entry["val"][head]["mae"])
        rows.append(row)
    return rows


def ridge_baselines(run: runs.RunData) -> dict[str, Any]:
    """The run's linear-probe baselines (`evaluation.baselines.ridge_cv`; results'
    'baselines'): once per selected fold, seed-free, on the whole training fold (ridge picks
    its penalty by its own inner CV, grouped as the outer split; by source video when a
    training fold holds a single surgeon or supertrial), clipped to [0, score_max]."""
    samples, folds = run.samples, [f for _, f in run.selected_folds()]
    index_folds = [f.indices(samples) for f in folds]
    groups = splits.group_keys(samples, run.config.cv.scheme)
    if any(len({groups[i] for i in train}) < 2 for train, _ in index_folds):
        groups = splits.group_keys(samples, "kfold")
    return baselines.ridge_cv({m: [s[m] for s in samples] for m in run.modalities},
                              run.scores, index_folds, groups,
                              score_range=(0.0, float(run.config.data.score_max)),
                              fold_names=[f.name for f in folds],
                              video_ids=[s["video_id"] for s in samples])


def _model_records(meta: Mapping[str, Any], final: Mapping[str, np.ndarray],
                   test: phase.EvalSet, video_ids: list[str], score_max: float,
                   target_max: float) -> dict[str, Any]:
    """Per head: the reporting history (test scc/mae, val_scc/val_mae, loss) and the test
    predictions (score units) of the final epoch and of the best (checkpointed) epoch."""
    records = {}
    history = meta["history"]
    for head in final:
        rows = history_rows(history, head)
        best = meta["best"]
        preds = {"final": {"epoch": history[-1]["epoch"], "video_ids": video_ids,
                           "true": test.scores.tolist(),
                           "pred": metrics.to_score_units(final[head], score_max,
                                                          target_max).tolist()}}
        if best.get("predictions"):
            preds["checkpoint_best"] = {"epoch": best["epoch"], "video_ids": video_ids,
                                        "true": test.scores.tolist(),
                                        "pred": list(best["predictions"][head])}
        records[head] = {"history": rows, "predictions": preds}
    return records
