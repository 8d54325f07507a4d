"""The memory-bounded path (`query_block_size`, docs/design.md §3.8) against dense DRA.

Dense DRA is itself checked against Flax and a float64 reference (test_dra.py,
test_dra_decode.py); here the blockwise path must give the same outputs, sown values and
gradients to 1e-5 for block sizes that do and do not divide the sequence, with masks and
biases that vary per query row, and its XLA buffer plan must not grow with q_len x kv_len.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from surgfusion_jax.models.dra import DRA

B, LQ, LK, F, H = 2, 7, 9, 12, 3


def _data(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    mask = np.array(jax.random.bernoulli(k[2], 0.7, (B, 1, LQ, LK)))
    mask[..., 0] = True
    return (jax.random.normal(k[0], (B, LQ, F)), jax.random.normal(k[1], (B, LK, F)),
            jnp.asarray(mask), 0.3 * jax.random.normal(k[3], (1, H, LQ, LK)))


def _apply(module, variables, *args, **kwargs):
    fn = functools.partial(module.apply, sow_weights=True, mutable=["intermediates"])
    out, state = jax.jit(fn)(variables, *args, **kwargs)
    return out, {k: v[0] for k, v in state["intermediates"].items()}


@pytest.mark.parametrize("mixing,diversify,causal", [("adaptive", True, False),
                                                     ("negative", True, False),
                                                     ("positive", False, False),
                                                     ("adaptive", True, True)])
def test_blockwise_equals_dense(mixing, diversify, causal):
    q, kv, mask, bias = _data()
    if causal:
        kv, mask, bias = q, mask[..., :LQ], bias[..., :LQ]
    dense = DRA(num_heads=H, qkv_features=F, mixing=mixing, diversify=diversify, causal=causal,
                alpha_bias_init=0.4)
    variables = dense.init(jax.random.key(1), q, kv)
    want, want_sown = _apply(dense, variables, q, kv, mask=mask, bias=bias)
    for block in (2, 3) if mixing == "adaptive" else (3,):
        got, got_sown = _apply(dense.clone(query_block_size=block), variables, q, kv,
                               mask=mask, bias=bias)
        np.testing.assert_allclose(got, want, atol=1e-5)
        for name in ("attention_weights", "alpha", "beta"):
            np.testing.assert_allclose(got_sown[name], want_sown[name], atol=1e-5)


def test_blockwise_gradients_equal_dense():
    q, kv, mask, bias = _data(2)
    dense = DRA(num_heads=H, qkv_features=F, alpha_bias_init=0.4)
    variables = dense.init(jax.random.key(3), q, kv)

    def grads(module):
        loss = lambda p, x: jnp.sum(module.apply({"params": p}, x, kv, mask=mask) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], q)

    want, got = grads(dense), grads(dense.clone(query_block_size=3))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_custom_attention_fn_gets_an_equivalent_problem():
    q, kv, mask, bias = _data(4)
    widths = []

    def attention(query, key, value, bias=None, mask=None, dtype=None, module=None):
        widths.append(query.shape[-1])
        return nn.dot_product_attention(query, key, value, bias=bias, mask=mask, dtype=dtype,
                                        module=module)

    for causal in (False, True):
        kv_ = q if causal else kv
        m, b = (mask[..., :LQ], bias[..., :LQ]) if causal else (mask, bias)
        internal = DRA(num_heads=H, qkv_features=F, causal=causal, alpha_bias_init=0.4)
        variables = internal.init(jax.random.key(5), q, kv_)
        want, _ = _apply(internal, variables, q, kv_, mask=m, bias=b)
        got, _ = _apply(internal.clone(attention_fn=attention), variables, q, kv_, mask=m, bias=b)
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert widths == [F, F]  # every head widened from d_h to H * d_h = qkv_features
    with pytest.raises(ValueError, match="query_block_size"):
        internal.clone(attention_fn=attention, query_block_size=2).apply(variables, q, kv_)


def test_blockwise_dropout_is_a_valid_dropout():
    q, kv, mask, _ = _data(6)
    layer = DRA(num_heads=H, qkv_features=F, dropout_rate=0.5, query_block_size=3)
    variables = layer.init(jax.random.key(7), q, kv, deterministic=True)
    run = jax.jit(lambda v, rng, det: layer.apply(v, q, kv, mask=mask, deterministic=det,
                                                  rngs={"dropout": rng}), static_argnums=2)
    base = run(variables, jax.random.key(0), True)
    np.testing.assert_allclose(base, layer.clone(query_block_size=None).apply(
        variables, q, kv, mask=mask, deterministic=True), atol=1e-5)
    a, b = run(variables, jax.random.key(1), False), run(variables, jax.random.key(2), False)
    assert np.all(np.isfinite(a)) and not np.allclose(a, base) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, run(variables, jax.random.key(1), False))


def test_memory_plan_is_bounded_by_the_block():
    """XLA's buffer plan: dense grows as q_len x kv_len, blockwise as block x kv_len."""
    block = 32

    def plan(length, block_size):
        x = jnp.zeros((1, length, 8))
        layer = DRA(num_heads=2, qkv_features=8, query_block_size=block_size)
        variables = layer.init(jax.random.key(0), x[:, :4])
        stats = jax.jit(layer.apply).lower(variables, x).compile().memory_analysis()
        return stats.temp_size_in_bytes

    dense = {n: plan(n, None) for n in (256, 512)}
    blockwise = {n: plan(n, block) for n in (256, 512)}
    scores_bytes = 2 * 512 * 512 * 4  # one float32 score matrix of the two heads
    assert dense[512] >= scores_bytes and dense[512] > 3.5 * dense[256]
    assert blockwise[512] < scores_bytes / 2 and blockwise[512] < 2.5 * blockwise[256]
