"""Figures of a run: predicted vs true scores, and Fig. 4-style CSFB modality weights.

Figures use matplotlib's object API with the Agg canvas (no pyplot state) and are written
atomically (`surgfusion_jax.io.atomic_write`).
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np

from surgfusion_jax.evaluation import metrics
from surgfusion_jax.io import atomic_write

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
