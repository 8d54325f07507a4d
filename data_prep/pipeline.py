"""Features of one sample: decode -> 10 FPS -> flow -> 32-frame segments -> backbone
(docs/design.md §1).

Streaming: frames are decoded one by one, buffered into a chunk of whole segments
(`batch_segments` x 32 frames, by default the extractor's batch size), turned into
flow and fed to the extractor chunk by chunk, and dropped. Memory is therefore bounded by
one chunk (8 x 32 x 224 x 224 x (3 + 2 + 3) bytes, about 100 MB) whatever the video
length. The flow state (last grayscale frame) is carried between chunks, so the result is
identical to a one-pass computation.

The extractor is any object with `rgb`, `flow` and `mask` methods mapping uint8
[N, 32, H, W, 3] / [N, 32, H, W, 2] / [N, 32, H, W] or [N, 32, H, W, 3] (label maps or
rendered masks, see `masks.py`) to float32 [N, feature_dim]
(`data_prep.extractor.I3DFeatureExtractor` by default, `BackboneExtractor` for the paper's
backbones chosen per modality with `--backbones`; tests inject a stand-in).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import numpy as np

from data_prep.common import FPS, SEGMENT_LENGTH, PrepError, SampleSpec
from data_prep.flow import FlowStream
from data_prep.masks import MaskReader
from data_prep.segments import SegmentBatcher
from data_prep.video import VideoStream


@dataclasses.dataclass
class StageTimes:
    """Seconds spent per stage and 10-FPS frames processed (for throughput reports)."""

    decode_s: float = 0.0
    flow_s: float = 0.0
    features_s: float = 0.0
    frames: int = 0

    def add(self, other: "StageTimes") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def rates(self) -> dict[str, float]:
        """frames/s per stage and for the three stages together."""
        def rate(s):
            return round(self.frames / s, 2) if s > 0 else None
        total = self.decode_s + self.flow_s + self.features_s
        return dict(frames=self.frames, decode_fps=rate(self.decode_s),
                    flow_fps=rate(self.flow_s), features_fps=rate(self.features_s),
                    stages_fps=rate(total))


def _features(fn, x: np.ndarray, modality: str, n: int, feature_dim: Optional[int]) -> np.ndarray:
    out = np.asarray(fn(x), np.float32)
    if out.ndim != 2 or out.shape[0] != n or (feature_dim and out.shape[1] != feature_dim):
        raise RuntimeError(f"extractor.{modality} returned shape {out.shape} for {n} clips; "
                           f"expected [{n}, {feature_dim or 'feature_dim'}]")
    if not np.all(np.isfinite(out)):
        raise RuntimeError(f"extractor.{modality} returned NaN/inf features")
    return out


def extract_sample(spec: SampleSpec, extractor: Any, *, modalities: Sequence[str],
                   image_size: int, flow_bound: float,
                   segment_length: int = SEGMENT_LENGTH, batch_segments: int = 8,
                   feature_dim: Optional[int] = None, times: Optional[StageTimes] = None,
                   progress: Any = None) -> dict[str, np.ndarray]:
    """Returns {modality: float32 [num_segments, D], 'num_frames': int, 'num_segments': int}.

    Raises PrepError for unreadable/corrupt/too-short inputs and mask mismatches.
    `progress` is an optional tqdm bar (updated with frames, postfix = current stage).
    """
    times = times if times is not None else StageTimes()
    video = VideoStream(spec.video_path, size=image_size, start_s=spec.start_s,
                        end_s=spec.end_s, out_fps=FPS)
    masks = MaskReader(spec.mask_path, video, image_size) if "mask" in modalities else None
    if progress is not None:
        progress.reset(total=video.expected_frames() or None)
    flow = FlowStream(flow_bound) if "flow" in modalities else None
    batcher = SegmentBatcher(segment_length, batch_segments)
    feats: dict[str, list[np.ndarray]] = {m: [] for m in modalities}

    def stage(name: str) -> None:
        if progress is not None:
            progress.set_postfix_str(name, refresh=False)

    def run(chunk: dict[str, np.ndarray]) -> None:
        n = chunk["rgb"].shape[0]
        if flow is not None:
            stage("flow")
            t0 = time.perf_counter()
            frames = chunk["rgb"].reshape((-1,) + chunk["rgb"].shape[2:])
            flows = flow.push(frames).reshape(chunk["rgb"].shape[:4] + (2,))
            times.flow_s += time.perf_counter() - t0
        stage("features")
        t0 = time.perf_counter()
        if "rgb" in modalities:
            feats["rgb"].append(_features(extractor.rgb, chunk["rgb"], "rgb", n, feature_dim))
        if flow is not None:
            feats["flow"].append(_features(extractor.flow, flows, "flow", n, feature_dim))
        if masks is not None:
            feats["mask"].append(_features(extractor.mask, chunk["mask"], "mask", n, feature_dim))
        times.features_s += time.perf_counter() - t0
        if progress is not None:
            progress.update(n * segment_length)
        stage("decode")

    frames = iter(video)
    stage("decode")
    try:
        while True:
            t0 = time.perf_counter()
            try:
                k, frame = next(frames)
            except StopIteration:
                times.decode_s += time.perf_counter() - t0
                break
            item = {"rgb": frame}
            if masks is not None:
                item["mask"] = masks.mask(k)
            times.decode_s += time.perf_counter() - t0
            times.frames += 1
            chunk = batcher.add(item)
            if chunk is not None:
                run(chunk)
        if masks is not None:
            masks.finish()
        if batcher.frames < segment_length:
            raise PrepError(
                f"video {spec.video_path!r}" + (f" [{spec.start_s}-{spec.end_s} s]"
                                                if spec.start_s or spec.end_s else "") +
                f" gives only {batcher.frames} frames at {FPS:g} FPS; a sample needs at least "
                f"one {segment_length}-frame segment ({segment_length / FPS:g} s); fix: check "
                f"the file or the time range, or remove the sample.")
        chunk = batcher.flush()
        if chunk is not None:
            run(chunk)
    finally:
        if hasattr(frames, "close"):
            frames.close()
    out: dict[str, Any] = {m: np.concatenate(v, axis=0) for m, v in feats.items()}
    out["num_frames"] = np.int64(batcher.frames)
    out["num_segments"] = np.int64(batcher.segments)
    return out
