"""Causal DRA and incremental decoding (docs/design.md §3.7, Eqs. 12-18 on the prefix).

The reference is a float64 NumPy implementation written from the rule itself: for every
query row t, alpha from the mean of the queries 0..t and the Eq. 15 sums over the causal
triangle {(s, j): j <= s <= t} of the scores, by explicit loops (no Gram matrices, unlike
the module). Decoding token by token must reproduce the full-sequence causal output.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.core import pop

from surgfusion_jax.models.dra import DRA

B, L, F, H = 2, 5, 12, 3


def _x(seed=0, length=L):
    return jax.random.normal(jax.random.key(seed), (B, length, F))


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def causal_reference(params, x, heads, mask=None, bias=None, eps=1e-8, relative_eps=0.0):
    """Causal DRA in float64: returns (out [B, L, F_out], alpha [B, L, H], beta [B, L, H])."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    proj = {n: np.einsum("blf,fhd->blhd", x, p[n]["kernel"]) + p[n]["bias"]
            for n in ("query", "key", "value")}
    b, length, _ = x.shape
    d = proj["query"].shape[-1]
    mlp = p["alpha_mlp"]
    out_heads = np.zeros((b, length, heads, d))
    alpha, beta = np.zeros((b, length, heads)), np.zeros((b, length, heads))
    for i in range(b):
        scores = np.stack([proj["query"][i, :, h] @ proj["key"][i, :, h].T / np.sqrt(d)
                           for h in range(heads)])  # A+ [H, L, L]
        for t in range(length):
            pooled = proj["query"][i, :t + 1].mean(axis=0)  # [H, d]
            logit = _gelu(pooled @ mlp["hidden"]["kernel"] + mlp["hidden"]["bias"])
            z = (logit @ mlp["logit"]["kernel"] + mlp["logit"]["bias"])[:, 0]
            al = 1.0 / (1.0 + np.exp(-z))
            mixed = np.array([al[h] * scores[h] + (1 - al[h]) * -scores[h] for h in range(heads)])
            main = mixed.mean(axis=0)
            inner, norm, head_norms = np.zeros(heads), 0.0, np.zeros(heads)
            for s in range(t + 1):
                for j in range(s + 1):
                    inner += mixed[:, s, j] * main[s, j]
                    norm += main[s, j] ** 2
                    head_norms += mixed[:, s, j] ** 2
            c = inner / (norm + eps + relative_eps * head_norms.mean())
            be = 1.0 / (1.0 + np.exp(-(1.0 - c)))
            alpha[i, t], beta[i, t] = al, be
            for h in range(heads):
                row = mixed[h, t] + be[h] * (mixed[h, t] - c[h] * main[t])
                if bias is not None:
                    row = row + np.broadcast_to(bias, (b, heads, length, length))[i, h, t]
                visible = np.arange(length) <= t
                if mask is not None:
                    visible &= np.broadcast_to(mask, (b, heads, length, length))[i, h, t]
                row = np.where(visible, row, -np.inf)
                w = np.exp(row - row.max())
                out_heads[i, t, h] = (w / w.sum()) @ proj["value"][i, :, h]
    out = np.einsum("blhd,hdo->blo", out_heads, p["out"]["kernel"]) + p["out"]["bias"]
    return out, alpha, beta


def test_causal_dra_matches_the_numpy_rule():
    x = _x()
    mask = np.array(jax.random.bernoulli(jax.random.key(1), 0.7, (B, 1, L, L)))
    mask[..., 0] = True
    bias = 0.3 * np.asarray(jax.random.normal(jax.random.key(2), (1, H, L, L)))
    dra = DRA(num_heads=H, qkv_features=F, causal=True, alpha_bias_init=0.4)
    variables = dra.init(jax.random.key(3), x)
    apply = jax.jit(lambda v, *a, **k: dra.apply(v, *a, sow_weights=True,
                                                 mutable=["intermediates"], **k))
    out, state = apply(variables, x, mask=jnp.asarray(mask), bias=jnp.asarray(bias))
    ref, alpha, beta = causal_reference(variables["params"], x, H, mask=mask, bias=bias)
    inter = state["intermediates"]
    np.testing.assert_allclose(inter["alpha"][0], alpha, atol=1e-5)
    np.testing.assert_allclose(inter["beta"][0], beta, atol=1e-5)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # the causal rule is not the whole-sequence rule under a causal mask
    plain = jax.jit(DRA(num_heads=H, qkv_features=F, alpha_bias_init=0.4).apply)(
        variables, x, mask=jnp.asarray(mask) & nn.make_causal_mask(jnp.ones((B, L))).astype(bool),
        bias=jnp.asarray(bias))
    assert np.abs(plain - out).max() > 1e-3


@pytest.mark.parametrize("mixing,diversify", [("adaptive", True), ("adaptive", False),
                                              ("positive", True), ("negative", False)])
def test_token_by_token_decoding_equals_the_full_causal_output(mixing, diversify):
    x = _x(4)
    dra = DRA(num_heads=H, qkv_features=F, mixing=mixing, diversify=diversify, causal=True,
              alpha_bias_init=0.4)
    decoder = dra.clone(decode=True)
    cache, params = pop(decoder.init(jax.random.key(5), x), "params")
    names = {"cached_key", "cached_value", "cache_index"}
    names |= {"cached_query_sum"} if mixing == "adaptive" else set()
    names |= {"cached_gram"} if diversify else set()
    assert set(cache["cache"]) == names
    full, state = dra.apply({"params": params}, x, sow_weights=True, mutable=["intermediates"])
    step = jax.jit(lambda c, tok: decoder.apply({"params": params, **c}, tok, sow_weights=True,
                                                mutable=["cache", "intermediates"]))
    outs, betas = [], []
    for t in range(L):
        y, upd = step(cache, x[:, t:t + 1])
        cache = {"cache": upd["cache"]}
        outs.append(y)
        betas.append(upd["intermediates"]["beta"][0])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
    np.testing.assert_allclose(jnp.concatenate(betas, 1), state["intermediates"]["beta"][0],
                               atol=1e-5)
    assert int(cache["cache"]["cache_index"]) == L


def test_decoding_a_statistics_form_requires_causal():
    x = _x()
    with pytest.raises(ValueError, match="causal=True"):
        DRA(num_heads=H, qkv_features=F, decode=True).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="causal=True"):
        DRA(num_heads=H, qkv_features=F, mixing="positive", decode=True).init(
            jax.random.key(0), x)


def test_receptive_field_of_causal_dra_is_the_prefix():
    x = _x(6, length=6)
    dra = DRA(num_heads=H, qkv_features=F, causal=True)
    variables = dra.init(jax.random.key(7), x)
    leaky = DRA(num_heads=H, qkv_features=F)  # whole-sequence statistics + a causal mask
    causal_mask = nn.make_causal_mask(jnp.ones((B, 6)))

    def dependence(module, **kw):  # [output row, input row]: max |d out / d in|
        jac = jax.jit(jax.jacrev(lambda z: module.apply(variables, z, **kw)[0]))(x)
        return np.abs(np.asarray(jac[:, :, 0])).max(axis=(1, 3))

    dep = dependence(dra)
    for pos in range(6):
        assert np.all(dep[pos, :pos + 1] > 0) and np.all(dep[pos, pos + 1:] == 0), (pos, dep)
    assert np.any(dependence(leaky, mask=causal_mask)[3, 4:] > 1e-6)


def test_custom_attention_fn_decodes_the_diversified_form_too():
    x = _x(8)

    def attention(query, key, value, bias=None, mask=None, dtype=None):
        return nn.dot_product_attention(query, key, value, bias=bias, mask=mask, dtype=dtype)

    dra = DRA(num_heads=H, qkv_features=F, causal=True, attention_fn=attention)
    decoder = dra.clone(decode=True)
    cache, params = pop(decoder.init(jax.random.key(9), x), "params")
    internal = jax.jit(DRA(num_heads=H, qkv_features=F, causal=True).apply)({"params": params}, x)
    np.testing.assert_allclose(jax.jit(dra.apply)({"params": params}, x), internal, atol=1e-5)
    step = jax.jit(lambda c, tok: decoder.apply({"params": params, **c}, tok, mutable=["cache"]))
    outs = []
    for t in range(L):
        y, cache = step(cache, x[:, t:t + 1])
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), internal, atol=1e-5)
