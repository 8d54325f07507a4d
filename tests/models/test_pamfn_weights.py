"""SurgFusionNet under preset 'pamfn' computes what PAMFN's own PyTorch modules compute.

The reference is tests/fixtures/pamfn/pamfn_reference.npz, written by
tests/fixtures/make_pamfn_fixtures.py from PAMFN's `BaseModel` and `PAMFN` (float64, small
widths, random BatchNorm statistics); no PyTorch here. PAMFN's weights are loaded into ours
with `pamfn_weights.from_pamfn`, then scores (eval and train mode), the MSE loss, every
gradient and every updated BatchNorm statistic are compared. Dropout is off on both sides
and the policy's Gumbel noise is zero on both (random draws cannot be matched).
"""
import functools
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from surgfusion_jax import config_lib
from surgfusion_jax.models import dfb, pamfn_weights
from surgfusion_jax.training import train

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "pamfn",
                       "pamfn_reference.npz")
DROPOUTS = ("embed_dropout", "branch_head_dropout", "feature_dropout", "head_dropout",
            "head_hidden_dropout", "attention_dropout")


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def _sub(ref, prefix):
    return {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}


@functools.lru_cache(maxsize=None)
def _model(**model_overrides):
    config = config_lib.get_config()
    config.preset = "pamfn"
    config.model.features, config.model.embed_features, config.model.num_candidates = 8, 512, 3
    config.model.gumbel_at_test = False  # the fixture's policy has no noise
    for name in DROPOUTS:
        config.model[name] = 0.0
    for name, value in model_overrides.items():
        config.model[name] = value
    config = config_lib.resolve(config)
    return train.build_model(config.model, ("rgb", "flow", "mask"))


def _template(model):
    return train.init_variables(model, jax.random.key(0), 6, 8)


def _variables(model, state):
    template = _template(model)
    return template, pamfn_weights.merge(template, pamfn_weights.from_pamfn(state, template))


def _inputs(ref, key="input"):
    return {ours: jnp.asarray(ref[f"{key}/{slot}"], jnp.float32)
            for slot, ours, _ in pamfn_weights.SLOTS}


def _assert_trees_match(ours, want, atol, what):
    want_leaves = dict(jax.tree_util.tree_leaves_with_path(want))
    compared = 0
    for path, value in jax.tree_util.tree_leaves_with_path(ours):
        name = f"{what} {jax.tree_util.keystr(path)}"
        if path in want_leaves:
            np.testing.assert_allclose(np.asarray(value), want_leaves.pop(path), rtol=0,
                                       atol=atol, err_msg=name)
            compared += 1
        else:  # PAMFN has no gradient there (a frozen branch): ours must have none either
            assert not np.any(np.asarray(value)), name
    assert not want_leaves, f"{what}: not in our model: {list(want_leaves)[:3]}"
    return compared


def test_eval_scores_equal_pamfns(ref):
    """Branch and fused scores in eval mode: 4 videos of 12 steps, and one of 11 padded
    to 12 in the same batch (masked; odd: stage pooling drops its last step,
    `model.pool_odd_step='drop'`; with 'keep' its rgb score differs by 2e-3, and
    test_layers tests both conventions)."""
    model = _model()
    _, variables = _variables(model, _sub(ref, "param/"))
    even, odd = _inputs(ref), _inputs(ref, "input_odd")
    inputs = {m: jnp.concatenate([even[m], jnp.pad(odd[m], ((0, 0), (0, 1), (0, 0)))])
              for m in even}
    valid = jnp.ones((5, 12), bool).at[4, 11].set(False)
    out = jax.jit(functools.partial(model.apply, train=False, phase="all"))(
        variables, inputs, valid)
    np.testing.assert_allclose(out["fused"], np.concatenate([ref["eval/fused"], ref["eval_odd/fused"]]),
                               rtol=0, atol=2e-6)
    for slot, ours, _ in pamfn_weights.SLOTS:
        want = np.concatenate([ref[f"eval/branch/{slot}"], ref[f"eval_odd/branch/{slot}"]])
        np.testing.assert_allclose(out[ours], want, rtol=0, atol=2e-6, err_msg=ours)


def _loss_and_grads(model, variables, inputs, label, phase, head):
    def loss_fn(params):
        out, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, inputs, None,
            train=True, phase=phase, rngs={"dropout": jax.random.key(1), "gumbel": jax.random.key(2)},
            mutable=["batch_stats"])
        loss = train.phase_loss({head: out[head]}, label, jnp.ones_like(label), alpha=1.0)
        return loss, (out[head], updates["batch_stats"])

    with mock.patch.object(dfb, "positional_gumbel", lambda key, shape: jnp.zeros(shape)):
        return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])


def _check_train_step(ref, prefix, phase, head, branch_only=None):
    """Our train step of `phase` against the fixture's `prefix` step: score, loss, every
    gradient, every updated running statistic. Returns the numbers of gradients and
    statistics compared."""
    model = _model()
    state = _sub(ref, "param/")
    template, variables = _variables(model, state)
    label = jnp.asarray(ref["label"], jnp.float32)
    (loss, (score, stats)), grads = _loss_and_grads(model, variables, _inputs(ref), label,
                                                    phase, head)
    np.testing.assert_allclose(score, ref[f"{prefix}/score"], rtol=0, atol=5e-6)
    np.testing.assert_allclose(loss, ref[f"{prefix}/loss"], rtol=1e-4)
    if branch_only:  # a BaseModel of its own: its names lack the fusion model's prefix
        state = {k[len("model_r."):]: v for k, v in state.items() if k.startswith("model_r.")}
        grads, stats = ({f"branch_{branch_only}": t[f"branch_{branch_only}"]}
                        for t in (grads, stats))
    grad_state = _sub(ref, f"{prefix}/grad/")
    if not branch_only:  # d/d log_tau = tau d/d tau
        grad_state["tau_value"] = ref["param/tau"]
    want_grads = pamfn_weights.from_pamfn(grad_state, template, gradients=True,
                                          branch_only=branch_only)["params"]
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
    want_stats = pamfn_weights.from_pamfn({**state, **_sub(ref, f"{prefix}/after/")}, template,
                                          branch_only=branch_only)["batch_stats"]
    return (_assert_trees_match(grads, want_grads, 1e-4 * scale, "grad"),
            _assert_trees_match(stats, want_stats, 1e-6, "batch_stats"), set(want_grads))


def test_fusion_phase_step_equals_pamfns(ref):
    """One train-mode fused forward (PAMFN's model.train(): the frozen branches' BatchNorm
    on batch statistics, the third branch undetached), its MSE loss, the gradient of every
    parameter and every updated running statistic."""
    num_grads, num_stats, trained = _check_train_step(ref, "train", "fusion", "fused")
    assert (num_grads, num_stats) == (144, 86)
    assert trained == {"fusion", "branch_mask"}  # PAMFN's undetached third branch


def test_unimodal_phase_step_equals_pamfns(ref):
    """One BaseModel train step as phase (a) takes it: score, loss, gradients, running
    statistics (PyTorch's unbiased running variance: `model.bn_unbiased_running_var`;
    Flax's biased one differs by up to 5e-3 here, and test_layers tests both)."""
    assert _check_train_step(ref, "branch_train", "unimodal", "rgb", "rgb")[:2] == (26, 16)


def test_a_state_dict_of_other_widths_is_refused_by_name(ref):
    state = _sub(ref, "param/")
    template = _template(_model())
    bad = dict(state)
    bad["stage2.f_fusion.proj2.0.weight"] = np.zeros((8, 32, 1))
    with pytest.raises(pamfn_weights.PamfnWeightsError, match="stage2.f_fusion.proj2.0.weight"):
        pamfn_weights.from_pamfn(bad, template)
    missing = {k: v for k, v in state.items() if k != "fc.5.bias"}
    with pytest.raises(pamfn_weights.PamfnWeightsError, match="fc.5.bias"):
        pamfn_weights.from_pamfn(missing, template)
    extra = dict(state, **{"stage4.conv.0.weight": np.zeros(3)})
    with pytest.raises(pamfn_weights.PamfnWeightsError, match="stage4"):
        pamfn_weights.from_pamfn(extra, template)
