"""Linear-probe baselines: ridge regression on mean-pooled features (docs/design.md §5.9).

A deep model is only worth its cost if it beats a linear read-out of the same features, so
every run reports one beside the models. Per outer fold and feature set (each modality
alone, and all modalities concatenated: 'ridge (<modality>)', 'ridge (all)'):

  1. each video's features are mean-pooled over its valid segments (`mean_pool`; padding
     never enters the mean);
  2. the pooled features are standardised (mean and SD of the training fold) and fed to a
     ridge regression with an intercept, on the scores in score units (closed form: one
     SVD of the training matrix gives the whole penalty grid, `ridge_path`);
  3. its penalty is chosen from a log grid (`ALPHAS`) by grouped inner cross-validation on
     the training fold only (`GroupKFold` over the outer split's groups, so no surgeon or
     source video straddles an inner split either; mean squared error, ties to the smaller
     penalty; `choose_alpha`), then the model is refit on the whole training fold;
  4. its test-fold predictions are clipped to the score range and scored with the
     project's SCC and MAE (`metrics`).

Closed form and deterministic: ridge has no seed, so a run reports it once per fold.
`ridge_cv` is the public entry point (training calls it per run; benchmarks may call it on
any features and folds).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.model_selection import GroupKFold

from surgfusion_jax.evaluation import metrics

# Half-decade steps over nine decades: standardised I3D features (1024-3072 dims, tens of
# videos) want penalties far above 1, small synthetic ones far below.
ALPHAS = tuple(float(a) for a in np.logspace(-3, 6, 19))
INNER_FOLDS = 5
ALL = "all"


def name(feature_set: str) -> str:
    """The baseline's name in results and tables, e.g. 'ridge (rgb)', 'ridge (all)'."""
    return f"ridge ({feature_set})"


def mean_pool(features: Any, lengths: Sequence[int] | None = None) -> np.ndarray:
    """[N, F] float64 means over each video's valid segments.

    `features`: a padded array [N, T, F] with `lengths` [N] (rows past a video's length
    are padding and ignored), or a sequence of N arrays [T_i, F] (`lengths`, if given,
    keeps the first lengths[i] rows of each)."""
    videos = list(features)
    if lengths is None and isinstance(features, np.ndarray) and features.ndim == 3:
        raise ValueError("mean_pool: a padded [N, T, F] array needs `lengths` (the number "
                         "of valid segments per video); pass a list of [T_i, F] arrays "
                         "otherwise.")
    if lengths is not None and len(lengths) != len(videos):
        raise ValueError(f"mean_pool: {len(videos)} videos but {len(lengths)} lengths.")
    out = []
    for i, video in enumerate(videos):
        v = np.asarray(video, np.float64)
        if lengths is not None:
            v = v[:int(lengths[i])]
        if v.ndim != 2 or v.shape[0] == 0:
            raise ValueError(f"mean_pool: video {i} has no valid segment (shape {v.shape}); "
                             "every video needs at least one [F] feature row.")
        out.append(v.mean(axis=0))
    return np.stack(out)


def _standardise(x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Arrays scaled with the training mean and population SD (a constant feature keeps
    scale 1: it carries nothing and must stay finite)."""
    mu, sd = x_train.mean(axis=0), x_train.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return [(a - mu) / sd for a in (x_train, *others)]


def ridge_path(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
               alphas: Sequence[float]) -> np.ndarray:
    """[n_test, len(alphas)] predictions of the standardised ridge with an intercept, one
    column per penalty: one SVD serves the whole grid (w = V diag(s / (s^2 + a)) U^T y)."""
    z, zt = _standardise(np.asarray(x_train, np.float64), np.asarray(x_test, np.float64))
    y = np.asarray(y_train, np.float64)
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    shrink = s[None, :] / (s[None, :] ** 2 + np.asarray(alphas, np.float64)[:, None])
    coef = (shrink * (u.T @ (y - y.mean()))[None, :]) @ vt  # [alphas, features]
    return zt @ coef.T + y.mean()


def choose_alpha(x_train: np.ndarray, y_train: np.ndarray, groups_train: Sequence[Any], *,
                 alphas: Sequence[float] = ALPHAS, inner_folds: int = INNER_FOLDS) -> float:
    """The penalty with the lowest mean squared error over grouped inner folds of the
    training data (`GroupKFold`, at most `inner_folds`, mean over folds; ties go to the
    smaller penalty). Sees nothing but the training fold."""
    groups_train = np.asarray(groups_train)
    n_groups = len(np.unique(groups_train))
    if n_groups < 2:
        raise ValueError(f"ridge baseline: the training fold has {n_groups} group(s); choosing "
                         "its penalty by grouped inner cross-validation needs at least 2 "
                         "(surgeons / supertrials / source videos).")
    grid = np.sort(np.asarray(alphas, np.float64))
    x, y = np.asarray(x_train, np.float64), np.asarray(y_train, np.float64)
    splitter = GroupKFold(n_splits=min(int(inner_folds), n_groups))
    mse = [np.mean((ridge_path(x[fit], y[fit], x[held], grid) - y[held][:, None]) ** 2, axis=0)
           for fit, held in splitter.split(x, y, groups_train)]
    return float(grid[int(np.argmin(np.mean(mse, axis=0)))])


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, groups_train: Sequence[Any],
                x_test: np.ndarray, *, alphas: Sequence[float] = ALPHAS,
                inner_folds: int = INNER_FOLDS,
                score_range: tuple[float, float] | None = None) -> tuple[np.ndarray, float]:
    """(test predictions, chosen penalty): the penalty by `choose_alpha` on the training
    data alone, then the ridge refit on all of it, predictions clipped to `score_range`."""
    alpha = choose_alpha(x_train, y_train, groups_train, alphas=alphas, inner_folds=inner_folds)
    pred = ridge_path(x_train, y_train, x_test, [alpha])[:, 0]
    if score_range is not None:
        pred = np.clip(pred, *score_range)
    return pred, alpha


def ridge_cv(features_by_video: Mapping[str, Any], scores: Sequence[float],
             folds: Sequence[tuple[Sequence[int], Sequence[int]]], groups: Sequence[Any], *,
             lengths: Sequence[int] | None = None,
             score_range: tuple[float, float] | None = None,
             alphas: Sequence[float] = ALPHAS, inner_folds: int = INNER_FOLDS,
             fold_names: Sequence[str] | None = None,
             video_ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Ridge baselines of every feature set over the outer `folds` (module docstring).

    features_by_video: {modality: per-video features} as `mean_pool` takes them (`lengths`
      for padded arrays); N videos, in the order of `scores` and `groups`.
    folds: (train indices, test indices) per outer fold; groups: per video, the key the
      outer split groups by (surgeon, supertrial or source video), reused by the inner CV.
    score_range: (low, high) the predictions are clipped to (the score scale).

    Returns {'ridge (<modality>)' ..., 'ridge (all)' (with more than one modality): {
      'scc_mean', 'scc_std', 'scc_ci95', 'mae_mean', 'mae_std', 'mae_ci95', 'n_folds',
      'per_fold': [{'fold', 'alpha', 'scc', 'mae', 'n_train', 'true', 'pred'
                    (, 'video_ids')}]}}: mean, population SD and 95% CI half width
    (Student's t) over folds; MAE and predictions in score units."""
    if not features_by_video:
        raise ValueError("ridge_cv: no features (features_by_video is empty).")
    pooled = {m: mean_pool(f, lengths) for m, f in features_by_video.items()}
    sets = dict(pooled)
    if len(pooled) > 1:
        sets[ALL] = np.concatenate(list(pooled.values()), axis=1)
    y = np.asarray(scores, np.float64)
    groups = np.asarray(groups)
    n = y.shape[0]
    if any(x.shape[0] != n for x in sets.values()) or groups.shape[0] != n:
        raise ValueError(f"ridge_cv: {n} scores, but features of "
                         f"{ {m: x.shape[0] for m, x in pooled.items()} } videos and "
                         f"{groups.shape[0]} groups.")
    names = list(fold_names) if fold_names is not None else [f"fold_{k + 1}" for k in range(len(folds))]
    out = {}
    for feature_set, x in sets.items():
        per_fold = []
        for fold, (train, test) in zip(names, folds, strict=True):
            train, test = np.asarray(train, np.int64), np.asarray(test, np.int64)
            if np.intersect1d(train, test).size:
                raise ValueError(f"ridge_cv: fold {fold!r} has videos in both train and test.")
            pred, alpha = fit_predict(x[train], y[train], groups[train], x[test], alphas=alphas,
                                      inner_folds=inner_folds, score_range=score_range)
            entry = {"fold": fold, "alpha": alpha, "scc": metrics.spearman(pred, y[test]),
                     "mae": metrics.mae(pred, y[test]), "n_train": int(train.size),
                     "true": y[test].tolist(), "pred": pred.tolist()}
            if video_ids is not None:
                entry["video_ids"] = [video_ids[i] for i in test]
            per_fold.append(entry)
        out[name(feature_set)] = summarise_folds(per_fold)
    return out


def summarise_folds(per_fold: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean, population SD and 95% CI half width over folds of per-fold SCC and MAE."""
    entry: dict[str, Any] = {}
    for metric in ("scc", "mae"):
        values = [p[metric] for p in per_fold]
        entry[f"{metric}_mean"], entry[f"{metric}_std"] = metrics.mean_std(values)
        entry[f"{metric}_ci95"] = metrics.mean_ci95(values)[1]
    entry["n_folds"] = len(per_fold)
    entry["per_fold"] = [dict(p) for p in per_fold]
    return entry
