"""Tests for surgfusion_jax.models.branches.UnimodalBranch (Eqs. 1-2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_testutil import np_pool2, tree_copy
from surgfusion_jax.models.branches import UnimodalBranch

F, D = 6, 8


@pytest.fixture(scope="module")
def branch_and_vars():
    branch = UnimodalBranch(features=D, embed_features=12)
    x = jnp.zeros((2, 8, F))
    return branch, jax.jit(lambda k: branch.init(k, x, None, train=False))(jax.random.key(0))


def jit_apply(module):
    """One compiled apply per (shapes, train, mutable); keeps the tests fast."""
    return jax.jit(module.apply, static_argnames=("train", "mutable"))


def _x(rng, b, t):
    return jnp.asarray(rng.normal(size=(b, t, F)).astype(np.float32))


def test_shapes_masks_and_score_range(branch_and_vars):
    branch, variables = branch_and_vars
    x = _x(np.random.default_rng(0), 2, 7)  # T not a multiple of 4
    score, stages, valids = branch.apply(variables, x, None, train=False)
    assert score.shape == (2,) and score.dtype == jnp.float32
    assert bool(jnp.all((score > 0) & (score < 1)))
    assert [s.shape for s in stages] == [(2, 7, D), (2, 4, D), (2, 2, D), (2, 1, D)]
    assert [v.shape for v in valids] == [(2, 7), (2, 4), (2, 2), (2, 1)]
    params = variables["params"]
    assert params["embed1"]["conv"]["kernel"].shape == (1, F, 12)
    assert params["embed2"]["conv"]["kernel"].shape == (1, 12, D)
    assert params["stage1"]["conv1"]["conv"]["kernel"].shape == (3, D, D)


def test_stage_structure_follows_eqs_1_and_2(branch_and_vars):
    """With each block's second Conv zeroed, Eq. 1 is the identity, so the stages are
    just the pooling of Eq. 2: x1 = AvgPool2(x0), x2 = AvgPool2(x1), x3 = mean(x2)."""
    branch, variables = branch_and_vars
    params = tree_copy(variables["params"])
    for i in (1, 2, 3):
        params[f"stage{i}"]["conv2"]["bn"] = jax.tree.map(
            jnp.zeros_like, params[f"stage{i}"]["conv2"]["bn"])
    x = _x(np.random.default_rng(1), 2, 7)
    valid = np.array([[1] * 7, [1, 1, 1, 1, 1, 0, 0]], bool)
    _, stages, _ = branch.apply({**variables, "params": params}, x, jnp.asarray(valid),
                                train=False)
    x0 = np.asarray(stages[0])
    x1, v1 = np_pool2(x0, valid)
    x2, v2 = np_pool2(x1, v1)
    x3 = np.stack([x2[i, v2[i]].mean(0) for i in range(2)])[:, None]
    np.testing.assert_allclose(stages[1], x1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stages[2], x2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stages[3], x3, rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_eval_outputs(branch_and_vars):
    """A batch of videos of different lengths: each sample equals its unpadded run."""
    branch, variables = branch_and_vars
    rng = np.random.default_rng(2)
    lengths = (5, 8, 3)
    videos = [_x(rng, 1, n) for n in lengths]
    x = jnp.concatenate([jnp.pad(v, ((0, 0), (0, 8 - v.shape[1]), (0, 0))) for v in videos])
    valid = jnp.arange(8)[None] < jnp.array(lengths)[:, None]
    apply = jit_apply(branch)
    score, stages, valids = apply(variables, x, valid, train=False)
    for i, v in enumerate(videos):
        s1, st1, _ = apply(variables, v, None, train=False)
        np.testing.assert_allclose(score[i], s1[0], rtol=1e-5, atol=1e-6)
        for stage, single in zip(stages, st1):
            n = single.shape[1]
            np.testing.assert_allclose(stage[i, :n], single[0], rtol=1e-5, atol=1e-5)
            assert float(jnp.abs(stage[i, n:]).max(initial=0.0)) == 0.0  # clean padding


def test_padding_does_not_change_train_outputs_or_batch_stats():
    """Train mode: BatchNorm statistics come from valid steps only."""
    branch = UnimodalBranch(features=D, embed_features=12, embed_dropout=0.0,
                            head_dropout=0.0)
    rng = np.random.default_rng(3)
    x = _x(rng, 2, 6)
    variables = jax.jit(lambda k: branch.init(k, x, None, train=False))(jax.random.key(0))
    padded = jnp.pad(x, ((0, 0), (0, 3), (0, 0)))
    valid = jnp.arange(9)[None].repeat(2, 0) < 6
    apply = jit_apply(branch)
    (s0, st0, _), bs0 = apply(variables, x, None, train=True, mutable=("batch_stats",))
    (s1, st1, _), bs1 = apply(variables, padded, valid, train=True, mutable=("batch_stats",))
    np.testing.assert_allclose(s0, s1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st0[3], st1[3], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(bs0), jax.tree.leaves(bs1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Sanity: the batch statistics did move away from their initial values.
    assert not np.allclose(bs0["batch_stats"]["stage1"]["conv1"]["bn"]["mean"], 0.0)


def test_dropout_active_only_in_train(branch_and_vars):
    branch, variables = branch_and_vars
    x = _x(np.random.default_rng(4), 2, 8)

    apply = jit_apply(branch)

    def run(seed):
        out, _ = apply(variables, x, None, train=True, mutable=("batch_stats",),
                       rngs={"dropout": jax.random.key(seed)})
        return out[0]

    assert not np.allclose(run(0), run(1))
    e0 = apply(variables, x, None, train=False)[0]
    e1 = apply(variables, x, None, train=False)[0]
    np.testing.assert_array_equal(e0, e1)


def test_bad_valid_shape_is_reported(branch_and_vars):
    branch, variables = branch_and_vars
    with pytest.raises(ValueError, match="valid has shape"):
        branch.apply(variables, jnp.zeros((2, 8, F)), jnp.ones((2, 7), bool), train=False)
