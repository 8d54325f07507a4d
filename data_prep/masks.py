"""Tool/object segmentation masks aligned with the 10-FPS video frames (docs/design.md §1).

The paper made the masks with a federated segmentation model (RAH/RARP) or SAM 2
(JIGSAWS); we do not ship a segmenter. The user supplies, per sample, either

* a folder of per-frame PNGs, taken in natural filename order (frame_2 before
  frame_10). It must hold one PNG per frame of the *whole* source video, either at the
  source frame rate (count = video frames) or already at 10 FPS (count = 10-FPS frames);
  any other count is a mismatch. Time ranges index into the same numbering.
* a mask video, resampled to 10 FPS on the same grid as the RGB video (using its own
  frame rate); its 10-FPS frame count must equal the video's.

Representation (decided here). PNGs are lossless, so a single-channel PNG is kept as a
label map [size, size] uint8 (binary 0/1 or 0/255, or class ids; the extractor renders
it with its fixed palette), and a colour PNG as an already-rendered RGB mask
[size, size, 3] (an alpha channel is dropped). All PNGs of one folder must be of one
kind. A mask video is lossy (MJPG/H.264 blur label values), so its frames are always
taken as rendered RGB images. Resizing uses nearest neighbour (no blended labels).
"""

from __future__ import annotations

import os
import re
from typing import Iterator, Optional

import cv2
import numpy as np

from data_prep.common import PrepError
from data_prep.video import VideoStream, expected_frames, source_index

MISMATCH_FIX = ("fix: supply one mask per video frame (at the video's frame rate or at 10 FPS) "
                "or leave the masks out with --modalities=rgb,flow")


def natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_pngs(folder: str) -> list[str]:
    """PNG files of `folder` in natural order; PrepError when there are none."""
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(".png")), key=natural_key)
    if not names:
        raise PrepError(f"mask folder {folder!r} contains no .png files; fix: put one PNG per "
                        f"frame there, or point mask_path at a mask video.")
    return [os.path.join(folder, n) for n in names]


def read_png(path: str, size: Optional[int]) -> np.ndarray:
    """Label map uint8 [size, size] (1-channel PNG) or RGB uint8 [size, size, 3]."""
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise PrepError(f"mask image {path!r} cannot be read (corrupt or not a PNG); fix: "
                        f"re-export it.")
    if img.dtype != np.uint8:
        if img.dtype == np.uint16 and img.max() < 256:
            img = img.astype(np.uint8)
        else:
            raise PrepError(f"mask image {path!r} is {img.dtype} with values up to "
                            f"{img.max()}; fix: save masks as 8-bit PNGs (labels 0-255).")
    if size is not None and img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_NEAREST)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2RGB)
    return img


class MaskReader:
    """Hands out the mask of each 10-FPS frame k of `video`, in increasing k.

    Use `mask(k)` for every frame the video yields, then `finish()` once the video stream
    is exhausted; both raise PrepError when the mask and video frame counts differ.
    """

    def __init__(self, path: str, video: VideoStream, size: Optional[int]):
        if not os.path.exists(path):
            raise PrepError(f"mask path {path!r} does not exist; fix: correct mask_path, or "
                            f"leave the masks out with --modalities=rgb,flow.")
        self.path, self.video, self.size = path, video, size
        info = video.info
        self.n_src_hint = info.frame_count
        self.n10_hint = expected_frames(info.frame_count, info.fps, video.out_fps)
        self._stream: Optional[Iterator] = None
        self._mask_video: Optional[VideoStream] = None
        self._ndim: Optional[int] = None
        if os.path.isdir(path):
            self.files = list_pngs(path)
            n = len(self.files)
            if n == self.n_src_hint:
                self.mode = "source_rate"
            elif n == self.n10_hint:
                self.mode = "10fps"
            else:
                raise PrepError(
                    f"mask folder {path!r} has {n} PNGs but video {info.path!r} has "
                    f"{self.n_src_hint} frames ({self.n10_hint} at 10 FPS); {MISMATCH_FIX}.")
        else:
            self.mode = "video"
            self._mask_video = VideoStream(path, size=size, start_s=video.start_s,
                                           end_s=video.end_s, out_fps=video.out_fps,
                                           mask=True, what="mask video")
            mv = self._mask_video.info
            n10_mask = expected_frames(mv.frame_count, mv.fps, video.out_fps)
            if mv.frame_count and self.n_src_hint and n10_mask != self.n10_hint:
                raise PrepError(
                    f"mask video {path!r} has {mv.frame_count} frames at {mv.fps:g} FPS "
                    f"({n10_mask} at 10 FPS) but video {info.path!r} has {self.n_src_hint} "
                    f"at {info.fps:g} FPS ({self.n10_hint} at 10 FPS); {MISMATCH_FIX}.")
            self._stream = iter(self._mask_video)

    def _mismatch(self, detail: str) -> PrepError:
        return PrepError(f"mask {self.path!r} does not match video {self.video.path!r}: "
                         f"{detail}; {MISMATCH_FIX}.")

    def mask(self, k: int) -> np.ndarray:
        """Mask of 10-FPS frame k: label map [size, size] or RGB [size, size, 3] uint8."""
        if self._stream is not None:
            try:
                km, frame = next(self._stream)
            except StopIteration:
                raise self._mismatch(f"the mask video ends at 10-FPS frame {k} while the "
                                     f"video goes on") from None
            if km != k:  # both streams start at the same grid index; cannot differ
                raise self._mismatch(f"grid index {km} != {k}")
            return frame
        idx = k if self.mode == "10fps" else source_index(k, self.video.info.fps,
                                                          self.video.out_fps)
        if idx >= len(self.files):
            raise self._mismatch(f"frame {idx} needed but only {len(self.files)} PNGs")
        img = read_png(self.files[idx], self.size)
        if self._ndim is None:
            self._ndim = img.ndim
        elif img.ndim != self._ndim:
            raise PrepError(f"mask folder {self.path!r} mixes single-channel and colour PNGs "
                            f"({os.path.basename(self.files[idx])}); fix: export all masks of a "
                            f"video the same way.")
        return img

    def finish(self) -> None:
        """Final count check once the video stream is exhausted."""
        v = self.video
        if self._stream is not None:
            if v.eof:
                extra = next(self._stream, None)
                if extra is not None:
                    raise self._mismatch(f"the mask video has more frames than the video "
                                         f"({v.frames} at 10 FPS)")
            if hasattr(self._stream, "close"):
                self._stream.close()
            return
        if not v.eof:
            return  # stopped at end_s: only the indices used were checkable (in mask())
        n = len(self.files)
        if self.mode == "source_rate" and n != v.source_frames:
            raise self._mismatch(f"{n} PNGs but the video decodes to {v.source_frames} frames")
        if self.mode == "10fps" and n != v.k0 + v.frames:
            raise self._mismatch(f"{n} PNGs but the video gives {v.frames} frames at 10 FPS")
