"""The one summary of cross-validation results: per model and protocol, mean ± std over folds.

Results dict (written to `<workdir>/results.json`; NaN/inf are stored as null):

  {
    'config':  {...},                      # the run's config as a plain dict
    'dataset': 'RAH-skill', 'scheme': 'kfold', 'seed': 0, 'score_max': 30.0,   # optional
    'folds': [
      {'name': 'fold_1', 'train': [video ids], 'test': [video ids],          # ids optional
       'models': {
         'rgb' | 'flow' | 'mask' | 'fused' | <any variant name>: {
           'history': [{'epoch': 1, 'scc': float, 'mae': float,              # test fold, MAE in score units
                        'val_scc': float, 'val_mae': float, 'loss': float}, ...],   # val_*/loss optional
           'predictions': {'final' | 'checkpoint_best':
                           {'epoch': int, 'video_ids': [...], 'true': [...], 'pred': [...]}},
         }}},                                                                # optional, score units
      ...],
    'summary': {model: {protocol: {'scc_mean', 'scc_std', 'mae_mean', 'mae_std', 'n_folds',
                                   'per_fold': [{'fold', 'epoch', 'scc', 'mae'}]}}},
    'comparisons': {'fused - <model>': {protocol: {'scc_diff', 'scc_diff_ci95',
                    'mae_diff', 'mae_diff_ci95', 'n', 'unit'}}},  # `paired_differences`
    'paper':   {model: {'scc': float | None, 'mae': float | None}},         # optional
    'features_note': str | None,  # the features are not the paper's backbones (optional)
    'baselines': {'ridge (rgb)' | ... | 'ridge (all)': {...}},  # linear probes, once per fold
                 # (seed-free; `evaluation.baselines.ridge_cv`; optional)
    'provenance': {...},  # versions, Python, platform, XLA_FLAGS, git (`surgfusion_jax.provenance`)
  }

A fold record of a run trained with several seeds also holds its 'seed'.

`summarise(folds, source=...)` reads one (SCC, MAE) per fold and protocol, then takes the
mean and population std over folds (`metrics.mean_std`), from either source:

  source='history' (a training run's results.json; docs/design.md §5.3):
    * 'paper'        per fold, the epoch with the best test-fold SCC and that epoch's
                     MAE: one reading of the paper's "the best SCC and its corresponding
                     MAE" (§IV-A). It selects on the test fold and is optimistic.
    * 'best-mean'    one epoch for all folds of a seed: the one with the best fold-mean
                     test SCC (the other reading); also selects on the test folds.
    * 'final'        the last epoch (no selection; unbiased).
    * 'val-selected' per fold, the epoch with the best inner-validation SCC (`val_scc`;
                     unbiased); present only when every history entry of every fold has one.
    Ties go to the earliest epoch; NaN SCCs are never selected (an epoch where one fold's
    SCC is NaN has a NaN fold mean). `tables.UNBIASED` names the readings that never look
    at the test folds and `tables.PROTOCOL_NOTES` says what each picks (every table
    prints both).
  source='predictions' (the experiment tables, which must come out the same when
    recomputed from checkpoints): 'paper' and 'final' recomputed from the saved test
    predictions of the 'best' checkpoint and of the last epoch; 'best-mean' and
    'val-selected' from the fold histories when every fold record carries one (a
    recomputation reads them from the 'last' checkpoints).

`across_tasks` combines per-task summaries into Table I's "Across Tasks" row.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from surgfusion_jax import provenance
from surgfusion_jax.evaluation import metrics, tables
from surgfusion_jax.io import read_json, to_jsonable, write_json, atomic_write

PROTOCOLS = ("paper", "best-mean", "final", "val-selected")
MODEL_ORDER = ("rgb", "flow", "mask", "fused")
# Protocol -> key of the saved predictions it reads (source='predictions').
PREDICTION_KEYS = {"paper": "checkpoint_best", "final": "final"}
SOURCES = ("history", "predictions")


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _select(history: Sequence[Mapping[str, Any]], protocol: str, shared_epoch: int | None = None
            ) -> Mapping[str, Any] | None:
    if not history:
        return None
    entries = sorted(history, key=lambda h: h["epoch"])
    if protocol == "final":
        return entries[-1]
    if protocol == "best-mean":
        return next((h for h in entries if h["epoch"] == shared_epoch), None)
    key = "scc" if protocol == "paper" else "val_scc"
    if any(key not in h for h in entries):
        return None
    scores = np.array([_num(h[key]) for h in entries])
    if np.all(np.isnan(scores)):
        return entries[-1]
    return entries[int(np.nanargmax(scores))]  # first maximum = earliest epoch


def _shared_epoch(records: Sequence[Mapping[str, Any] | None]) -> int | None:
    """The 'best-mean' epoch of one model over the fold records of one seed: the epoch
    (among those every fold has) with the highest mean test SCC over the folds."""
    per_fold = [{h["epoch"]: _num(h.get("scc")) for h in r["history"]}
                for r in records if r and r.get("history")]
    if not per_fold:
        return None
    epochs = sorted(set.intersection(*(set(d) for d in per_fold)))
    if not epochs:
        return None
    means = np.array([np.mean([d[e] for d in per_fold]) for e in epochs])  # NaN in a fold -> NaN
    if np.all(np.isnan(means)):
        return epochs[-1]
    return epochs[int(np.nanargmax(means))]  # first maximum = earliest epoch


def _reading(record: Mapping[str, Any] | None, protocol: str, source: str,
             shared_epoch: int | None = None) -> dict[str, Any] | None | bool:
    """(epoch, scc, mae) of one fold; None when the fold lacks the model (skipped); False
    when the protocol does not apply to it (the protocol is dropped)."""
    if source == "predictions" and protocol in PREDICTION_KEYS:
        pred = (record or {}).get("predictions", {}).get(PREDICTION_KEYS[protocol])
        if pred is None:
            return None
        p = np.asarray(pred["pred"], np.float64)  # JSON null (NaN) -> nan
        t = np.asarray(pred["true"], np.float64)
        return {"epoch": pred["epoch"], "scc": metrics.spearman(p, t), "mae": metrics.mae(p, t)}
    if not record:
        return None
    if not record.get("history"):  # source 'predictions': a record without history drops it
        return None if source == "history" else False
    chosen = _select(record["history"], protocol, shared_epoch)
    if chosen is None:
        return False
    return {"epoch": int(chosen["epoch"]), "scc": _num(chosen.get("scc")),
            "mae": _num(chosen.get("mae"))}


def summarise(folds: Sequence[Mapping[str, Any]], source: str = "history"
              ) -> dict[str, dict[str, dict[str, Any]]]:
    """{model: {protocol: {scc_mean, scc_std, mae_mean, mae_std, n_folds, per_fold}}}.

    Records of several seeds (their 'seed' field; `config.num_seeds`) are summarised per
    seed first; the entry then holds the mean over seeds of the fold means with the half
    width of its 95% confidence interval (`scc_ci95`, `mae_ci95`, Student's t over the
    seeds), `n_seeds`, `per_seed` and the fold SDs averaged over seeds (`scc_std`,
    `mae_std`)."""
    seeds = _seeds(folds)
    if len(seeds) <= 1:
        return _summarise_folds(folds, source)
    per_seed = {seed: _summarise_folds([f for f in folds if f.get("seed") == seed], source)
                for seed in seeds}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model, by_protocol in per_seed[seeds[0]].items():
        out[model] = {}
        for protocol in by_protocol:
            entries = [per_seed[seed].get(model, {}).get(protocol) for seed in seeds]
            if any(e is None for e in entries):
                continue
            scc_mean, scc_ci = metrics.mean_ci95([e["scc_mean"] for e in entries])
            mae_mean, mae_ci = metrics.mean_ci95([e["mae_mean"] for e in entries])
            out[model][protocol] = {
                "scc_mean": scc_mean, "scc_ci95": scc_ci, "mae_mean": mae_mean,
                "mae_ci95": mae_ci, "n_seeds": len(seeds),
                "scc_std": float(np.mean([e["scc_std"] for e in entries])),
                "mae_std": float(np.mean([e["mae_std"] for e in entries])),
                "n_folds": entries[0]["n_folds"],
                "per_seed": [{"seed": seed, "scc": e["scc_mean"], "mae": e["mae_mean"]}
                             for seed, e in zip(seeds, entries)],
                "per_fold": [dict(p, seed=seed) for seed, e in zip(seeds, entries)
                             for p in e["per_fold"]]}
    return out


def paired_differences(folds: Sequence[Mapping[str, Any]], source: str = "history",
                       reference: str = "fused",
                       baselines: Mapping[str, Mapping[str, Any]] | None = None
                       ) -> dict[str, dict[str, dict[str, Any]]]:
    """{'<reference> - <model>': {protocol: {scc_diff, scc_diff_ci95, mae_diff,
    mae_diff_ci95, n, unit}}}: the paired difference of `reference` and every other model,
    paired over seeds (their fold means) when the records hold several seeds, else over
    folds; mean and 95% CI half width (Student's t).

    `baselines` (results' 'baselines': seed-free, one reading per fold) are compared too,
    under every protocol of `reference`: per seed against their fold mean, else per fold."""
    unit, readings = _readings_by_unit(folds, source)
    ref_readings = readings.get(reference, {})
    for name, b in (baselines or {}).items():
        value = ({f["fold"]: (_num(f["scc"]), _num(f["mae"])) for f in b["per_fold"]}
                 if unit == "fold" else None)
        mean = (_num(b["scc_mean"]), _num(b["mae_mean"]))
        readings[name] = {protocol: value or {k: mean for k in ref}
                          for protocol, ref in ref_readings.items()}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model in readings:
        if model == reference:
            continue
        for protocol, other in readings[model].items():
            ref = readings.get(reference, {}).get(protocol, {})
            common = [k for k in ref if k in other]  # units both models have
            if not common:
                continue
            scc = metrics.mean_ci95([ref[k][0] - other[k][0] for k in common])
            mae = metrics.mean_ci95([ref[k][1] - other[k][1] for k in common])
            out.setdefault(f"{reference} - {model}", {})[protocol] = {
                "scc_diff": scc[0], "scc_diff_ci95": scc[1], "mae_diff": mae[0],
                "mae_diff_ci95": mae[1], "n": len(common), "unit": unit}
    return out


def _readings_by_unit(folds: Sequence[Mapping[str, Any]], source: str
                      ) -> tuple[str, dict[str, dict[str, dict[Any, tuple[float, float]]]]]:
    """('seed' | 'fold', {model: {protocol: {unit: (scc, mae)}}}): one reading per seed
    (its fold means) when the records hold several seeds, else one per fold."""
    seeds = _seeds(folds)
    out: dict[str, dict[str, dict[Any, tuple[float, float]]]] = {}
    if len(seeds) > 1:
        for seed in seeds:
            per_seed = _summarise_folds([f for f in folds if f.get("seed") == seed], source)
            for model, by_protocol in per_seed.items():
                for protocol, e in by_protocol.items():
                    out.setdefault(model, {}).setdefault(protocol, {})[seed] = (
                        e["scc_mean"], e["mae_mean"])
        return "seed", out
    for model, by_protocol in _summarise_folds(folds, source).items():
        for protocol, e in by_protocol.items():
            out.setdefault(model, {})[protocol] = {p["fold"]: (p["scc"], p["mae"])
                                                   for p in e["per_fold"]}
    return "fold", out


def _seeds(folds: Sequence[Mapping[str, Any]]) -> list:
    return sorted({f.get("seed") for f in folds}, key=lambda s: (s is None, s))


def _summarise_folds(folds: Sequence[Mapping[str, Any]], source: str
                     ) -> dict[str, dict[str, dict[str, Any]]]:
    """The summary of the fold records of one seed (see `summarise`)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    models: list[str] = []
    for fold in folds:
        models += [m for m in fold.get("models", {}) if m not in models]
    models.sort(key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER), m))
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for model in models:
        by_protocol = {}
        records = [fold.get("models", {}).get(model) for fold in folds]
        shared = _shared_epoch(records)
        for protocol in PROTOCOLS:
            per_fold, complete = [], True
            for fold, record in zip(folds, records):
                reading = _reading(record, protocol, source, shared)
                if reading is False:
                    complete = False
                    break
                if reading is not None:
                    per_fold.append({"fold": fold.get("name"), **reading})
            if not complete or not per_fold:
                continue
            scc_mean, scc_std = metrics.mean_std([p["scc"] for p in per_fold])
            mae_mean, mae_std = metrics.mean_std([p["mae"] for p in per_fold])
            by_protocol[protocol] = {"scc_mean": scc_mean, "scc_std": scc_std,
                                     "mae_mean": mae_mean, "mae_std": mae_std,
                                     "n_folds": len(per_fold), "per_fold": per_fold}
        if by_protocol or source == "history":
            summary[model] = by_protocol
    return summary


def across_tasks(per_task: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Table I's "Across Tasks" entry from per-task {scc_mean, scc_std, mae_mean, mae_std,
    n_folds}: SCC by the Fisher z mean of the task SCCs (`metrics.fisher_z_mean`), MAE by
    their arithmetic mean, each SD as the root mean square of the task SDs (the paper's
    Across-Tasks SDs follow from its task SDs this way, e.g. LOSO SCC 0.076, 0.092, 0.032
    -> 0.071), folds summed over tasks."""
    def rms(xs):
        return float(np.sqrt(np.mean(np.square(xs))))

    return {"scc_mean": metrics.fisher_z_mean([t["scc_mean"] for t in per_task]),
            "scc_std": rms([t["scc_std"] for t in per_task]),
            "mae_mean": metrics.fold_mean([t["mae_mean"] for t in per_task]),
            "mae_std": rms([t["mae_std"] for t in per_task]),
            "n_folds": int(sum(t["n_folds"] for t in per_task))}


# --------------------------------------------------------------------------- files

def write_results(workdir: str, results: Mapping[str, Any],
                  paper: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes `results.json` and `results.md` into workdir (atomically); fills in 'summary'
    (from the fold histories) when missing and 'paper' when given. Returns the results as
    written (plain JSON data, as `load_results` would read them back) under 'results' and
    the paths under 'json' and 'markdown'."""
    results = dict(results)
    if "folds" not in results:
        raise ValueError("results need a 'folds' list (see the schema in "
                         "surgfusion_jax/evaluation/summary.py).")
    if not results.get("summary"):
        results["summary"] = summarise(results["folds"])
    if "comparisons" not in results:
        results["comparisons"] = paired_differences(results["folds"],
                                                    baselines=results.get("baselines"))
    if paper is not None:
        results["paper"] = paper
    results.setdefault("provenance", provenance.record())  # kept when a results file is rewritten
    clean = to_jsonable(results)
    paths = {"json": os.path.join(workdir, "results.json"),
             "markdown": os.path.join(workdir, "results.md")}
    write_json(paths["json"], clean)
    atomic_write(paths["markdown"], tables.results_markdown(clean))
    return dict(paths, results=clean)


def load_results(workdir_or_path: str) -> dict[str, Any]:
    path = workdir_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    return read_json(path)
