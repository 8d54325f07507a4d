"""Tests for surgfusion_jax.models.surgfusion.SurgFusionNet (phases, freezing, masking, ablations)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from surgfusion_jax.models import layers
from surgfusion_jax.models.losses import skill_loss
from surgfusion_jax.models.surgfusion import (SurgFusionNet, csfb_modality_weights,
                                       csfb_weights_from_intermediates)

F, D, K, B, T = 8, 16, 3, 2, 8
MODS = ("rgb", "flow", "mask")
# Parameter/dropout keys: RBG keys compile far faster than threefry on XLA:CPU, and
# the tests do not depend on the stream. Gumbel keys stay threefry (their per-step
# fold_in keeps padded and unpadded noise identical).
PKEY = functools.partial(jax.random.key, impl="unsafe_rbg")


def make_model(**kwargs):
    return SurgFusionNet(features=D, embed_features=16, num_candidates=K, **kwargs)


def make_inputs(seed, b=B, t=T, modalities=MODS):
    rng = np.random.default_rng(seed)
    return {m: jnp.asarray(rng.normal(size=(b, t, F)).astype(np.float32)) for m in modalities}


def make_runner(model):
    """One compiled apply per (shapes, train, phase), returning outputs and state."""
    @functools.partial(jax.jit, static_argnames=("train", "phase"))
    def run(variables, inputs, valid, seed, *, train, phase):
        rngs = {"dropout": PKEY(seed), "gumbel": jax.random.key(seed)}
        return model.apply(variables, inputs, valid, train=train, phase=phase, rngs=rngs,
                           mutable=["intermediates", "batch_stats"])
    return run


def init(model, inputs):
    valid = jnp.ones(next(iter(inputs.values())).shape[:2], bool)
    return jax.jit(lambda: model.init(PKEY(0), inputs, valid, phase="all"))()


def make_train_grad(model, variables):
    """Compiled value_and_grad of the summed Eq. 19 losses of a phase, in train mode;
    aux = (outputs, updated batch_stats)."""
    def loss(params, inputs, target, seed, phase):
        rngs = {"dropout": PKEY(seed), "gumbel": jax.random.key(seed)}
        out, state = model.apply({**variables, "params": params}, inputs, all_valid(),
                                 train=True, phase=phase, rngs=rngs, mutable=["batch_stats"])
        return sum(skill_loss(score, target) for score in out.values()), (out, state)
    return jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=4)


@pytest.fixture(scope="module")
def setup():
    model = make_model()
    variables = init(model, make_inputs(0))
    return model, variables, make_runner(model)


def all_valid(b=B, t=T):
    return jnp.ones((b, t), bool)


def tree_norm(tree):
    return float(sum(jnp.sum(jnp.abs(leaf)) for leaf in jax.tree.leaves(tree)))


def test_eval_outputs_and_parameter_tree(setup):
    model, variables, run = setup
    assert set(variables["params"]) == {"branch_rgb", "branch_flow", "branch_mask", "fusion"}
    assert set(variables["batch_stats"]) == set(variables["params"])
    np.testing.assert_allclose(variables["params"]["fusion"]["log_tau"], math.log(10.0))
    out, _ = run(variables, make_inputs(1), all_valid(), 0, train=False, phase="all")
    assert set(out) == set(MODS) | {"fused"}
    for score in out.values():
        assert score.shape == (B,) and score.dtype == jnp.float32
        assert bool(jnp.all((score > 0) & (score < 1)))


def test_fusion_phase_freezes_branches(setup):
    """Fusion phase, train: zero gradient and unchanged BN statistics in the branches;
    gradient everywhere in the fusion branch, PolicyNets and tau included."""
    model, variables, _ = setup
    x, target = make_inputs(2), jnp.array([0.2, 0.4])
    step = make_train_grad(model, variables)
    (_, (out, state)), g = step(variables["params"], x, target, 0, "fusion")
    assert set(out) == {"fused"} and out["fused"].shape == (B,)
    for m in MODS:
        assert all(float(jnp.abs(leaf).max()) == 0.0
                   for leaf in jax.tree.leaves(g[f"branch_{m}"])), m
        for a, b in zip(jax.tree.leaves(variables["batch_stats"][f"branch_{m}"]),
                        jax.tree.leaves(state["batch_stats"][f"branch_{m}"])):
            np.testing.assert_array_equal(a, b)
    fusion = g["fusion"]
    for name in ("stage1", "stage2", "stage3", "head_hidden", "head_out", "log_tau"):
        assert tree_norm(fusion[name]) > 0, name
    for i in (1, 2, 3):  # the straight-through mask carries gradient to every PolicyNet
        assert tree_norm(fusion[f"stage{i}"]["dfb"]["policy"]) > 0, i
        assert tree_norm(fusion[f"stage{i}"]["csfb"]) > 0, i
    old = dict(variables["batch_stats"]["fusion"])
    new = dict(state["batch_stats"]["fusion"])
    # Stage 1's ResBlock sees the zero-initialised c (conv output 0): its means stay 0.
    del old["stage1"], new["stage1"]
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(old),
                                                    jax.tree.leaves(new)))
    # Dropout on the fed unimodal features (and in the head) is on in train mode.
    (_, (out2, _)), _ = step(variables["params"], x, target, 1, "fusion")
    assert not np.allclose(out["fused"], out2["fused"])


def test_unimodal_phase_trains_the_branches(setup):
    model, variables, _ = setup
    step = make_train_grad(model, variables)
    (_, (out, state)), g = step(variables["params"], make_inputs(3), jnp.array([0.2, 0.4]), 0,
                                "unimodal")
    assert set(out) == set(MODS)
    for m in MODS:
        branch = g[f"branch_{m}"]
        assert tree_norm(branch["embed1"]) > 0 and tree_norm(branch["head"]) > 0
        assert not np.allclose(state["batch_stats"][f"branch_{m}"]["embed1"]["bn"]["mean"],
                               variables["batch_stats"][f"branch_{m}"]["embed1"]["bn"]["mean"])
    assert tree_norm(g["fusion"]) == 0.0


def test_bfloat16_forward_runs_with_float32_params(setup):
    model, variables, run = setup
    bf16 = make_model(dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: bf16.init(PKEY(0), make_inputs(0), None, phase="all"))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes["params"])} == {jnp.dtype("float32")}
    x = make_inputs(4)
    out, _ = make_runner(bf16)(variables, x, all_valid(), 0, train=False, phase="all")
    ref, _ = run(variables, x, all_valid(), 0, train=False, phase="all")
    for key in ref:
        assert out[key].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out[key])))
        np.testing.assert_allclose(out[key], ref[key], atol=0.03)
        assert not np.array_equal(out[key], ref[key])  # it did compute in bfloat16


# Every modality subset (Table III), strategy (Table IV), head count (Table V) and
# "CSFB only" appears at least once.
CONFIGS = [
    dict(modalities=("rgb",), fusion="avg", num_heads=1),
    dict(modalities=("flow",), fusion="cat", num_heads=4),
    dict(modalities=("mask",), fusion="vanilla_ca", num_heads=8),
    dict(modalities=("rgb", "flow"), fusion="negative_ca", num_heads=2),
    dict(modalities=("rgb", "mask"), fusion="dra", num_heads=1, use_dfb=False),
    dict(modalities=("flow", "mask"), fusion="dra", num_heads=8),
    dict(modalities=MODS, fusion="cat", num_heads=2, use_dfb=False),
]


def _config_id(cfg):
    return "-".join([*cfg["modalities"], cfg["fusion"], f"h{cfg['num_heads']}",
                     "csfb" if cfg.get("use_dfb") is False else "dfb"])


@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
def test_ablation_configs_trace(cfg):
    """Shapes, dtypes and parameter trees of every ablation, without compiling."""
    model = make_model(**cfg)
    x = make_inputs(0, modalities=cfg["modalities"])
    rngs = {"params": PKEY(0), "dropout": PKEY(1), "gumbel": jax.random.key(2)}
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(rngs, x, all_valid(), train=True, phase="all"))
    assert set(out) == set(cfg["modalities"]) | {"fused"}
    assert all(v.shape == (B,) and v.dtype == jnp.float32 for v in out.values())
    params = variables["params"]
    assert set(params) == {f"branch_{m}" for m in cfg["modalities"]} | {"fusion"}
    has_dfb = cfg.get("use_dfb", True)
    assert ("log_tau" in params["fusion"]) == has_dfb
    assert ("dfb" in params["fusion"]["stage2"]) == has_dfb


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS + [dict(modalities=MODS, fusion=s, num_heads=h)
                                           for s, h in [("avg", 2), ("vanilla_ca", 4)]],
                         ids=_config_id)
def test_ablation_configs_run(cfg):
    model = make_model(**cfg)
    x = make_inputs(0, modalities=cfg["modalities"])
    variables = init(model, x)
    run = make_runner(model)
    for train in (False, True):
        out, _ = run(variables, x, all_valid(), 0, train=train, phase="all")
        for score in out.values():
            assert bool(jnp.all((score > 0) & (score < 1)))


def test_padding_does_not_change_eval_outputs_or_csfb_weights(setup):
    """A batch of videos of lengths 5 and 8 (padded to 8): each sample equals its own
    unpadded run, for both phases and for the CSFB weights at valid steps."""
    model, variables, run = setup
    full = make_inputs(5)
    lengths = jnp.array([5, 8])
    valid = jnp.arange(T)[None] < lengths[:, None]
    padded = {m: jnp.where(valid[..., None], v, 0.0) for m, v in full.items()}
    out, state = run(variables, padded, valid, 0, train=False, phase="all")
    w = csfb_weights_from_intermediates(state["intermediates"])
    singles = {  # sample 0 as a length-5 video; sample 1 as the full length-8 video
        0: run(variables, {m: v[:, :5] for m, v in full.items()}, all_valid(t=5), 0,
               train=False, phase="all"),
        1: run(variables, full, all_valid(), 0, train=False, phase="all")}
    stage_valid = layers.stage_valids(valid)[1:]
    for i, (out_i, state_i) in singles.items():
        for key in out:
            np.testing.assert_allclose(out[key][i], out_i[key][i], rtol=1e-5, atol=1e-6)
        w_i = csfb_weights_from_intermediates(state_i["intermediates"])
        for stage, (a, b) in enumerate(zip(w, w_i)):
            n = int(stage_valid[stage][i].sum())
            assert b.shape[1] == n
            np.testing.assert_allclose(a[i, :n], b[i, :n], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # covered block by block in test_branches / test_dfb / test_layers
def test_padding_does_not_change_train_outputs_or_batch_stats(setup):
    """Train mode (dropout off): BN statistics over valid steps, position-keyed Gumbel."""
    _, variables, _ = setup  # the dropout rates do not change the parameter tree
    model = make_model(embed_dropout=0.0, branch_head_dropout=0.0, feature_dropout=0.0,
                       head_hidden_dropout=0.0, attention_dropout=0.0)
    x = make_inputs(6, t=5)
    padded = {m: jnp.pad(v, ((0, 0), (0, 3), (0, 0))) for m, v in x.items()}
    valid = jnp.arange(T)[None].repeat(B, 0) < 5
    run = make_runner(model)
    out0, st0 = run(variables, x, all_valid(t=5), 0, train=True, phase="all")
    out1, st1 = run(variables, padded, valid, 0, train=True, phase="all")
    for key in out0:
        np.testing.assert_allclose(out0[key], out1[key], rtol=1e-5, atol=1e-6)
    # (Running means near 0 come from cancelling sums reduced in another shape.)
    for a, b in zip(jax.tree.leaves(st0["batch_stats"]), jax.tree.leaves(st1["batch_stats"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_phase_all_is_the_union_of_the_two_phases(setup):
    """In train mode too: the frozen fusion pass reads the incoming BN statistics."""
    model, variables, run = setup
    x = make_inputs(8)
    both, st_all = run(variables, x, all_valid(), 0, train=True, phase="all")
    fused, st_fus = run(variables, x, all_valid(), 0, train=True, phase="fusion")
    uni, st_uni = run(variables, x, all_valid(), 0, train=True, phase="unimodal")
    for key, value in {**fused, **uni}.items():
        np.testing.assert_allclose(both[key], value, rtol=1e-5, atol=1e-6)
    expect = {**st_uni["batch_stats"], "fusion": st_fus["batch_stats"]["fusion"]}
    for a, b in zip(jax.tree.leaves(st_all["batch_stats"]), jax.tree.leaves(expect)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_csfb_modality_weights_helper(setup):
    model, variables, run = setup
    x = make_inputs(7)
    weights = jax.jit(functools.partial(csfb_modality_weights, model))(variables, x, all_valid())
    assert [w.shape for w in weights] == [(B, 4, 3), (B, 2, 3), (B, 1, 3)]
    for w in weights:
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    _, state = run(variables, x, all_valid(), 0, train=False, phase="all")
    for a, b in zip(weights, csfb_weights_from_intermediates(state["intermediates"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_input_errors_are_reported():
    model = make_model(modalities=("rgb", "flow"))
    x = make_inputs(0, modalities=("rgb",))
    trace = lambda m, inputs, **kw: jax.eval_shape(
        lambda: m.init(PKEY(0), inputs, None, **kw))
    with pytest.raises(KeyError, match="flow"):
        trace(model, x, phase="all")
    with pytest.raises(ValueError, match="phase"):
        trace(make_model(modalities=("rgb",)), x, phase="both")
    with pytest.raises(ValueError, match="fusion"):
        trace(make_model(modalities=("rgb",), fusion="sum"), x, phase="all")
    bad = {"rgb": x["rgb"], "flow": x["rgb"][:, :5]}
    with pytest.raises(ValueError, match="disagree"):
        trace(model, bad, phase="all")


def test_modality_dropout_drops_whole_modalities_and_keeps_the_scale(setup):
    """`model.modality_dropout`: per sample each modality's features (every stage) are
    either all zero or all scaled by M / kept, never all dropped; a modality is dropped
    with probability p - p^M (a draw that drops all of them keeps all)."""
    from surgfusion_jax.models.surgfusion import FusionBranch
    p, batch, num = 0.4, 20000, 3
    rng = np.random.default_rng(0)
    feats = [[jnp.asarray(rng.uniform(1, 2, size=(batch, 4, 2)), jnp.float32),
              jnp.asarray(rng.uniform(1, 2, size=(batch, 1, 2)), jnp.float32)]
             for _ in range(num)]
    out = FusionBranch(modality_dropout=p).apply(
        {}, feats, method=FusionBranch._drop_modalities, rngs={"dropout": jax.random.PRNGKey(0)})
    ratios = [[np.asarray(o[s] / f[s]).reshape(batch, -1) for s in range(2)]
              for o, f in zip(out, feats)]  # [M][stage] -> [B, T * C]
    scale = np.stack([r[0][:, 0] for r in ratios], axis=1)  # [B, M]
    for m in range(num):  # one factor per sample and modality, at every stage
        for stage in ratios[m]:
            np.testing.assert_allclose(stage, scale[:, m:m + 1] * np.ones_like(stage),
                                       rtol=1e-6)
    kept = scale > 0
    assert kept.any(axis=1).all()
    np.testing.assert_allclose(scale.sum(axis=1), num, rtol=1e-6)
    np.testing.assert_allclose(scale[kept], (num / kept.sum(axis=1, keepdims=True)
                                             * np.ones_like(scale))[kept], rtol=1e-6)
    # P(a modality dropped) = p - p^M (a draw dropping all keeps all)
    assert abs((~kept).mean() - (p - p ** num)) < 0.01
    model, variables, _ = setup
    x = make_inputs(1)
    evals = [jax.jit(functools.partial(m.apply, train=False, phase="fusion"))(variables, x)
             ["fused"] for m in (model, model.clone(modality_dropout=p))]
    np.testing.assert_array_equal(evals[0], evals[1])  # evaluation: no modality dropout


def test_mean_of_heads_averages_the_fusion_and_branch_heads_in_eval_only(setup):
    """`model.fused_score='mean_of_heads'`: in eval the 'fused' score is the mean of the
    fusion head (the same model with 'fusion_head') and the branch heads (phase
    'unimodal' in eval); training reads the fusion head alone (same parameters)."""
    model, variables, run = setup
    x = make_inputs(4)
    mean_model = model.clone(fused_score="mean_of_heads")
    run_mean = make_runner(mean_model)
    head, _ = run(variables, x, all_valid(), 0, train=False, phase="fusion")
    branches, _ = run(variables, x, all_valid(), 0, train=False, phase="unimodal")
    mean, _ = run_mean(variables, x, all_valid(), 0, train=False, phase="fusion")
    expected = np.mean([np.asarray(head["fused"], np.float64)]
                       + [np.asarray(branches[m], np.float64) for m in MODS], axis=0)
    np.testing.assert_allclose(mean["fused"], expected, rtol=1e-6)
    assert not np.allclose(mean["fused"], head["fused"])
    trained = [r(variables, x, all_valid(), 3, train=True, phase="fusion")[0]["fused"]
               for r in (run, run_mean)]
    np.testing.assert_array_equal(trained[0], trained[1])
    with pytest.raises(ValueError, match="model.fused_score"):
        jax.eval_shape(lambda: make_model(fused_score="median").init(PKEY(0), x, None,
                                                                     phase="all"))
