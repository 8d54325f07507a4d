"""Migrating a Flax attention checkpoint to DRA (`from_mha_params`) and the README's examples.

Reference: `flax.linen.MultiHeadDotProductAttention` with the original parameters. The
migrated adaptive layer without diversification computes A_mix = (2 alpha - 1) A+
(Eq. 13), so it must approach Flax's output as the initial alpha approaches 1.
"""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from surgfusion_jax.models.dra import DRA, from_mha_params

README = Path(__file__).resolve().parents[2] / "README.md"
B, L, F = 2, 6, 8


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, L, F))


def _layer_params():
    return nn.MultiHeadDotProductAttention(num_heads=2).init(jax.random.key(1), _x())


def test_migrated_layer_starts_at_the_requested_alpha_and_near_flax():
    x, variables = _x(), _layer_params()
    want = nn.MultiHeadDotProductAttention(num_heads=2).apply(variables, x)
    mixed_only = jax.jit(lambda v: DRA(num_heads=2, diversify=False).apply(
        v, x, sow_weights=True, mutable=["intermediates"]))
    errors = []
    for initial in (0.9, 0.99, 1 - 1e-7):
        migrated = from_mha_params(variables, initial_alpha=initial)
        out, state = mixed_only(migrated)
        np.testing.assert_allclose(state["intermediates"]["alpha"][0], initial, rtol=1e-6)
        errors.append(float(jnp.abs(out - want).max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5, errors
    # the projections are untouched and the gradient reaches the zero-initialised alpha kernel
    migrated = from_mha_params(variables)
    for name in ("query", "key", "value", "out"):
        np.testing.assert_array_equal(migrated["params"][name]["kernel"],
                                      variables["params"][name]["kernel"])
    grads = jax.jit(jax.grad(lambda p: jnp.sum(DRA(num_heads=2).apply({"params": p}, x) ** 2)))(
        migrated["params"])
    assert np.abs(grads["alpha_mlp"]["logit"]["kernel"]).max() > 0


def test_every_attention_layer_of_a_model_tree_is_converted_once():
    x = _x()

    class Two(nn.Module):
        attention: type = nn.MultiHeadDotProductAttention

        @nn.compact
        def __call__(self, x):
            x = self.attention(num_heads=2, name="MultiHeadDotProductAttention_0")(x)
            x = self.attention(num_heads=4, name="MultiHeadDotProductAttention_1")(x)
            return nn.Dense(F)(x)

    variables = Two().init(jax.random.key(0), x)
    variables = {**variables, "batch_stats": {"unrelated": jnp.ones(3)}}
    migrated = from_mha_params(variables, alpha_hidden_features=3)
    assert "alpha_mlp" not in variables["params"]["MultiHeadDotProductAttention_0"]  # not mutated
    assert migrated["batch_stats"]["unrelated"] is variables["batch_stats"]["unrelated"]
    shapes = jax.tree.map(jnp.shape, migrated["params"])
    assert shapes["MultiHeadDotProductAttention_1"]["alpha_mlp"]["hidden"]["kernel"] == (2, 3)
    out = jax.jit(Two(lambda **kw: DRA(alpha_hidden_features=3, **kw)).apply)(migrated, x)
    assert out.shape == x.shape and np.all(np.isfinite(out))
    again = from_mha_params(migrated, alpha_hidden_features=3)  # already converted: unchanged
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(migrated)):
        np.testing.assert_array_equal(a, b)
    fixed = from_mha_params(variables, mixing="positive")
    assert jax.tree.structure(fixed) == jax.tree.structure(variables)
    with pytest.raises(ValueError, match="no MultiHeadDotProductAttention"):
        from_mha_params({"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}}})
    with pytest.raises(ValueError, match="initial_alpha"):
        from_mha_params(variables, initial_alpha=1.0)


def _dra_section_blocks(text):
    start = text.index("## DRA as a layer in your own model")
    end = text.find("\n## ", start + 3)
    section = text[start:end if end >= 0 else None]
    return re.findall(r"^```python[ \t]*\n(.*?)^```", section, re.MULTILINE | re.DOTALL)


def test_readme_dra_examples_run_as_written():
    """The blocks after the first (tests/test_readme.py runs that one): the migration."""
    blocks = _dra_section_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2 and "from_mha_params" in blocks[1]
    for i, code in enumerate(blocks[1:], 1):
        namespace = {"__name__": "readme_dra_example"}
        exec(compile(code, f"{README}:DRA example {i}", "exec"), namespace)  # noqa: S102
