"""Non-overlapping 32-frame segments of the 10-FPS frames (paper Sec. III-A.3, docs/design.md §1).

A video of n frames gives floor(n / 32) segments; segment j covers frames
[32 j, 32 j + 32). Each segment becomes one feature vector per modality.

Tail rule (decided here): the last n mod 32 frames (< 3.2 s) are dropped. Padding them
(repeating frames) would give the last feature a different temporal statistics from all
others; dropping at most 3.1 s of a minutes-long recording loses nothing the score depends
on. A sample with fewer than 32 frames has no segment and is reported as too short.

`SegmentBatcher` gathers streamed frames into chunks of whole segments (by default as
many as the feature extractor takes per batch) so that only one chunk is ever in memory.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from data_prep.common import SEGMENT_LENGTH


def num_segments(num_frames: int, length: int = SEGMENT_LENGTH) -> int:
    """Full segments in `num_frames` frames (the tail < length is dropped)."""
    return max(0, int(num_frames)) // length


def segment_bounds(num_frames: int, length: int = SEGMENT_LENGTH) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the segments."""
    return [(j * length, (j + 1) * length) for j in range(num_segments(num_frames, length))]


def split_segments(frames: np.ndarray, length: int = SEGMENT_LENGTH) -> np.ndarray:
    """[n, ...] frames -> [n // length, length, ...], tail dropped."""
    s = num_segments(len(frames), length)
    return frames[: s * length].reshape((s, length) + frames.shape[1:])


class SegmentBatcher:
    """Buffers per-frame arrays (one per stream key) into chunks of whole segments.

    `add(frame_dict)` returns a chunk dict of [batch_segments, length, ...] arrays when the
    buffer is full, else None; `flush()` returns the remaining whole segments (or None) and
    drops the tail. `frames` counts every frame added, `tail_frames` the dropped ones.
    """

    def __init__(self, length: int = SEGMENT_LENGTH, batch_segments: int = 8):
        if length < 1 or batch_segments < 1:
            raise ValueError("length and batch_segments must be >= 1")
        self.length, self.batch_segments = length, batch_segments
        self.capacity = length * batch_segments
        self._buf: Optional[dict[str, np.ndarray]] = None
        self._n = 0
        self.frames = 0
        self.segments = 0
        self.tail_frames = 0

    def add(self, item: Mapping[str, np.ndarray]) -> Optional[dict[str, np.ndarray]]:
        if self._buf is None:
            self._buf = {k: np.empty((self.capacity,) + np.shape(v), np.asarray(v).dtype)
                         for k, v in item.items()}
        for k, v in item.items():
            self._buf[k][self._n] = v
        self._n += 1
        self.frames += 1
        if self._n == self.capacity:
            return self._take(self.batch_segments)
        return None

    def flush(self) -> Optional[dict[str, np.ndarray]]:
        s = self._n // self.length
        self.tail_frames = self._n - s * self.length
        return self._take(s) if s else None

    def _take(self, segs: int) -> dict[str, np.ndarray]:
        n = segs * self.length
        out = {k: v[:n].reshape((segs, self.length) + v.shape[1:]).copy()
               for k, v in self._buf.items()}
        self._n = 0
        self.segments += segs
        return out
