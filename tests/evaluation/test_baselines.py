"""Ridge linear-probe baselines against a numpy float64 closed form (evaluation.baselines)."""
import numpy as np
import pytest
from scipy import stats

from surgfusion_jax.evaluation import baselines

N, GROUPS, DIMS, T = 24, 6, {"rgb": 5, "flow": 4}, 7


def ref_ridge(x_train, y_train, x_test, alpha):
    """Standardise with the training mean/SD, ridge with an intercept: closed form."""
    mu, sd = x_train.mean(0), x_train.std(0)
    z, zt = (x_train - mu) / sd, (x_test - mu) / sd
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y_train - y_train.mean()))
    return zt @ w + y_train.mean()


def ref_alpha(x, y, groups, alphas):
    """Leave-one-group-out MSE (mean over groups), first minimum over the sorted grid."""
    alphas = sorted(alphas)
    mse = [np.mean([np.mean((ref_ridge(x[groups != g], y[groups != g], x[groups == g], a)
                             - y[groups == g]) ** 2) for g in np.unique(groups)])
           for a in alphas]
    return alphas[int(np.argmin(mse))]


def data(seed=0):
    """Padded features [N, T, F] with garbage past each length, lengths, scores, groups."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, N)
    groups = np.arange(N) % GROUPS  # interleaved: contiguous chunks are not the groups
    skill = rng.uniform(-1, 1, N)
    feats = {}
    for m, d in DIMS.items():
        u = rng.normal(size=d)
        f = rng.normal(size=(N, T, d)) + 0.8 * skill[:, None, None] * u
        for i, n in enumerate(lengths):
            f[i, n:] = 1e3 * rng.normal(size=(T - n, d))  # padding: must never be read
        feats[m] = f
    scores = 18 + 10 * skill + rng.normal(0, 2, N)
    folds = [(np.flatnonzero(groups // 2 != k), np.flatnonzero(groups // 2 == k)) for k in range(3)]
    return feats, lengths, scores, groups, folds


def pooled_by_hand(feats, lengths):
    return {m: np.stack([f[i, :n].mean(0) for i, n in enumerate(lengths)]) for m, f in feats.items()}


def test_mean_pool_ignores_padding():
    feats, lengths, *_ = data()
    f = feats["rgb"]
    ragged = [f[i, :n] for i, n in enumerate(lengths)]
    want = pooled_by_hand(feats, lengths)["rgb"]
    np.testing.assert_allclose(baselines.mean_pool(f, lengths), want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(baselines.mean_pool(ragged), baselines.mean_pool(f, lengths))
    assert np.abs(f.mean(1) - want).max() > 10  # the padding would show if it were read
    with pytest.raises(ValueError, match="needs `lengths`"):
        baselines.mean_pool(f)
    with pytest.raises(ValueError, match="no valid segment"):
        baselines.mean_pool(f, np.zeros(N, int))


def test_ridge_matches_closed_form_and_grouped_inner_cv():
    feats, lengths, scores, groups, folds = data()
    out = baselines.ridge_cv(feats, scores, folds, groups, lengths=lengths,
                             video_ids=[f"v{i}" for i in range(N)])
    assert list(out) == ["ridge (rgb)", "ridge (flow)", "ridge (all)"]
    pooled = pooled_by_hand(feats, lengths)
    sets = dict(pooled, all=np.concatenate([pooled["rgb"], pooled["flow"]], axis=1))
    chosen = set()
    for feature_set, x in sets.items():
        result = out[f"ridge ({feature_set})"]
        sccs, maes = [], []
        for (train, test), fold in zip(folds, result["per_fold"], strict=True):
            # training folds hold 4 groups < INNER_FOLDS: the inner CV is leave-one-group-out
            alpha = ref_alpha(x[train], scores[train], groups[train], baselines.ALPHAS)
            assert fold["alpha"] == alpha
            pred = ref_ridge(x[train], scores[train], x[test], alpha)
            np.testing.assert_allclose(fold["pred"], pred, rtol=0, atol=1e-9)
            assert fold["true"] == scores[test].tolist()
            assert fold["video_ids"] == [f"v{i}" for i in test]
            sccs.append(stats.spearmanr(pred, scores[test]).statistic)
            maes.append(np.mean(np.abs(pred - scores[test])))
            assert fold["scc"] == pytest.approx(sccs[-1], abs=1e-12)
            chosen.add(alpha)
        assert result["scc_mean"] == pytest.approx(np.mean(sccs), abs=1e-12)
        assert result["scc_std"] == pytest.approx(np.std(sccs), abs=1e-12)
        assert result["mae_mean"] == pytest.approx(np.mean(maes), abs=1e-9)
        assert result["scc_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * stats.sem(sccs))
        assert result["n_folds"] == 3
    assert len(chosen) > 1  # the grid search is exercised, not stuck at one end


def test_penalty_is_chosen_without_the_test_fold():
    feats, lengths, scores, groups, folds = data()
    base = baselines.ridge_cv(feats, scores, folds, groups, lengths=lengths)
    test = folds[0][1]
    moved_scores = scores.copy()
    moved_scores[test] = np.random.default_rng(5).uniform(0, 40, test.size)
    moved_feats = {m: f.copy() for m, f in feats.items()}
    for f in moved_feats.values():
        f[test] = np.random.default_rng(6).normal(0, 5, f[test].shape)
    by_scores = baselines.ridge_cv(feats, moved_scores, folds, groups, lengths=lengths)
    by_feats = baselines.ridge_cv(moved_feats, scores, folds, groups, lengths=lengths)
    for key, result in base.items():
        fold = result["per_fold"][0]
        assert by_scores[key]["per_fold"][0]["alpha"] == fold["alpha"]
        assert by_scores[key]["per_fold"][0]["pred"] == fold["pred"]  # identical, bit for bit
        assert by_feats[key]["per_fold"][0]["alpha"] == fold["alpha"]
        assert by_feats[key]["per_fold"][0]["pred"] != fold["pred"]  # the test fold was moved


def test_predictions_are_clipped_to_the_score_range():
    feats, lengths, scores, groups, folds = data()
    free = baselines.ridge_cv(feats, scores, folds, groups, lengths=lengths)["ridge (all)"]
    lo, hi = 15.0, 21.0
    clipped = baselines.ridge_cv(feats, scores, folds, groups, lengths=lengths,
                                 score_range=(lo, hi))["ridge (all)"]
    free_pred = np.concatenate([f["pred"] for f in free["per_fold"]])
    assert free_pred.min() < lo and free_pred.max() > hi  # the clip is exercised
    for a, b in zip(free["per_fold"], clipped["per_fold"]):
        assert b["alpha"] == a["alpha"]
        np.testing.assert_array_equal(b["pred"], np.clip(a["pred"], lo, hi))
        assert b["mae"] == pytest.approx(np.mean(np.abs(np.clip(a["pred"], lo, hi) - a["true"])))


def test_one_modality_and_errors():
    feats, lengths, scores, groups, folds = data()
    out = baselines.ridge_cv({"rgb": feats["rgb"]}, scores, folds, groups, lengths=lengths)
    assert list(out) == ["ridge (rgb)"]  # 'all' would repeat it
    one_group = np.where(groups < 2, 0, groups)  # fold 1 trains on groups 2-5 only... fine
    one_group[groups >= 2] = 9  # now folds 2 and 3 train on one group
    with pytest.raises(ValueError, match="at least 2"):
        baselines.ridge_cv(feats, scores, folds, one_group, lengths=lengths)
    with pytest.raises(ValueError, match="both train and test"):
        baselines.ridge_cv(feats, scores, [(np.arange(N), np.arange(3))], groups, lengths=lengths)
