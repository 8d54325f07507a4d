"""Runs an experiment: trains (or recomputes) each run once, summarises it, writes the table.

`fold_records` gives a run's fold records with the test predictions of its 'best'
checkpoint and of its last epoch and its per-epoch history, by training it
(`cross_validation`), reading back a finished run whose config matches, or, with
`--from_checkpoints`, re-evaluating its saved checkpoints (`experiments.recompute`);
`run_records` adds the run's ridge baselines. `run_table` turns the rows of a table into its
output files (`experiments.outputs`). What a run and a row are: `experiments.spec`.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Sequence

from absl import logging

from data_prep import synthskill_setup
from experiments import outputs, recompute
from experiments.spec import ALL_MODALITIES, SYNTHSKILL, ExperimentError, Options, Row, Run, run_config
from surgfusion_jax.data import feature_dataset
from surgfusion_jax.evaluation import summary
from surgfusion_jax.io import read_json, to_jsonable
from surgfusion_jax.training import cross_validation, runs


def fold_records(run: Run, options: Options) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(run config dict, fold records with 'checkpoint_best'/'final' test predictions and
    the per-epoch history)."""
    return run_records(run, options)[:2]


def run_records(run: Run, options: Options
                ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """`fold_records` and the run's ridge baselines (results' 'baselines'; {} for a
    finished run written before they existed), as JSON data (NaN: None) on every path."""
    config = run_config(run, options)
    if options.from_checkpoints:
        saved, folds, ridge = recompute.fold_records(config.workdir, options.data_dir,
                                                     expected=config)
        return saved, folds, to_jsonable(ridge)
    if "synthskill" in config and run.data == SYNTHSKILL:  # e.g. configs/demo.py
        # prep every modality, whichever subset runs first
        synthskill_setup.ensure_features(config, progress=config.progress_bar,
                                         modalities=ALL_MODALITIES)
    finished = os.path.join(config.workdir, "results.json")
    if os.path.exists(finished):  # written last by a complete run: reuse it if it is ours
        results = summary.load_results(finished)
        if results.get("config") == cross_validation.run_config_dict(config):
            return results["config"], results["folds"], results.get("baselines") or {}
    results, _ = cross_validation.run_cross_validation(config, config.workdir)
    return results["config"], results["folds"], results.get("baselines") or {}


def execute(rows: Sequence[Row], options: Options
            ) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict], dict[str, dict]]:
    """Trains (or recomputes) every run of `rows` once; returns (summaries, {run: ridge
    baselines}, provenance, {run: dataset metadata}); refuses runs whose features were
    made differently."""
    summaries, ridge, provenance, features = {}, {}, {}, {}
    for run in dict.fromkeys(r.run for r in rows if r.run is not None):
        logging.info("run %s", run.name)
        config, folds, ridge[run.name] = run_records(run, options)
        summaries[run.name] = summary.summarise(folds, source="predictions")
        workdir = os.path.join(options.workdir, run.name)
        provenance[run.name] = outputs.run_provenance(workdir, config, [f["name"] for f in folds])
        metadata = os.path.join(workdir, runs.FEATURES_FILE)
        if os.path.exists(metadata):
            features[f"run {run.name}"] = read_json(metadata)
    # a table compares runs: their features must come from the same backbones and prep
    feature_dataset.check_same_features(features)
    return summaries, ridge, provenance, features


def run_table(name: str, title: str, build_rows: Callable[[Options], list[Row]],
              options: Options, extra_rows: Callable[..., list[dict]] | None = None,
              extra_notes: Sequence[str] = ()) -> dict[str, str]:
    """Builds the rows, trains/recomputes their runs and writes the outputs."""
    rows = build_rows(options)
    if not rows:
        raise ExperimentError(f"{name}: no rows selected; check --variants/--datasets.")
    summaries, ridge, provenance, features = execute(rows, options)
    out = outputs.table_rows(rows, summaries, options, ridge)
    if extra_rows is not None:
        out += extra_rows(rows, summaries, options)
    out = outputs.drop_empty_readings(out)
    backbone = next((note for note in (feature_dataset.backbone_note(m) for m in features.values())
                     if note), None)
    if backbone:
        print(backbone)
    return outputs.write_outputs(name, title, out, outputs.fold_rows(rows, summaries, ridge),
                                 outputs.notes(options, list(extra_notes) + ([backbone] if backbone else [])),
                                 options, provenance)
