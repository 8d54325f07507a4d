"""A self-contained HTML report of one scored video (`surgfusion_jax.predict --video`).

One file, no external resources: inline CSS, every image a base64 PNG `data:` URI. It
shows the ensemble score on the dataset's scale with the per-fold spread, the Fig. 4 CSFB
modality weights over time (drawn by `plots.plot_modality_weights`, thumbnails under the
curves) with the RGB / flow / mask thumbnails of the marked time steps, the per-fold
predictions, and the prep settings the video went through.
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any, Mapping, Sequence

import numpy as np

from surgfusion_jax.evaluation import plots
from surgfusion_jax.io import atomic_write

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto;
       max-width: 980px; color: #222; padding: 0 1em; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
.sub { color: #666; margin-top: 0; }
.score { display: flex; gap: 2em; align-items: baseline; background: #f4f6fa;
         border-radius: 8px; padding: 1em 1.5em; margin: 1em 0; }
.score .value { font-size: 3em; font-weight: 600; color: #1f4e9c; }
.score .scale { color: #555; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.9em; text-align: left; }
th { background: #f4f6fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.thumbs { display: flex; flex-wrap: wrap; gap: 1em; }
.thumbs figure { margin: 0; text-align: center; font-size: 0.85em; color: #444; }
.thumbs img { display: block; width: 112px; height: auto; image-rendering: pixelated;
              border: 1px solid #ccc; margin-bottom: 2px; }
img.figure { max-width: 100%; }
.note { color: #8a5a00; font-size: 0.9em; }
"""


def png_data_uri(image: np.ndarray) -> str:
    """uint8 [H, W] or [H, W, 3] -> 'data:image/png;base64,...'."""
    from matplotlib import image as mpimg

    buf = io.BytesIO()
    arr = np.asarray(image)
    mpimg.imsave(buf, arr, format="png", cmap="gray" if arr.ndim == 2 else None)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _file_data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    def cell(v):
        if isinstance(v, float):
            return f'<td class="num">{v:.2f}</td>'
        return f"<td>{html.escape(str(v))}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def write_report(path: str, *, title: str, score: float, score_range: tuple[float, float],
                 folds: Sequence[Mapping[str, Any]], weights: np.ndarray,
                 modalities: Sequence[str], seconds_per_step: float, stage: int,
                 thumbnails: Sequence[tuple[int, Mapping[str, np.ndarray]]],
                 details: Mapping[str, Any], note: str | None = None) -> str:
    """Writes the report to `path` (atomically) and the curves to `<path stem>_csfb.png`.

    folds: [{'fold', 'prediction', 'seeds'}]; weights [T, M] (stage `stage` CSFB weights);
    thumbnails: [(step, {modality: image})] of the marked steps; details: label -> value
    rows of the provenance table.
    """
    preds = np.asarray([f["prediction"] for f in folds], float)
    lo, hi = score_range
    figure = os.path.splitext(path)[0] + "_csfb.png"
    plots.plot_modality_weights(
        weights, list(modalities), figure, seconds_per_step=seconds_per_step,
        title=f"CSFB stage {stage} modality weights (Fig. 4)",
        thumbnails=[(t, [ims[m] for m in modalities if m in ims]) for t, ims in thumbnails])
    mean_w = np.asarray(weights, float).mean(axis=0)
    thumbs = []
    for i, (t, ims) in enumerate(thumbnails):
        for m in modalities:
            if m in ims:
                thumbs.append(f'<figure><img alt="{m} T{i + 1}" src="{png_data_uri(ims[m])}">'
                              f"T{i + 1} · {m} · {t * seconds_per_step:.1f} s</figure>")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">SurgFusion-Net skill score, ensemble of {len(folds)} fold model(s)</p>',
        '<div class="score" id="score">'
        f'<span class="value">{score:.2f}</span>'
        f'<span class="scale">on the {lo:g}–{hi:g} scale<br>'
        f"folds: {preds.min():.2f} – {preds.max():.2f}, std {preds.std():.2f}</span></div>",
    ]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts += [
        "<h2>Which modality drove it</h2>",
        "<p>Mean CSFB weight: " + ", ".join(f"{m} {w:.2f}" for m, w in zip(modalities, mean_w))
        + f". One time step of fusion stage {stage} spans {seconds_per_step:g} s.</p>",
        f'<img class="figure" alt="CSFB modality weights" src="{_file_data_uri(figure)}">',
        '<div class="thumbs" id="thumbnails">' + "".join(thumbs) + "</div>",
        "<h2>Per-fold predictions</h2>",
        _table(["fold", "prediction", "seeds"],
               [(f["fold"], float(f["prediction"]), f["seeds"]) for f in folds], "folds"),
        "<h2>How the video was prepared</h2>",
        _table(["setting", "value"], [(k, v) for k, v in details.items()], "details"),
        "</body></html>",
    ]
    return atomic_write(path, "\n".join(parts) + "\n")
