"""Output files of an experiment: Markdown, LaTeX and CSV tables with "paper" and "ours"
columns, per-fold numbers and provenance (config, git commit, split seeds) of every run.

  <workdir>/<name>.md / .tex / .csv   one row per table row: its labels, 'ours on' (the
                                      data ours was trained on), paper SCC / MAE (mean ±
                                      SD where the paper prints one), ours SCC / MAE
                                      (mean ± SD over folds) for both protocols
                                      (`spec.PROTOCOLS`), the number of folds
  <workdir>/<name>_folds.csv          per row, protocol and fold: epoch, SCC, MAE
  <workdir>/<name>_provenance.json    experiment flags, git commit, and per run: its
                                      workdir, full config, seeds and split test folds

The table files depend only on the numbers (no dates), so a `--from_checkpoints`
recomputation rewrites them byte for byte; the provenance records when and how.
CSV: a 'mean ± SD' cell becomes two columns `<col>` and `<col>_std`.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from typing import Any, Mapping, Sequence

from experiments.spec import (PROTOCOLS, REPO_ROOT, SCHEME_LABELS, SYNTHSKILL, TARGETS, Options,
                              Row, Run, run_config)
from surgfusion_jax.evaluation import tables
from surgfusion_jax.io import atomic_write, write_json


def _pair(mean: float | None, std: float | None) -> Any:
    return mean if std is None or mean is None else (mean, std)


def cells(labels: Mapping[str, Any], ours_on: str, paper: Mapping[str, float | None],
          ours: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One output row: labels, 'ours on', paper (mean ± SD where printed), ours per protocol
    (`ours`: {protocol: {scc_mean, scc_std, mae_mean, mae_std, n_folds}})."""
    out = dict(labels)
    out["ours on"] = ours_on
    out["paper SCC"] = _pair(paper.get("SCC"), paper.get("SCC_std"))
    out["paper MAE"] = _pair(paper.get("MAE"), paper.get("MAE_std"))
    for protocol, label in PROTOCOLS.items():
        s = ours.get(protocol)
        out[f"ours SCC ({label})"] = (s["scc_mean"], s["scc_std"]) if s else None
        out[f"ours MAE ({label})"] = (s["mae_mean"], s["mae_std"]) if s else None
    out["folds"] = max((s["n_folds"] for s in ours.values()), default=None)
    return out


def table_rows(rows: Sequence[Row], summaries: Mapping[str, Any], options: Options
               ) -> list[dict[str, Any]]:
    """The output rows of `rows` (see `cells`)."""
    return [cells(r.labels, ours_label(r.run, options) if r.run else "—", r.paper,
                  summaries.get(r.run.name, {}).get(r.model, {}) if r.run else {})
            for r in rows]


def ours_label(run: Run, options: Options) -> str:
    """What ours was trained on, e.g. 'SynthSkill (synthskill) LOUO', 'RAH-skill 4-Fold'."""
    if run.data == SYNTHSKILL:
        return f"SynthSkill ({run_config(run, options).data.name}) {SCHEME_LABELS[run.scheme]}"
    target = TARGETS[run.data]
    return " ".join(x for x in (target.dataset, target.task, SCHEME_LABELS[run.scheme]) if x)


def fold_rows(rows: Sequence[Row], summaries: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-fold numbers of every row (the `<table>_folds.csv` file)."""
    out = []
    for row in rows:
        if row.run is None:
            continue
        for protocol, s in summaries.get(row.run.name, {}).get(row.model, {}).items():
            for p in s["per_fold"]:
                out.append({**row.labels, "run": row.run.name, "model": row.model,
                            "protocol": protocol, "fold": p["fold"], "epoch": p["epoch"],
                            "scc": p["scc"], "mae": p["mae"]})
    return out


def notes(options: Options, extra: Sequence[str] = ()) -> list[str]:
    out = list(extra)
    if options.synthetic:
        out.append("Ours is trained and evaluated on SynthSkill (see 'ours on'); the paper "
                   "columns are the paper's numbers for the dataset/scheme of the row, shown "
                   "for reference only.")
    out += ["'paper' columns: He et al., SurgFusion-Net (mean ± SD where the paper prints "
            "an SD).",
            "'ours ... (best epoch)': per fold, the epoch with the best test-fold SCC and "
            "its MAE, the paper's protocol (it selects on the test fold and is optimistic); "
            "unimodal rows use the epoch of the best mean SCC over the branches.",
            "'ours ... (final epoch)': the last epoch of each fold, no selection (unbiased).",
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
              "runs": provenance}
    write_json(paths["provenance"], record, sort_keys=True)
    return paths


def git_commit() -> str:
    """`git rev-parse HEAD` of the repository ('+dirty' with uncommitted changes), or
    'unknown' without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
                               ).stdout.strip()
        return head + ("+dirty" if dirty else "") if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
