"""DRA's `relative_eps` (rho): Eq. 15 with rho * mean_h ||A_mix_h||^2 added to its
denominator (`dra_decode.projection_coefficients`, docs/design.md §3.2).

Why it exists: with the paper's eps = 1e-8 alone, c_h = <A_mix_h, P_main> / ||P_main||^2
and its gradient grow without bound when the heads' scores cancel in P_main; in the
fusion phase this made training diverge to NaN (docs/parity.md). References: the float64
loops of test_dra.py / test_dra_decode.py with the rho term, and closed-form bounds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from surgfusion_jax.models import dra_blockwise, dra_decode
from surgfusion_jax.models.dra import DRA
from surgfusion_jax.models.dra_nnx import dra_nnx_from_linen

from test_dra import B, F, LK, LQ, _init, _inputs, _mask, _sown, reference_dra
from test_dra_decode import causal_reference

RHO = 0.05


@pytest.mark.parametrize("heads", [2, 3])
def test_dense_dra_matches_the_float64_rule(heads):
    q, k, v = _inputs(seed=heads)
    mask = _mask(1, seed=10 + heads)
    dra = DRA(num_heads=heads, qkv_features=12 // heads * heads, out_features=4,
              relative_eps=RHO)
    variables = _init(dra, heads, q, k, v)
    variables["params"]["alpha_mlp"]["logit"]["bias"] = jnp.array([0.3])
    out, state = dra.apply(variables, q, k, v, mask=mask, sow_weights=True,
                           mutable=["intermediates"])
    ref_out, _, ref_beta, _ = reference_dra(variables["params"], q, k, v, heads,
                                            mask=np.asarray(mask), relative_eps=RHO)
    np.testing.assert_allclose(_sown(state)["beta"], ref_beta, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    paper, *_ = reference_dra(variables["params"], q, k, v, heads, mask=np.asarray(mask))
    assert np.abs(paper - ref_out).max() > 1e-4  # rho changes the output: the test can fail


def test_causal_and_decoded_dra_match_the_float64_rule():
    x = jax.random.normal(jax.random.key(0), (B, 5, F))
    dra = DRA(num_heads=2, qkv_features=F, causal=True, alpha_bias_init=0.4,
              relative_eps=RHO)
    variables = dra.init(jax.random.key(1), x)
    want, _, _ = causal_reference(variables["params"], x, 2, relative_eps=RHO)
    np.testing.assert_allclose(dra.apply(variables, x), want, atol=1e-5, rtol=1e-5)
    decoder = dra.clone(decode=True)
    cache = decoder.init(jax.random.key(1), x)["cache"]
    steps = []
    for t in range(x.shape[1]):
        out, mutated = decoder.apply({**variables, "cache": cache}, x[:, t:t + 1],
                                     mutable=["cache"])
        cache = mutated["cache"]
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), want, atol=1e-5, rtol=1e-5)


def test_blockwise_custom_fn_and_nnx_paths_equal_dense():
    q, k, v = _inputs(seed=7, lq=7)
    dense = DRA(num_heads=2, qkv_features=F, relative_eps=RHO, alpha_bias_init=0.4)
    variables = _init(dense, 3, q, k, v)
    want = dense.apply(variables, q, k, v)
    np.testing.assert_allclose(dense.clone(query_block_size=3).apply(variables, q, k, v),
                               want, atol=1e-5, rtol=1e-5)

    def flax_fn(query, key, value, bias=None, mask=None, dtype=None):  # a custom attention_fn
        return nn.dot_product_attention(query, key, value, bias=bias, mask=mask, dtype=dtype)

    np.testing.assert_allclose(dense.clone(attention_fn=flax_fn).apply(variables, q, k, v),
                               want, atol=1e-5, rtol=1e-5)
    layer = dra_nnx_from_linen(dense, variables, F, nnx.Rngs(0))
    assert layer.relative_eps == RHO
    np.testing.assert_allclose(layer(q, k, v), want, atol=1e-5, rtol=1e-5)


def _cancelling_scores(delta: float) -> jnp.ndarray:
    """Two heads whose scores cancel in P_main up to `delta`: [1, 2, 1, 4]."""
    s = jnp.array([1.0, -2.0, 0.5, 1.5])
    return jnp.stack([s, -s + delta * jnp.array([1.0, 0.0, -1.0, 0.5])])[None, :, None, :]


@pytest.mark.parametrize("rho", [1e-3, 1e-2, 1e-1])
def test_rho_bounds_the_projection_coefficient(rho):
    """|c_h| <= sqrt(H) / (2 sqrt(rho)) for any scores, including cancelling heads."""
    alpha = jnp.full((1, 2), 0.9)
    for delta in (1e-6, 1e-4, 1e-1, 1.0):
        inner, norm_sq, head_norm_sq = _statistics(_cancelling_scores(delta), alpha)
        c, _ = dra_decode.projection_coefficients(inner, norm_sq, head_norm_sq, eps=1e-8,
                                                  relative_eps=rho)
        assert np.abs(c).max() <= np.sqrt(2) / (2 * np.sqrt(rho)) + 1e-5
        c_paper, _ = dra_decode.projection_coefficients(inner, norm_sq, head_norm_sq,
                                                        eps=1e-8)
        if delta == 1e-4:  # the paper's coefficient: ~||A_mix|| / ||P_main||, capped by eps
            assert np.abs(c_paper).max() > 1e3
    scores = jax.random.normal(jax.random.key(0), (64, 3, 2, 5))
    inner, norm_sq, head_norm_sq = _statistics(scores, jax.random.uniform(jax.random.key(1),
                                                                          (64, 3)))
    c, _ = dra_decode.projection_coefficients(inner, norm_sq, head_norm_sq, eps=1e-8,
                                              relative_eps=rho)
    assert np.abs(c).max() <= np.sqrt(3) / (2 * np.sqrt(rho)) + 1e-5


def _statistics(scores, alpha):
    mixed = (2.0 * alpha - 1.0)[..., None, None] * scores
    main = jnp.mean(mixed, axis=-3, keepdims=True)
    return (jnp.sum(mixed * main, axis=(-2, -1)), jnp.sum(main * main, axis=(-2, -1)),
            jnp.sum(mixed * mixed, axis=(-2, -1)))


def test_rho_keeps_the_gradient_finite_where_the_heads_cancel():
    """The gradient of Eqs. 13-17 w.r.t. the scores: ~1/||P_main|| under the paper's
    Eq. 15 (here ~5e3; capped only by eps = 1e-8), ~4 with rho = 0.01; aligned heads are
    barely changed."""
    alpha = jnp.full((1, 2), 0.9)
    probe = jax.random.normal(jax.random.key(0), (1, 2, 1, 4))

    def grad_norm(scores, rho):
        f = lambda s: jnp.sum(probe * dra_blockwise.mix_and_diversify(
            s, alpha, diversify=True, eps=1e-8, relative_eps=rho)[0])
        return float(jnp.linalg.norm(jax.grad(f)(scores)))

    near = _cancelling_scores(1e-4)
    assert grad_norm(near, 0.0) > 1e3
    assert grad_norm(near, 1e-2) < 20
    aligned = jnp.concatenate([near[:, :1], near[:, :1] * 1.1], axis=1)
    paper, _ = dra_blockwise.mix_and_diversify(aligned, alpha, diversify=True, eps=1e-8)
    ours, _ = dra_blockwise.mix_and_diversify(aligned, alpha, diversify=True, eps=1e-8,
                                              relative_eps=1e-2)
    np.testing.assert_allclose(ours, paper, rtol=0.05)


def test_zero_rho_is_the_paper_bit_for_bit():
    q, k, v = _inputs(seed=5)
    paper = DRA(num_heads=2, qkv_features=8)
    variables = _init(paper, 5, q, k, v)
    np.testing.assert_array_equal(paper.clone(relative_eps=0.0).apply(variables, q, k, v),
                                  paper.apply(variables, q, k, v))
