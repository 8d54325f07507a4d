"""Tests of surgfusion_jax/models/dra.py (Divergence Regulated Attention, Eqs. 11-18).

References: `flax.linen.MultiHeadDotProductAttention` (DRA with alpha fixed and no
diversification must reproduce it exactly) and a float64 numpy implementation of
Eqs. 11-18 written here from the paper, independent of the module's code.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from surgfusion_jax.models.dra import DRA

B, LQ, LK, F = 2, 3, 5, 8


def _inputs(seed=0, lq=LQ, lk=LK, f=F):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, lq, f)), jax.random.normal(kk, (B, lk, f)),
            jax.random.normal(kv, (B, lk, f)))


def _mask(heads_dim, lq=LQ, lk=LK, seed=3):
    """Random boolean mask [B, heads_dim, lq, lk]; key 0 always visible (no empty rows)."""
    m = np.array(jax.random.bernoulli(jax.random.key(seed), 0.6, (B, heads_dim, lq, lk)))
    m[..., 0] = True
    return jnp.asarray(m)


def _init(module, seed, *args, **kwargs):
    return module.init(jax.random.key(seed), *args, **kwargs)


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def _sown(state):
    inter = state["intermediates"]
    return {k: v[0] for k, v in inter.items()}


# ---------------------------------------------------------------- flax MHA equivalence

@pytest.mark.parametrize("mask_kind", ["none", "full", "broadcast_heads"])
@pytest.mark.parametrize("self_attention", [False, True])
def test_positive_no_diversify_equals_flax_mha(mask_kind, self_attention):
    q, k, v = _inputs()
    heads = 2
    if self_attention:
        k = v = None
        lk = LQ
    else:
        lk = LK
    mask = {"none": None, "full": _mask(heads, lk=lk),
            "broadcast_heads": _mask(1, lk=lk)}[mask_kind]
    mha = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=8)
    dra = DRA(num_heads=heads, qkv_features=8, mixing="positive", diversify=False)
    variables = _init(mha, 1, q, k, v, mask=mask)
    want = mha.apply(variables, q, k, v, mask=mask)
    got = dra.apply(variables, q, k, v, mask=mask)
    assert got.shape == (B, LQ, F)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # the mask must matter, otherwise the masked cases test nothing
    if mask is not None:
        assert not np.allclose(dra.apply(variables, q, k, v), got, atol=1e-4)


def test_positive_equals_mha_with_dropout_on_and_off():
    q, k, v = _inputs()
    mask = _mask(1)
    kw = dict(num_heads=2, qkv_features=8, dropout_rate=0.4)
    mha = nn.MultiHeadDotProductAttention(**kw)
    dra = DRA(**kw, mixing="positive", diversify=False)
    variables = _init(mha, 1, q, k, v, deterministic=True)
    rngs = {"dropout": jax.random.key(7)}
    for det in (True, False):
        want = mha.apply(variables, q, k, v, mask=mask, deterministic=det, rngs=rngs)
        got = dra.apply(variables, q, k, v, mask=mask, deterministic=det, rngs=rngs)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixing", ["positive", "negative", "adaptive"])
def test_parameter_tree_matches_mha(mixing):
    q, k, v = _inputs()
    mha_vars = _init(nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8), 0, q, k, v)
    dra_vars = _init(DRA(num_heads=2, qkv_features=8, mixing=mixing), 0, q, k, v)
    dra_params = dict(dra_vars["params"])
    if mixing == "adaptive":
        alpha = dra_params.pop("alpha_mlp")
        assert _shapes(alpha) == {"hidden": {"kernel": (4, 4), "bias": (4,)},
                                  "logit": {"kernel": (4, 1), "bias": (1,)}}
    assert _shapes(dra_params) == _shapes(dict(mha_vars["params"]))
    assert set(dra_vars) == {"params"}


def test_negative_equals_mha_with_negated_query():
    q, k, v = _inputs()
    mask = _mask(2)
    mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    variables = _init(mha, 2, q, k, v)
    negated = jax.tree.map(lambda x: x, variables)
    negated["params"]["query"] = jax.tree.map(lambda x: -x, variables["params"]["query"])
    dra = DRA(num_heads=2, qkv_features=8, mixing="negative", diversify=False)
    got = dra.apply(variables, q, k, v, mask=mask)
    np.testing.assert_allclose(got, mha.apply(negated, q, k, v, mask=mask), atol=1e-5, rtol=1e-5)
    assert not np.allclose(got, mha.apply(variables, q, k, v, mask=mask), atol=1e-4)


# ---------------------------------------------------------------- numpy reference

def _np_gelu(x):  # tanh approximation, as flax.linen.gelu
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_dra(params, xq, xk, xv, heads, mask=None, bias=None, diversify=True, eps=1e-8,
                  relative_eps=0.0):
    """Eqs. 11-18 in float64, one (sample, head) at a time. Returns (out, alpha, beta, w).
    `relative_eps` adds rho * mean_h ||A_mix_h||^2 to Eq. 15's denominator (DRA's)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xq, xk, xv = (np.asarray(a, np.float64) for a in (xq, xk, xv))
    proj = {n: np.einsum("blf,fhd->blhd", x, p[n]["kernel"]) + p[n]["bias"]
            for n, x in (("query", xq), ("key", xk), ("value", xv))}
    b, lq, lk, d = xq.shape[0], xq.shape[1], xk.shape[1], proj["query"].shape[-1]
    alpha, beta = np.zeros((b, heads)), np.zeros((b, heads))
    weights = np.zeros((b, heads, lq, lk))
    out_heads = np.zeros((b, lq, heads, d))
    mlp = p["alpha_mlp"]
    for i in range(b):
        mixed = []
        for h in range(heads):
            qh, kh = proj["query"][i, :, h], proj["key"][i, :, h]
            a_pos = qh @ kh.T / np.sqrt(d)  # Eq. 11
            pooled = qh.mean(axis=0)  # AvgPool over the query sequence
            hidden = _np_gelu(pooled @ mlp["hidden"]["kernel"] + mlp["hidden"]["bias"])
            alpha[i, h] = _np_sigmoid(hidden @ mlp["logit"]["kernel"] + mlp["logit"]["bias"])[0]
            mixed.append(alpha[i, h] * a_pos + (1 - alpha[i, h]) * (-a_pos))  # Eq. 13
        p_main = sum(mixed) / heads  # Eq. 14
        spread = relative_eps * np.mean([np.sum(m ** 2) for m in mixed])
        for h in range(heads):
            final = mixed[h]
            beta[i, h] = 1.0
            if diversify:
                coeff = np.sum(mixed[h] * p_main) / (np.sum(p_main ** 2) + eps + spread)
                beta[i, h] = _np_sigmoid(1.0 - coeff)  # Eq. 15
                divg = mixed[h] - coeff * p_main  # Eq. 16
                final = mixed[h] + beta[i, h] * divg  # Eq. 17
            if bias is not None:
                final = final + np.broadcast_to(bias, (b, heads, lq, lk))[i, h]
            logits = final - final.max(axis=-1, keepdims=True)
            e = np.exp(logits)
            if mask is not None:
                e = e * np.broadcast_to(mask, (b, heads, lq, lk))[i, h]
            w = e / e.sum(axis=-1, keepdims=True)
            weights[i, h] = w
            out_heads[i, :, h] = w @ proj["value"][i, :, h]  # Eq. 18
    out = np.einsum("blhd,hdo->blo", out_heads, p["out"]["kernel"]) + p["out"]["bias"]
    return out, alpha, beta, weights


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_adaptive_diversify_matches_numpy_reference(heads):
    q, k, v = _inputs(seed=heads)
    mask = _mask(1, seed=10 + heads)
    bias = 0.5 * jax.random.normal(jax.random.key(20 + heads), (1, heads, LQ, LK))
    dra = DRA(num_heads=heads, qkv_features=8, out_features=4, alpha_hidden_features=5)
    variables = _init(dra, heads, q, k, v)
    # random (not constant) alpha logit bias so that heads get different alphas
    variables["params"]["alpha_mlp"]["logit"]["bias"] = jnp.array([0.3])
    out, state = dra.apply(variables, q, k, v, mask=mask, bias=bias, sow_weights=True,
                           mutable=["intermediates"])
    sown = _sown(state)
    ref_out, ref_alpha, ref_beta, ref_w = reference_dra(
        variables["params"], q, k, v, heads, mask=np.asarray(mask), bias=np.asarray(bias))
    np.testing.assert_allclose(sown["alpha"], ref_alpha, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(sown["beta"], ref_beta, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(sown["attention_weights"], ref_w, atol=1e-5)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    if heads > 1:  # the divergence term must change the output, or this test proves nothing
        ref_plain, *_ = reference_dra(variables["params"], q, k, v, heads, mask=np.asarray(mask),
                                      bias=np.asarray(bias), diversify=False)
        assert np.abs(ref_plain - ref_out).max() > 1e-3
        plain = DRA(num_heads=heads, qkv_features=8, out_features=4, alpha_hidden_features=5,
                    diversify=False).apply(variables, q, k, v, mask=mask, bias=bias)
        np.testing.assert_allclose(plain, ref_plain, atol=1e-5, rtol=1e-5)


def test_one_head_diversify_is_a_no_op():
    q, k, v = _inputs()
    on = DRA(num_heads=1, qkv_features=8)
    variables = _init(on, 0, q, k, v)
    off = DRA(num_heads=1, qkv_features=8, diversify=False)
    np.testing.assert_allclose(on.apply(variables, q, k, v), off.apply(variables, q, k, v),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- properties

def test_alpha_invariant_to_query_permutation_and_factors_in_unit_interval():
    q, k, v = _inputs()
    dra = DRA(num_heads=2, qkv_features=8)
    variables = _init(dra, 0, q, k, v)
    perm = jnp.array([2, 0, 1])
    out, st = dra.apply(variables, q, k, v, sow_weights=True, mutable=["intermediates"])
    out_p, st_p = dra.apply(variables, q[:, perm], k, v, sow_weights=True,
                            mutable=["intermediates"])
    s, s_p = _sown(st), _sown(st_p)
    np.testing.assert_allclose(s_p["alpha"], s["alpha"], atol=1e-6)
    np.testing.assert_allclose(s_p["beta"], s["beta"], atol=1e-5)
    np.testing.assert_allclose(out_p, out[:, perm], atol=1e-5)  # rows permute with queries
    for name in ("alpha", "beta"):
        assert np.all((s[name] > 0) & (s[name] < 1)), name


def test_weights_normalised_zero_where_masked_and_no_nan():
    q, k, v = _inputs()
    mask = np.array(_mask(2))
    mask[0, :, 1, :] = False  # a whole query row masked in every head
    dra = DRA(num_heads=2, qkv_features=8)
    variables = _init(dra, 0, q, k, v)
    out, st = dra.apply(variables, q, k, v, mask=jnp.asarray(mask), sow_weights=True,
                        mutable=["intermediates"])
    w = np.asarray(_sown(st)["attention_weights"])
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(w))
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    partly = mask.any(-1, keepdims=True)  # rows with at least one visible key
    assert np.all(w[np.broadcast_to(partly, mask.shape) & ~mask] == 0.0)
    zq, zkv = jnp.zeros_like(q), jnp.zeros_like(k)
    zout, zst = dra.apply(variables, zq, zkv, zkv, mask=jnp.asarray(mask),
                          sow_weights=True, mutable=["intermediates"])
    assert np.all(np.isfinite(zout))
    assert all(np.all(np.isfinite(x)) for x in _sown(zst).values())


def test_extra_batch_dimensions():
    q, k, v = _inputs()
    dra = DRA(num_heads=2, qkv_features=8)
    variables = _init(dra, 0, q, k, v)
    flat = dra.apply(variables, q, k, v)
    nested = dra.apply(variables, q[:, None], k[:, None], v[:, None])  # [B, 1, len, F]
    np.testing.assert_allclose(nested[:, 0], flat, atol=1e-6)


def test_sown_shapes():
    q, k, v = _inputs()
    dra = DRA(num_heads=4, qkv_features=8)
    variables = _init(dra, 0, q, k, v)
    _, st = dra.apply(variables, q, k, v, sow_weights=True, mutable=["intermediates"])
    assert _shapes(_sown(st)) == {"attention_weights": (B, 4, LQ, LK), "alpha": (B, 4),
                                  "beta": (B, 4)}
    _, st = dra.apply(variables, q, k, v, mutable=["intermediates"])
    assert "intermediates" not in st  # nothing sown unless asked


def test_dropout_path():
    q, k, v = _inputs()
    dra = DRA(num_heads=2, qkv_features=8, dropout_rate=0.5)
    variables = _init(dra, 0, q, k, v, deterministic=True)
    base = dra.apply(variables, q, k, v, deterministic=True)
    with pytest.raises(Exception, match="dropout"):
        dra.apply(variables, q, k, v, deterministic=False)
    dropped = dra.apply(variables, q, k, v, deterministic=False,
                        rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(dropped, base, atol=1e-4)
    again = dra.apply(variables, q, k, v, deterministic=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(again, base)
    explicit = dra.apply(variables, q, k, v, deterministic=False,
                         dropout_rng=jax.random.key(1))
    assert np.all(np.isfinite(explicit)) and not np.allclose(explicit, base, atol=1e-4)
    with pytest.raises(Exception, match="deterministic"):
        dra.apply(variables, q, k, v)  # dropout_rate > 0 needs `deterministic` somewhere


def test_bfloat16_close_to_float32():
    q, k, v = _inputs()
    f32 = DRA(num_heads=2, qkv_features=8)
    variables = _init(f32, 0, q, k, v)
    want = f32.apply(variables, q, k, v)
    got = DRA(num_heads=2, qkv_features=8, dtype=jnp.bfloat16).apply(variables, q, k, v)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=0.05)


def test_jit_and_grad_reach_alpha_mlp():
    q, k, v = _inputs()
    dra = DRA(num_heads=2, qkv_features=8)
    variables = _init(dra, 0, q, k, v)
    eager = dra.apply(variables, q, k, v)
    np.testing.assert_allclose(jax.jit(dra.apply)(variables, q, k, v), eager, atol=1e-5)

    grad_fn = jax.jit(jax.grad(lambda p, *x: jnp.mean(dra.apply({"params": p}, *x) ** 2)))
    grads = grad_fn(variables["params"], q, k, v)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    alpha_grads = jax.tree.leaves(grads["alpha_mlp"])
    assert len(alpha_grads) == 4 and all(np.abs(g).max() > 0 for g in alpha_grads)
    # all-zero inputs: P_main = 0, so Eq. 15 divides by eps alone; gradients stay finite
    zero_grads = grad_fn(variables["params"], *(jnp.zeros_like(x) for x in (q, k, v)))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(zero_grads))


def test_invalid_configuration_errors():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="mixing"):
        _init(DRA(num_heads=2, mixing="vanilla"), 0, q, k, v)
    with pytest.raises(ValueError, match="divisible"):
        _init(DRA(num_heads=3, qkv_features=8), 0, q, k, v)
