"""One video -> features with a trained run's own prep settings (`surgfusion_jax.predict --video`).

`featurize` is registered as the entry point `default` of the group
`surgfusion_jax.video_featurizers` (pyproject.toml), so the library loads it through
`importlib.metadata` and never imports the prep stage (docs/design.md §1.9).

The settings come from the run's dataset metadata (`<workdir>/dataset_metadata.json`,
docs/design.md §1.6): frame rate, segment length, decoded size, flow bound, flow input,
dtype and, per modality, the backbone and its checkpoint's SHA-256. The extractor is
rebuilt from them (`prepare.make_extractor`) and its identity must equal the recorded one
(`prepare.extractor_identity`), so the video's features are made exactly as the run's
training features were. The per-video work is the prep stage's own
(`pipeline.extract_sample`).

Backbone files (`--backbones` datasets) are looked up, per modality, in the `backbones`
argument (same syntax as the prep flag), then under `$SURGFUSION_BACKBONES_DIR` by file
name, then at the path recorded at prep time.

Thumbnails: while the clips pass to the extractor, the frame in the middle of every
`thumbnail_stride` segments is kept (downscaled), as the network saw it: the RGB frame,
the quantised flow in the I3D colour coding (`extractor.flow_to_colour`, brightness
stretched to the frame's largest motion) and the rendered mask. With stride 2^s these
are the frames of fusion stage s's time steps, those `experiments.thumbnails.frame_index`
picks for Fig. 4.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import cv2
import numpy as np

from data_prep import prepare
from data_prep.common import FPS, PREP_VERSION, SEGMENT_LENGTH, PrepError, SampleSpec
from data_prep.pipeline import extract_sample

BACKBONES_ENV = "SURGFUSION_BACKBONES_DIR"
I3D_CLASS = "data_prep.extractor.I3DFeatureExtractor"
BACKBONE_CLASS = "data_prep.extractor.BackboneExtractor"
THUMBNAIL_SIZE = 128


def _records(metadata: Mapping[str, Any]) -> dict:
    records = metadata.get("backbones") or {}
    return json.loads(records) if isinstance(records, str) else dict(records)


def _checkpoint(modality: str, record: Mapping[str, Any], given: Mapping[str, Any]) -> str:
    """Path of a modality's backbone file on this machine (module docstring)."""
    name, recorded = str(record.get("name")), str(record.get("checkpoint") or "")
    if modality in given and given[modality][1]:
        candidates = [given[modality][1]]
    else:
        env = os.environ.get(BACKBONES_ENV)
        candidates = ([os.path.join(env, os.path.basename(recorded))] if env else []) + [recorded]
    for path in candidates:
        # A TF checkpoint is a prefix of .index/.data files.
        if path and (os.path.exists(path) or os.path.exists(path + ".index")):
            return path
    raise PrepError(
        f"the run's {modality} features come from backbone {name} with checkpoint "
        f"{os.path.basename(recorded)!r} (SHA-256 {str(record.get('checkpoint_sha256'))[:12]}...), "
        f"not found on this machine (looked at {', '.join(repr(c) for c in candidates)}); fix: "
        f"pass --backbones={modality}:{name}=<path to that file> or put it in the folder "
        f"named by ${BACKBONES_ENV}.")


def extractor_for(metadata: Mapping[str, Any], *, backbones: Optional[str] = None,
                  batch_size: int = 8) -> Any:
    """The extractor that made the features of `metadata` (I3D stand-in or `--backbones`)."""
    ident = dict(metadata.get("extractor") or {})
    cls = ident.get("cls")
    image_size, bound = int(metadata["image_size"]), float(metadata["flow_bound"])
    dtype = ident.get("feature_dtype") or None
    if cls == I3D_CLASS:
        return prepare.make_extractor(image_size, batch_size, metadata.get("flow_mode") or None,
                                      dtype=dtype, flow_bound=bound)
    if cls == BACKBONE_CLASS:
        from data_prep.extractor import parse_backbones
        given = parse_backbones(backbones) if backbones else {}
        spec = ",".join(f"{m}:{r['name']}={_checkpoint(m, r, given)}"
                        for m, r in _records(metadata).items())
        return prepare.make_extractor(image_size, batch_size, backbones=spec, dtype=dtype,
                                      flow_bound=bound)
    raise PrepError(f"the run's features were made by extractor {cls or '(unrecorded)'!r}, "
                    f"which the prep stage cannot rebuild; fix: prepare the run's dataset with "
                    f"the default I3D or --backbones, or pass the extractor to featurize().")


def check_identity(extractor: Any, metadata: Mapping[str, Any]) -> None:
    """PrepError unless `extractor` makes the features the run was trained on."""
    want = dict(metadata.get("extractor") or {})
    have = prepare.extractor_identity(extractor)
    diffs = [f"{k}: run {want.get(k)!r} vs here {have.get(k)!r}"
             for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diffs:
        hint = ("the backbone checkpoint differs from the run's; fix: point --backbones or "
                f"${BACKBONES_ENV} at the file the run used" if any("backbones" in d for d in diffs)
                else "fix: install the package versions the run was prepared with")
        raise PrepError(f"this machine's feature extractor differs from the run's "
                        f"({'; '.join(d[:200] for d in diffs[:3])}); {hint}.")


class _Thumbnails:
    """Passes clips on to the extractor and keeps one frame per `stride` segments."""

    def __init__(self, extractor: Any, stride: int, size: int = THUMBNAIL_SIZE):
        from data_prep.extractor import flow_to_colour, mask_palette
        self._extractor, self._stride, self._size = extractor, int(stride), int(size)
        self._flow_to_colour, self._palette = flow_to_colour, mask_palette()
        middle = self._stride * SEGMENT_LENGTH // 2
        self._segment, self._offset = divmod(middle, SEGMENT_LENGTH)
        self._seen: dict[str, int] = {}
        self.steps: dict[int, dict[str, np.ndarray]] = {}

    def _image(self, modality: str, frame: np.ndarray) -> np.ndarray:
        nearest = modality == "mask"
        if modality == "flow":
            # Brightness = |flow| / bound is dark for small motions: stretch it so the
            # frame's largest motion is full (down to 1/40 of the bound: still stays dark).
            colour = self._flow_to_colour(frame)
            colour = colour / max(float(colour.max()), 0.025)
            frame = np.rint(np.clip(colour, 0, 1) * 255).astype(np.uint8)
        elif modality == "mask" and frame.ndim == 2:
            frame = self._palette[frame]
        h, w = frame.shape[:2]
        scale = min(1.0, self._size / max(h, w))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return cv2.resize(frame, size, interpolation=cv2.INTER_NEAREST if nearest
                          else cv2.INTER_AREA) if scale < 1 else frame

    def _keep(self, modality: str, clips: np.ndarray) -> None:
        start = self._seen.get(modality, 0)
        self._seen[modality] = start + len(clips)
        for j, clip in enumerate(clips):
            step, within = divmod(start + j, self._stride)
            if within == self._segment:
                frame = clip[self._offset]
            elif within == 0 and modality not in self.steps.get(step, {}):
                frame = clip[len(clip) // 2]  # a short last step has no middle segment
            else:
                continue
            self.steps.setdefault(step, {})[modality] = self._image(modality, frame)

    def __getattr__(self, modality: str):
        if modality not in ("rgb", "flow", "mask"):
            raise AttributeError(modality)

        def run(clips):
            self._keep(modality, np.asarray(clips))
            return getattr(self._extractor, modality)(clips)
        return run


def featurize(video: str, *, metadata: Mapping[str, Any],
              modalities: Optional[Sequence[str]] = None, masks: Optional[str] = None,
              start_s: Optional[float] = None, end_s: Optional[float] = None,
              backbones: Optional[str] = None, thumbnail_stride: int = 4,
              batch_size: int = 8, extractor: Any = None) -> dict[str, Any]:
    """Features of one video (or its [start_s, end_s) range) as the run's prep made them.

    Returns {'features': {modality: float32 [T, D]}, 'num_segments': T, 'num_frames': n,
    'thumbnails': [(step, {modality: uint8 image})]}; PrepError (a UserError) names the
    file and the fix when the video, masks or backbone files are unusable.
    """
    modalities = tuple(modalities or metadata["modalities"])
    missing = [m for m in modalities if m not in metadata["modalities"]]
    if missing:
        raise PrepError(f"the run's dataset has no {missing} features; fix: score with the "
                        f"run's modalities {list(metadata['modalities'])}.")
    if "mask" in modalities and not masks:
        raise PrepError(f"the run uses tool masks (modalities {list(modalities)}); fix: pass "
                        f"--masks=<folder of per-frame PNGs or a mask video> for {video!r}.")
    settings = dict(prep_version=(str(metadata.get("prep_version")), PREP_VERSION),
                    fps=(float(metadata["fps"]), FPS),
                    segment_length=(int(metadata["segment_length"]), SEGMENT_LENGTH))
    for key, (run_value, here) in settings.items():
        if run_value != here:
            raise PrepError(f"the run's features were prepared with {key}={run_value}, this "
                            f"data_prep uses {here}; fix: install the surgfusion-jax version "
                            f"that prepared the run.")
    if not os.path.isfile(video):
        raise PrepError(f"--video={video!r} does not exist; fix: give the path of a video file.")
    if extractor is None:
        extractor = extractor_for(metadata, backbones=backbones, batch_size=batch_size)
    check_identity(extractor, metadata)
    spec = SampleSpec(video_id=os.path.basename(video), video_path=video, score=0.0,
                      surgeon_id="", mask_path=masks, start_s=start_s, end_s=end_s)
    recorder = _Thumbnails(extractor, thumbnail_stride)
    arrays = extract_sample(spec, recorder, modalities=modalities,
                            image_size=int(metadata["image_size"]),
                            flow_bound=float(metadata["flow_bound"]),
                            batch_segments=int(getattr(extractor, "batch_size", batch_size)),
                            feature_dim=int(metadata.get("feature_dim") or 0) or None)
    return dict(features={m: arrays[m] for m in modalities},
                num_segments=int(arrays["num_segments"]), num_frames=int(arrays["num_frames"]),
                thumbnails=sorted(recorder.steps.items()))
