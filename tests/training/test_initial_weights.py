"""`model.init_weights` files: written and read back exactly, and every misfit named."""
import jax
import numpy as np
import pytest

from surgfusion_jax.training import initial_weights


def _variables():
    rng = np.random.default_rng(0)
    return {"params": {"branch_rgb": {"embed1": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)},
                                      "head": {"bias": np.zeros(1, np.float32)}}},
            "batch_stats": {"branch_rgb": {"embed1": {"bn": {"mean": rng.normal(size=3)}}}}}


def _template(variables, dtype=np.float32):
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), dtype), variables)


def test_round_trip_is_exact_and_takes_the_template_dtypes(tmp_path):
    variables = _variables()
    path = str(tmp_path / "sub" / "seed3.npz")
    initial_weights.save(path, variables)
    got = initial_weights.load(path, _template(variables))
    flat_want = jax.tree_util.tree_leaves_with_path(variables)
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    assert len(flat_got) == len(flat_want)
    for key, want in flat_want:
        assert flat_got[key].dtype == np.float32  # the float64 statistic is cast
        np.testing.assert_array_equal(flat_got[key], np.asarray(want, np.float32))
    assert not list(tmp_path.glob("sub/*.tmp.npz"))  # written atomically


def test_path_for_seed_replaces_only_the_seed_field():
    assert initial_weights.path_for_seed("/w/{seed}/init_{seed}.npz", 7) == "/w/7/init_7.npz"
    assert initial_weights.path_for_seed("/w/{x}.npz", 7) == "/w/{x}.npz"


def test_misfits_name_the_file_the_entry_and_the_field(tmp_path):
    variables = _variables()
    template = _template(variables)
    path = str(tmp_path / "init.npz")
    with pytest.raises(initial_weights.InitialWeightsError, match=r"model.init_weights.*does not exist"):
        initial_weights.load(path, template)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(initial_weights.InitialWeightsError, match="cannot read"):
        initial_weights.load(str(tmp_path / "junk.npz"), template)

    fewer = {"params": variables["params"]}
    initial_weights.save(path, fewer)
    with pytest.raises(initial_weights.InitialWeightsError,
                       match=r"lacks entries \(1: batch_stats/branch_rgb/embed1/bn/mean\)"):
        initial_weights.load(path, template)
    initial_weights.save(path, variables)
    with pytest.raises(initial_weights.InitialWeightsError, match="has extra entries"):
        initial_weights.load(path, _template(fewer))
    wrong = _template(variables)
    wrong["params"]["branch_rgb"]["embed1"]["kernel"] = jax.ShapeDtypeStruct((4, 5), np.float32)
    with pytest.raises(initial_weights.InitialWeightsError,
                       match=r"params/branch_rgb/embed1/kernel has shape \(4, 3\), the model \(4, 5\)"):
        initial_weights.load(path, wrong)
