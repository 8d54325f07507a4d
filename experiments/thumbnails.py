"""Fig. 4 thumbnails: the RGB frame, its optical flow and its tool mask at a time step.

The feature dataset holds features only, so the source files are found through the prep
inputs: a CSV manifest (`data_prep.manifest.read_manifest`; SynthSkill's manifest.csv,
RAH/RARP manifests), a JIGSAWS root (`data_prep.jigsaws.jigsaws_samples`), or a
'manifest' path in the dataset metadata. Frames are taken on the prep's own 10-FPS grid
(`data_prep.video.VideoStream`, with the sample's start_s for RAH phases), resized to
the dataset's image_size; the mask comes from `data_prep.masks.MaskReader` (mask video
or PNG folder, aligned like in the prep).

Time mapping: feature segment j covers 10-FPS frames [j L, (j+1) L) of the sample (L =
segment_length, 32); fusion stage s runs at 2^s segments per step (stage 1 at T/2,
stage 2 at T/4), so step t is shown by the frame at the middle of its segments,
k = (t + 1/2) 2^s L. The flow thumbnail is Farneback flow (`data_prep.flow.farneback`)
from frame k-1 to k (from k to k+1 at the very first frame, like the prep's first-frame
rule), drawn in the usual colour wheel: hue = direction, brightness = magnitude relative
to the frame's largest motions (at most the dataset's flow_bound), see `flow_to_rgb`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from data_prep.common import PrepError
from data_prep.flow import farneback, to_gray
from data_prep.jigsaws import jigsaws_samples
from data_prep.manifest import read_manifest
from data_prep.masks import MaskReader
from data_prep.video import VideoStream, grid_range
from surgfusion_jax import errors
from surgfusion_jax.data.feature_dataset import MODALITIES


class ThumbnailError(errors.UserError, RuntimeError):
    """The source video/mask of a sample cannot be read; the message says why."""


def find_specs(metadata: Mapping[str, Any], *, manifest: str | None = None,
               jigsaws_root: str | None = None, jigsaws_task: str | None = None,
               mask_root: str | None = None) -> dict[str, Any]:
    """{video_id: data_prep SampleSpec} of the source files; ThumbnailError if none."""
    modalities = tuple(metadata.get("modalities", MODALITIES))
    manifest = manifest or metadata.get("manifest")
    try:
        if manifest:
            specs = read_manifest(manifest, modalities=modalities)
        elif jigsaws_root:
            if not jigsaws_task:
                raise ThumbnailError("a JIGSAWS root needs the task (Suturing, Knot_Tying, ...)")
            specs = jigsaws_samples(jigsaws_root, jigsaws_task, modalities=modalities,
                                    mask_root=mask_root)
        else:
            raise ThumbnailError("the source videos are unknown: pass --manifest=<the CSV the "
                                 "features were prepared from> (or --jigsaws_root)")
    except PrepError as e:
        raise ThumbnailError(f"cannot read the prep inputs: {e}") from None
    return {s.video_id: s for s in specs}


def frame_index(step: int, stage: int, segment_length: int, num_segments: int) -> int:
    """10-FPS frame (from the sample's start) shown for fusion `stage` step `step`."""
    k = int((step + 0.5) * 2 ** stage * segment_length)
    return min(k, max(num_segments * segment_length - 1, 0))


def flow_to_rgb(flow: np.ndarray, bound: float, min_scale: float = 0.5) -> np.ndarray:
    """float [H, W, 2] flow -> uint8 RGB: hue = direction (red = rightwards), brightness =
    |flow| / s with s = the frame's 99th-percentile |flow| clipped to [min_scale, bound]
    pixels (small motions stay visible; a still frame stays dark)."""
    mag, ang = cv2.cartToPolar(flow[..., 0].astype(np.float32), flow[..., 1].astype(np.float32))
    scale = float(np.clip(np.percentile(mag, 99), min(min_scale, bound), bound))
    hsv = np.zeros(flow.shape[:2] + (3,), np.uint8)
    hsv[..., 0] = np.round(ang * 90.0 / math.pi).astype(np.int32) % 180  # OpenCV hue 0..179
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(mag / scale * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _mask_image(mask: np.ndarray) -> np.ndarray:
    if mask.ndim == 2 and mask.max() <= 1:
        return (mask * 255).astype(np.uint8)
    return mask


def read_frames(spec: Any, k: int, *, image_size: int, fps: float, flow_bound: float
                ) -> list[np.ndarray]:
    """[RGB, flow colour image, mask (when the sample has one)] at 10-FPS frame k."""
    k0 = grid_range(spec.start_s, spec.end_s, fps)[0]
    first = k0 + k - 1 if k > 0 else k0 + k
    try:
        stream = VideoStream(spec.video_path, size=image_size, start_s=first / fps,
                             end_s=(first + 2) / fps, out_fps=fps)
        masks = MaskReader(spec.mask_path, stream, image_size) if spec.mask_path else None
        frames, mask_frames = [], []
        for kk, frame in stream:
            frames.append(frame)
            if masks is not None:
                mask_frames.append(masks.mask(kk))
    except (PrepError, cv2.error, OSError) as e:
        raise ThumbnailError(f"{spec.video_id}: {e}") from None
    if len(frames) < 2:
        raise ThumbnailError(f"{spec.video_id}: {spec.video_path} ends before 10-FPS frame "
                             f"{k0 + k} (time {(k0 + k) / fps:.1f} s)")
    flow = farneback(to_gray(frames[0]), to_gray(frames[1]))
    shown = 1 if k > 0 else 0
    images = [frames[shown], flow_to_rgb(flow, flow_bound)]
    if mask_frames:
        images.append(_mask_image(mask_frames[shown]))
    return images


def thumbnails(spec: Any, steps: Sequence[int], stage: int, metadata: Mapping[str, Any],
               num_segments: int) -> list[tuple[int, list[np.ndarray]]]:
    """[(step, [rgb, flow, mask])] for `plots.plot_modality_weights(thumbnails=...)`."""
    if not os.path.exists(spec.video_path):
        raise ThumbnailError(f"video {spec.video_path!r} of {spec.video_id} not found")
    fps = float(metadata.get("fps", 10.0))
    size = int(metadata.get("image_size", 224))
    bound = float(metadata.get("flow_bound", 20.0))
    seg = int(metadata.get("segment_length", 32))
    return [(t, read_frames(spec, frame_index(t, stage, seg, num_segments), image_size=size,
                            fps=fps, flow_bound=bound)) for t in steps]
