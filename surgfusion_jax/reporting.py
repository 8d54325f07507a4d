"""Cross-validation results: summary protocols, results files, tables and figures (SPEC §5-6).

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
           'predictions': {<protocol>: {'epoch': int, 'video_ids': [...],
                                        'true': [...], 'pred': [...]}},      # optional, score units
         }}},
      ...],
    'summary': {model: {protocol: {'scc_mean', 'scc_std', 'mae_mean', 'mae_std', 'n_folds',
                                   'per_fold': [{'fold', 'epoch', 'scc', 'mae'}]}}},
    'paper':   {model: {'scc': float | None, 'mae': float | None}},         # optional
  }

Protocols (`summarise`), each giving one (SCC, MAE) per fold, then mean ± std over folds
(population std, `metrics.mean_std`):
  * 'paper'        the epoch with the best test-fold SCC and that epoch's MAE: the paper's
                   protocol ("the best SCC and its corresponding MAE", Sec. IV-A). It selects
                   on the test fold and is optimistic.
  * 'final'        the last epoch (no selection).
  * 'val-selected' the epoch with the best inner-validation SCC (`val_scc`); present only
                   when every history entry of every fold has one.
Ties go to the earliest epoch; NaN SCCs are never selected.

Figures use matplotlib's object API with the Agg canvas (no pyplot state) and are
written atomically, like the JSON/Markdown files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from surgfusion_jax import metrics

PROTOCOLS = ("paper", "final", "val-selected")
MODEL_ORDER = ("rgb", "flow", "mask", "fused")


# --------------------------------------------------------------------------- summary

def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _select(history: Sequence[Mapping[str, Any]], protocol: str) -> Mapping[str, Any] | None:
    if not history:
        return None
    entries = sorted(history, key=lambda h: h["epoch"])
    if protocol == "final":
        return entries[-1]
    key = "scc" if protocol == "paper" else "val_scc"
    if any(key not in h for h in entries):
        return None
    scores = np.array([_num(h[key]) for h in entries])
    if np.all(np.isnan(scores)):
        return entries[-1]
    return entries[int(np.nanargmax(scores))]  # first maximum = earliest epoch


def summarise(folds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{model: {protocol: {scc_mean, scc_std, mae_mean, mae_std, n_folds, per_fold}}}."""
    models = []
    for fold in folds:
        models += [m for m in fold.get("models", {}) if m not in models]
    models.sort(key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER), m))
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for model in models:
        summary[model] = {}
        for protocol in PROTOCOLS:
            per_fold, complete = [], True
            for fold in folds:
                record = fold.get("models", {}).get(model)
                if not record or not record.get("history"):
                    continue  # model not trained in this fold (yet)
                chosen = _select(record["history"], protocol)
                if chosen is None:  # e.g. no val_scc: the protocol does not apply
                    complete = False
                    break
                per_fold.append({"fold": fold.get("name"), "epoch": int(chosen["epoch"]),
                                 "scc": _num(chosen.get("scc")), "mae": _num(chosen.get("mae"))})
            if not complete:
                continue
            if not per_fold:
                continue
            scc_mean, scc_std = metrics.mean_std([p["scc"] for p in per_fold])
            mae_mean, mae_std = metrics.mean_std([p["mae"] for p in per_fold])
            summary[model][protocol] = {"scc_mean": scc_mean, "scc_std": scc_std, "mae_mean": mae_mean,
                                        "mae_std": mae_std, "n_folds": len(per_fold), "per_fold": per_fold}
    return summary


def combine_tasks(per_task: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> dict:
    """'Across Tasks' summary from per-task summaries (Table I): Fisher z mean of the
    task SCCs, arithmetic mean of the task MAEs (std = spread over tasks)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    tasks = list(per_task)
    for model in {m for s in per_task.values() for m in s}:
        for protocol in PROTOCOLS:
            rows = [per_task[t].get(model, {}).get(protocol) for t in tasks]
            if any(r is None for r in rows):
                continue
            sccs, maes = [r["scc_mean"] for r in rows], [r["mae_mean"] for r in rows]
            out.setdefault(model, {})[protocol] = {
                "scc_mean": metrics.fisher_z_mean(sccs), "scc_std": metrics.mean_std(sccs)[1],
                "mae_mean": metrics.fold_mean(maes), "mae_std": metrics.mean_std(maes)[1], "n_folds": len(rows),
                "per_fold": [{"fold": t, "epoch": None, "scc": s, "mae": a} for t, s, a in zip(tasks, sccs, maes)]}
    return out


# --------------------------------------------------------------------------- tables

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
                    protocols: Sequence[str] = PROTOCOLS) -> list[dict[str, Any]]:
    """One row per model: '<metric> (<protocol>)' = (mean, std), plus 'paper SCC/MAE' when given."""
    rows = []
    for model, by_protocol in summary.items():
        row: dict[str, Any] = {"model": model}
        for protocol in protocols:
            if protocol in by_protocol:
                s = by_protocol[protocol]
                row[f"SCC ({protocol})"] = (s["scc_mean"], s["scc_std"])
                row[f"MAE ({protocol})"] = (s["mae_mean"], s["mae_std"])
        if paper is not None:
            row["paper SCC"] = (paper.get(model) or {}).get("scc")
            row["paper MAE"] = (paper.get(model) or {}).get("mae")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- files

def atomic_write(path: str, data: bytes | str) -> str:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON copy: numpy scalars/arrays to Python, NaN/inf to None, tuples to lists."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        return to_jsonable(obj.to_dict())
    return obj


def results_markdown(results: Mapping[str, Any]) -> str:
    """The Markdown report of a results dict (summary table, then per-fold numbers)."""
    summary = results.get("summary") or summarise(results.get("folds", []))
    head = [f"# Results: {results.get('dataset', 'dataset')} — {results.get('scheme', 'scheme')}", ""]
    meta = {k: results[k] for k in ("dataset", "scheme", "seed", "score_max") if k in results}
    if meta:
        head += ["- " + ", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    head += ["SCC: Spearman per test fold, MAE in score units; mean ± std over folds. Protocol 'paper' = best "
             "test-fold epoch (optimistic, as in the paper); 'final' = last epoch; 'val-selected' = best "
             "inner-validation epoch.", ""]
    body = markdown_table(comparison_rows(summary, results.get("paper")))
    folds = []
    for model, by_protocol in summary.items():
        for protocol, s in by_protocol.items():
            for p in s["per_fold"]:
                folds.append({"model": model, "protocol": protocol, "fold": p["fold"], "epoch": p["epoch"],
                              "SCC": p["scc"], "MAE": p["mae"]})
    return "\n".join(head) + body + "\n## Per fold\n\n" + markdown_table(folds)


def write_results(workdir: str, results: Mapping[str, Any], paper: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write `results.json` and `results.md` into workdir (atomically); fills in 'summary'
    (from the fold histories) when missing and 'paper' when given. Returns the paths."""
    results = dict(results)
    if "folds" not in results:
        raise ValueError("results need a 'folds' list (see the schema in surgfusion_jax/reporting.py).")
    if not results.get("summary"):
        results["summary"] = summarise(results["folds"])
    if paper is not None:
        results["paper"] = paper
    clean = to_jsonable(results)
    paths = {"json": os.path.join(workdir, "results.json"), "markdown": os.path.join(workdir, "results.md")}
    atomic_write(paths["json"], json.dumps(clean, indent=1, allow_nan=False) + "\n")
    atomic_write(paths["markdown"], results_markdown(clean))
    return paths


def load_results(workdir_or_path: str) -> dict[str, Any]:
    path = workdir_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- figures

def _save_figure(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    return atomic_write(path, buf.getvalue())


def plot_predictions(true, pred, path: str, title: str | None = None) -> str:
    """Scatter of predicted vs true scores (score units) with the y = x line; SCC/MAE in the title."""
    from matplotlib.figure import Figure

    t, p = np.asarray(true, dtype=float).reshape(-1), np.asarray(pred, dtype=float).reshape(-1)
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"plot_predictions needs equally long non-empty true/pred, got {t.shape} and {p.shape}.")
    fig = Figure(figsize=(4.2, 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(t, p, s=18, alpha=0.8, color="tab:blue", edgecolor="none")
    finite = np.concatenate([t, p])[np.isfinite(np.concatenate([t, p]))]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="y = x")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("true score")
    ax.set_ylabel("predicted score")
    stats_text = f"SCC {metrics.spearman(p, t):.3f}, MAE {metrics.mae(p, t):.3f}"
    ax.set_title(f"{title}\n{stats_text}" if title else stats_text, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return _save_figure(fig, path)


def plot_modality_weights(weights, modality_names: Sequence[str], path: str, seconds_per_step: float | None = None,
                          title: str | None = None, thumbnails: Sequence[tuple[int, Any]] | None = None) -> str:
    """Fig. 4-style per-modality CSFB attention curves over time.

    weights [T, M] (rows need not sum to one); `seconds_per_step` turns the x axis into
    seconds; `thumbnails` = [(t, image or list of images), ...] marks time step t with a
    dashed line labelled T1, T2, ... and shows the images (e.g. RGB, flow, mask, top to
    bottom) in a column under the curves. Images are HxW or HxWx3/4 arrays.
    """
    from matplotlib.figure import Figure

    w = np.asarray(weights, dtype=float)
    if w.ndim != 2 or w.shape[1] != len(modality_names):
        raise ValueError(f"weights must be [T, M] with M = len(modality_names) = {len(modality_names)}, "
                         f"got shape {w.shape}.")
    scale = seconds_per_step or 1.0
    x = np.arange(w.shape[0]) * scale
    thumbs = [(int(t), list(ims) if isinstance(ims, (list, tuple)) else [ims]) for t, ims in (thumbnails or [])]
    n_img_rows = max((len(ims) for _, ims in thumbs), default=0)
    fig = Figure(figsize=(max(6.0, 1.6 * len(thumbs)), 3.0 + 1.3 * n_img_rows), dpi=100)
    grid = fig.add_gridspec(1 + n_img_rows, max(1, len(thumbs)), height_ratios=[2.3] + [1.0] * n_img_rows,
                            hspace=0.5 if n_img_rows else None)
    ax = fig.add_subplot(grid[0, :])
    for m, name in enumerate(modality_names):
        ax.plot(x, w[:, m], lw=1.6, label=name)
    for i, (t, _ims) in enumerate(thumbs):
        ax.axvline(t * scale, color="purple", ls="--", lw=1)
        ax.text(t * scale, 1.02, f"T{i + 1}", color="purple", ha="center", va="bottom",
                transform=ax.get_xaxis_transform(), fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlim(x[0] if len(x) else 0, x[-1] if len(x) > 1 else 1)
    ax.set_xlabel("time (s)" if seconds_per_step else "time step")
    ax.set_ylabel("attention weight")
    ax.legend(loc="upper right", fontsize=8, ncol=len(modality_names))
    if title:
        ax.set_title(title, fontsize=10, pad=14)
    for col, (t, ims) in enumerate(thumbs):
        for row, im in enumerate(ims):
            a = fig.add_subplot(grid[1 + row, col])
            arr = np.asarray(im)
            a.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
            a.set_xticks([])
            a.set_yticks([])
            if row == 0:
                a.set_title(f"T{col + 1}", fontsize=8)
    return _save_figure(fig, path)


def plot_run(workdir: str, results: Mapping[str, Any], protocol: str = "final") -> list[str]:
    """`<workdir>/plots/predictions_<model>.png`: out-of-fold predictions of every model.

    Pools each fold's test predictions of `protocol` ('final': last epoch, the unbiased
    protocol) over the folds, so every video appears once.
    """
    paths = []
    models = sorted({m for fold in results["folds"] for m in fold["models"]})
    for model in models:
        true, pred = [], []
        for fold in results["folds"]:
            p = fold["models"].get(model, {}).get("predictions", {}).get(protocol)
            if p:
                true += list(p["true"])
                pred += list(p["pred"])
        if true:
            paths.append(plot_predictions(
                true, pred, os.path.join(workdir, "plots", f"predictions_{model}.png"),
                title=f"{model}: out-of-fold predictions ({protocol} epoch)"))
    return paths
