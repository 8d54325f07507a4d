"""Tests for surgfusion_jax.models.fusion_strategies (Table IV switch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_testutil import np_dense
from surgfusion_jax.models import fusion_strategies as fs
from surgfusion_jax.models.dra import DRA

D = 8


def _tokens(seed, kv=3):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, 4, 1, D)).astype(np.float32))
    kv_tokens = jnp.asarray(rng.normal(size=(2, 4, kv, D)).astype(np.float32))
    return q, kv_tokens


@pytest.mark.parametrize("strategy,mixing,diversify", [
    ("dra", "adaptive", True), ("vanilla_ca", "positive", False),
    ("negative_ca", "negative", False)])
def test_attention_strategies_are_configured_dra(strategy, mixing, diversify):
    module = fs.make_fusion(strategy, features=D, num_heads=4, dropout_rate=0.1)
    assert isinstance(module, DRA)
    assert (module.mixing, module.diversify, module.num_heads) == (mixing, diversify, 4)
    assert (module.qkv_features, module.out_features, module.dropout_rate) == (D, D, 0.1)


def test_unknown_strategy_names_the_field():
    with pytest.raises(ValueError, match="fusion"):
        fs.make_fusion("sum", features=D)


def test_avg_is_dense_of_the_token_mean():
    q, kv = _tokens(0)
    module = fs.make_fusion("avg", features=D)
    variables = module.init(jax.random.key(0), q, kv, kv)
    out, state = module.apply(variables, q, kv, kv, sow_weights=True, mutable=["intermediates"])
    want = np_dense(np.asarray(kv).mean(-2, keepdims=True), variables["params"]["out"])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    weights = state["intermediates"]["attention_weights"][0]
    assert weights.shape == (2, 4, 1, 1, 3)
    np.testing.assert_allclose(weights, 1 / 3, rtol=1e-6)
    # The query does not matter.
    np.testing.assert_allclose(module.apply(variables, 5 * q, kv, kv), out, rtol=1e-6)


def test_avg_and_cat_follow_the_additive_mask():
    """A 0/-1e9 bias admits candidates 0..k*: avg averages them, cat zeroes the rest."""
    q, kv = _tokens(1)
    bias = jnp.array([0.0, 0.0, -1e9])  # k* = 1
    avg = fs.make_fusion("avg", features=D)
    v_avg = avg.init(jax.random.key(0), q, kv, kv)
    got = avg.apply(v_avg, q, kv, kv, bias=bias)
    want = np_dense(np.asarray(kv)[..., :2, :].mean(-2, keepdims=True), v_avg["params"]["out"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    cat = fs.make_fusion("cat", features=D)
    v_cat = cat.init(jax.random.key(0), q, kv, kv)
    gated = np.asarray(kv).copy()
    gated[..., 2, :] = 0.0
    want = np_dense(gated.reshape(2, 4, 1, 3 * D), v_cat["params"]["out"])
    np.testing.assert_allclose(cat.apply(v_cat, q, kv, kv, bias=bias), want,
                               rtol=1e-5, atol=1e-6)
    # Boolean masks act the same way.
    mask = jnp.array([True, True, False])
    np.testing.assert_allclose(cat.apply(v_cat, q, kv, kv, mask=mask), want,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["avg", "cat"])
def test_zero_valued_bias_passes_gradients(strategy):
    """The straight-through term of the DFB mask is 0 in value but must carry gradient."""
    q, kv = _tokens(2)
    module = fs.make_fusion(strategy, features=D)
    variables = module.init(jax.random.key(0), q, kv, kv)

    def f(b):
        return jnp.sum(module.apply(variables, q, kv, kv, bias=b) ** 2)

    g = jax.grad(f)(jnp.zeros((3,)))
    assert float(jnp.abs(g).sum()) > 0
