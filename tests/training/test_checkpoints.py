"""Orbax checkpoints per fold and phase: exact round trips, best/last bookkeeping."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from surgfusion_jax.training import checkpoints, train

CFG = dict(learning_rate=1e-3, end_learning_rate=5e-6, num_epochs=4, weight_decay=1e-4,
           head_lr_factor=0.1, grad_clip=2.0)


def _state(seed=0, steps=0):
    """A fusion-phase TrainState on a toy parameter tree (no model needed)."""
    rng = np.random.default_rng(seed)
    params = {"branch_rgb": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
              "fusion": {"head_out": {"b": jnp.zeros(2)}, "stage1": {"k": jnp.ones(4)}}}
    stats = {"branch_rgb": {"mean": jnp.asarray(rng.normal(size=2), jnp.float32)}}
    state = train.TrainState.create(apply_fn=None, params=params, batch_stats=stats,
                                    tx=train.make_optimizer("fusion", CFG), phase="fusion")
    state = train.with_learning_rate(state.replace(step=jnp.zeros((), jnp.int32)), 1e-3)
    for k in range(steps):
        grads = jax.tree.map(lambda p, k=k: jnp.full_like(p, 0.1 * (k + 1)), params)
        state = state.apply_gradients(grads=grads)
    return state


def _equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def test_last_round_trip_is_exact(tmp_path):
    ck = checkpoints.PhaseCheckpoints(tmp_path / "fold_1" / "fusion")
    assert ck.last_epoch() is None and ck.restore_last(_state()) is None
    state = _state(steps=3)
    history = [{"epoch": 1, "loss": 0.1234567890123, "test": {"fused": {"scc": float("nan")}}}]
    ck.save_last(1, state, jax.random.PRNGKey(7), {"history": history, "best": {"epoch": 1}})
    restored, rng, meta = ck.restore_last(_state())  # fresh state gives the structure
    assert _equal(restored.params, state.params) and _equal(restored.opt_state, state.opt_state)
    assert _equal(restored.batch_stats, state.batch_stats) and int(restored.step) == 3
    np.testing.assert_array_equal(rng, jax.random.PRNGKey(7))
    assert meta["epoch"] == 1 and meta["history"][0]["loss"] == 0.1234567890123
    assert np.isnan(meta["history"][0]["test"]["fused"]["scc"])
    # Continuing from the restored state matches continuing from the original.
    grads = jax.tree.map(jnp.ones_like, state.params)
    assert _equal(restored.apply_gradients(grads=grads).params,
                  state.apply_gradients(grads=grads).params)


def test_the_two_newest_steps_are_kept_and_no_temporaries_remain(tmp_path):
    ck = checkpoints.PhaseCheckpoints(tmp_path)
    for epoch in (1, 2, 3):
        ck.save_last(epoch, _state(steps=epoch), jax.random.PRNGKey(0), {"history": []})
    assert ck.last_epoch() == 3
    assert sorted(os.listdir(tmp_path / "last")) == ["2", "3"]
    restored, _, meta = ck.restore_last(_state(), epoch=2)  # a group resuming one save back
    assert meta["epoch"] == 2 and int(restored.step) == 2
    assert sorted(os.listdir(tmp_path / "last")) == ["2"]  # the newer step is discarded


def test_best_is_written_once_per_epoch_and_pruned_on_resume(tmp_path):
    ck = checkpoints.PhaseCheckpoints(tmp_path)
    ck.save_last(2, _state(steps=2), jax.random.PRNGKey(0), {"history": []})
    ck.save_best(2, _state(steps=2), {"scc": 0.5})
    ck.save_best(2, _state(steps=9), {"scc": 0.9})  # same epoch again (a replay): skipped
    variables, meta = ck.restore_variables("best", _variables())
    assert meta == {"scc": 0.5, "epoch": 2}
    assert _equal(variables["params"], _state(steps=2).params)
    ck.save_best(4, _state(steps=4), {"scc": 0.7})  # written after the last `last` step
    ck.restore_last(_state())  # resuming from epoch 2 drops best steps from the future
    assert sorted(os.listdir(tmp_path / "best")) == []
    ck.save_best(3, _state(steps=3), {"scc": 0.6})
    assert ck.restore_variables("best", _variables())[1]["epoch"] == 3


def _variables():
    s = _state()
    return {"params": s.params, "batch_stats": s.batch_stats}


def test_restore_variables_from_last_and_structure_check(tmp_path):
    ck = checkpoints.PhaseCheckpoints(tmp_path)
    with pytest.raises(FileNotFoundError, match="no 'last' checkpoint"):
        ck.restore_variables("last", _variables())
    state = _state(steps=2)
    ck.save_last(5, state, jax.random.PRNGKey(0), {"history": [1, 2]})
    variables, meta = ck.restore_variables("last", _variables())
    assert _equal(variables["params"], state.params) and meta["epoch"] == 5
    assert _equal(variables["batch_stats"], state.batch_stats)
    abstract = jax.eval_shape(lambda: _variables())  # shapes suffice as a template
    assert _equal(ck.restore_variables("last", abstract)[0]["params"], state.params)
    other = {"params": {"branch_rgb": {"w": jnp.ones((3, 2))}}, "batch_stats": {}}
    with pytest.raises(ValueError, match="does not fit this model"):
        ck.restore_variables("last", other)
    with pytest.raises(ValueError, match="'last' or 'best'"):
        ck.restore_variables("middle", _variables())
