"""Video decoding and resampling to 10 FPS with OpenCV (paper Sec. III-A.3, docs/design.md §1).

Frames are streamed one at a time: a `VideoStream` never holds more than the current
frame, so a 30-minute video costs the same memory as a 10-second one.

Resampling rule (decided here). The 10-FPS frame k sits at time t_k = k / 10 s on a grid
anchored at the start of the file; it is the source frame nearest to t_k,
`i = floor(k * src_fps / 10 + 0.5)` (30 Hz -> every 3rd frame, 60 Hz -> every 6th,
25 Hz -> 0,3,5,8,10,...; sources below 10 FPS repeat frames). A time range
[start_s, end_s) keeps the grid frames with start_s <= t_k < end_s, so the phases of
one video share one grid. Frames that are skipped are only `grab()`bed, not converted.

Resizing (decided here): the whole frame is resized to `size` x `size` (no crop, so
instruments at the border stay in view), with INTER_AREA for images and INTER_NEAREST
for masks. Colour frames come out RGB uint8.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator, Optional

import cv2
import numpy as np

from data_prep.common import FPS, PrepError

# A file that decodes fewer frames than its container announces, by more than this
# fraction (and more than 2 frames), is reported as truncated/corrupt; the slack covers
# containers that announce approximate counts (duration x rate).
TRUNCATION_TOLERANCE = 0.02
REENCODE_HINT = "fix: re-encode it (e.g. `ffmpeg -i in.mp4 -c:v libx264 out.mp4`) or remove it"


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container announces; `frame_count` is a hint until the file is decoded."""

    path: str
    fps: float
    frame_count: int
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps


def source_index(k: int, src_fps: float, out_fps: float = FPS) -> int:
    """Index of the source frame shown as output frame k (nearest to t = k / out_fps)."""
    return int(math.floor(k * src_fps / out_fps + 0.5))


def grid_range(start_s: Optional[float], end_s: Optional[float],
               out_fps: float = FPS) -> tuple[int, Optional[int]]:
    """Output-grid indices [k0, k1) with start_s <= k / out_fps < end_s (k1 None = open)."""
    k0 = 0 if start_s is None else max(0, int(math.ceil(start_s * out_fps - 1e-6)))
    k1 = None if end_s is None else max(k0, int(math.ceil(end_s * out_fps - 1e-6)))
    return k0, k1


def expected_frames(n_src: int, src_fps: float, out_fps: float = FPS,
                    start_s: Optional[float] = None, end_s: Optional[float] = None) -> int:
    """Number of output frames a file of `n_src` source frames yields (closed form)."""
    if n_src <= 0:
        return 0
    # k is kept while source_index(k) <= n_src - 1.
    k_end = int(math.floor(((n_src - 1) + 0.5) * out_fps / src_fps - 1e-9)) + 1
    while source_index(k_end, src_fps, out_fps) <= n_src - 1:   # guard float edge cases
        k_end += 1
    while k_end > 0 and source_index(k_end - 1, src_fps, out_fps) > n_src - 1:
        k_end -= 1
    k0, k1 = grid_range(start_s, end_s, out_fps)
    stop = k_end if k1 is None else min(k_end, k1)
    return max(0, stop - k0)


def probe(path: str, what: str = "video") -> VideoInfo:
    """Opens `path` and reads its frame rate, frame count and size; PrepError if unusable."""
    if not os.path.isfile(path):
        raise PrepError(f"{what} file {path!r} does not exist; fix: correct the path (manifest "
                        f"paths are relative to the manifest's folder) or remove the sample.")
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise PrepError(f"{what} file {path!r} cannot be opened by OpenCV (unknown or "
                            f"corrupt format); {REENCODE_HINT}.")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    finally:
        cap.release()
    if not math.isfinite(fps) or fps <= 0 or fps > 1000:
        raise PrepError(f"{what} file {path!r} reports no usable frame rate ({fps}); "
                        f"{REENCODE_HINT} with an explicit rate (`-r 30`).")
    return VideoInfo(path=path, fps=fps, frame_count=max(count, 0), width=width, height=height)


class VideoStream:
    """Iterates (k, frame) over the 10-FPS grid of one file, decoding lazily.

    Args:
      path: video file.
      size: output side length (frames resized to size x size); None keeps the size.
      start_s, end_s: optional time range [start_s, end_s) in seconds.
      out_fps: output frame rate (10).
      mask: resize with INTER_NEAREST (label maps / masks) instead of INTER_AREA.
      what: name used in error messages ("video", "mask video").

    After iteration: `source_frames` = source frames read, `eof` = whether the file
    ended (rather than the time range). A file that fails to open raises PrepError; one
    that stops far before its announced length raises PrepError (truncated/corrupt).
    """

    def __init__(self, path: str, *, size: Optional[int] = None, start_s: Optional[float] = None,
                 end_s: Optional[float] = None, out_fps: float = FPS, mask: bool = False,
                 what: str = "video"):
        self.info = probe(path, what)
        self.path, self.size, self.out_fps, self.what = path, size, out_fps, what
        self.start_s, self.end_s = start_s, end_s
        self.k0, self.k1 = grid_range(start_s, end_s, out_fps)
        self.interpolation = cv2.INTER_NEAREST if mask else cv2.INTER_AREA
        self.source_frames = 0
        self.frames = 0
        self.eof = False

    def expected_frames(self) -> int:
        """Output frames expected from the announced frame count (a hint)."""
        return expected_frames(self.info.frame_count, self.info.fps, self.out_fps,
                               self.start_s, self.end_s)

    def _convert(self, frame: np.ndarray) -> np.ndarray:
        if self.size is not None and frame.shape[:2] != (self.size, self.size):
            frame = cv2.resize(frame, (self.size, self.size), interpolation=self.interpolation)
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        cap = cv2.VideoCapture(self.path)
        if not cap.isOpened():
            raise PrepError(f"{self.what} file {self.path!r} cannot be opened; {REENCODE_HINT}.")
        src_fps = self.info.fps
        self.source_frames, self.frames, self.eof = 0, 0, False
        k, pos, cur_idx, cur = self.k0, 0, -1, None
        try:
            while self.k1 is None or k < self.k1:
                target = source_index(k, src_fps, self.out_fps)
                if target != cur_idx:
                    while pos < target:
                        if not cap.grab():
                            self.eof = True
                            break
                        pos += 1
                    if self.eof:
                        break
                    ok, frame = cap.read()
                    if not ok or frame is None:
                        self.eof = True
                        break
                    pos += 1
                    cur_idx, cur = target, self._convert(frame)
                self.source_frames = pos
                self.frames += 1
                yield k, cur
                k += 1
        finally:
            self.source_frames = pos
            cap.release()
        if self.eof:
            self._check_complete()

    def _check_complete(self) -> None:
        hint, got = self.info.frame_count, self.source_frames
        if hint > 0 and hint - got > max(2, TRUNCATION_TOLERANCE * hint):
            raise PrepError(f"{self.what} file {self.path!r} stopped decoding after {got} of "
                            f"{hint} frames (truncated or corrupt); {REENCODE_HINT}.")
        if self.end_s is not None:
            length = got / self.info.fps
            if self.end_s > length + 1.0 / self.out_fps:
                raise PrepError(
                    f"{self.what} file {self.path!r} is {length:.2f} s long but the sample asks "
                    f"for end_s={self.end_s}; fix: correct end_s (or start_s) in the manifest.")
