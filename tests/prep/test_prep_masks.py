"""data_prep.masks: PNG folders (source rate / 10 FPS) and mask videos, aligned with video."""
import os

import cv2
import numpy as np
import pytest

from data_prep.common import PrepError
from data_prep.masks import MaskReader, list_pngs
from data_prep.video import VideoStream
from prep_testutil import mask_at, write_png_masks, write_video

N = 120   # 4 s at 30 FPS -> 40 frames at 10 FPS
S = 24


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("masks")
    return dict(
        video=write_video(d / "v.avi", N, seed=2),
        src_pngs=write_png_masks(d / "src_pngs", N, seed=2),
        ten_pngs=write_png_masks(d / "ten_pngs", N, seed=2, step=3),
        mask_video=write_video(d / "m.avi", N, seed=2, mask=True),
        mask_video_10=write_video(d / "m10.avi", N // 3, fps=10.0, seed=2, mask=True, step=3),
        short_pngs=write_png_masks(d / "short", N - 9, seed=2),
        short_video=write_video(d / "ms.avi", N - 30, seed=2, mask=True),
        dir=d)


def _expected(i):
    return cv2.resize(mask_at(i, 2), (S, S), interpolation=cv2.INTER_NEAREST)


def _read_all(video_path, mask_path, **kw):
    v = VideoStream(video_path, size=S, **kw)
    r = MaskReader(mask_path, v, S)
    out = [(k, r.mask(k)) for k, _ in v]
    r.finish()
    return r, out


@pytest.mark.parametrize("which,mode", [("src_pngs", "source_rate"), ("ten_pngs", "10fps")])
def test_png_folders_align_with_the_10fps_grid(media, which, mode):
    r, out = _read_all(media["video"], media[which])
    assert r.mode == mode and len(out) == N // 3
    for k, m in out:
        assert m.shape == (S, S) and m.dtype == np.uint8       # 1-channel PNG -> label map
        np.testing.assert_array_equal(m, _expected(3 * k))


@pytest.mark.parametrize("which", ["mask_video", "mask_video_10"])
def test_mask_videos_align_with_the_10fps_grid(media, which):
    r, out = _read_all(media["video"], media[which])
    assert r.mode == "video" and len(out) == N // 3
    for k, m in out:
        assert m.shape == (S, S, 3)                              # lossy video -> RGB image
        agree = np.mean((m[..., 0] > 127) == (_expected(3 * k) > 127))
        assert agree > 0.97


def test_time_range_indexes_the_whole_video_numbering(media):
    r, out = _read_all(media["video"], media["src_pngs"], start_s=1.0, end_s=2.0)
    assert [k for k, _ in out] == list(range(10, 20))
    for k, m in out:
        np.testing.assert_array_equal(m, _expected(3 * k))


@pytest.mark.parametrize("which,pattern", [
    ("short_pngs", r"has 111 PNGs but video .* has 120 frames \(40 at 10 FPS\)"),
    ("short_video", r"mask video .* \(30 at 10 FPS\) but video .* \(40 at 10 FPS\)"),
    ("nothing_here", r"does not exist.*--modalities=rgb,flow"),
])
def test_mismatches_and_missing_masks(media, which, pattern):
    path = media.get(which, str(media["dir"] / which))
    with pytest.raises(PrepError, match=pattern):
        MaskReader(path, VideoStream(media["video"], size=S), S)


def test_natural_order_mixed_and_empty_folders(tmp_path, media):
    for i in (10, 2, 1):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((4, 4), i, np.uint8))
    assert [os.path.basename(p) for p in list_pngs(str(tmp_path))] == ["f1.png", "f2.png", "f10.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PrepError, match="no .png files"):
        list_pngs(str(empty))
    mixed = write_png_masks(tmp_path / "mixed", N, seed=2)
    cv2.imwrite(os.path.join(mixed, "frame_6.png"), np.dstack([mask_at(6, 2)] * 2 + [mask_at(0)]))
    with pytest.raises(PrepError, match="mixes single-channel and colour"):
        _read_all(media["video"], mixed)
