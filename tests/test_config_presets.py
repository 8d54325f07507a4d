"""Presets (config_lib.PRESETS): each switch builds the behaviour its preset documents.

One test per switch, each against an independent reference (numpy, PyTorch's documented
initialisation bounds, a module built the other way). docs/parity.md measures them.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from surgfusion_jax import config_lib
from surgfusion_jax.data import input_pipeline as ip
from surgfusion_jax.evaluation import metrics
from surgfusion_jax.models import dfb, init_schemes
from surgfusion_jax.models.csfb import CrossStageFusionBlock
from surgfusion_jax.models.dra import DRA
from surgfusion_jax.models.surgfusion import SurgFusionNet
from surgfusion_jax.training import train

SWITCHES = sorted(config_lib.PRESETS["pamfn"])


def _get(config, path):
    for part in path.split("."):
        config = config[part]
    return config


def _preset_model(preset):
    """The SurgFusionNet that training builds from the default config under `preset`."""
    config = config_lib.get_config()
    config.preset = preset
    return train.build_model(config_lib.resolve(config).model, ("rgb", "flow", "mask"))


def test_every_switch_is_a_placeholder_that_every_preset_sets():
    config = config_lib.get_config()
    for name, values in config_lib.PRESETS.items():
        assert sorted(values) == SWITCHES, name
    for path in SWITCHES:
        assert _get(config, path) is None, path  # unresolved: the preset decides


@pytest.mark.parametrize("preset", sorted(config_lib.PRESETS))
def test_resolve_fills_switches_and_keeps_explicit_values(preset):
    config = config_lib.get_config()
    config.preset = preset
    # an explicit value other than the preset's must win
    config.model.init = "flax" if config_lib.PRESETS[preset]["model.init"] == "torch" else "torch"
    resolved = config_lib.resolve(config)
    for path, value in config_lib.PRESETS[preset].items():
        expected = config.model.init if path == "model.init" else value
        assert _get(resolved, path) == expected, path
    assert config_lib.resolve(resolved).to_dict() == resolved.to_dict()  # idempotent
    assert _get(config, "data.target_max") is None  # the input is not changed


def test_unknown_preset_is_a_one_line_user_error():
    config = config_lib.get_config()
    config.preset = "pytorch"
    with pytest.raises(config_lib.PresetError, match="recommended"):
        config_lib.resolve(config)


def test_paper_configs_use_the_paper_preset_and_new_data_recommended():
    assert config_lib.paper_config("x", "rarp", batch_size=16).preset == "paper"
    assert config_lib.get_config().preset == "recommended"
    assert config_lib.load_config_file("configs/demo.py").preset == "recommended"


# --- data.target_max ----------------------------------------------------------------

@pytest.mark.parametrize("target_max", [0.5, 1.0])
def test_target_range(target_max):
    scores = np.array([6.0, 18.0, 30.0])
    targets = metrics.to_target(scores, 30.0, target_max)
    np.testing.assert_allclose(targets, scores / 30.0 * target_max)
    np.testing.assert_allclose(metrics.to_score_units(targets, 30.0, target_max), scores)
    samples = [dict(num_segments=2, score=s, rgb=np.zeros((2, 3), np.float32)) for s in scores]
    data = ip.make_device_data(samples, ("rgb",), 30.0, target_max=target_max)
    np.testing.assert_allclose(np.asarray(data.targets), scores / 30.0 * target_max, rtol=1e-6)
    with pytest.raises(ValueError, match="target_max"):
        metrics.to_target(scores, 30.0, 1.5)


# --- loss_alpha (PAMFN: MSE) ----------------------------------------------------------

def test_loss_alpha_one_is_mse():
    pred, target = jnp.array([0.2, 0.9, 0.4]), jnp.array([0.3, 0.5, 0.4])
    loss = train.phase_loss({"fused": pred}, target, jnp.ones(3), alpha=1.0)
    np.testing.assert_allclose(float(loss), np.mean((np.asarray(pred) - np.asarray(target)) ** 2),
                               rtol=1e-6)


# --- model.init ('torch': PyTorch's nn.Linear / nn.Conv1d reset_parameters) -----------

def _tiny_model(**kw):
    return SurgFusionNet(features=8, embed_features=16, num_candidates=2, num_heads=2, **kw)


def test_torch_init_draws_within_pytorch_bounds():
    model = _tiny_model()
    variables = train.init_variables(model, jax.random.PRNGKey(0), 12, scheme="torch")
    flax_vars = train.init_variables(model, jax.random.PRNGKey(0), 12, scheme="flax")
    params = variables["params"]
    # PyTorch: nn.Linear(in, out) and nn.Conv1d(in, out, k) draw U(+-1/sqrt(in * k)).
    expected = {
        "branch_rgb/embed1/conv/kernel": 1 / math.sqrt(12),  # Conv1d(12, 16, 1)
        "branch_rgb/stage1/conv1/conv/kernel": 1 / math.sqrt(8 * 3),  # Conv1d(8, 8, 3)
        "branch_rgb/head/kernel": 1 / math.sqrt(8),  # Linear(8, 1)
        # Conv1d(3 * 8, 3 * 8, 1, groups=3): 8 inputs per group
        "fusion/stage1/dfb/fusion_nets/weights_hidden/conv/kernel": 1 / math.sqrt(8),
        "fusion/stage1/dfb/attention/query/kernel": 1 / math.sqrt(8),  # Linear(8, 8)
        "fusion/stage1/dfb/policy/logits/kernel": 1 / math.sqrt(3 * 8),  # Conv1d(24, K, 1)
    }
    bounds = init_schemes.uniform_bound(params)
    for key, bound in expected.items():
        assert bounds[key] == pytest.approx(bound), key
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    checked = 0
    for path, value in flat:
        key = "/".join(p.key for p in path)
        if key in bounds:
            v = np.asarray(value)
            assert np.abs(v).max() <= bounds[key] + 1e-7, key
            if v.size >= 256:  # uniform: std = bound / sqrt(3)
                assert np.std(v) == pytest.approx(bounds[key] / math.sqrt(3), rel=0.2), key
            checked += 1
    assert checked >= 20
    # Normalisation parameters, the temperature and DRA's alpha MLP keep their values.
    for path, value in jax.tree_util.tree_flatten_with_path(flax_vars["params"])[0]:
        key = "/".join(p.key for p in path)
        if key.endswith(("scale", "log_tau")) or "alpha_mlp" in key:
            got = params
            for p in path:
                got = got[p.key]
            np.testing.assert_array_equal(np.asarray(got), np.asarray(value), err_msg=key)


def test_attention_input_kernels_use_the_input_width_as_fan_in():
    params = {"attention": {"query": {"kernel": jnp.zeros((8, 2, 4)), "bias": jnp.zeros((2, 4))},
                            "out": {"kernel": jnp.zeros((2, 4, 8)), "bias": jnp.zeros((8,))}}}
    bounds = init_schemes.uniform_bound(params)
    assert bounds["attention/query/kernel"] == pytest.approx(1 / math.sqrt(8))  # Linear(8, 8)
    assert bounds["attention/out/kernel"] == pytest.approx(1 / math.sqrt(8))
    out = init_schemes.reinit(params, jax.random.PRNGKey(0), "torch")
    assert np.abs(np.asarray(out["attention"]["query"]["bias"])).max() > 0  # bias redrawn
    with pytest.raises(ValueError, match="model.init"):
        init_schemes.reinit(params, jax.random.PRNGKey(0), "kaiming")


# --- unimodal.clip_per_branch ---------------------------------------------------------

def test_clip_per_branch_clips_each_branch_by_its_own_norm():
    params = {"branch_rgb": {"w": jnp.zeros(3)}, "branch_flow": {"w": jnp.zeros(2)},
              "fusion": {"w": jnp.zeros(2)}}
    grads = {"branch_rgb": {"w": jnp.array([30.0, 40.0, 0.0])},  # norm 50
             "branch_flow": {"w": jnp.array([0.6, 0.8])},  # norm 1: under the clip
             "fusion": {"w": jnp.array([1.0, 1.0])}}
    cfg = dict(weight_decay=0.0, momentum=0.0, grad_clip=2.0)
    lr = 0.1

    def update(per_branch):
        tx = train.make_optimizer("unimodal", dict(cfg, clip_per_branch=per_branch))
        state = tx.init(params)
        state.hyperparams["learning_rate"] = jnp.asarray(lr)
        return tx.update(grads, state, params)[0]

    separate, joint = update(True), update(False)
    # Reference: SGD on each branch's gradient clipped to norm 2 on its own.
    np.testing.assert_allclose(separate["branch_rgb"]["w"], -lr * np.array([1.2, 1.6, 0.0]),
                               rtol=1e-6)
    np.testing.assert_allclose(separate["branch_flow"]["w"], -lr * np.array([0.6, 0.8]), rtol=1e-6)
    np.testing.assert_array_equal(separate["fusion"]["w"], np.zeros(2))
    # One global norm over both branches. The fusion parameters, which phase 'unimodal'
    # does not train (their gradient is zero in a real model), are not part of it.
    total = math.sqrt(50 ** 2 + 1)
    np.testing.assert_allclose(joint["branch_flow"]["w"], -lr * np.array([0.6, 0.8]) * 2 / total,
                               rtol=1e-5)


# --- model.broadcast_dropout ----------------------------------------------------------

@pytest.mark.parametrize("broadcast", [True, False])
def test_attention_dropout_mask_shared_over_the_batch_or_not(broadcast):
    block = CrossStageFusionBlock(features=8, num_heads=2, fusion="vanilla_ca",
                                  attention_dropout=0.5, broadcast_dropout=broadcast)
    c = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(0), (1, 3, 8)), (6, 3, 8))
    outs = [jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(i), (1, 3, 8)), (6, 3, 8))
            for i in (1, 2, 3)]
    variables = block.init(jax.random.PRNGKey(4), c, outs, train=False)
    s = block.apply(variables, c, outs, train=True, rngs={"dropout": jax.random.PRNGKey(5)})
    same_rows = all(np.allclose(s[0], s[b]) for b in range(1, 6))
    assert same_rows == broadcast  # identical rows see one mask only when it is broadcast


# --- model.gumbel_at_test -------------------------------------------------------------

def test_policy_samples_at_test_only_when_asked():
    x = [jax.random.normal(jax.random.PRNGKey(0), (2, 16, 4))]
    valid = jnp.ones((2, 16), bool)
    choices = {}
    for noise in (False, True):
        net = dfb.PolicyNet(num_candidates=4, noise_at_test=noise)
        v = net.init(jax.random.PRNGKey(1), x, valid, tau=1.0, train=False)
        runs = [net.apply(v, x, valid, tau=1.0, train=False, rngs={"gumbel": jax.random.PRNGKey(k)})
                [0] for k in range(3)]
        choices[noise] = runs
    for run in choices[False]:  # eval without noise: argmax of the logits, every time
        np.testing.assert_array_equal(run, choices[False][0])
    assert any(not np.array_equal(choices[True][0], r) for r in choices[True][1:])
    net = dfb.PolicyNet(num_candidates=4, noise_at_test=True)  # no stream: fixed key, repeatable
    v = net.init(jax.random.PRNGKey(1), x, valid, tau=1.0, train=False)
    np.testing.assert_array_equal(net.apply(v, x, valid, tau=1.0, train=False)[0],
                                  net.apply(v, x, valid, tau=1.0, train=False)[0])


# --- model.attention_output_projection ------------------------------------------------

def test_no_output_projection_equals_an_identity_projection():
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 8))
    kv = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 8))
    plain = DRA(num_heads=2, qkv_features=8, out_features=8, output_projection=False,
                mixing="negative", diversify=False)
    projected = DRA(num_heads=2, qkv_features=8, out_features=8, mixing="negative",
                    diversify=False)
    v_plain = plain.init(jax.random.PRNGKey(2), q, kv)
    assert "out" not in v_plain["params"]
    v_proj = projected.init(jax.random.PRNGKey(2), q, kv)
    params = dict(v_proj["params"])
    params.update({k: v_plain["params"][k] for k in ("query", "key", "value")})
    params["out"] = {"kernel": jnp.eye(8).reshape(2, 4, 8), "bias": jnp.zeros(8)}
    np.testing.assert_allclose(plain.apply(v_plain, q, kv), projected.apply({"params": params}, q, kv),
                               atol=1e-6)


# --- model.frozen_branch_train --------------------------------------------------------

@pytest.mark.parametrize("frozen_train", [False, True])
def test_frozen_branches_update_their_statistics_only_in_train_mode(frozen_train):
    model = _tiny_model(frozen_branch_train=frozen_train)
    variables = train.init_variables(model, jax.random.PRNGKey(0), 6)
    inputs = {m: jax.random.normal(jax.random.PRNGKey(i), (4, 8, 6)) + 3.0
              for i, m in enumerate(model.modalities)}
    # jitted: run op by op, the model's hundreds of primitives each compile alone (~1 min)
    _, updates = jax.jit(lambda v, x: model.apply(
        v, x, jnp.ones((4, 8), bool), train=True, phase="fusion", mutable=["batch_stats"],
        rngs={"dropout": jax.random.PRNGKey(1), "gumbel": jax.random.PRNGKey(2)}))(
        variables, inputs)
    before = variables["batch_stats"]["branch_rgb"]
    after = updates["batch_stats"]["branch_rgb"]
    changed = not all(jax.tree.leaves(jax.tree.map(np.array_equal, before, after)))
    assert changed == frozen_train


# --- data.mask_padding ----------------------------------------------------------------

@pytest.mark.parametrize("lengths,differs", [((3, 9, 12), True), ((8, 9, 12), False)])
def test_literal_zero_padding_only_changes_padded_windows(lengths, differs):
    model = _tiny_model(modalities=("rgb",))
    rng = np.random.default_rng(0)
    samples = [dict(num_segments=t, score=10.0 + i, rgb=rng.normal(size=(t, 6)).astype(np.float32))
               for i, t in enumerate(lengths)]
    data = ip.make_device_data(samples, ("rgb",), 30.0, window=8)
    variables = train.init_variables(model, jax.random.PRNGKey(0), 6)
    tx = train.make_optimizer("unimodal", dict(weight_decay=0.0, momentum=0.9, grad_clip=2.0))
    losses = []
    for mask in (True, False):
        state = train.create_train_state(model, variables, tx, "unimodal", learning_rate=0.01,
                                         mask_padding=mask)
        _, out = train.train_epoch(state, data, jnp.arange(3, dtype=jnp.int32), jnp.int32(3),
                                   jax.random.PRNGKey(1), jnp.float32(0.01), window=8,
                                   batch_size=3, steps=1)
        losses.append(float(out["loss"]))
    if differs:  # the zeros of a short video's window enter BatchNorm and pooling
        assert abs(losses[0] - losses[1]) > 1e-3
    else:  # no padding: the same step up to float round-off (masked vs plain sums)
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# --- model.dra_relative_eps -----------------------------------------------------------

def test_relative_eps_reaches_every_dra_of_the_model():
    """The switch reaches CSFB and DFB attention alike: the fused output equals the one of
    the same parameters with DRA's rho set, and differs from the paper's rho = 0.
    (Eq. 15 with rho itself: tests/models/test_dra_relative_eps.py.)"""
    paper, ours = _tiny_model(dra_relative_eps=0.0), _tiny_model(dra_relative_eps=0.5)
    variables = train.init_variables(paper, jax.random.PRNGKey(0), 6)
    inputs = {m: jax.random.normal(jax.random.PRNGKey(i), (4, 8, 6))
              for i, m in enumerate(paper.modalities)}
    valid = jnp.ones((4, 8), bool)

    def run(model):  # jitted: run eagerly, every primitive compiled on its own (85 s)
        out, state = jax.jit(functools.partial(model.apply, phase="fusion",
                                               mutable=["intermediates"]))(variables, inputs, valid)
        return out["fused"], state["intermediates"]

    (want, inter), (got, inter_ours) = run(paper), run(ours)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() > 1e-6
    betas = [(p, b) for p, b in _sown_leaves(inter, "beta")]
    assert {p.split("/")[1] for p, _ in betas} == {"stage1", "stage2", "stage3"}
    for (path, beta), (_, beta_ours) in zip(betas, _sown_leaves(inter_ours, "beta")):
        if np.allclose(beta, 1 / (1 + np.exp(-1.0))):  # c = 0: all-zero scores (stage 1
            np.testing.assert_array_equal(beta_ours, beta)  # CSFB starts from c = 0)
        else:
            assert not np.allclose(beta, beta_ours), path  # every DRA took the switch


def _sown_leaves(tree, name):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [("/".join(str(getattr(k, "key", k)) for k in path), np.asarray(v))
            for path, v in flat if name in str(path[-2:])]


# --- fusion.head_lr_factor --------------------------------------------------------------

@pytest.mark.parametrize("preset,factor", [("pamfn", 0.1), ("paper", 0.1), ("recommended", 1.0)])
def test_fusion_head_moves_at_the_presets_rate(preset, factor):
    """Adam's first step is lr * sign(g) per parameter: the head's must be `factor` times
    the body's (closed form, not the optimizer's own arithmetic)."""
    config = config_lib.get_config()
    config.preset = preset
    cfg = config_lib.resolve(config).fusion
    assert cfg.head_lr_factor == factor
    params = {"fusion": {"head_out": {"kernel": jnp.ones((3,))},
                         "stage1": {"kernel": jnp.ones((3,))}}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    tx = train.make_optimizer("fusion", cfg)
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(1e-3)
    updates, _ = tx.update(grads, state, params)
    body = float(updates["fusion"]["stage1"]["kernel"][0])
    head = float(updates["fusion"]["head_out"]["kernel"][0])
    decay = cfg.weight_decay  # AdamW adds lr * decay * p (p = 1)
    assert body == pytest.approx(-1e-3 * (1 + decay), rel=1e-3)
    assert head == pytest.approx(-1e-3 * factor * (1 + decay), rel=1e-3)


# --- model.trainable_branches -----------------------------------------------------------

@pytest.mark.slow  # two fusion-model compiles (~27 s): make test-slow; CI budget
def test_pamfn_keeps_its_third_branch_training_in_the_fusion_phase():
    """PAMFN's fusion model detaches two branches' features but not the third's, and its
    AdamW holds all parameters: under 'pamfn' one fusion step moves the mask branch (its
    unused regression head excepted) and its BatchNorm statistics, and no other branch;
    the trainable branch's update equals AdamW's closed-form first step (lr * (sign(g) +
    decay * p)) on the gradient of the fused loss alone."""
    config = config_lib.get_config()
    config.preset = "pamfn"
    resolved = config_lib.resolve(config)
    assert resolved.model.trainable_branches == ("mask",)
    model = _tiny_model(trainable_branches=resolved.model.trainable_branches)
    variables = train.init_variables(model, jax.random.PRNGKey(0), 6)
    tx = train.phase_optimizer(resolved, "fusion")
    state = train.create_train_state(model, variables, tx, "fusion", learning_rate=1e-3,
                                     loss_alpha=1.0)
    batch = {"inputs": {m: jax.random.normal(jax.random.PRNGKey(i), (4, 8, 6)) + 1.0
                        for i, m in enumerate(model.modalities)},
             "valid": jnp.ones((4, 8), bool), "target": jnp.array([0.2, 0.4, 0.6, 0.8]),
             "weight": jnp.ones((4,))}
    new, _ = jax.jit(train.train_step)(state, batch, jax.random.PRNGKey(3))

    def moved(tree_a, tree_b):
        return not all(jax.tree.leaves(jax.tree.map(np.array_equal, tree_a, tree_b)))

    for m in ("rgb", "flow"):
        assert not moved(variables["params"][f"branch_{m}"], new.params[f"branch_{m}"]), m
        assert not moved(variables["batch_stats"][f"branch_{m}"], new.batch_stats[f"branch_{m}"])
    old_mask, new_mask = variables["params"]["branch_mask"], new.params["branch_mask"]
    assert not moved(old_mask["head"], new_mask["head"])  # unused: no decay either
    assert moved(variables["batch_stats"]["branch_mask"], new.batch_stats["branch_mask"])

    # The gradient it moved along: the fused loss with the mask branch differentiable.
    def loss(params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                             batch["inputs"], batch["valid"], train=True, phase="fusion",
                             rngs=dict(zip(("dropout", "gumbel"),
                                           jax.random.split(jax.random.PRNGKey(3)))),
                             mutable=["batch_stats"])
        return jnp.mean((out["fused"] - batch["target"]) ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    clip = min(1.0, resolved.fusion.grad_clip / float(optax.global_norm(grads)))
    decay = resolved.fusion.weight_decay
    for name in ("embed1", "stage3"):
        g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads["branch_mask"][name])])
        p = np.concatenate([np.ravel(x) for x in jax.tree.leaves(old_mask[name])])
        q = np.concatenate([np.ravel(x) for x in jax.tree.leaves(new_mask[name])])
        assert np.abs(g).max() > 0, name
        big = np.abs(g * clip) > 1e-5  # Adam's eps (1e-8) blurs sign(g) for tiny ones
        np.testing.assert_allclose((q - p)[big], -1e-3 * (np.sign(g[big]) + decay * p[big]),
                                   rtol=2e-3, atol=1e-8)

    frozen = _tiny_model()  # paper / recommended: every branch frozen
    with pytest.raises(ValueError, match="model.trainable_branches"):
        bad = _tiny_model(modalities=("rgb",), trainable_branches=("mask",))
        bad.init(jax.random.PRNGKey(0), {"rgb": jnp.zeros((1, 4, 6))}, phase="all")
    assert frozen.trainable_branches == ()



# --- model.modality_dropout -------------------------------------------------------------

@pytest.mark.parametrize("preset,rate", [("pamfn", 0.0), ("paper", 0.0), ("recommended", 0.3)])
def test_modality_dropout_reaches_the_fusion_branch(preset, rate):
    """The preset's rate reaches the model built from the config (what the rate does is
    tested against numpy in tests/models/test_surgfusion.py)."""
    assert _preset_model(preset).modality_dropout == rate


# --- model.fused_score ------------------------------------------------------------------

@pytest.mark.parametrize("preset,readout", [("pamfn", "fusion_head"), ("paper", "fusion_head"),
                                            ("recommended", "mean_of_heads")])
def test_fused_score_readout_reaches_the_model(preset, readout):
    """The preset's readout reaches the model built from the config (what it computes is
    tested against the separate heads in tests/models/test_surgfusion.py)."""
    assert _preset_model(preset).fused_score == readout


# --- model.pool_odd_step, model.bn_unbiased_running_var ------------------------------------

@pytest.mark.parametrize("preset,odd_step,unbiased", [("pamfn", "drop", True),
                                                      ("paper", "drop", True),
                                                      ("recommended", "keep", False)])
def test_pytorch_layer_conventions_reach_the_model(preset, odd_step, unbiased):
    """The preset's pooling and BatchNorm conventions reach the model built from the
    config (what they compute: tests/models/test_layers.py against PyTorch's AvgPool1d
    rule and running variance, and tests/models/test_pamfn_weights.py against PAMFN's
    own modules)."""
    model = _preset_model(preset)
    assert (model.pool_odd_step, model.bn_unbiased_running_var) == (odd_step, unbiased)
