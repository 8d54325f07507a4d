"""DRA(mixing='positive', diversify=False) behaves as `flax.linen.MultiHeadDotProductAttention`.

Every field and call argument of Flax's layer is exercised with the same settings on both
layers and the outputs, parameters, caches and sown values compared, bit for bit where
Flax's own code path is taken (docs/design.md §3.5). Flax's layer is the reference.
"""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.core import pop

from surgfusion_jax.models.dra import DRA

B, LQ, LK, F = 2, 3, 5, 8
PositiveDRA = functools.partial(DRA, mixing="positive", diversify=False)
BASE = dict(num_heads=2, qkv_features=8)


def _xs(seed=0, shape_q=(B, LQ, F), shape_kv=(B, LK, F)):
    kq, kk = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kq, shape_q), jax.random.normal(kk, shape_kv)


def _both(**kw):
    return nn.MultiHeadDotProductAttention(**BASE, **kw), PositiveDRA(**BASE, **kw)


def _equal_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_init_creates_flax_parameters_with_output_initialisers():
    q, kv = _xs()
    kw = dict(kernel_init=nn.initializers.ones, out_kernel_init=nn.initializers.zeros,
              bias_init=nn.initializers.zeros, out_bias_init=nn.initializers.ones)
    mha, dra = _both(**kw)
    v_mha, v_dra = mha.init(jax.random.key(0), q, kv), dra.init(jax.random.key(0), q, kv)
    _equal_trees(v_mha, v_dra)
    p = v_dra["params"]
    assert float(p["out"]["kernel"].max()) == 0.0 and float(p["out"]["bias"].min()) == 1.0
    assert float(p["query"]["kernel"].min()) == 1.0 and float(p["key"]["bias"].max()) == 0.0


def test_dtype_is_inferred_from_the_inputs():
    x = jnp.ones((2, 3, 4), jnp.complex64)
    y, _ = PositiveDRA(**BASE).init_with_output(jax.random.key(0), x)
    assert y.dtype == jnp.complex64 and y.shape == x.shape


def test_key_value_argument_rules_and_deprecated_inputs_kv():
    q, kv = _xs()
    mha, dra = _both()
    variables = mha.init(jax.random.key(0), q, kv)
    ref = mha.apply(variables, q, kv, kv)
    for args, kwargs in (((q, kv, kv), {}), ((q, kv), {})):
        np.testing.assert_array_equal(dra.apply(variables, *args, **kwargs), ref)
    with pytest.warns(DeprecationWarning, match="inputs_kv arg will be deprecated"):
        np.testing.assert_array_equal(dra.apply(variables, q, inputs_kv=kv), ref)
    with pytest.raises(ValueError, match="`inputs_k` cannot be None"):
        dra.apply(variables, q, inputs_v=kv)
    with pytest.raises(ValueError, match="`inputs_kv` must be None"):
        dra.apply(variables, q, kv, inputs_kv=kv)
    square = jnp.ones((B, LK, LK))  # a mask passed positionally is flagged, as by Flax
    with pytest.warns(DeprecationWarning, match="signature of MultiHeadDotProductAttention"):
        with pytest.raises(Exception):
            dra.apply(variables, q, kv, square)


@pytest.mark.parametrize("broadcast", [True, False])
def test_dropout_streams_and_explicit_rng_match_flax(broadcast):
    q, kv = _xs()
    mha, dra = _both(dropout_rate=0.5, broadcast_dropout=broadcast)
    variables = mha.init(jax.random.key(0), q, kv, deterministic=True)
    rngs = {"dropout": jax.random.key(3)}
    out = dra.apply(variables, q, kv, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(out, mha.apply(variables, q, kv, deterministic=False,
                                                 rngs=rngs))
    explicit = dict(deterministic=False, rngs=rngs, dropout_rng=jax.random.key(9))
    np.testing.assert_array_equal(dra.apply(variables, q, kv, **explicit),
                                  mha.apply(variables, q, kv, **explicit))
    assert not np.array_equal(dra.apply(variables, q, kv, **explicit), out)
    # deterministic (call or attribute) ignores the rngs
    np.testing.assert_array_equal(dra.apply(variables, q, kv, deterministic=True, rngs=rngs),
                                  dra.apply(variables, q, kv, deterministic=True))


def test_swapping_the_class_with_name_keeps_paths_and_dropout_streams():
    q, _ = _xs()

    class Block(nn.Module):
        attention: type = nn.MultiHeadDotProductAttention

        @nn.compact
        def __call__(self, x):
            return self.attention(**BASE, dropout_rate=0.3, deterministic=False,
                                  name="MultiHeadDotProductAttention_0")(x) + x

    original, swapped = Block(), Block(attention=PositiveDRA)
    variables = original.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, q)
    rngs = {"dropout": jax.random.key(2)}
    np.testing.assert_array_equal(swapped.apply(variables, q, rngs=rngs),
                                  original.apply(variables, q, rngs=rngs))
    assert set(variables["params"]) == {"MultiHeadDotProductAttention_0"}


def test_flax_alias_multi_head_attention_gives_identical_results():
    q, kv = _xs()
    dra = PositiveDRA(**BASE, bias_init=nn.initializers.uniform())
    alias = nn.MultiHeadAttention(**BASE, bias_init=nn.initializers.uniform())
    out1, v1 = dra.init_with_output(jax.random.key(4), q, kv)
    out2, v2 = alias.init_with_output(jax.random.key(4), q, kv, kv)
    np.testing.assert_array_equal(out1, out2)
    _equal_trees(v1, v2)


@pytest.mark.parametrize("force_fp32", [False, True])
def test_mixed_precision_follows_both_flax_softmax_modes(force_fp32):
    q, kv = _xs()
    mha, dra = _both(dtype=jnp.bfloat16, force_fp32_for_softmax=force_fp32)
    variables = mha.init(jax.random.key(0), q, kv)
    want, st_want = mha.apply(variables, q, kv, sow_weights=True, mutable=["intermediates"])
    got, st_got = dra.apply(variables, q, kv, sow_weights=True, mutable=["intermediates"])
    np.testing.assert_array_equal(got, want)
    w_want = st_want["intermediates"]["attention_weights"][0]
    w_got = st_got["intermediates"]["attention_weights"][0]
    assert w_got.dtype == (jnp.float32 if force_fp32 else jnp.bfloat16)
    np.testing.assert_array_equal(w_got, w_want)


def test_sow_weights_only_in_the_layers_asked():
    x = _xs()[0]

    class Three(nn.Module):
        @nn.compact
        def __call__(self, x, sow):
            x = PositiveDRA(**BASE)(x, sow_weights=sow)
            x = PositiveDRA(**BASE)(x)
            return PositiveDRA(**BASE)(x, sow_weights=sow)

    variables = Three().init(jax.random.key(0), x, False)
    _, state = Three().apply(variables, x, True, mutable=["intermediates"])
    assert set(state["intermediates"]) == {"DRA_0", "DRA_2"}
    assert state["intermediates"]["DRA_0"]["attention_weights"][0].shape == (B, 2, LQ, LQ)
    _, state = Three().apply(variables, x, False, mutable=["intermediates"])
    assert "intermediates" not in state


@pytest.mark.parametrize("batch_shape,scan_axis", [((B,), 1), ((B, 3), 2)])
def test_decode_matches_flax_and_the_full_causal_sequence(batch_shape, scan_axis):
    length = 4
    x = jax.random.normal(jax.random.key(5), batch_shape + (length, F))
    mha, dra = _both(decode=True, precision=jax.lax.Precision.HIGHEST)
    cache, params = pop(mha.init(jax.random.key(0), x), "params")
    _equal_trees(cache, pop(dra.init(jax.random.key(0), x), "params")[0])
    causal = nn.make_causal_mask(jnp.ones(batch_shape + (length,)))
    full = dra.clone(decode=False).apply({"params": params}, x, mask=causal)
    c_mha, c_dra, steps = cache, cache, []
    for t in range(length):
        token = jax.lax.slice_in_dim(x, t, t + 1, axis=scan_axis)
        y_mha, c_mha = mha.apply({"params": params, **c_mha}, token, mutable=["cache"])
        y_dra, c_dra = dra.apply({"params": params, **c_dra}, token, mutable=["cache"])
        np.testing.assert_array_equal(y_dra, y_mha)
        steps.append(y_dra)
    _equal_trees(c_dra, c_mha)
    np.testing.assert_allclose(jnp.concatenate(steps, scan_axis), full, atol=1e-5)
    with pytest.raises(ValueError, match="cache shape"):
        dra.apply({"params": params, **c_dra}, x, mutable=["cache"])


def test_normalize_qk_and_custom_dot_generals_match_flax():
    q, kv = _xs()
    calls = []

    def counting_dot_general(*args, **kwargs):
        calls.append(1)
        return jax.lax.dot_general(*args, **kwargs)

    kw = dict(normalize_qk=True, qkv_dot_general=counting_dot_general,
              out_dot_general=counting_dot_general)
    mha, dra = _both(**kw)
    variables = mha.init(jax.random.key(0), q, kv)
    assert {"query_ln", "key_ln"} <= set(variables["params"])
    calls.clear()
    got = dra.apply(variables, q, kv)
    assert len(calls) == 4  # query, key, value, out
    np.testing.assert_array_equal(got, mha.apply(variables, q, kv))


def test_custom_attention_fn_and_einsum_classes_are_used_as_by_flax():
    q, kv = _xs()
    seen = []

    def attention(query, key, value, mask=None, dropout_rng=None, dropout_rate=0.0,
                  broadcast_dropout=True, deterministic=False, dtype=None, precision=None):
        seen.append(query.shape)
        return nn.dot_product_attention(query, key, value, mask=mask, dtype=dtype)

    mha, dra = _both(attention_fn=attention)
    variables = mha.init(jax.random.key(0), q, kv)
    seen.clear()
    np.testing.assert_array_equal(dra.apply(variables, q, kv), mha.apply(variables, q, kv))
    assert seen == [(B, LQ, 2, 4)] * 2

    einsums = []

    def make_einsum():
        def einsum(*args, **kwargs):
            einsums.append(args[0])
            return jnp.einsum(*args, **kwargs)
        return einsum

    kw = dict(qk_attn_weights_einsum_cls=make_einsum, attn_weights_value_einsum_cls=make_einsum)
    mha, dra = _both(**kw)
    np.testing.assert_array_equal(dra.apply(variables, q, kv), mha.apply(variables, q, kv))
    assert len(einsums) == 4
    with pytest.raises(ValueError, match="mutually exclusive"):
        PositiveDRA(**BASE, **kw, precision=jax.lax.Precision.HIGHEST).apply(variables, q, kv)
    # DRA's own (diversified) path honours the same classes and the same rule
    with pytest.raises(ValueError, match="mutually exclusive"):
        DRA(**BASE, **kw, mixing="positive", precision=jax.lax.Precision.HIGHEST).apply(
            variables, q, kv)
    einsums.clear()
    out = DRA(**BASE, **kw, mixing="positive").apply(variables, q, kv)
    assert len(einsums) == 2 and out.shape == (B, LQ, F)


def test_bias_is_a_dra_extension_passed_to_attention_fn():
    q, kv = _xs()
    bias = jax.random.normal(jax.random.key(8), (1, 2, LQ, LK))
    mha, dra = _both()
    variables = mha.init(jax.random.key(0), q, kv)

    def biased(query, key, value, mask=None, dtype=None):
        return nn.dot_product_attention(query, key, value, bias=bias, mask=mask, dtype=dtype)

    want = nn.MultiHeadDotProductAttention(**BASE, attention_fn=biased).apply(variables, q, kv)
    np.testing.assert_array_equal(dra.apply(variables, q, kv, bias=bias), want)
    assert not np.allclose(want, mha.apply(variables, q, kv), atol=1e-4)

    def no_bias(query, key, value, mask=None):
        return nn.dot_product_attention(query, key, value, mask=mask)

    with pytest.raises(ValueError, match="bias"):
        PositiveDRA(**BASE, attention_fn=no_bias).apply(variables, q, kv, bias=bias)


def test_decode_in_float64_mode():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with jax.enable_x64(True):
            x = jnp.ones((1, 4, 4))
            dra = PositiveDRA(num_heads=2, qkv_features=4, decode=True)
            variables = dra.init(jax.random.key(0), x, x, x)
            cache = variables["cache"]
            for t in range(2):
                y, upd = dra.apply({"params": variables["params"], "cache": cache},
                                   x[:, t:t + 1], mutable=["cache"])
                cache = upd["cache"]
                assert y.shape == (1, 1, 4)
            assert int(cache["cache_index"]) == 2
