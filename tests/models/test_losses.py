"""Tests for surgfusion_jax.models.losses.skill_loss (Eq. 19)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from surgfusion_jax.models.losses import skill_loss


def np_loss(pred, target, alpha, weights=None):
    w = np.ones_like(pred) if weights is None else weights
    err = pred.astype(np.float64) - target
    return alpha * np.sum(w * err ** 2) / w.sum() + (1 - alpha) * np.sum(w * np.abs(err)) / w.sum()


@pytest.mark.parametrize("alpha", [0.5, 0.0, 1.0, 0.3])
def test_matches_numpy(alpha):
    rng = np.random.default_rng(0)
    pred, target = rng.uniform(size=7).astype(np.float32), rng.uniform(size=7).astype(np.float32)
    np.testing.assert_allclose(skill_loss(pred, target, alpha), np_loss(pred, target, alpha),
                               rtol=1e-6)


def test_default_alpha_is_half_mse_half_mae():
    pred, target = jnp.array([0.1, 0.5]), jnp.array([0.3, 0.2])
    mse, mae = (0.04 + 0.09) / 2, (0.2 + 0.3) / 2
    np.testing.assert_allclose(skill_loss(pred, target), 0.5 * mse + 0.5 * mae, rtol=1e-6)


def test_weights_give_a_weighted_mean_and_ignore_zero_weight_samples():
    rng = np.random.default_rng(1)
    pred, target = rng.uniform(size=5).astype(np.float32), rng.uniform(size=5).astype(np.float32)
    weights = np.array([1.0, 2.0, 0.0, 1.0, 0.5], np.float32)
    np.testing.assert_allclose(skill_loss(pred, target, weights=weights),
                               np_loss(pred, target, 0.5, weights), rtol=1e-6)
    pred2 = pred.copy()
    pred2[2] = 100.0  # a zero-weight (padding) sample cannot matter
    np.testing.assert_allclose(skill_loss(pred2, target, weights=weights),
                               skill_loss(pred, target, weights=weights), rtol=1e-6)


def test_gradient_and_jit():
    pred, target = jnp.array([0.1, 0.5]), jnp.array([0.3, 0.2])
    g = jax.jit(jax.grad(skill_loss))(pred, target)
    # d/dp [0.5 * mean(e^2) + 0.5 * mean|e|] = 0.5 * (2 e / n) + 0.5 * sign(e) / n
    e = np.array([-0.2, 0.3])
    np.testing.assert_allclose(g, 0.5 * e + 0.25 * np.sign(e), rtol=1e-5)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="same shape"):
        skill_loss(jnp.zeros(3), jnp.zeros((3, 1)))
    with pytest.raises(ValueError, match="weights"):
        skill_loss(jnp.zeros(3), jnp.zeros(3), weights=jnp.ones(2))
