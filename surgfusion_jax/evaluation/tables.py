"""Results tables: Markdown, LaTeX (booktabs) and CSV from one list of row dicts.

A cell is a float, a string, None (shown as '—') or a (mean, std) pair ('m ± s'; two
columns `<col>` and `<col>_std` in CSV). `comparison_rows` turns a results summary
(`evaluation.summary`) into one row per model; `results_markdown` is a run's
`results.md`.
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


def comparison_rows(summary: Mapping[str, Any], paper: Mapping[str, Mapping[str, Any]] | None = None,
                    protocols: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per model: '<metric> (<protocol>)' = (mean, spread), plus 'paper SCC/MAE' when
    given; `protocols` (default: those of the summary, in its order) picks the columns.

    The spread is the SD over folds for one seed, and the 95% CI half width over seeds for
    several (`evaluation.summary.summarise`)."""
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
    return rows


def difference_rows(comparisons: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per compared pair: '<metric> diff (<protocol>)' = (mean, 95% CI half width)."""
    rows = []
    for pair, by_protocol in comparisons.items():
        row: dict[str, Any] = {"pair": pair}
        for protocol, d in by_protocol.items():
            row[f"SCC diff ({protocol})"] = (d["scc_diff"], d["scc_diff_ci95"])
            row[f"MAE diff ({protocol})"] = (d["mae_diff"], d["mae_diff_ci95"])
            row["paired over"] = f"{d['n']} {d['unit']}s"
        rows.append(row)
    return rows


def results_markdown(results: Mapping[str, Any]) -> str:
    """The Markdown report of a results dict with its summary (summary table, paired
    differences, then per-fold numbers)."""
    summary = results["summary"]
    head = [f"# Results: {results.get('dataset', 'dataset')} — {results.get('scheme', 'scheme')}", ""]
    meta = {k: results[k] for k in ("dataset", "scheme", "seed", "seeds", "score_max") if k in results}
    if meta:
        head += ["- " + ", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    seeds = len(results.get("seeds") or [None])
    spread = (f"mean over {seeds} seeds of the fold means ± its 95% confidence interval"
              if seeds > 1 else "mean ± std over folds")
    if results.get("features_note"):  # the features are not the paper's backbones'
        head += [results["features_note"], ""]
    head += [f"SCC: Spearman per test fold, MAE in score units; {spread}. Protocol 'paper' = best "
             "test-fold epoch (optimistic, as in the paper); 'final' = last epoch; 'val-selected' = best "
             "inner-validation epoch.", ""]
    body = "\n" + markdown_table(comparison_rows(summary, results.get("paper")))
    if results.get("comparisons"):
        body += ("\n## Paired differences\n\nFused minus each branch, paired over seeds (or over "
                 "folds for one seed): mean ± 95% CI half width; a CI that excludes 0 is a "
                 "difference the runs support.\n\n" + markdown_table(difference_rows(results["comparisons"])))
    folds = []
    for model, by_protocol in summary.items():
        for protocol, s in by_protocol.items():
            for p in s["per_fold"]:
                folds.append({"model": model, "protocol": protocol, **({"seed": p["seed"]} if "seed" in p else {}),
                              "fold": p["fold"], "epoch": p["epoch"], "SCC": p["scc"], "MAE": p["mae"]})
    return "\n".join(head) + body + "\n## Per fold\n\n" + markdown_table(folds)
