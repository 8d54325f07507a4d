"""Metrics against independent references (numpy / scipy / hand computations)."""
import numpy as np
import pytest
from scipy import stats

from surgfusion_jax.evaluation import metrics


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=20)
    true = np.round(rng.normal(size=20), 1)  # ties in the labels
    assert metrics.spearman(pred, true) == pytest.approx(stats.spearmanr(pred, true)[0], abs=1e-12)


def test_spearman_by_hand():
    # ranks pred = [1,2,3,4], true = [1,3,2,4]: 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*2/60 = 0.8
    assert metrics.spearman([0.1, 0.2, 0.3, 0.4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert metrics.spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert metrics.spearman(np.array([[0.1], [0.3], [0.2]]), [1, 3, 2]) == pytest.approx(1.0)  # [N,1]


def test_spearman_degenerate_cases():
    assert metrics.spearman([0.3, 0.3, 0.3], [1, 2, 3]) == 0.0  # constant predictions
    assert metrics.spearman([1, 2, 3], [5, 5, 5]) == 0.0
    assert np.isnan(metrics.spearman([0.3], [1.0]))
    assert np.isnan(metrics.spearman([0.1, np.nan, 0.3], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        metrics.spearman([1, 2, 3], [1, 2])


def test_mae_and_score_units():
    assert metrics.mae([1.0, 2.0, 4.0], [2.0, 2.0, 1.0]) == pytest.approx(4.0 / 3.0)
    # target 0.5 * score / 30: a score of 24 is 0.4; 0.4 back is 24.
    assert metrics.to_target(24.0, 30.0) == pytest.approx(0.4)
    assert metrics.to_score_units(0.4, 30.0) == pytest.approx(24.0)
    scores = np.array([6.0, 17.5, 30.0])
    np.testing.assert_allclose(metrics.to_score_units(metrics.to_target(scores, 30), 30), scores)
    pred = metrics.to_score_units([0.2, 0.25], 30)
    assert metrics.mae(pred, [13.0, 14.0]) == pytest.approx((1.0 + 1.0) / 2)
    with pytest.raises(ValueError, match="score_max"):
        metrics.to_score_units(0.4, 0)


def test_fisher_z_mean():
    r = np.array([0.93, 0.92, 0.91])
    expected = np.tanh(np.mean(0.5 * np.log((1 + r) / (1 - r))))  # artanh written out
    assert metrics.fisher_z_mean(r) == pytest.approx(expected, abs=1e-12)
    assert round(metrics.fisher_z_mean(r), 2) == 0.92  # docs/design.md §5 example
    # differs from the arithmetic mean when spread: z-mean is pulled towards the larger |r|
    assert metrics.fisher_z_mean([0.9, 0.1]) > 0.5
    assert metrics.fisher_z_mean([0.5]) == pytest.approx(0.5)
    assert np.isfinite(metrics.fisher_z_mean([1.0, 0.8]))  # clipped, not inf
    assert np.isnan(metrics.fisher_z_mean([0.5, np.nan]))
    with pytest.raises(ValueError):
        metrics.fisher_z_mean([1.5])


def test_fold_mean_and_mean_std():
    assert metrics.fold_mean([0.8, 0.9, 0.7]) == pytest.approx(0.8)
    m, s = metrics.mean_std([1.0, 2.0, 3.0, 4.0])
    assert (m, s) == pytest.approx((2.5, np.sqrt(1.25)))
    assert metrics.mean_std([1.0, 2.0, 3.0, 4.0], ddof=1)[1] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert metrics.mean_std([0.5]) == (0.5, 0.0)
    assert metrics.format_mean_std(0.81234, 0.02) == "0.8123 ± 0.0200"
    with pytest.raises(ValueError):
        metrics.fold_mean([])
