"""Results tables: Markdown, LaTeX (booktabs) and CSV from one list of row dicts.

A cell is a float, a string, None (shown as '—') or a (mean, std) pair ('m ± s'; two
columns `<col>` and `<col>_std` in CSV). `comparison_rows` turns a results summary
(`evaluation.summary`) into one row per model (and one per ridge baseline,
`evaluation.baselines`); `PROTOCOL_NOTES` / `UNBIASED` describe the readings every table
names (`protocol_rows`); `results_markdown` is a run's `results.md`.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, (tuple, list)) and len(value) == 2:
        if value[0] is None:
            return "—"
        if value[1] is None:  # no spread (one fold, one seed)
            return format(value[0], floatfmt)
        return f"{format(value[0], floatfmt)} ± {format(value[1], floatfmt)}"
    if isinstance(value, (float, np.floating)):
        return format(float(value), floatfmt)
    return str(value)


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   floatfmt: str = ".4f") -> str:
    """GitHub Markdown table; cells: float, str, None ('—') or (mean, std) ('m ± s')."""
    cols = _columns(rows, columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c), floatfmt).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("$", r"\$"), ("±", r"$\pm$"), ("—", "--")):
        text = text.replace(a, b)
    return text


def latex_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, caption: str | None = None,
                label: str | None = None, floatfmt: str = ".4f") -> str:
    """booktabs `table` environment with the same cells as `markdown_table`."""
    cols = _columns(rows, columns)
    out = ["\\begin{table}[t]", "\\centering"]
    if caption:
        out.append(f"\\caption{{{_latex_escape(caption)}}}")
    if label:
        out.append(f"\\label{{{label}}}")
    out += [f"\\begin{{tabular}}{{l{'c' * (len(cols) - 1)}}}", "\\toprule",
            " & ".join(_latex_escape(c) for c in cols) + " \\\\", "\\midrule"]
    out += [" & ".join(_latex_escape(_cell(r.get(c), floatfmt)) for c in cols) + " \\\\" for r in rows]
    out += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(out) + "\n"


def csv_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """CSV text; a (mean, std) cell becomes two columns `<col>` and `<col>_std`; None is empty."""
    cols = _columns(rows, columns)
    paired = {c for c in cols for r in rows if isinstance(r.get(c), (tuple, list))}
    header = [h for c in cols for h in ((c, f"{c}_std") if c in paired else (c,))]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        line = []
        for c in cols:
            v = r.get(c)
            vals = (list(v) if isinstance(v, (tuple, list)) else [v, None]) if c in paired else [v]
            line += ["" if x is None or (isinstance(x, float) and math.isnan(x)) else x for x in vals]
        writer.writerow(line)
    return buf.getvalue()


# The readings of a run (`summary.PROTOCOLS`): what each picks, and which never look at
# the test fold (every results table names them).
PROTOCOL_NOTES = {
    "paper": "per fold, the epoch with the best test-fold SCC, with its MAE (the paper's "
             "reading of \"the best SCC and its corresponding MAE\")",
    "best-mean": "one epoch for all folds of a seed: the epoch with the best fold-mean "
                 "test SCC (the other reading)",
    "final": "the last epoch of every fold",
    "val-selected": "per fold, the epoch with the best inner-validation SCC "
                    "(cv.inner_val_fraction > 0)",
}
UNBIASED = ("final", "val-selected")


def protocol_rows(protocols: Sequence[str]) -> list[dict[str, Any]]:
    """The legend of the readings `protocols`: what each picks and whether it is unbiased."""
    return [{"reading": p, "epoch": PROTOCOL_NOTES.get(p, p),
             "unbiased": "yes" if p in UNBIASED else "no: selects on the test fold (optimistic)"}
            for p in protocols]


def _protocols(summary: Mapping[str, Any]) -> list[str]:
    """The protocols of a summary, in first-seen order."""
    out: list[str] = []
    for by_protocol in summary.values():
        out += [p for p in by_protocol if p not in out]
    return out


def comparison_rows(summary: Mapping[str, Any], paper: Mapping[str, Mapping[str, Any]] | None = None,
                    protocols: Sequence[str] | None = None,
                    baselines: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> list[dict[str, Any]]:
    """One row per model: '<metric> (<protocol>)' = (mean, spread), plus 'paper SCC/MAE' when
    given; `protocols` (default: those of the summary, in its order) picks the columns.

    The spread is the SD over folds for one seed, and the 95% CI half width over seeds for
    several (`evaluation.summary.summarise`). `baselines` (results' 'baselines') add one
    row each after the models: seed-free and without epochs, so the same number (mean ± SD
    over folds) stands under every protocol."""
    rows = []
    for model, by_protocol in summary.items():
        row: dict[str, Any] = {"model": model}
        for protocol in (by_protocol if protocols is None else protocols):
            if protocol in by_protocol:
                s = by_protocol[protocol]
                spread = "ci95" if "scc_ci95" in s else "std"
                row[f"SCC ({protocol})"] = (s["scc_mean"], s[f"scc_{spread}"])
                row[f"MAE ({protocol})"] = (s["mae_mean"], s[f"mae_{spread}"])
        if paper is not None:
            row["paper SCC"] = (paper.get(model) or {}).get("scc")
            row["paper MAE"] = (paper.get(model) or {}).get("mae")
        rows.append(row)
    for name, b in (baselines or {}).items():
        row = {"model": name}
        for protocol in (_protocols(summary) if protocols is None else protocols):
            row[f"SCC ({protocol})"] = (b["scc_mean"], b["scc_std"])
            row[f"MAE ({protocol})"] = (b["mae_mean"], b["mae_std"])
        if paper is not None:
            row["paper SCC"] = row["paper MAE"] = None
        rows.append(row)
    return rows


def run_table(results: Mapping[str, Any]) -> str:
    """The Markdown table `python -m surgfusion_jax.main` prints after a run: every model
    and ridge baseline under every reading (the README's demo table is this, verbatim)."""
    return markdown_table(comparison_rows(results["summary"], results.get("paper"),
                                          baselines=results.get("baselines") or {}))


def baseline_rows(baselines: Mapping[str, Mapping[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(one row per baseline: SCC and MAE mean ± 95% CI half width over folds; one row per
    baseline and fold: the chosen ridge penalty, SCC, MAE)."""
    summary_rows, fold_rows = [], []
    for name, b in baselines.items():
        summary_rows.append({"baseline": name, "SCC": (b["scc_mean"], b["scc_ci95"]),
                             "MAE": (b["mae_mean"], b["mae_ci95"]),
                             "SCC SD": b["scc_std"], "MAE SD": b["mae_std"],
                             "folds": b["n_folds"]})
        fold_rows += [{"baseline": name, "fold": f["fold"], "alpha": f"{f['alpha']:.3g}",
                       "SCC": f["scc"], "MAE": f["mae"]} for f in b["per_fold"]]
    return summary_rows, fold_rows


def difference_rows(comparisons: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per compared pair: '<metric> diff (<protocol>)' = (mean, 95% CI half width)."""
    rows = []
    for pair, by_protocol in comparisons.items():
        row: dict[str, Any] = {"pair": pair}
        for protocol, d in by_protocol.items():
            row[f"SCC diff ({protocol})"] = (d["scc_diff"], d["scc_diff_ci95"])
            row[f"MAE diff ({protocol})"] = (d["mae_diff"], d["mae_diff_ci95"])
        row["paired over"] = f"{d['n']} {d['unit']}s"  # last column: protocols share units
        rows.append(row)
    return rows


def results_markdown(results: Mapping[str, Any]) -> str:
    """The Markdown report of a results dict with its summary (the readings, the summary
    table with the ridge baselines, paired differences, the baselines, per-fold numbers)."""
    summary = results["summary"]
    baselines = results.get("baselines") or {}
    head = [f"# Results: {results.get('dataset', 'dataset')} — {results.get('scheme', 'scheme')}", ""]
    meta = {k: results[k] for k in ("dataset", "scheme", "seed", "seeds", "score_max") if k in results}
    if meta:
        head += ["- " + ", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    seeds = len(results.get("seeds") or [None])
    spread = (f"mean over {seeds} seeds of the fold means ± its 95% confidence interval"
              if seeds > 1 else "mean ± std over folds")
    if results.get("features_note"):  # the features are not the paper's backbones'
        head += [results["features_note"], ""]
    model_config = (results.get("config") or {}).get("model") or {}
    if model_config.get("fused_score") == "mean_of_heads":
        head += ["Row 'fused': the mean of the fusion head and the branch heads "
                 "(`model.fused_score = 'mean_of_heads'`); the paper reads the fusion head "
                 "alone (`'fusion_head'`).", ""]
    head += [f"SCC: Spearman per test fold, MAE in score units; {spread}. Each column is one "
             "reading of the training history; only the unbiased ones never look at the test "
             "fold:", "", markdown_table(protocol_rows(_protocols(summary)))]
    if baselines:
        head += ["Rows 'ridge (...)': ridge regression on each video's mean-pooled features "
                 "(one modality, or all concatenated), its penalty chosen by grouped inner "
                 "cross-validation on the training fold only; no epochs and no seeds, so one "
                 "number (mean ± SD over folds) stands under every reading."]
    body = "\n" + markdown_table(comparison_rows(summary, results.get("paper"), baselines=baselines))
    if results.get("comparisons"):
        body += ("\n## Paired differences\n\nFused minus each branch (and each ridge baseline), "
                 "paired over seeds (or over folds for one seed): mean ± 95% CI half width; a CI "
                 "that excludes 0 is a difference the runs support.\n\n"
                 + markdown_table(difference_rows(results["comparisons"])))
    if baselines:
        summary_rows, fold_rows = baseline_rows(baselines)
        body += ("\n## Linear-probe baselines\n\nMean ± 95% CI half width over folds (Student's "
                 "t); predictions clipped to the score range.\n\n" + markdown_table(summary_rows)
                 + "\n" + markdown_table(fold_rows))
    folds = []
    for model, by_protocol in summary.items():
        for protocol, s in by_protocol.items():
            for p in s["per_fold"]:
                folds.append({"model": model, "protocol": protocol, **({"seed": p["seed"]} if "seed" in p else {}),
                              "fold": p["fold"], "epoch": p["epoch"], "SCC": p["scc"], "MAE": p["mae"]})
    return "\n".join(head) + body + "\n## Per fold\n\n" + markdown_table(folds)
