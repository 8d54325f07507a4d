"""Tests of surgfusion_jax/models/dra_nnx.py: the NNX DRA (Eqs. 11-18).

References: `flax.nnx.MultiHeadAttention` (the positive, undiversified DRANNX must behave
as it, bit for bit: outputs, dropout streams, sown weights, grouped keys, causal flag and
decoding) and the linen `DRA`, itself checked against Flax's attention and float64
references in test_dra*.py: the NNX layer must reproduce it for the same parameters in
every form, including causal decoding and the blockwise path, and the
`flax.nnx.bridge.ToNNX` wrapper of the linen layer must agree with both.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from surgfusion_jax.models.dra import DRA
from surgfusion_jax.models.dra_nnx import DRANNX, dra_nnx_from_linen

B, LQ, LK, F = 2, 3, 5, 8


def _inputs(seed=0):
    kq, kk, kv, km, kb = jax.random.split(jax.random.key(seed), 5)
    mask = np.array(jax.random.bernoulli(km, 0.6, (B, 1, LQ, LK)))
    mask[..., 0] = True
    bias = 0.5 * jax.random.normal(kb, (1, 2, LQ, LK))
    return (jax.random.normal(kq, (B, LQ, F)), jax.random.normal(kk, (B, LK, F)),
            jax.random.normal(kv, (B, LK, F)), jnp.asarray(mask), bias)


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


@pytest.mark.parametrize("mixing,diversify", [("adaptive", True), ("adaptive", False),
                                              ("positive", False), ("negative", True)])
def test_loaded_nnx_matches_linen(mixing, diversify):
    q, k, v, mask, bias = _inputs()
    linen = DRA(num_heads=2, qkv_features=8, out_features=6, mixing=mixing, diversify=diversify)
    variables = linen.init(jax.random.key(1), q, k, v)
    want, state = linen.apply(variables, q, k, v, mask=mask, bias=bias, sow_weights=True,
                              mutable=["intermediates"])
    layer = dra_nnx_from_linen(linen, variables, F, nnx.Rngs(0))
    assert isinstance(layer, DRANNX)
    got, inter = nnx.capture(layer, nnx.Intermediate)(q, k, v, mask=mask, bias=bias,
                                                      sow_weights=True)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    for name in ("attention_weights", "alpha", "beta"):
        np.testing.assert_allclose(inter[name][0], state["intermediates"][name][0], atol=1e-6)
    # parameters really come from the linen variables (not the fresh init)
    fresh = DRANNX(2, F, 8, 6, mixing=mixing, diversify=diversify, rngs=nnx.Rngs(5))
    assert not np.allclose(fresh(q, k, v, mask=mask, bias=bias), want, atol=1e-4)


def test_native_parameter_layout_matches_linen():
    q, k, v, *_ = _inputs()
    variables = DRA(num_heads=2, qkv_features=8).init(jax.random.key(0), q, k, v)
    layer = DRANNX(num_heads=2, in_features=F, qkv_features=8, rngs=nnx.Rngs(0))
    assert _shapes(nnx.state(layer, nnx.Param).to_pure_dict()) == _shapes(variables["params"])
    assert layer(q, k, v).shape == (B, LQ, F) and layer(q).shape == (B, LQ, F)


def test_tonnx_bridge_matches_linen_and_native():
    q, k, v, mask, bias = _inputs()
    linen = DRA(num_heads=2, qkv_features=8)
    bridged = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(0)).lazy_init(q, k, v)
    out = bridged(q, k, v, mask=mask, bias=bias)
    params = nnx.state(bridged, nnx.Param).to_pure_dict()
    assert set(params) == {"query", "key", "value", "out", "alpha_mlp"}
    variables = {"params": params}
    np.testing.assert_allclose(out, linen.apply(variables, q, k, v, mask=mask, bias=bias),
                               atol=1e-6)
    native = dra_nnx_from_linen(linen, variables)
    np.testing.assert_allclose(native(q, k, v, mask=mask, bias=bias), out, atol=1e-6)


def test_dropout_train_eval_and_rngs():
    q, k, v, *_ = _inputs()
    layer = DRANNX(2, F, 8, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1))
    with pytest.raises(ValueError, match="deterministic"):
        layer(q, k, v)
    base = layer(q, k, v, deterministic=True)
    layer.train()
    dropped = layer(q, k, v)
    assert not np.allclose(dropped, base, atol=1e-4)
    assert not np.allclose(layer(q, k, v), dropped, atol=1e-4)  # the kept stream advances
    explicit = layer(q, k, v, rngs=nnx.Rngs(dropout=3))
    np.testing.assert_allclose(explicit, layer(q, k, v, rngs=nnx.Rngs(dropout=3)))
    layer.eval()
    np.testing.assert_array_equal(layer(q, k, v), base)


def test_nnx_jit_and_grad_reach_alpha_mlp():
    q, k, v, mask, bias = _inputs()
    layer = DRANNX(2, F, 8, rngs=nnx.Rngs(0))
    eager = layer(q, k, v, mask=mask, bias=bias)
    jitted = nnx.jit(lambda m, *x: m(*x, mask=mask, bias=bias))(layer, q, k, v)
    np.testing.assert_allclose(jitted, eager, atol=1e-5)
    grads = nnx.grad(lambda m: jnp.mean(m(q, k, v, mask=mask, bias=bias) ** 2))(layer)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["alpha_mlp"]))


def test_errors():
    q, k, v, *_ = _inputs()
    with pytest.raises(ValueError, match="mixing"):
        DRANNX(2, F, mixing="vanilla", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible"):
        DRANNX(3, F, qkv_features=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        DRANNX(2, 4, qkv_features=8, rngs=nnx.Rngs(0))(q, k, v)
    linen = DRA(num_heads=2, qkv_features=8)
    variables = linen.init(jax.random.key(0), q, k, v)
    with pytest.raises(ValueError, match="in_features"):
        dra_nnx_from_linen(linen, variables, in_features=4)
    with pytest.raises(ValueError, match="alpha_mlp"):
        no_alpha = {"params": {n: variables["params"][n] for n in ("query", "key", "value", "out")}}
        dra_nnx_from_linen(linen, no_alpha)


PositiveNNX = functools.partial(DRANNX, mixing="positive", diversify=False)


def _copy_params(src, dst):
    nnx.update(dst, nnx.state(src, nnx.Param))


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_positive_matches_nnx_multi_head_attention(kv_heads):
    q, k, v, mask, _ = _inputs()
    kw = dict(num_heads=2, in_features=F, qkv_features=8, num_kv_heads=kv_heads,
              dropout_rate=0.3, decode=False)
    mha = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0, dropout=1))
    dra = PositiveNNX(**kw, rngs=nnx.Rngs(0, dropout=1))
    _copy_params(mha, dra)
    for call in (dict(deterministic=True, mask=mask), dict(deterministic=True, is_causal=True),
                 dict(deterministic=False), dict(deterministic=False, rngs=4)):
        kv = (q,) if call.get("is_causal") else (k, v)
        fresh = lambda: {**call, "rngs": nnx.Rngs(dropout=4)} if "rngs" in call else call
        np.testing.assert_array_equal(dra(q, *kv, **fresh()), mha(q, *kv, **fresh()))
    capture = lambda m: nnx.capture(m, nnx.Intermediate)(q, k, v, deterministic=True,
                                                          sow_weights=True)[1]
    np.testing.assert_array_equal(capture(dra)["attention_weights"][0],
                                  capture(mha)["attention_weights"][0])


def test_positive_decoding_matches_nnx_multi_head_attention():
    q, *_ = _inputs()
    kw = dict(num_heads=2, in_features=F, qkv_features=8, decode=True)
    mha = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
    dra = PositiveNNX(**kw, rngs=nnx.Rngs(0))
    _copy_params(mha, dra)
    for layer in (mha, dra):
        layer.init_cache(q.shape)
    for t in range(LQ):
        np.testing.assert_array_equal(dra(q[:, t:t + 1]), mha(q[:, t:t + 1]))
    np.testing.assert_array_equal(dra.cached_key[...], mha.cached_key[...])
    assert int(dra.cache_index[...]) == LQ
    with pytest.raises(ValueError, match="init_cache"):
        PositiveNNX(**kw, rngs=nnx.Rngs(0))(q[:, :1])


def test_causal_decoding_and_blockwise_match_linen():
    x = jax.random.normal(jax.random.key(3), (B, 6, F))
    linen = DRA(num_heads=2, qkv_features=8, causal=True, alpha_bias_init=0.4)
    variables = linen.init(jax.random.key(4), x)
    full = linen.apply(variables, x)
    layer = dra_nnx_from_linen(linen, variables)
    np.testing.assert_allclose(layer(x), full, atol=1e-6)
    np.testing.assert_allclose(layer(x, decode=False), full, atol=1e-6)
    layer.init_cache(x.shape)
    assert layer.cached_gram.shape == (B, 2, 2) and layer.cached_query_sum.shape == (B, 2, 4)
    step = nnx.jit(lambda m, tok: m(tok, decode=True))
    steps = [step(layer, x[:, t:t + 1]) for t in range(6)]
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
    for causal in (False, True):
        lin = linen.clone(causal=causal, query_block_size=4)
        native = dra_nnx_from_linen(lin, variables)
        np.testing.assert_allclose(native(x), lin.apply(variables, x), atol=1e-6)
    plain = dra_nnx_from_linen(linen.clone(causal=False), variables)
    with pytest.raises(ValueError, match="causal=True"):
        plain.init_cache(x.shape)
        plain(x[:, :1], decode=True)
    # is_causal=True at the call gives the causal statistics as well
    np.testing.assert_allclose(plain(x, is_causal=True), full, atol=1e-6)
