"""Output files of an experiment: Markdown, LaTeX and CSV tables with "paper" and "ours"
columns, per-fold numbers and provenance (config, git commit, split seeds) of every run.

  <workdir>/<name>.md / .tex / .csv   one row per table row: its labels, model, 'ours on'
                                      (the data ours was trained on), paper SCC / MAE (mean
                                      ± SD where the paper prints one), ours SCC / MAE
                                      (mean ± SD over folds) for every reading the runs
                                      have (`spec.PROTOCOLS`), the number of folds; after
                                      each dataset column's rows, its ridge baselines
                                      ('ridge (rgb)' ... 'ridge (all)', `ridge_blocks`)
  <workdir>/<name>_folds.csv          per row, protocol and fold: epoch, SCC, MAE (ridge:
                                      the chosen penalty)
  <workdir>/<name>_provenance.json    experiment flags, git commit, environment (package
                                      versions, Python, platform, XLA_FLAGS), and per run: its
                                      workdir, full config, seeds and split test folds

The table files depend only on the numbers (no dates), so a `--from_checkpoints`
recomputation rewrites them byte for byte; the provenance records when and how.
CSV: a 'mean ± SD' cell becomes two columns `<col>` and `<col>_std`.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any, Mapping, Sequence

from experiments.spec import (PROTOCOLS, REPO_ROOT, SCHEME_LABELS, SYNTHSKILL, TARGETS, Options,
                              Row, Run, run_config)
from surgfusion_jax import provenance as provenance_lib
from surgfusion_jax.evaluation import tables
from surgfusion_jax.io import atomic_write, write_json


def _pair(mean: float | None, std: float | None) -> Any:
    return mean if std is None or mean is None else (mean, std)


def cells(labels: Mapping[str, Any], ours_on: str, paper: Mapping[str, float | None],
          ours: Mapping[str, Mapping[str, Any]], model: str | None = None) -> dict[str, Any]:
    """One output row: labels, model, 'ours on', paper (mean ± SD where printed), ours per
    protocol (`ours`: {protocol: {scc_mean, scc_std, mae_mean, mae_std, n_folds}})."""
    out = dict(labels)
    out["model"] = model
    out["ours on"] = ours_on
    out["paper SCC"] = _pair(paper.get("SCC"), paper.get("SCC_std"))
    out["paper MAE"] = _pair(paper.get("MAE"), paper.get("MAE_std"))
    for protocol, label in PROTOCOLS.items():
        s = ours.get(protocol)
        out[f"ours SCC ({label})"] = (s["scc_mean"], s["scc_std"]) if s else None
        out[f"ours MAE ({label})"] = (s["mae_mean"], s["mae_std"]) if s else None
    out["folds"] = max((s["n_folds"] for s in ours.values()), default=None)
    return out


def table_rows(rows: Sequence[Row], summaries: Mapping[str, Any], options: Options,
               ridge: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The output rows of `rows` (see `cells`), each dataset column's block of rows followed
    by its ridge baselines (`ridge`: {run name: results' 'baselines'}; `ridge_blocks`)."""
    after = {end: block for end, block in ridge_blocks(rows, ridge or {})}
    readings = [p for p in PROTOCOLS  # those some run has: ridge fills no empty column
                if any(p in by_model for s in summaries.values() for by_model in s.values())]
    out = []
    for i, r in enumerate(rows):
        out.append(cells(r.labels, ours_label(r.run, options) if r.run else "—", r.paper,
                         summaries.get(r.run.name, {}).get(r.model, {}) if r.run else {},
                         model=r.model))
        labels, run, baselines = after.get(i, (None, None, {}))
        for name, b in baselines.items():  # seed-free, no epochs: one number per reading
            out.append(cells(labels, ours_label(run, options), {},
                             {protocol: b for protocol in readings}, model=name))
    return out


DATASET_LABELS = ("task", "dataset", "scheme")  # the row labels a ridge block keeps


def ridge_blocks(rows: Sequence[Row], ridge: Mapping[str, Any]
                 ) -> list[tuple[int, tuple[dict[str, Any], Run, dict[str, Any]]]]:
    """(index of the last row of a block, (its dataset labels, run, baselines)) per block of
    consecutive rows with the same dataset labels and run data/scheme: the baselines of
    its run with the most modalities (ridge needs no variant: one block per column)."""
    out, start = [], 0
    for i, row in enumerate(rows):
        if i + 1 < len(rows) and _block_key(rows[i + 1]) == _block_key(row):
            continue
        block = [r for r in rows[start:i + 1] if r.run is not None]
        start = i + 1
        if not block:
            continue
        run = max(block, key=lambda r: len(r.run.modalities)).run  # first of the widest
        if ridge.get(run.name):
            labels = {k: (v if k in DATASET_LABELS else None) for k, v in block[0].labels.items()}
            out.append((i, (labels, run, ridge[run.name])))
    return out


def _block_key(row: Row) -> tuple:
    return (row.run and (row.run.data, row.run.scheme),
            [row.labels.get(k) for k in DATASET_LABELS])


def drop_empty_readings(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` without the 'ours' columns that are empty in every row (a reading no run
    has, e.g. 'val-selected' without an inner validation split)."""
    empty = {k for r in rows for k in r
             if k.startswith("ours ") and all(x.get(k) is None for x in rows)}
    return [{k: v for k, v in r.items() if k not in empty} for r in rows]


def ours_label(run: Run, options: Options) -> str:
    """What ours was trained on, e.g. 'SynthSkill (synthskill) LOUO', 'RAH-skill 4-Fold'."""
    if run.data == SYNTHSKILL:
        return f"SynthSkill ({run_config(run, options).data.name}) {SCHEME_LABELS[run.scheme]}"
    target = TARGETS[run.data]
    return " ".join(x for x in (target.dataset, target.task, SCHEME_LABELS[run.scheme]) if x)


def fold_rows(rows: Sequence[Row], summaries: Mapping[str, Any],
              ridge: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per-fold numbers of every row and ridge baseline (the `<table>_folds.csv` file; a
    ridge fold has no protocol or epoch, but its chosen penalty)."""
    after = {end: block for end, block in ridge_blocks(rows, ridge or {})}
    out = []
    for i, row in enumerate(rows):
        if row.run is None:
            continue
        for protocol, s in summaries.get(row.run.name, {}).get(row.model, {}).items():
            for p in s["per_fold"]:
                out.append({**row.labels, "run": row.run.name, "model": row.model,
                            "protocol": protocol, "fold": p["fold"], "epoch": p["epoch"],
                            "scc": p["scc"], "mae": p["mae"]})
        labels, run, baselines = after.get(i, (None, None, {}))
        for name, b in baselines.items():
            out += [{**labels, "run": run.name, "model": name, "protocol": None,
                     "fold": p["fold"], "epoch": None, "scc": p["scc"], "mae": p["mae"],
                     "alpha": p["alpha"]} for p in b["per_fold"]]
    return out


def notes(options: Options, extra: Sequence[str] = ()) -> list[str]:
    out = list(extra)
    if options.synthetic:
        out.append("Ours is trained and evaluated on SynthSkill (see 'ours on'); the paper "
                   "columns are the paper's numbers for the dataset/scheme of the row, shown "
                   "for reference only.")
    out.append("'paper' columns: He et al., SurgFusion-Net (mean ± SD where the paper prints "
               "an SD).")
    for protocol, label in PROTOCOLS.items():
        bias = ("unbiased: it never looks at the test fold" if protocol in tables.UNBIASED
                else "it selects on the test fold and is optimistic")
        extra = ("; unimodal rows use the epoch of the best mean SCC over the branches"
                 if protocol == "paper" else "")
        out.append(f"'ours ... ({label})': {tables.PROTOCOL_NOTES[protocol]}{extra} ({bias}).")
    out += ["Rows 'ridge (...)': ridge regression on each video's mean-pooled features (one "
            "modality, or all concatenated) of the row block's run, its penalty chosen by "
            "grouped inner cross-validation on the training fold only; no epochs or seeds, "
            "so one number stands under every reading (unbiased).",
            "SCC: Spearman per test fold; MAE in score units; mean ± population SD over "
            "folds."]
    return out


def write_outputs(name: str, title: str, rows: Sequence[dict[str, Any]],
                  folds: Sequence[dict[str, Any]], note_lines: Sequence[str], options: Options,
                  provenance: Mapping[str, Any]) -> dict[str, str]:
    """`<workdir>/<name>.{md,tex,csv}`, `<name>_folds.csv`, `<name>_provenance.json`."""
    w = options.workdir
    md = f"# {title}\n\n" + "".join(f"- {n}\n" for n in note_lines) + "\n" + \
        tables.markdown_table(rows)
    caption = title + ". " + " ".join(note_lines)
    paths = {"md": os.path.join(w, f"{name}.md"), "tex": os.path.join(w, f"{name}.tex"),
             "csv": os.path.join(w, f"{name}.csv"),
             "folds_csv": os.path.join(w, f"{name}_folds.csv"),
             "provenance": os.path.join(w, f"{name}_provenance.json")}
    atomic_write(paths["md"], md)
    atomic_write(paths["tex"], tables.latex_table(rows, caption=caption, label=f"tab:{name}"))
    atomic_write(paths["csv"], tables.csv_table(rows))
    atomic_write(paths["folds_csv"], tables.csv_table(folds))
    record = {"experiment": name, "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "git_commit": git_commit(), "argv": list(options.argv) or sys.argv,
              "dataset": options.dataset, "from_checkpoints": options.from_checkpoints,
              "variants": list(options.variants), "datasets": list(options.datasets),
              "environment": provenance_lib.record(REPO_ROOT), "runs": provenance}
    write_json(paths["provenance"], record, sort_keys=True)
    return paths


def git_commit() -> str:
    """HEAD of the repository ('+dirty' with uncommitted changes), or 'unknown' without
    git (`surgfusion_jax.provenance.git_state`)."""
    git = provenance_lib.git_state(REPO_ROOT)
    return (git["commit"] + ("+dirty" if git["dirty"] else "")) if git["commit"] else "unknown"


def run_provenance(workdir: str, config: Mapping[str, Any], folds: Sequence[str]
                   ) -> dict[str, Any]:
    """What identifies a run's numbers: its config, seeds and folds (`splits.json`)."""
    splits_path = os.path.join(workdir, "splits.json")
    with open(splits_path, encoding="utf-8") as f:
        splits = json.load(f)
    return {"workdir": workdir, "config": config, "seed": config["seed"],
            "split_seed": config["cv"]["seed"], "scheme": config["cv"]["scheme"],
            "splits": {"file": splits_path,
                       "test": {f["name"]: f["test"] for f in splits["folds"]}},
            "folds_evaluated": list(folds)}
