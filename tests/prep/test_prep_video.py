"""data_prep.video: 10-FPS resampling and decoding, checked against direct OpenCV reads."""

import cv2
import numpy as np
import pytest

from data_prep.common import PrepError
from data_prep.video import VideoStream, expected_frames, grid_range, probe

W, H = 64, 48


def _index_frame(i):
    """Frame whose two halves encode i coarsely (robust to MJPG): left i//16, right i%16."""
    f = np.zeros((H, W, 3), np.uint8)
    f[:, : W // 2] = (i // 16) * 16 + 8
    f[:, W // 2:] = (i % 16) * 16 + 8
    return f


def _decode_index(frame):
    a = int(np.median(frame[:, 4: W // 2 - 4])) // 16
    b = int(np.median(frame[:, W // 2 + 4: -4])) // 16
    return a * 16 + b


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    d = tmp_path_factory.mktemp("video")
    paths = {}
    for fps, n in ((30.0, 150), (24.0, 120), (4.0, 16)):
        p = str(d / f"idx_{int(fps)}.avi")
        vw = cv2.VideoWriter(p, cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
        for i in range(n):
            vw.write(_index_frame(i))
        vw.release()
        paths[fps] = (p, n)
    return paths


def _direct_frames(path):
    cap = cv2.VideoCapture(path)
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(f)
    cap.release()
    return out


def _reference_indices(n_src, fps, start_s=None, end_s=None):
    """Nearest source frame to t = k/10 by brute-force argmin over source timestamps."""
    t_src = np.arange(n_src + 1) / fps   # index n_src = a phantom frame past the end
    out, k = [], 0
    while True:
        t = k / 10.0
        i = int(np.argmin(np.abs(t_src - t)))
        if i == n_src:  # nearest frame lies past the end of the file
            break
        if (start_s is None or t >= start_s - 1e-9) and (end_s is None or t < end_s - 1e-9):
            out.append(i)
        if end_s is not None and t >= end_s:
            break
        k += 1
    return out


@pytest.mark.parametrize("fps", [30.0, 24.0, 4.0])
def test_resampling_matches_direct_opencv(indexed, fps):
    path, n = indexed[fps]
    direct = _direct_frames(path)
    assert len(direct) == n
    ref = _reference_indices(n, fps)
    stream = VideoStream(path, size=None)
    got = list(stream)
    assert [k for k, _ in got] == list(range(len(ref)))
    assert len(got) == expected_frames(n, fps) == stream.expected_frames()
    for (k, frame), i in zip(got, ref):
        # Same decoder, same frame: bit-identical to cv2 BGR->RGB of the direct read.
        np.testing.assert_array_equal(frame, cv2.cvtColor(direct[i], cv2.COLOR_BGR2RGB))
        assert _decode_index(frame) == i
    assert stream.eof and stream.source_frames == n


def test_30fps_keeps_every_third_frame(indexed):
    path, n = indexed[30.0]
    idx = [_decode_index(f) for _, f in VideoStream(path)]
    assert idx == list(range(0, n, 3))


def test_time_range_and_resize(indexed):
    path, n = indexed[30.0]
    direct = _direct_frames(path)
    stream = VideoStream(path, size=24, start_s=1.0, end_s=3.55)
    got = list(stream)
    ks = [k for k, _ in got]
    assert ks == list(range(10, 36)) == list(range(*grid_range(1.0, 3.55)))
    assert not stream.eof
    ref = _reference_indices(n, 30.0, 1.0, 3.55)
    assert len(ref) == len(got) == expected_frames(n, 30.0, start_s=1.0, end_s=3.55)
    for (_, frame), i in zip(got, ref):
        want = cv2.cvtColor(cv2.resize(direct[i], (24, 24), interpolation=cv2.INTER_AREA),
                            cv2.COLOR_BGR2RGB)
        assert frame.shape == (24, 24, 3) and frame.dtype == np.uint8
        np.testing.assert_array_equal(frame, want)


def test_probe_reports_rate_and_count(indexed):
    info = probe(indexed[24.0][0])
    assert info.fps == pytest.approx(24.0) and info.frame_count == 120
    assert (info.width, info.height) == (W, H)


def test_missing_unreadable_and_truncated_files(tmp_path, indexed):
    with pytest.raises(PrepError, match="does not exist"):
        probe(str(tmp_path / "nope.avi"))
    junk = tmp_path / "junk.avi"
    junk.write_bytes(np.random.default_rng(0).integers(0, 255, 5000, np.uint8).tobytes())
    with pytest.raises(PrepError, match="cannot be opened"):
        list(VideoStream(str(junk)))
    src = indexed[30.0][0]
    data = open(src, "rb").read()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(PrepError, match=r"stopped decoding after \d+ of 150 frames \(truncated"):
        list(VideoStream(str(cut)))


def test_end_beyond_video_is_an_error(indexed):
    path, _ = indexed[30.0]   # 5 s long
    with pytest.raises(PrepError, match="end_s=9"):
        list(VideoStream(path, start_s=1.0, end_s=9.0))


def test_stream_holds_one_frame_at_a_time(indexed):
    """The iterator yields frames lazily (a generator), never a decoded list."""
    path, _ = indexed[30.0]
    it = iter(VideoStream(path))
    k, f = next(it)
    assert k == 0 and f.shape == (H, W, 3)
    it.close()
