"""Device dataset, training windows, epoch batches and bucketed eval plans (no model)."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from surgfusion_jax.data import input_pipeline as ip

MODS = ("rgb", "flow")


def _samples(lengths, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    return [dict(num_segments=n, score=6.0 + i, **{m: rng.normal(size=(n, dim)).astype(np.float32)
                                                   for m in MODS})
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("length, min_bucket, expected", [
    (1, 8, 8), (8, 8, 8), (9, 8, 16), (33, 8, 64), (5, 1, 8), (100, 16, 128), (3, 4, 4)])
def test_bucket_length(length, min_bucket, expected):
    assert ip.bucket_length(length, min_bucket) == expected


def test_device_data_pads_with_zeros_and_normalises_targets():
    samples = _samples([3, 11, 6])
    data = ip.make_device_data(samples, MODS, score_max=30.0, window=20, min_bucket=4)
    assert data.padded_length == 20  # max(bucket(11) = 16, window)
    np.testing.assert_array_equal(data.lengths, [3, 11, 6])
    np.testing.assert_allclose(data.targets, [0.5 * (6 + i) / 30 for i in range(3)], rtol=1e-6)
    for m in MODS:
        for i, s in enumerate(samples):
            np.testing.assert_array_equal(data.features[m][i, :s["num_segments"]], s[m])
            assert not np.any(np.asarray(data.features[m][i, s["num_segments"]:]))


def test_windows_are_consecutive_segments_or_zero_padded():
    samples = _samples([3, 11, 6, 8])
    data = ip.make_device_data(samples, MODS, 30.0, window=6)
    idx = jnp.array([0, 1, 2, 3, 1])
    starts_seen = collections.defaultdict(set)
    for seed in range(40):
        inputs, valid = ip.sample_windows(jax.random.PRNGKey(seed), data, idx, 6)
        inputs, valid = jax.device_get((inputs, valid))
        for row, i in enumerate(np.asarray(idx)):
            feats = samples[i]["rgb"]
            n = len(feats)
            got = inputs["rgb"][row]
            if n <= 6:  # whole video from 0, zero tail with valid=False
                np.testing.assert_array_equal(got[:n], feats)
                assert not got[n:].any()
                np.testing.assert_array_equal(valid[row], np.arange(6) < n)
                starts_seen[i].add(0)
                continue
            assert valid[row].all()
            starts = [s for s in range(n - 6 + 1) if np.array_equal(feats[s:s + 6], got)]
            assert len(starts) == 1, "window must be 6 consecutive segments of the video"
            np.testing.assert_array_equal(inputs["flow"][row], samples[i]["flow"][starts[0]:starts[0] + 6])
            starts_seen[i].add(starts[0])
    assert starts_seen[1] == set(range(11 - 6 + 1))  # every start is drawn
    assert starts_seen[3] == {0, 1, 2}


def test_epoch_batches_visit_each_training_video_once():
    train_idx = jnp.asarray(ip.pad_indices([7, 2, 9, 4, 5], 12))
    steps = ip.steps_per_epoch(5, 2)
    assert steps == 3
    orders = set()
    for seed in range(10):
        idx, weight = jax.device_get(ip.epoch_batches(jax.random.PRNGKey(seed), train_idx,
                                                      jnp.int32(5), 2, steps))
        assert idx.shape == weight.shape == (3, 2)
        real = idx.reshape(-1)[weight.reshape(-1) == 1]
        assert sorted(real) == [2, 4, 5, 7, 9]
        assert weight.sum() == 5 and set(idx.reshape(-1)) <= {2, 4, 5, 7, 9}
        orders.add(tuple(real))
    assert len(orders) > 5  # shuffled


def test_epoch_batches_with_fewer_videos_than_a_batch():
    idx, weight = ip.epoch_batches(jax.random.PRNGKey(0), jnp.array([3, 1, 3, 3]), jnp.int32(2), 4,
                                   ip.steps_per_epoch(2, 4))
    assert sorted(np.asarray(idx)[0][np.asarray(weight)[0] == 1]) == [1, 3]
    assert set(np.asarray(idx).ravel()) <= {1, 3}


def test_pad_indices_rejects_bad_sizes():
    np.testing.assert_array_equal(ip.pad_indices([4, 1], 4), [4, 1, 4, 4])
    with pytest.raises(ValueError):
        ip.pad_indices([], 3)
    with pytest.raises(ValueError):
        ip.pad_indices([1, 2, 3], 2)


def test_eval_plan_groups_by_bucket_in_fixed_size_batches():
    lengths = [3, 30, 9, 12, 7, 64, 16, 2]
    indices = [0, 1, 2, 3, 4, 5, 6, 7]
    plan = ip.make_eval_plan(lengths, indices, batch_size=2, min_bucket=8)
    assert all(b.idx.shape == (2,) for b in plan)
    assert sorted({b.length for b in plan}) == [8, 16, 32, 64]
    seen = [int(i) for b in plan for i in b.idx[:b.count]]
    assert sorted(seen) == indices
    for b in plan:
        for i in b.idx[:b.count]:
            assert ip.bucket_length(lengths[i], 8) == b.length


def test_runs_eval_plan_gives_each_run_its_own_plan_side_by_side():
    lengths = [3, 30, 9, 12, 7, 64, 16, 2, 20]
    run_indices = [[0, 1, 2, 3, 4, 7], [5, 6], [], [7, 8, 2]]
    plan = ip.make_runs_eval_plan(lengths, run_indices, batch_size=2, min_bucket=8)
    assert all(b.idx.shape == (4, 2) and b.count.shape == (4,) for b in plan)
    for r, indices in enumerate(run_indices):
        alone = ip.make_eval_plan(lengths, indices, 2, 8) if indices else []
        rows = [(b.length, b.idx[r], b.count[r]) for b in plan if b.count[r]]
        assert len(rows) == len(alone)  # run r's batches, in order, are its plan alone
        for (length, idx, count), want in zip(rows, alone):
            assert (length, count) == (want.length, want.count)
            np.testing.assert_array_equal(idx, want.idx)
    for b in plan:  # padding rows repeat a video of the same bucket
        for r in np.flatnonzero(b.count == 0):
            assert all(ip.bucket_length(lengths[i], 8) == b.length for i in b.idx[r])
    # the fullest run sets a bucket's batch count: bucket 8 holds run 0's 0, 4, 7
    assert sum(b.length == 8 for b in plan) == 2
    assert ip.make_runs_eval_plan(lengths, [[], []], 2, 8) == []


def test_gather_eval_batch_cuts_to_length_with_valid_mask():
    samples = _samples([3, 11])
    data = ip.make_device_data(samples, MODS, 30.0)
    inputs, valid = ip.gather_eval_batch(data, jnp.array([1, 0]), 16)
    assert inputs["rgb"].shape == (2, 16, 3)
    np.testing.assert_array_equal(valid, np.arange(16)[None] < np.array([[11], [3]]))
    np.testing.assert_array_equal(inputs["flow"][0, :11], samples[1]["flow"])
