"""Farneback optical flow between consecutive 10-FPS frames (paper Sec. III-A.3, docs/design.md §1).

Flow is computed with `cv2.calcOpticalFlowFarneback` on the grayscale versions of the
resized (image_size x image_size) 10-FPS RGB frames, so displacements are in pixels of
the network input.

Scaling (decided here): each component (x and y separately) is clipped to
[-bound, +bound] pixels with bound = 20 (`DEFAULT_FLOW_BOUND`, recorded in the dataset
metadata as `flow_bound`) and mapped linearly to uint8:
    u8 = rint((clip(v, -bound, bound) + bound) * 255 / (2 * bound))
so -bound -> 0, 0 -> 128 (127.5 rounded to even), +bound -> 255. At 10 FPS and
224 px, instrument motion rarely exceeds 20 px per frame; larger values saturate.

First frame (decided here): flow frame t (t >= 1) is the flow from frame t-1 to frame t.
Frame 0 has no predecessor, so it gets a copy of flow frame 1. The flow sequence thus has
exactly as many frames as the RGB sequence (the paper's counts, 2 maps per frame minus
one per video, show N-1 flows per video; replicating the first keeps the 32-frame
segments of RGB, flow and masks aligned without an artificial zero-motion frame).

`FlowStream` keeps the last grayscale frame between chunks, so a long video is processed
chunk by chunk with results identical to one pass over the whole video.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

DEFAULT_FLOW_BOUND = 20.0
# OpenCV's classic Farneback settings (pyramid 0.5 x 3 levels, 15 px window).
FARNEBACK_PARAMS = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5,
                        poly_sigma=1.2, flags=0)
FIRST_FRAME_RULE = "copy_of_second"


def farneback(prev_gray: np.ndarray, gray: np.ndarray) -> np.ndarray:
    """float32 [H, W, 2] displacement (x, y) in pixels from `prev_gray` to `gray`."""
    p = FARNEBACK_PARAMS
    return cv2.calcOpticalFlowFarneback(prev_gray, gray, None, p["pyr_scale"], p["levels"],
                                        p["winsize"], p["iterations"], p["poly_n"],
                                        p["poly_sigma"], p["flags"])


def quantize_flow(flow: np.ndarray, bound: float = DEFAULT_FLOW_BOUND) -> np.ndarray:
    """Clip each component to +-bound px and map [-bound, bound] linearly to uint8 [0, 255]."""
    if bound <= 0:
        raise ValueError(f"flow bound must be positive, got {bound}")
    flow = np.asarray(flow, np.float64)   # float64 so rounding never depends on float32 noise
    scaled = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2.0 * bound))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def dequantize_flow(flow_u8: np.ndarray, bound: float = DEFAULT_FLOW_BOUND) -> np.ndarray:
    """Inverse of `quantize_flow` (up to the quantisation step 2*bound/255)."""
    return flow_u8.astype(np.float32) * (2.0 * bound / 255.0) - bound


def to_gray(frame_rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2GRAY)


class FlowStream:
    """Turns consecutive chunks of RGB frames into quantised flow, one flow per frame."""

    def __init__(self, bound: float = DEFAULT_FLOW_BOUND):
        self.bound = float(bound)
        self._prev: Optional[np.ndarray] = None

    def push(self, frames_rgb: np.ndarray) -> np.ndarray:
        """uint8 [n, H, W, 3] -> uint8 [n, H, W, 2]; the very first chunk needs n >= 2."""
        n = len(frames_rgb)
        if n == 0:
            return np.zeros((0,) + frames_rgb.shape[1:3] + (2,), np.uint8)
        first = self._prev is None
        if first and n < 2:
            raise ValueError("the first chunk of a flow stream needs at least 2 frames")
        out = np.empty(frames_rgb.shape[:3] + (2,), np.uint8)
        prev = self._prev
        for t in range(n):
            gray = to_gray(frames_rgb[t])
            if prev is not None:
                out[t] = quantize_flow(farneback(prev, gray), self.bound)
            prev = gray
        if first:
            out[0] = out[1]
        self._prev = prev
        return out


def compute_flow(frames_rgb: np.ndarray, bound: float = DEFAULT_FLOW_BOUND) -> np.ndarray:
    """Quantised flow of a whole (short) RGB sequence, uint8 [n, H, W, 2]."""
    return FlowStream(bound).push(frames_rgb)
