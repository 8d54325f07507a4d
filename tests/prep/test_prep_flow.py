"""data_prep.flow: Farneback flow and its uint8 scaling, against direct OpenCV calls."""
import cv2
import numpy as np
import pytest

from data_prep.flow import (DEFAULT_FLOW_BOUND, FlowStream, compute_flow, dequantize_flow,
                            quantize_flow)


def _texture(h=40, w=48, seed=0):
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.uniform(0, 255, (h + 20, w + 20)).astype(np.float32), (0, 0), 2)
    base = cv2.normalize(base, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return base


def _moving_rgb(n=12, shift=2, seed=0):
    tex = _texture(seed=seed)
    frames = [cv2.cvtColor(tex[5:45, 10 + t * shift: 58 + t * shift] if 58 + t * shift <= tex.shape[1]
                           else tex[5:45, :48], cv2.COLOR_GRAY2RGB) for t in range(n)]
    return np.stack(frames)


def _reference_u8(v, bound):
    """Independent linear map: np.interp over [-bound, bound] -> [0, 255] (clips outside)."""
    return np.rint(np.interp(v, [-bound, bound], [0.0, 255.0])).astype(np.uint8)


def test_quantize_is_linear_and_clipped():
    b = 20.0
    v = np.array([-100.0, -20.0, -10.0, 0.0, 0.1, 10.0, 19.9, 20.0, 35.0], np.float32)
    np.testing.assert_array_equal(quantize_flow(v, b), _reference_u8(v.astype(np.float64), b))
    assert quantize_flow(np.float32(-b), b) == 0 and quantize_flow(np.float32(b), b) == 255
    assert quantize_flow(np.float32(0.0), b) == 128   # 127.5 rounds to even
    rng = np.random.default_rng(1)
    x = rng.uniform(-30, 30, (64, 2)).astype(np.float32)
    np.testing.assert_array_equal(quantize_flow(x, 7.5), _reference_u8(x.astype(np.float64), 7.5))
    back = dequantize_flow(quantize_flow(x, 7.5), 7.5)
    assert np.all(np.abs(back - np.clip(x, -7.5, 7.5)) <= 7.5 / 255 + 1e-5)
    with pytest.raises(ValueError):
        quantize_flow(x, 0.0)


def test_flow_matches_direct_farneback_and_first_frame_rule():
    frames = _moving_rgb(10)
    out = compute_flow(frames, DEFAULT_FLOW_BOUND)
    assert out.shape == frames.shape[:3] + (2,) and out.dtype == np.uint8
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    for t in range(1, len(frames)):
        direct = cv2.calcOpticalFlowFarneback(gray[t - 1], gray[t], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        np.testing.assert_array_equal(out[t], _reference_u8(direct.astype(np.float64), 20.0))
    np.testing.assert_array_equal(out[0], out[1])      # frame 0 copies flow 1


def test_flow_sign_and_magnitude_of_a_known_shift():
    frames = _moving_rgb(4, shift=3)   # content moves 3 px to the left per frame
    out = compute_flow(frames, 20.0)
    centre = dequantize_flow(out[2, 12:28, 14:34], 20.0)
    assert np.median(centre[..., 0]) == pytest.approx(-3.0, abs=0.5)
    assert np.median(centre[..., 1]) == pytest.approx(0.0, abs=0.5)


def test_chunked_stream_equals_one_pass():
    frames = _moving_rgb(13)
    whole = compute_flow(frames)
    stream = FlowStream()
    parts = [stream.push(frames[:5]), stream.push(frames[5:6]), stream.push(frames[6:])]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError):
        FlowStream().push(frames[:1])
