"""Tests for surgfusion_jax.models.csfb.CrossStageFusionBlock (Eqs. 3-5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_testutil import np_dense, np_softmax
from surgfusion_jax.models.csfb import CrossStageFusionBlock
from surgfusion_jax.models.fusion_strategies import HEADS, STRATEGIES

B, T, D, M = 2, 5, 8, 3


def _inputs(seed):
    rng = np.random.default_rng(seed)
    c = jnp.asarray(rng.normal(size=(B, T, D)).astype(np.float32))
    outs = [jnp.asarray(rng.normal(size=(B, T, D)).astype(np.float32)) for _ in range(M)]
    return c, outs


def _run(block, variables, c, outs):
    out, state = block.apply(variables, c, outs, train=False, mutable=["intermediates"])
    return out, state["intermediates"]["attention"]["attention_weights"][0]


def test_attends_over_modalities_per_time_step():
    """Permuting the time steps of all inputs permutes the output the same way."""
    block = CrossStageFusionBlock(features=D, num_heads=2)
    c, outs = _inputs(0)
    variables = block.init(jax.random.key(0), c, outs, train=False)
    out, weights = _run(block, variables, c, outs)
    perm = np.array([3, 0, 4, 2, 1])
    out_p, weights_p = _run(block, variables, c[:, perm], [o[:, perm] for o in outs])
    np.testing.assert_allclose(out_p, out[:, perm], rtol=1e-5, atol=1e-6)
    assert out.shape == (B, T, D)
    # One query per step, M modality tokens, weights sum to 1 over modalities.
    assert weights.shape == (B, T, 2, 1, M)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(weights_p, weights[:, perm], rtol=1e-5, atol=1e-6)
    # Changing one step's inputs changes only that step's output.
    out_c, _ = _run(block, variables, c.at[:, 2].add(1.0), outs)
    changed = np.abs(np.asarray(out_c - out)).max(axis=(0, 2)) > 1e-6
    np.testing.assert_array_equal(changed, [False, False, True, False, False])


def test_vanilla_single_head_matches_numpy():
    """Eqs. 3-5 with alpha = 1 and one head: s_t = W_o softmax(q_t K_t^T / sqrt(d)) V_t."""
    block = CrossStageFusionBlock(features=D, num_heads=1, fusion="vanilla_ca")
    c, outs = _inputs(1)
    variables = block.init(jax.random.key(1), c, outs, train=False)
    got = block.apply(variables, c, outs, train=False)
    p = variables["params"]
    a = p["attention"]
    q = np_dense(np_dense(np.asarray(c), p["query_proj"]), a["query"])[..., 0, :]  # [B,T,D]
    tokens = np.stack([np.asarray(o) for o in outs], axis=-2)  # Eq. 4: [B,T,M,D]
    k = np_dense(tokens, a["key"])[..., 0, :]
    v = np_dense(tokens, a["value"])[..., 0, :]
    w = np_softmax(np.einsum("btd,btmd->btm", q, k) / np.sqrt(D))
    heads = np.einsum("btm,btmd->btd", w, v)
    # The out projection maps [heads=1, d_h] -> D.
    want = np_dense(heads, {"kernel": np.asarray(a["out"]["kernel"]).reshape(D, D),
                            "bias": a["out"]["bias"]})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fusion,heads", [(s, 2) for s in STRATEGIES] +
                         [("dra", h) for h in HEADS if h != 2])
def test_every_strategy_and_head_count_runs(fusion, heads):
    block = CrossStageFusionBlock(features=D, num_heads=heads, fusion=fusion)
    c, outs = _inputs(2)
    variables = block.init(jax.random.key(0), c, outs, train=False)
    out, weights = _run(block, variables, c, outs)
    assert out.shape == (B, T, D) and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(weights.mean(-3).sum(-1), 1.0, rtol=1e-5)
    # Attention dropout (train) runs with a 'dropout' rng.
    out_t = block.apply(variables, c, outs, train=True, rngs={"dropout": jax.random.key(1)})
    assert out_t.shape == (B, T, D)


def test_single_modality_gets_all_the_weight():
    block = CrossStageFusionBlock(features=D)
    c, outs = _inputs(3)
    variables = block.init(jax.random.key(0), c, outs[:1], train=False)
    _, weights = _run(block, variables, c, outs[:1])
    np.testing.assert_allclose(weights, 1.0, rtol=1e-6)


def test_mismatched_lengths_are_reported():
    block = CrossStageFusionBlock(features=D)
    c, outs = _inputs(4)
    with pytest.raises(ValueError, match="does not match"):
        block.init(jax.random.key(0), c, [o[:, :3] for o in outs], train=False)
