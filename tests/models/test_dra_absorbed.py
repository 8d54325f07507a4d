"""DRA(absorb_projections=True): the key/value projections moved to the query side.

References: Flax's `MultiHeadDotProductAttention` for plain dot-product attention, and
DRA's projected form (itself checked against Flax and numpy in test_dra*.py) for the
adaptive and diversified forms. Same parameters, outputs, sown weights and gradients to
float32 round-off.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from surgfusion_jax.models.dra import DRA

B, LQ, LK, F = 3, 2, 7, 12
BASE = dict(num_heads=2, qkv_features=8, out_features=10)


def _inputs(seed=0, value_features=F):
    kq, kk, kv, kb, km = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(kq, (B, LQ, F))
    k = jax.random.normal(kk, (B, LK, F))
    v = jax.random.normal(kv, (B, LK, value_features))
    bias = jax.random.normal(kb, (B, 1, LQ, LK))
    mask = jax.random.bernoulli(km, 0.7, (B, 1, LQ, LK)).at[..., 0].set(True)
    return q, k, v, bias, mask


def _apply(layer, variables, q, k, v, **kw):
    return layer.apply(variables, q, k, v, rngs={"dropout": jax.random.key(7)},
                       mutable=["intermediates"], **kw)


def _close(a, b, atol=2e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = max(float(jnp.max(jnp.abs(x))), 1.0)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol * scale)


@pytest.mark.parametrize("mixing,diversify", [("adaptive", True), ("adaptive", False),
                                              ("negative", False)])
@pytest.mark.parametrize("deterministic", [True, False])
def test_matches_the_projected_form(mixing, diversify, deterministic):
    q, k, v, bias, mask = _inputs(value_features=6)
    kw = dict(BASE, mixing=mixing, diversify=diversify, dropout_rate=0.3,
              broadcast_dropout=False)
    projected, absorbed = DRA(**kw), DRA(**kw, absorb_projections=True)
    variables = projected.init(jax.random.key(1), q, k, v, deterministic=True)
    _close(variables, absorbed.init(jax.random.key(1), q, k, v, deterministic=True), atol=0)
    call = dict(bias=bias, mask=mask, deterministic=deterministic, sow_weights=True)
    out_p, sown_p = _apply(projected, variables, q, k, v, **call)
    out_a, sown_a = _apply(absorbed, variables, q, k, v, **call)
    _close(out_p, out_a)
    _close(sown_p, sown_a)

    def loss(layer, params, q, k, v):
        out, _ = _apply(layer, {"params": params}, q, k, v, **call)
        return jnp.sum(jnp.sin(out))

    grads = [jax.grad(lambda *a: loss(layer, *a), argnums=(0, 1, 2, 3))(
        variables["params"], q, k, v) for layer in (projected, absorbed)]
    if not diversify:  # softmax is shift-invariant: the key bias gets round-off only
        for g in grads:
            np.testing.assert_allclose(g[0]["key"]["bias"], 0.0, atol=1e-5)
            g[0]["key"].pop("bias")
    _close(*grads)


@pytest.mark.parametrize("use_bias", [True, False])
def test_plain_attention_matches_flax(use_bias):
    """mixing='positive', diversify=False against Flax's own layer (parameters shared)."""
    q, k, v, bias, mask = _inputs(seed=3)
    flax_layer = nn.MultiHeadDotProductAttention(**BASE, use_bias=use_bias)
    ours = DRA(**BASE, use_bias=use_bias, mixing="positive", diversify=False,
               absorb_projections=True)
    variables = flax_layer.init(jax.random.key(2), q, k, v)
    _close(variables, ours.init(jax.random.key(2), q, k, v), atol=0)
    expected = flax_layer.apply(variables, q, k, v, mask=mask)
    _close(expected, ours.apply(variables, q, k, v, mask=mask))
    # one query over many tokens, the DFB's shape
    q1 = q[:, :1]
    _close(flax_layer.apply(variables, q1, k, v), ours.apply(variables, q1, k, v))


def test_without_output_projection_returns_the_concatenated_heads():
    q, k, v, bias, _ = _inputs(seed=4)
    kw = dict(num_heads=2, qkv_features=8, out_features=8, output_projection=False)
    projected, absorbed = DRA(**kw), DRA(**kw, absorb_projections=True)
    variables = projected.init(jax.random.key(0), q, k, v)
    out = absorbed.apply(variables, q, k, v, bias=bias)
    assert out.shape == (B, LQ, 8)
    _close(projected.apply(variables, q, k, v, bias=bias), out)


@pytest.mark.parametrize("field,value", [("decode", True), ("normalize_qk", True),
                                         ("causal", True), ("query_block_size", 1)])
def test_unsupported_combinations_are_named(field, value):
    q, k, v, _, _ = _inputs()
    layer = DRA(**BASE, absorb_projections=True, **{field: value})
    with pytest.raises(ValueError, match=f"absorb_projections=True .*{field}"):
        layer.init(jax.random.key(0), q, k, v)
