"""data_prep.segments: 32-frame segment counting, tail rule and chunking."""
import numpy as np
import pytest

from data_prep.segments import SegmentBatcher, num_segments, segment_bounds, split_segments


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 63, 64, 100, 150])
def test_counting_drops_the_tail(n):
    assert num_segments(n) == sum(1 for s in range(0, n, 32) if s + 32 <= n)
    bounds = segment_bounds(n)
    assert all(e - s == 32 for s, e in bounds)
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
    assert (bounds[-1][1] if bounds else 0) > n - 32


def test_split_segments_layout():
    x = np.arange(100)
    seg = split_segments(x)
    assert seg.shape == (3, 32)
    np.testing.assert_array_equal(seg[1], np.arange(32, 64))


@pytest.mark.parametrize("n,batch", [(100, 2), (64, 2), (31, 4), (200, 1), (96, 8)])
def test_batcher_chunks_whole_segments(n, batch):
    b = SegmentBatcher(32, batch)
    chunks = []
    for i in range(n):
        c = b.add({"a": np.full((2, 2), i, np.int32), "b": np.int64(i)})
        if c is not None:
            chunks.append(c)
    last = b.flush()
    if last is not None:
        chunks.append(last)
    assert all(c["a"].shape[0] <= batch and c["a"].shape[1:] == (32, 2, 2) for c in chunks)
    got = np.concatenate([c["b"].reshape(-1) for c in chunks]) if chunks else np.zeros(0)
    np.testing.assert_array_equal(got, np.arange(num_segments(n) * 32))
    assert b.segments == num_segments(n) and b.tail_frames == n - 32 * num_segments(n)
    assert b.frames == n
