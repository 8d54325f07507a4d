"""Tests for surgfusion_jax.models.layers: masked pooling, masked conv blocks, residual blocks."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model_testutil import np_pool2, tree_copy
from surgfusion_jax.models import layers


def np_conv_bn_relu_train(x, valid, kernel, scale, bias, eps=layers.BN_EPSILON):
    """Reference ConvBNAct in train mode: SAME conv of the zeroed input, masked BN, ReLU."""
    x = np.where(valid[..., None], x, 0.0)
    k = kernel.shape[0]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
    y = np.stack([np.einsum("bkc,kcd->bd", xp[:, t:t + k], kernel)
                  for t in range(x.shape[1])], axis=1)
    sel = y[valid]
    mean, var = sel.mean(0), sel.var(0)
    y = (y - mean) / np.sqrt(var + eps) * scale + bias
    return np.where(valid[..., None], np.maximum(y, 0.0), 0.0), mean, var


def test_masked_avg_pool2_matches_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 4)).astype(np.float32)
    valid = np.array([[1, 1, 1, 1, 1, 1, 1],
                      [1, 1, 1, 0, 0, 0, 0],   # a half-valid pair, then empty pairs
                      [1, 1, 1, 1, 1, 0, 0]], bool)
    got, got_valid = layers.masked_avg_pool2(jnp.asarray(x), jnp.asarray(valid))
    want, want_valid = np_pool2(x, valid)
    assert got.shape == (3, 4, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_valid, want_valid)
    # A window with one valid step returns that step itself.
    np.testing.assert_allclose(got[1, 1], x[1, 2], rtol=1e-6)


def test_masked_global_mean_matches_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    x[1, 2:] = 1e6  # garbage at invalid steps must not leak
    got, got_valid = layers.masked_global_mean(jnp.asarray(x), jnp.asarray(valid))
    np.testing.assert_allclose(got[0, 0], x[0].mean(0), rtol=1e-5)
    np.testing.assert_allclose(got[1, 0], x[1, :2].mean(0), rtol=1e-5)
    assert got.shape == (2, 1, 3) and bool(got_valid.all())


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 9])
def test_stage_valids_lengths(t):
    valid = jnp.ones((2, t), bool).at[1, t // 2 + 1:].set(False)
    v0, v1, v2, v3 = layers.stage_valids(valid)
    assert v1.shape == (2, math.ceil(t / 2))
    assert v2.shape == (2, math.ceil(math.ceil(t / 2) / 2))
    assert v3.shape == (2, 1)
    # A sample of n valid steps keeps ceil(n/2) and ceil(n/4) valid pooled steps.
    n = int(valid[1].sum())
    assert int(v1[1].sum()) == math.ceil(n / 2)
    assert int(v2[1].sum()) == math.ceil(math.ceil(n / 2) / 2)


def test_conv_bn_act_train_matches_numpy_and_ignores_padding():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 3)).astype(np.float32)
    valid = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]], bool)
    x[1, 4:] = 50.0  # padded steps with garbage: must be zeroed before the conv
    block = layers.ConvBNAct(5, kernel_size=3)
    variables = block.init(jax.random.key(0), jnp.asarray(x), jnp.asarray(valid), train=False)
    params = variables["params"]
    params = jax.tree.map(lambda p: p + 0.1 * jnp.ones_like(p), params)  # non-trivial BN
    y, state = block.apply({"params": params, "batch_stats": variables["batch_stats"]},
                           jnp.asarray(x), jnp.asarray(valid), train=True,
                           mutable=["batch_stats"])
    want, mean, var = np_conv_bn_relu_train(
        x, valid, np.asarray(params["conv"]["kernel"]), np.asarray(params["bn"]["scale"]),
        np.asarray(params["bn"]["bias"]))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state["batch_stats"]["bn"]["mean"],
                               (1 - layers.BN_MOMENTUM) * mean, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(y[1, 4:]).max()) == 0.0


def test_residual_block_is_identity_plus_two_convs():
    """Eq. 1: zeroing the second Conv's BN output (GELU(0) = 0) leaves x itself."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 5, 4)).astype(np.float32))
    valid = jnp.ones((2, 5), bool)
    block = layers.ResidualConvBlock()
    variables = block.init(jax.random.key(0), x, valid, train=False)
    y = block.apply(variables, x, valid, train=False)
    assert y.shape == x.shape
    assert float(jnp.abs(y - x).max()) > 1e-3  # the convolutions contribute
    params = tree_copy(variables["params"])
    params["conv2"]["bn"] = jax.tree.map(jnp.zeros_like, params["conv2"]["bn"])
    y0 = block.apply({**variables, "params": params}, x, valid, train=False)
    np.testing.assert_allclose(y0, x, rtol=1e-6, atol=1e-6)


def test_fusion_resblock_shapes_and_padding():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 4, 12)).astype(np.float32))
    valid = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    block = layers.FusionResBlock(features=4)
    variables = block.init(jax.random.key(0), x, valid, train=False)
    y = block.apply(variables, x, valid, train=False)
    assert y.shape == (2, 4, 4)
    assert float(jnp.abs(y[1, 2:]).max()) == 0.0
    # The shortcut is a 1x1 conv 3d -> d; the main path two k=3 convs.
    assert variables["params"]["shortcut"]["conv"]["kernel"].shape == (1, 12, 4)
    assert variables["params"]["conv1"]["conv"]["kernel"].shape == (3, 12, 4)
    assert variables["params"]["conv2"]["conv"]["kernel"].shape == (3, 4, 4)
    # Unpadded second sample gives the same result at its valid steps.
    y1 = block.apply(variables, x[1:, :2], valid[1:, :2], train=False)
    np.testing.assert_allclose(y[1, :2], y1[0], rtol=1e-5, atol=1e-6)


def test_pooling_accumulates_in_float32_and_keeps_the_dtype():
    # 257 valid steps of 3.0: in bfloat16 the count rounds to 256 and the sum to 772,
    # which would give 3.0156; float32 accumulation gives 3.0 exactly.
    x = jnp.full((1, 259, 2), 3.0, jnp.bfloat16)
    valid = jnp.arange(259)[None] < 257
    mean, _ = layers.masked_global_mean(x, valid)
    pooled, pooled_valid = layers.masked_avg_pool2(x, valid)
    assert mean.dtype == jnp.bfloat16 and pooled.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(mean, np.float32), 3.0)
    np.testing.assert_array_equal(np.asarray(pooled[0, :129], np.float32), 3.0)
    assert not bool(pooled_valid[0, 129])  # steps 258 and the internal pad: both invalid


@pytest.mark.parametrize("kernel_size,groups,use_bias", [(1, 1, False), (3, 1, True),
                                                          (3, 4, False), (1, 3, True),
                                                          (2, 1, False), (5, 2, True)])
def test_temporal_conv_matches_flax_conv(kernel_size, groups, use_bias):
    """TemporalConv is nn.Conv(padding='SAME') written as matmuls: same params, same output."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 12))
    ours = layers.TemporalConv(24, kernel_size, feature_group_count=groups, use_bias=use_bias)
    ref = nn.Conv(24, (kernel_size,), padding="SAME", feature_group_count=groups,
                  use_bias=use_bias)
    params = ref.init(jax.random.PRNGKey(1), x)
    ours_params = ours.init(jax.random.PRNGKey(1), x)
    chex.assert_trees_all_equal_shapes(ours_params, params)
    if use_bias:  # nn.Conv starts at zero bias; make the bias matter
        params = tree_copy(params)
        params["params"]["bias"] = jnp.arange(24.0) / 10
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5,
                               atol=1e-5)


def test_temporal_conv_rejects_indivisible_groups():
    x = jnp.ones((1, 4, 6))
    with pytest.raises(ValueError, match="feature_group_count=4"):
        layers.TemporalConv(8, 1, feature_group_count=4).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_stacked_conv_bn_act_is_the_grouped_conv_bn_act(kernel_size):
    """K nets stacked on a leading axis == one K-group ConvBNAct on [B, T, K * C]: same
    variables, outputs, gradients and updated BatchNorm statistics (train and eval)."""
    nets, b, t, c, d = 3, 2, 7, 4, 5
    kx, kv = jax.random.split(jax.random.PRNGKey(3))
    x = jax.random.normal(kx, (nets, b, t, c))
    valid = jnp.arange(t)[None, :] < jnp.array([[t], [4]])  # second sample padded
    flat = x.transpose(1, 2, 0, 3).reshape(b, t, nets * c)
    grouped = layers.ConvBNAct(nets * d, kernel_size, feature_group_count=nets)
    stacked = layers.StackedConvBNAct(d, kernel_size)
    variables = grouped.init(kv, flat, valid, train=False)
    variables = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(kv, a.shape), variables)
    chex.assert_trees_all_equal_shapes(variables, stacked.init(kv, x, valid, train=False))
    for train in (True, False):
        want, want_state = grouped.apply(variables, flat, valid, train=train, mutable=["batch_stats"])
        got, got_state = stacked.apply(variables, x, valid, train=train, mutable=["batch_stats"])
        np.testing.assert_allclose(got.transpose(1, 2, 0, 3).reshape(b, t, nets * d), want,
                                   atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(got_state, want_state, atol=1e-6, rtol=1e-6)

    def loss(module, inputs):
        return lambda p: jnp.sum(module.apply({**variables, "params": p}, inputs, valid,
                                              train=True, mutable=["batch_stats"])[0] ** 2)

    chex.assert_trees_all_close(jax.grad(loss(stacked, x))(variables["params"]),
                                jax.grad(loss(grouped, flat))(variables["params"]),
                                atol=1e-4, rtol=1e-4)


def test_masked_avg_pool2_drop_is_torch_avg_pool1d():
    """odd_step='drop': n valid steps pool to floor(n / 2) pairs, as PyTorch's
    AvgPool1d(2, 2) pools a sequence of n steps; the dropped step is invalid and zero."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 7, 4)).astype(np.float32)
    lengths = (7, 3, 6)
    valid = np.arange(7)[None, :] < np.array(lengths)[:, None]
    got, got_valid = layers.masked_avg_pool2(jnp.asarray(x), jnp.asarray(valid), "drop")
    for b, n in enumerate(lengths):
        want = x[b, : 2 * (n // 2)].reshape(n // 2, 2, 4).mean(1)  # AvgPool1d on n steps
        np.testing.assert_array_equal(np.asarray(got_valid[b]), np.arange(4) < n // 2)
        np.testing.assert_allclose(got[b, : n // 2], want, rtol=1e-6, atol=1e-6)
        assert float(jnp.abs(got[b, n // 2:]).max()) == 0.0
    _, keep_valid = layers.masked_avg_pool2(jnp.asarray(x), jnp.asarray(valid), "keep")
    assert bool(keep_valid[0, 3]) and not bool(got_valid[0, 3])  # the switch matters
    v = layers.stage_valids(jnp.asarray(valid), "drop")
    assert [int(v[2][b].sum()) for b in range(3)] == [n // 4 for n in lengths]


def test_conventions_reject_an_unknown_odd_step():
    with pytest.raises(ValueError, match="model.pool_odd_step"):
        layers.Conventions(odd_step="ceil")


@pytest.mark.parametrize("unbiased", [False, True])
def test_conv_bn_act_batchnorm_is_flax_batchnorm_or_torch_running_var(unbiased):
    """ConvBNAct's BatchNorm against nn.BatchNorm itself (outputs, gradients, running
    mean), and the running variance against Flax's (biased) or PyTorch's (unbiased,
    n / (n - 1) over the n valid steps) batch variance."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(3, 5, 4)).astype(np.float32))
    valid = jnp.asarray(np.arange(5)[None, :] < np.array([5, 4, 2])[:, None])
    block = layers.ConvBNAct(6, 3, conventions=layers.Conventions(unbiased_running_var=unbiased))
    variables = block.init(jax.random.key(0), x, valid, train=False)
    params = jax.tree.map(lambda p: p + 0.1, variables["params"])

    def ours(params):
        y, state = block.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                               valid, train=True, mutable=["batch_stats"])
        return jnp.sum(y * jnp.arange(6.0)), (y, state["batch_stats"]["bn"])

    def flax_reference(params):
        h = layers.TemporalConv(6, 3).apply({"params": params["conv"]},
                                            layers.zero_invalid(x, valid))
        bn = nn.BatchNorm(use_running_average=False, momentum=layers.BN_MOMENTUM,
                          epsilon=layers.BN_EPSILON)
        y, state = bn.apply({"params": params["bn"], "batch_stats": variables["batch_stats"]["bn"]},
                            h, mask=valid[..., None], mutable=["batch_stats"])
        y = layers.zero_invalid(nn.relu(y), valid)
        return jnp.sum(y * jnp.arange(6.0)), (y, state["batch_stats"], h)

    (_, (y, stats)), grads = jax.value_and_grad(ours, has_aux=True)(params)
    (_, (y_ref, stats_ref, h)), grads_ref = jax.value_and_grad(flax_reference, has_aux=True)(params)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["mean"], stats_ref["mean"], rtol=1e-5, atol=1e-7)
    n = int(valid.sum())
    batch_var = np.asarray(h)[np.asarray(valid)].astype(np.float64).var(0)
    m = layers.BN_MOMENTUM
    want = m * 1.0 + (1 - m) * batch_var * (n / (n - 1) if unbiased else 1.0)
    np.testing.assert_allclose(stats["var"], want, rtol=1e-4)
    if not unbiased:
        np.testing.assert_allclose(stats["var"], stats_ref["var"], rtol=1e-5)
