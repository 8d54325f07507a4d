"""Training mechanics: optimizers, schedules, pure steps, jitted epochs, phase runner.

Most tests use `TinyNet`, a small stand-in with SurgFusionNet's interface (dict inputs,
`valid`, train/phase, `branch_<m>`/`fusion` params, BatchNorm, dropout and gumbel RNGs),
so they run in seconds; the real model is trained in test_cross_validation.py.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from surgfusion_jax.data import input_pipeline as ip
from surgfusion_jax.training import checkpoints, phase, train

MODS = ("rgb", "flow")
SGD = dict(learning_rate=1e-2, end_learning_rate=5e-6, num_epochs=5, weight_decay=1e-4,
           momentum=0.9, grad_clip=2.0)
ADAMW = dict(learning_rate=1e-3, end_learning_rate=5e-6, num_epochs=5, weight_decay=1e-4,
             head_lr_factor=0.1, grad_clip=2.0)


class TinyBranch(nn.Module):
    @nn.compact
    def __call__(self, x, valid, train):
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(4, use_bias=False)(x)))
        h = nn.Dropout(0.3, deterministic=not train)(h)
        v = valid[..., None].astype(h.dtype)
        pooled = (h * v).sum(1) / jnp.maximum(v.sum(1), 1.0)
        return jax.nn.sigmoid(nn.Dense(1, name="head")(pooled)[:, 0]), pooled


class TinyFusion(nn.Module):
    @nn.compact
    def __call__(self, feats, train):
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(4, use_bias=False)(feats)))
        if train:
            h = h * jnp.exp(0.01 * jax.random.gumbel(self.make_rng("gumbel"), h.shape))
        return jax.nn.sigmoid(nn.Dense(1, name="head_out")(h)[:, 0])


class TinyNet(nn.Module):
    modalities: tuple = MODS
    trainable_branches: tuple = ()  # as SurgFusionNet's: these train in phase 'fusion' too

    @nn.compact
    def __call__(self, inputs, valid=None, *, train=False, phase="fusion"):
        out, feats = {}, []
        for m in self.modalities:
            branch = TinyBranch(name=f"branch_{m}")
            if phase in ("unimodal", "all"):
                out[m] = branch(inputs[m], valid, train)[0]
            if phase in ("fusion", "all"):
                feat = branch(inputs[m], valid, False)[1]
                feats.append(feat if m in self.trainable_branches else jax.lax.stop_gradient(feat))
        if feats:
            out["fused"] = TinyFusion(name="fusion")(jnp.concatenate(feats, -1), train)
        return out


def _data(n=10, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    samples = [dict(num_segments=int(t), score=10.0 + 2 * i,
                    **{m: rng.normal(size=(int(t), dim)).astype(np.float32) for m in MODS})
               for i, t in enumerate(rng.integers(3, 12, size=n))]
    return samples, ip.make_device_data(samples, MODS, 30.0, window=6)


@functools.lru_cache(maxsize=None)
def _variables(seed=0):
    inputs = {m: jnp.zeros((1, 6, 5)) for m in MODS}
    init = jax.jit(functools.partial(TinyNet().init, phase="all"))
    return dict(init(jax.random.PRNGKey(seed), inputs, jnp.ones((1, 6), bool)))


def _state(phase, seed=0):
    cfg = SGD if phase == "unimodal" else ADAMW
    return train.create_train_state(TinyNet(), _variables(seed), train.make_optimizer(phase, cfg),
                                    phase, learning_rate=cfg["learning_rate"])


_step = jax.jit(train.train_step)  # one compiled step per phase for every test below


def _same(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def test_param_labels_of_the_real_model():
    model = train.build_model(dict(features=16, embed_features=32, num_candidates=3, num_heads=2,
                                   fusion="dra", use_dfb=True, dtype="float32"), ("rgb", "flow", "mask"))
    params = train.abstract_variables(model, 8)["params"]
    for phase in train.PHASES:
        labels = jax.tree_util.tree_flatten_with_path(train.param_labels(params, phase))[0]
        by_top = {}
        for path, label in labels:
            by_top.setdefault(path[0].key, set()).add(label)
        assert set(by_top) == {"branch_rgb", "branch_flow", "branch_mask", "fusion"}
        if phase == "unimodal":
            assert by_top["fusion"] == {"frozen"}
            assert all(by_top[f"branch_{m}"] == {"train"} for m in ("rgb", "flow", "mask"))
        else:
            assert by_top["fusion"] == {"train", "head"}
            assert all(by_top[f"branch_{m}"] == {"frozen"} for m in ("rgb", "flow", "mask"))
            heads = {jax.tree_util.keystr(p[:2]) for p, lab in labels if lab == "head"}
            assert heads == {"['fusion']['head_hidden']", "['fusion']['head_out']"}


def test_learning_rate_schedule_is_per_epoch_cosine_annealing():
    sched = train.learning_rate_schedule(dict(SGD, num_epochs=10))
    for epoch in range(10):
        ref = 5e-6 + (1e-2 - 5e-6) * (1 + math.cos(math.pi * epoch / 10)) / 2  # CosineAnnealingLR
        assert float(sched(epoch)) == pytest.approx(ref, rel=1e-5)


def test_injected_learning_rate_scales_the_update():
    state = _state("fusion")
    grads = jax.tree.map(jnp.ones_like, state.params)
    full = state.apply_gradients(grads=grads)
    tenth = train.with_learning_rate(state, 1e-4).apply_gradients(grads=grads)
    delta = lambda s: np.asarray(s.params["fusion"]["head_out"]["kernel"] -
                                 state.params["fusion"]["head_out"]["kernel"])
    np.testing.assert_allclose(delta(tenth), 0.1 * delta(full), rtol=5e-3)  # float32 params


def test_optimizers_first_step_against_closed_form():
    params = {"branch_rgb": {"w": jnp.array([1.0, -2.0])}, "fusion": {
        "stage1": {"k": jnp.array([0.5, 3.0])}, "head_out": {"b": jnp.array([1.0, 1.0])}}}
    grads = jax.tree.map(lambda p: jnp.array([3.0, 4.0]), params)
    # clip_by_global_norm(2) over the parameters the phase trains: in phase 'unimodal' the
    # branch alone (norm 5); the fusion parameters' gradients (zero in a real model) are
    # not part of it.
    scale = 2.0 / 5.0
    def first_update(phase, cfg):
        state = train.create_train_state(TinyNet(), {"params": params, "batch_stats": {}},
                                         train.make_optimizer(phase, cfg), phase,
                                         learning_rate=cfg["learning_rate"])
        return state.tx.update(grads, state.opt_state, params)[0]

    up = first_update("unimodal", SGD)
    g = np.array([3.0, 4.0]) * scale
    np.testing.assert_allclose(up["branch_rgb"]["w"], -1e-2 * (g + 1e-4 * np.array([1.0, -2.0])),
                               rtol=1e-5)
    assert not np.any(up["fusion"]["stage1"]["k"]) and not np.any(up["fusion"]["head_out"]["b"])
    up = first_update("fusion", ADAMW)
    # First Adam step: m_hat / sqrt(v_hat) = sign(g); decoupled decay lr * wd * p.
    np.testing.assert_allclose(up["fusion"]["stage1"]["k"], -1e-3 * (1 + 1e-4 * np.array([0.5, 3.0])),
                               rtol=1e-4)
    np.testing.assert_allclose(up["fusion"]["head_out"]["b"], -1e-4 * (1 + 1e-4), rtol=1e-4)
    assert not np.any(up["branch_rgb"]["w"])


def test_equal_optimizer_configs_share_one_object():
    longer = dict(ADAMW, num_epochs=300, learning_rate=0.1)  # the schedule is not part of it
    assert train.make_optimizer("fusion", longer) is train.make_optimizer("fusion", ADAMW)
    assert train.make_optimizer("fusion", dict(ADAMW, weight_decay=0.0)) is not \
        train.make_optimizer("fusion", ADAMW)
    with pytest.raises(ValueError, match="unknown phase"):
        train.make_optimizer("joint", ADAMW)


def _batch(data, idx, rng):
    inputs, valid = ip.sample_windows(rng, data, jnp.asarray(idx), 6)
    return {"inputs": inputs, "valid": valid, "target": data.targets[jnp.asarray(idx)],
            "weight": jnp.ones(len(idx))}


def test_train_step_batch_stats_and_frozen_parts():
    _, data = _data()
    uni = _state("unimodal")
    new, metrics = _step(uni, _batch(data, [0, 1, 2, 3], jax.random.PRNGKey(1)),
                                             jax.random.PRNGKey(2))
    assert np.isfinite(metrics["loss"]) and int(new.step) == 1
    assert not _same(new.batch_stats["branch_rgb"], uni.batch_stats["branch_rgb"])
    assert not _same(new.params["branch_flow"], uni.params["branch_flow"])
    assert _same(new.params["fusion"], uni.params["fusion"])
    fus = train.create_train_state(uni.apply_fn.__self__, {"params": new.params,
                                                           "batch_stats": new.batch_stats},
                                   train.make_optimizer("fusion", ADAMW), "fusion",
                                   learning_rate=1e-3)
    after, _ = _step(fus, _batch(data, [4, 5, 6], jax.random.PRNGKey(3)),
                                         jax.random.PRNGKey(4))
    for m in MODS:
        assert _same(after.params[f"branch_{m}"], fus.params[f"branch_{m}"])
        assert _same(after.batch_stats[f"branch_{m}"], fus.batch_stats[f"branch_{m}"])
    assert not _same(after.params["fusion"], fus.params["fusion"])
    assert not _same(after.batch_stats["fusion"], fus.batch_stats["fusion"])


@pytest.mark.parametrize("phase_name,trainable", [("unimodal", ()), ("fusion", ()),
                                                  ("fusion", ("rgb",))])
def test_grad_norm_is_the_norm_of_every_parameters_gradient(phase_name, trainable):
    _, data = _data()
    model = TinyNet(trainable_branches=trainable)
    cfg = SGD if phase_name == "unimodal" else ADAMW
    state = train.create_train_state(model, _variables(), train.make_optimizer(
        phase_name, cfg, trainable), phase_name, learning_rate=cfg["learning_rate"])
    batch, rng = _batch(data, [0, 1, 2, 3], jax.random.PRNGKey(1)), jax.random.PRNGKey(2)
    _, metrics = jax.jit(train.train_step)(state, batch, rng)

    def loss(params):  # the step's loss, with the step's split of its key
        dropout_rng, gumbel_rng = jax.random.split(rng)
        out, _ = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                batch["inputs"], batch["valid"], train=True, phase=phase_name,
                                rngs={"dropout": dropout_rng, "gumbel": gumbel_rng},
                                mutable=["batch_stats"])
        return train.phase_loss(out, batch["target"], batch["weight"], state.loss_alpha)

    grads = jax.grad(loss)(state.params)  # every parameter's, the frozen ones' included
    rgb = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                      for g in jax.tree.leaves(grads["branch_rgb"])))
    assert (rgb > 0) == (phase_name == "unimodal" or bool(trainable))
    reference = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(float(metrics["grad_norm"]), reference, rtol=1e-5)


def test_eval_step_is_per_video_and_deterministic():
    _, data = _data()
    state = _state("unimodal")
    state, _ = _step(state, _batch(data, [0, 1, 2, 3], jax.random.PRNGKey(0)),
                                jax.random.PRNGKey(1))
    stacked = train.stack([state])
    full = train.predict_batches(stacked, data, jnp.array([0, 1, 2, 3]), length=16)
    alone = train.predict_batches(stacked, data, jnp.array([2, 2, 2, 2]), length=16)
    np.testing.assert_allclose(full["rgb"][0, 2], alone["rgb"][0, 0], rtol=1e-6)


def test_evaluate_stacked_scores_each_run_on_its_own_videos():
    _, data = _data()
    states = [_state("unimodal")]
    states.append(_step(states[0], _batch(data, [0, 1, 2, 3], jax.random.PRNGKey(0)),
                        jax.random.PRNGKey(1))[0])
    stacked = train.stack(states)
    own = [[1, 3], [0, 2, 3]]
    lengths = np.asarray(data.lengths)
    shared = train.evaluate_stacked(stacked, data, ip.make_eval_plan(lengths, [0, 1, 2, 3], 2))
    per_run = train.evaluate_stacked(stacked, data, ip.make_runs_eval_plan(lengths, own, 2))
    for r, videos in enumerate(own):
        others = np.setdiff1d(np.arange(data.num_videos), videos)
        for head, p in per_run.items():
            np.testing.assert_allclose(p[r, videos], shared[head][r, videos], rtol=1e-6)
            assert np.isnan(p[r, others]).all()
        alone = train.evaluate_stacked(train.stack([states[r]]), data,
                                       ip.make_runs_eval_plan(lengths, [videos], 2))
        for head, p in alone.items():  # the same batches alone as in the group
            np.testing.assert_allclose(p[0], per_run[head][r], rtol=1e-6)


def _manual_epoch(state, data, train_idx, rng, batch_size, steps):
    """Reference: the epoch's batches and steps one at a time on the host."""
    state = train.with_learning_rate(state, 3e-3)
    order_rng, step_rng = jax.random.split(rng)
    padded = jnp.asarray(ip.pad_indices(train_idx, data.num_videos))
    idx, weight = ip.epoch_batches(order_rng, padded, jnp.int32(len(train_idx)), batch_size, steps)
    for s, key in enumerate(jax.random.split(step_rng, steps)):
        window_rng, key = jax.random.split(key)
        inputs, valid = ip.sample_windows(window_rng, data, idx[s], 6)
        batch = {"inputs": inputs, "valid": valid, "target": data.targets[idx[s]], "weight": weight[s]}
        state, _ = _step(state, batch, key)
    return state


@pytest.mark.parametrize("phase", train.PHASES)
def test_scanned_epoch_equals_sequential_steps(phase):
    _, data = _data()
    state, train_idx = _state(phase), [0, 2, 3, 7, 9]  # 2 steps of 3, the last one padded
    ref = _manual_epoch(state, data, train_idx, jax.random.PRNGKey(5), 3, 2)
    got, metrics = train.train_epoch(state, data, jnp.asarray(ip.pad_indices(train_idx, 10)),
                                     jnp.int32(5), jax.random.PRNGKey(5), 3e-3, window=6, batch_size=3,
                                     steps=2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 (got.params, got.batch_stats), (ref.params, ref.batch_stats))
    assert int(got.step) == 2 and np.isfinite(metrics["loss"])


def test_epoch_compiles_once_for_all_folds_and_vmaps_over_them():
    _, data = _data()
    state = _state("unimodal")
    folds = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [1, 3, 5, 7]]  # 2 steps of 3 each
    epoch = functools.partial(train.train_epoch, window=6, batch_size=3, steps=2)
    before = train.train_epoch._cache_size()
    singles = [epoch(state, data, jnp.asarray(ip.pad_indices(f, 10)), jnp.int32(len(f)),
                     jax.random.PRNGKey(k), 1e-2 / (k + 1))[0] for k, f in enumerate(folds)]
    assert train.train_epoch._cache_size() - before <= 1
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *([state] * 3))
    batched, _ = jax.vmap(epoch, in_axes=(0, None, 0, 0, 0, 0))(
        stacked, data, jnp.stack([jnp.asarray(ip.pad_indices(f, 10)) for f in folds]),
        jnp.array([len(f) for f in folds], jnp.int32), jnp.stack([jax.random.PRNGKey(k) for k in range(3)]),
        jnp.array([1e-2 / (k + 1) for k in range(3)]))
    for k in range(3):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=1e-5, atol=1e-6),
                     batched.params, singles[k].params)


def test_run_phase_resumes_to_identical_history(tmp_path):
    samples, data = _data()
    test = phase.EvalSet.make([6, 7, 8, 9], [s["score"] for s in samples])
    run = functools.partial(phase.run_single_phase, data=data, rng=jax.random.PRNGKey(3),
                            num_epochs=4, eval_batch_size=4, min_bucket=16,
                            batch_size=3, window=6, train_idx=[0, 1, 2, 3, 4, 5],
                            eval_sets={"test": test}, score_max=30.0, progress=False,
                            learning_rate=train.learning_rate_schedule(dict(SGD, num_epochs=4)))
    full_state, full = run(_state("unimodal"), checkpoints=checkpoints.PhaseCheckpoints(tmp_path / "a"))
    assert [h["epoch"] for h in full["history"]] == [1, 2, 3, 4]
    assert full["history"][0]["lr"] == pytest.approx(1e-2) and full["history"][3]["lr"] < 2e-3
    assert set(full["history"][0]["test"]) == set(MODS) and full["best"]["epoch"] >= 1
    ck = checkpoints.PhaseCheckpoints(tmp_path / "b")
    with pytest.raises(train.StopRequested):
        run(_state("unimodal"), checkpoints=ck, budget=phase.EpochBudget(3))
    assert ck.last_epoch() == 3
    state, resumed = run(_state("unimodal"), checkpoints=ck)
    assert resumed["history"] == full["history"] and resumed["best"] == full["best"]
    for head, pred in full["final"].items():
        np.testing.assert_array_equal(resumed["final"][head], pred)
    assert _same(state.params, full_state.params) and _same(state.opt_state, full_state.opt_state)


def test_a_diverging_run_is_reported_once_with_the_fix(caplog):
    """A loss that turns NaN (here: a NaN learning rate from epoch 2) is reported in one
    warning line naming the run, phase and epoch and the Eq. 15 switch; training goes on
    and the history keeps the NaN epochs."""
    samples, data = _data()
    test = phase.EvalSet.make([6, 7, 8, 9], [s["score"] for s in samples])
    with caplog.at_level("WARNING"):
        _, meta = phase.run_single_phase(
            _state("unimodal"), data=data, rng=jax.random.PRNGKey(3), num_epochs=3,
            eval_batch_size=4, min_bucket=16, batch_size=3, window=6,
            train_idx=[0, 1, 2, 3, 4, 5], eval_sets={"test": test}, score_max=30.0,
            progress=False, desc="fold_1 unimodal",
            learning_rate=lambda epoch: 1e-2 if epoch == 0 else float("nan"))
    losses = [h["loss"] for h in meta["history"]]
    assert np.isfinite(losses[0]) and np.isnan(losses[1:]).all()
    lines = [r.getMessage() for r in caplog.records if "diverged" in r.getMessage()]
    assert len(lines) == 1
    assert "unimodal epoch 2" in lines[0] and "dra_relative_eps=0.01" in lines[0]
