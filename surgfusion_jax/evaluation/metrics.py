"""Evaluation metrics of SurgFusion-Net (He et al., Sec. IV-A; docs/design.md §5).

* SCC: Spearman's rank correlation between the predictions and the labels of one
  test fold (`spearman`). A scheme's SCC is the arithmetic mean over its folds
  (`fold_mean`); across JIGSAWS tasks the per-task SCCs are averaged through Fisher's
  z-transformation (`fisher_z_mean`, r = tanh(mean_i artanh(r_i))), as in ref. [23].
* MAE: mean absolute error in score units (GEARS / M-GEARS points, `mae`). The
  network predicts normalised scores in (0, 1) trained against the target
  target_max * score / score_max (Sec. III-B.1: target_max 0.5), so `to_score_units`
  (pred * score_max / target_max) maps a prediction back before the MAE is taken;
  `to_target` is its inverse.

Decisions (documented and tested):
  * Constant predictions (or constant labels) carry no ranking information: scipy
    returns NaN with a warning there; `spearman` returns 0.0 instead, so one collapsed
    epoch does not turn a fold mean or a best-epoch selection into NaN.
  * Fewer than two samples, or any non-finite prediction (a diverged model), give
    NaN: the correlation is undefined and the caller must see it.
  * `fisher_z_mean` clips |r| to 1 - 1e-7 before artanh so a perfect fold (r = 1)
    stays finite (artanh(1 - 1e-7) ~ 8.4).
  * `mean_std` uses the population standard deviation (ddof=0) by default, numpy's
    convention; pass ddof=1 for the sample standard deviation.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import stats

FISHER_CLIP = 1.0 - 1e-7


def _as_1d(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim > 1 and arr.size == max(arr.shape):  # e.g. [N, 1] -> [N]
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {arr.shape}.")
    return arr


def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    p = _as_1d(pred, "pred")
    t = _as_1d(true, "true")
    if p.shape != t.shape:
        raise ValueError(
            f"pred and true must have the same length, got {p.shape[0]} predictions and "
            f"{t.shape[0]} labels (one prediction per test video is expected).")
    return p, t


def spearman(pred, true) -> float:
    """Spearman's rank correlation (SCC) of one test fold, via scipy.stats.spearmanr.

    Returns 0.0 when either input is constant (no ranking information) and NaN when
    there are fewer than two samples or a prediction is not finite.
    """
    p, t = _pair(pred, true)
    if p.size < 2 or not (np.all(np.isfinite(p)) and np.all(np.isfinite(t))):
        return float("nan")
    if np.all(p == p[0]) or np.all(t == t[0]):
        return 0.0
    return float(stats.spearmanr(p, t).statistic)


def mae(pred_scores, true_scores) -> float:
    """Mean absolute error; both arguments in score units (see `to_score_units`)."""
    p, t = _pair(pred_scores, true_scores)
    if p.size == 0:
        return float("nan")
    return float(np.mean(np.abs(p - t)))


def _check_scale(score_max: float, target_max: float) -> None:
    if not score_max > 0:
        raise ValueError(f"score_max must be positive, got {score_max!r} (dataset config field `score_max`).")
    if not 0 < target_max <= 1:
        raise ValueError(f"target_max must lie in (0, 1] (a sigmoid head), got {target_max!r} "
                         "(config field `data.target_max`).")


def to_score_units(pred, score_max: float, target_max: float = 0.5):
    """Network output (normalised, target = target_max * score / score_max) -> score units."""
    _check_scale(score_max, target_max)
    return np.asarray(pred, dtype=np.float64) * float(score_max) / float(target_max)


def to_target(score, score_max: float, target_max: float = 0.5):
    """Score units -> training target target_max * score / score_max in [0, target_max].

    The paper normalises to [0, 0.5] (Sec. III-B.1, `target_max` 0.5); PAMFN's datasets
    divide by the maximum score, [0, 1] (docs/parity.md measures both)."""
    _check_scale(score_max, target_max)
    return np.asarray(score, dtype=np.float64) * float(target_max) / float(score_max)


def fisher_z_mean(values: Iterable[float]) -> float:
    """Fisher z mean of correlations: tanh(mean(artanh(r_i))), |r_i| clipped to 1 - 1e-7.

    Used for the "Across Tasks" SCC of Table I (e.g. 0.93, 0.92, 0.91 -> 0.92).
    NaN in, NaN out.
    """
    r = _as_1d(list(values), "values")
    if r.size == 0:
        raise ValueError("fisher_z_mean needs at least one correlation.")
    if np.any(np.abs(r[np.isfinite(r)]) > 1.0):
        raise ValueError(f"correlations must lie in [-1, 1], got {r.tolist()}.")
    z = np.arctanh(np.clip(r, -FISHER_CLIP, FISHER_CLIP))
    return float(np.tanh(np.mean(z)))


def fold_mean(values: Sequence[float]) -> float:
    """Arithmetic mean over folds (a scheme's SCC or MAE, docs/design.md §5). NaN propagates."""
    v = _as_1d(list(values), "values")
    if v.size == 0:
        raise ValueError("fold_mean needs at least one fold value.")
    return float(np.mean(v))


def mean_std(values: Sequence[float], ddof: int = 0) -> tuple[float, float]:
    """(mean, standard deviation) over folds; std of a single value is 0.0."""
    v = _as_1d(list(values), "values")
    if v.size == 0:
        raise ValueError("mean_std needs at least one value.")
    std = float(np.std(v, ddof=ddof)) if v.size > ddof else 0.0
    return float(np.mean(v)), std


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% confidence interval) over independent runs (seeds),
    from Student's t with n - 1 degrees of freedom; the half-width of one value is NaN."""
    v = _as_1d(list(values), "values")
    if v.size == 0:
        raise ValueError("mean_ci95 needs at least one value.")
    if v.size == 1:
        return float(v[0]), float("nan")
    half = stats.t.ppf(0.975, v.size - 1) * np.std(v, ddof=1) / np.sqrt(v.size)
    return float(np.mean(v)), float(half)


def format_mean_std(mean: float, std: float | None = None, digits: int = 4) -> str:
    """'0.8123 ± 0.0201' (or just the mean when std is None); NaN prints as 'nan'."""
    if mean is None:
        return "—"
    text = f"{mean:.{digits}f}"
    if std is not None:
        text += f" ± {std:.{digits}f}"
    return text
