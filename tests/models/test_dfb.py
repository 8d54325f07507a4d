"""Tests for surgfusion_jax.models.dfb: FusionNets (Eq. 9), PolicyNet, masked decoding (Eqs. 6-10)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_testutil import np_dense, np_pool2, np_softmax, tree_copy
from surgfusion_jax.models import dfb

B, T_IN, D, K, M = 2, 16, 8, 4, 3
TAU = 10.0


def _inputs(seed, t_in=T_IN, global_pool=False):
    rng = np.random.default_rng(seed)
    t_out = 1 if global_pool else (t_in + 1) // 2
    arr = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    return arr(B, t_out, D), arr(B, t_out, D), [arr(B, t_in, D) for _ in range(M)]


def _init(block, c, s, xs, valid):
    return jax.jit(lambda k: block.init(k, c, s, xs, valid, tau=TAU, train=False))(
        jax.random.key(0))


@pytest.fixture(scope="module")
def dra_variables():
    """Variables of the default 'dra' block; their shapes do not depend on the length,
    the dropout rates or the pooling, so the tests below share them."""
    block = dfb.DynamicFusionBlock(features=D, num_candidates=K, num_heads=2)
    c, s, xs = _inputs(0)
    return _init(block, c, s, xs, jnp.ones((B, T_IN), bool))


def _apply_fn(block, train):
    def f(variables, c, s, xs, valid, tau, seed):
        rngs = {"gumbel": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}
        return block.apply(variables, c, s, xs, valid, tau=tau, train=train, rngs=rngs,
                           mutable=["intermediates", "batch_stats"])
    return jax.jit(f)


def test_attended_candidates_follow_the_policy_mask(dra_variables):
    """Candidates with index > k* get ~0 attention; those <= k* share all of it.
    (The same bias in the non-attention strategies: test_fusion_strategies.)"""
    block = dfb.DynamicFusionBlock(features=D, num_candidates=K, num_heads=2)
    c, s, xs = _inputs(0)
    valid = jnp.ones((B, T_IN), bool)
    variables = dra_variables
    f, state = _apply_fn(block, train=True)(variables, c, s, xs, valid, TAU, 0)
    assert f.shape == (B, T_IN // 2, D) and bool(jnp.all(jnp.isfinite(f)))
    inter = state["intermediates"]
    choice = np.asarray(inter["policy_choice"][0])  # [B, T, K] one-hot
    np.testing.assert_array_equal(choice.sum(-1), 1.0)
    k_star = choice.argmax(-1)
    assert len(np.unique(k_star)) >= 2  # the Gumbel noise explores several k*
    weights = np.asarray(inter["attention"]["attention_weights"][0]).mean(-3)[..., 0, :]
    admitted = np.arange(K)[None, None] <= k_star[..., None]
    assert float(np.abs(weights[~admitted]).max()) < 1e-6
    np.testing.assert_allclose((weights * admitted).sum(-1), 1.0, rtol=1e-5)


def test_gradients_reach_the_policy_net_and_tau(dra_variables):
    block = dfb.DynamicFusionBlock(features=D, num_candidates=K, num_heads=2)
    c, s, xs = _inputs(1)
    valid = jnp.ones((B, T_IN), bool)
    variables = dra_variables

    def loss(params, tau):
        f, _ = block.apply({**variables, "params": params}, c, s, xs, valid, tau=tau,
                           train=True, rngs={"gumbel": jax.random.key(3),
                                             "dropout": jax.random.key(4)},
                           mutable=["batch_stats"])
        return jnp.mean(f ** 2)

    g_params, g_tau = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], TAU)
    for leaf in jax.tree.leaves(g_params["policy"]):
        assert float(jnp.abs(leaf).max()) > 0
    assert float(jnp.abs(g_tau)) > 0
    assert float(jnp.abs(g_params["fusion_nets"]["ffn1"]["conv"]["kernel"]).max()) > 0


def test_eval_policy_is_the_noise_free_argmax(dra_variables):
    block = dfb.DynamicFusionBlock(features=D, num_candidates=K, num_heads=2)
    c, s, xs = _inputs(2, t_in=7)
    valid = jnp.array([[True] * 7, [True] * 4 + [False] * 3])
    variables = dra_variables
    apply = _apply_fn(block, train=False)
    f0, st0 = apply(variables, c, s, xs, valid, TAU, 0)
    f1, st1 = apply(variables, c, s, xs, valid, TAU, 7)  # other rngs: no effect in eval
    np.testing.assert_array_equal(f0, f1)
    choice = np.asarray(st0["intermediates"]["policy_choice"][0])
    logits = np_dense(np.concatenate([np.asarray(x) for x in xs], -1),
                      variables["params"]["policy"]["logits"])
    pooled, pooled_valid = np_pool2(logits, np.asarray(valid))
    np.testing.assert_array_equal(choice.argmax(-1)[pooled_valid],
                                  pooled.argmax(-1)[pooled_valid])


def test_candidate_bias_values_and_straight_through_gradient():
    logits = jnp.array([0.3, 1.2, -0.5, 0.1])

    def bias_of(l):
        y_soft = jax.nn.softmax(l)
        y_hard = jax.nn.one_hot(jnp.argmax(l), 4)
        return dfb.candidate_bias(y_hard, y_hard + y_soft - jax.lax.stop_gradient(y_soft))

    np.testing.assert_array_equal(bias_of(logits), [0.0, 0.0, dfb.MASK_VALUE, dfb.MASK_VALUE])
    # The bias moves with the soft sample: d bias / d logits = d softmax / d logits.
    np.testing.assert_allclose(jax.jacobian(bias_of)(logits),
                               jax.jacobian(jax.nn.softmax)(logits), rtol=1e-6)


def test_positional_gumbel_does_not_depend_on_the_padded_shape():
    key = jax.random.key(5)
    small = dfb.positional_gumbel(key, (2, 5, K))
    big = dfb.positional_gumbel(key, (3, 9, K))
    np.testing.assert_array_equal(small, big[:2, :5])
    assert len(np.unique(np.asarray(big))) == big.size  # distinct per sample and step


def test_fusion_nets_mix_modalities_per_eq_9():
    """alpha_k^m = softmax over m of modality m's own weight net; with the FFN's second
    conv zeroed (ReLU(0) = 0), candidate k is AvgPool2(sum_m alpha_k^m x_m)."""
    nets = dfb.FusionNets(num_candidates=K)
    _, _, xs = _inputs(6, t_in=7)
    valid = jnp.array([[True] * 7, [True] * 5 + [False] * 2])
    variables = nets.init(jax.random.key(0), xs, valid, train=False)
    params = tree_copy(variables["params"])
    params["ffn2"]["bn"] = jax.tree.map(jnp.zeros_like, params["ffn2"]["bn"])
    (out, out_valid), state = nets.apply({**variables, "params": params}, xs, valid,
                                         train=False, mutable=["intermediates"])
    # NumPy reference; eval-mode BN at its initial statistics (mean 0, var 1).
    hidden, wout = params["weights_hidden"], params["weights_out"]
    bn_scale = np.asarray(hidden["bn"]["scale"]) / np.sqrt(1.0 + 1e-5)
    logits = []
    for m, x in enumerate(xs):  # group m of each grouped conv = modality m's own net
        g_d, g_k = slice(m * D, (m + 1) * D), slice(m * K, (m + 1) * K)
        h = np.asarray(x) @ np.asarray(hidden["conv"]["kernel"])[0][:, g_d]
        h = np.maximum(h * bn_scale[g_d] + np.asarray(hidden["bn"]["bias"])[g_d], 0.0)
        logits.append(h @ np.asarray(wout["kernel"])[0][:, g_k]
                      + np.asarray(wout["bias"])[g_k])
    alpha = np_softmax(np.stack(logits, -2), axis=-2)  # [B, T, M, K]
    v = np.asarray(valid)  # (invalid steps are zeroed and masked out downstream)
    np.testing.assert_allclose(state["intermediates"]["modality_weights"][0][v], alpha[v],
                               rtol=1e-4, atol=1e-6)
    mixed = np.einsum("btmk,btmd->btkd", alpha, np.stack([np.asarray(x) for x in xs], -2))
    want, want_valid = np_pool2(mixed.reshape(B, 7, K * D), np.asarray(valid))
    assert out.shape == (B, 4, K, D)
    np.testing.assert_allclose(out, want.reshape(B, 4, K, D), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out_valid, want_valid)
    # The K FusionNets have their own weights: candidates differ.
    out_full = nets.apply(variables, xs, valid, train=False)[0]
    assert float(jnp.abs(out_full[:, :, 0] - out_full[:, :, 1]).max()) > 1e-4


def test_padding_does_not_change_train_outputs(dra_variables):
    """Train mode (BN batch statistics, Gumbel noise) with padded inputs, valid=False."""
    block = dfb.DynamicFusionBlock(features=D, num_candidates=K, num_heads=2,
                                   attention_dropout=0.0)
    c, s, xs = _inputs(7, t_in=7)
    valid = jnp.ones((B, 7), bool)
    variables = dra_variables
    pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n), (0, 0)))
    pvalid = jnp.arange(12)[None].repeat(B, 0) < 7
    f0, st0 = _apply_fn(block, True)(variables, c, s, xs, valid, TAU, 0)
    f1, st1 = _apply_fn(block, True)(variables, pad(c, 2), pad(s, 2), [pad(x, 5) for x in xs],
                                     pvalid, TAU, 0)
    np.testing.assert_allclose(f1[:, :4], f0, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(st1["intermediates"]["policy_choice"][0][:, :4],
                                  st0["intermediates"]["policy_choice"][0])
    for a, b in zip(jax.tree.leaves(st0["batch_stats"]), jax.tree.leaves(st1["batch_stats"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_global_pool_stage_runs_at_length_one(dra_variables):
    block = dfb.DynamicFusionBlock(features=D, num_candidates=K, global_pool=True)
    c, s, xs = _inputs(8, t_in=3, global_pool=True)
    valid = jnp.ones((B, 3), bool)
    f, _ = _apply_fn(block, True)(dra_variables, c, s, xs, valid, TAU, 0)
    assert f.shape == (B, 1, D)


def test_length_mismatch_is_reported():
    block = dfb.DynamicFusionBlock(features=D, num_candidates=K)
    c, s, xs = _inputs(9)
    with pytest.raises(ValueError, match="do not match"):
        block.init(jax.random.key(0), c[:, :3], s[:, :3], xs, jnp.ones((B, T_IN), bool),
                   tau=TAU, train=False)
