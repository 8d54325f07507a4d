"""Per-segment I3D features for the three modalities (docs/design.md §1.5).

`I3DFeatureExtractor` turns uint8 segments [N, T, H, W, ...] (T = 32 in the prep stage)
into float32 [N, 1024] vectors: Mixed_5c of the Kinetics-400 I3D of `data_prep/i3d.py`
averaged over time and space. Preprocessing, done here with OpenCV:

* resize every frame so that its shorter side equals `image_size` (cv2.INTER_AREA when
  shrinking, cv2.INTER_LINEAR when enlarging; label masks cv2.INTER_NEAREST), then crop
  the centre `image_size` x `image_size` square;
* scale uint8 [0, 255] linearly to [-1, 1] (x / 127.5 - 1), the range I3D was trained on.

Flow (**decision**, `flow_mode`). Input: x and y flow, each mapped linearly from
[-bound, bound] to uint8 [0, 255] (the prep stage's encoding; 127.5 = no motion).
Flow vectors are not rescaled when the frame is resized: they stay in units of the
dataset's flow bound (recorded in the dataset metadata).
* 'colour' (default): the flow is colour-coded like the Middlebury / OpenCV
  visualisation, hue = direction, saturation = 1, value = min(1, |flow| / bound), and
  the RGB image enters the unchanged RGB network. Default because the network is frozen:
  this keeps both direction and magnitude visible to RGB filters.
* 'two_channel': the raw 2 channels in [-1, 1] enter a copy of the network whose first
  conv kernel is averaged over RGB and replicated to 2 channels, scaled by 3/2
  (`i3d.adapt_first_conv`). This is the I3D flow-stream input format and the standard
  cross-modality initialisation, but with frozen weights the replicated kernel sees only
  x + y: flows that differ by swapping x and y, or by any motion along the (1, -1)
  direction, give the same features. Use it to mirror the I3D flow input layout.

Masks: [N, T, H, W] integer label maps (binary 0/1 or 0/255, or class labels) are
resized with nearest neighbour and rendered with a fixed palette: 0 -> black, 1 and
255 -> white, label k in 2..254 -> a saturated colour with hue k * 0.618 turns (fixed,
so one label always gets one colour whatever else is in the batch). [N, T, H, W, 3]
masks are taken as already-rendered RGB images.

Compilation: the forward pass is jitted once per (input shape): every batch, the last
one included (zero-padded), has exactly `batch_size` clips, so calls with any N reuse
one compiled function per (T, image_size, channels). `trace_count` counts the traces.
"""

from __future__ import annotations

import colorsys
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from data_prep import i3d
from surgfusion_jax.data.feature_dataset import MODALITIES

FLOW_MODES = ("colour", "two_channel")
DEFAULT_FLOW_MODE = "colour"


def _resize_frame(frame: np.ndarray, size: int, interpolation: int | None) -> np.ndarray:
    """Shorter side -> `size`, then centre crop to size x size (one frame, [H, W(, C)])."""
    h, w = frame.shape[:2]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        if interpolation is None:
            interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        frame = cv2.resize(frame, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return frame[top:top + size, left:left + size]


def resize_clip(clip: np.ndarray, size: int, interpolation: int | None = None) -> np.ndarray:
    """[T, H, W(, C)] -> [T, size, size(, C)], same dtype; see the module docstring."""
    out = np.stack([_resize_frame(np.ascontiguousarray(f), size, interpolation) for f in clip])
    return out.reshape((clip.shape[0], size, size) + clip.shape[3:])


def to_unit_range(clip: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return clip.astype(np.float32) / 127.5 - 1.0


def flow_to_colour(flow: np.ndarray) -> np.ndarray:
    """uint8 flow [..., 2] (x, y; 127.5 = 0) -> float32 RGB [..., 3] in [0, 1] (HSV coding)."""
    uv = to_unit_range(flow)
    hue = (np.degrees(np.arctan2(uv[..., 1], uv[..., 0])) % 360.0).astype(np.float32)
    value = np.minimum(1.0, np.hypot(uv[..., 0], uv[..., 1])).astype(np.float32)
    hsv = np.stack([hue, np.ones_like(hue), value], axis=-1)
    flat = hsv.reshape(-1, 1, 3)  # cvtColor wants one 2-D image; the map is per pixel.
    return cv2.cvtColor(flat, cv2.COLOR_HSV2RGB).reshape(hsv.shape)


def mask_palette() -> np.ndarray:
    """uint8 [256, 3] RGB palette for label masks (see the module docstring)."""
    palette = np.zeros((256, 3), np.uint8)
    for k in range(2, 255):
        rgb = colorsys.hsv_to_rgb((k * 0.6180339887) % 1.0, 1.0, 1.0)
        palette[k] = np.round(np.asarray(rgb) * 255)
    palette[1] = palette[255] = 255
    return palette


class I3DFeatureExtractor:
    """Kinetics-400 I3D features (Mixed_5c, averaged over T, H, W) for rgb/flow/mask clips.

    Args:
      image_size: side of the square crop fed to I3D (224 as in Kinetics; smaller for
        quick runs, the features stay 1024-d at any size).
      batch_size: clips per forward pass; the last batch is zero-padded to it.
      flow_mode: 'colour' (default) or 'two_channel'; see the module docstring.
      dtype: computation dtype of the network (jnp.bfloat16 on GPU); outputs are float32.
    """

    backbone = "i3d_kinetics400"
    feature_dim = i3d.FEATURE_DIM

    def __init__(self, image_size: int = 224, batch_size: int = 8,
                 flow_mode: str = DEFAULT_FLOW_MODE, dtype: Any = jnp.float32):
        if flow_mode not in FLOW_MODES:
            raise ValueError(f"I3DFeatureExtractor: flow_mode must be one of {FLOW_MODES}, "
                             f"got {flow_mode!r}")
        if image_size < 1 or batch_size < 1:
            raise ValueError("I3DFeatureExtractor: image_size and batch_size must be >= 1, got "
                             f"{image_size} and {batch_size}")
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.flow_mode = flow_mode
        self.dtype = jnp.dtype(dtype)
        module, variables = i3d.load_pretrained(dtype=dtype)
        self._variables = variables
        self._flow_variables = (i3d.adapt_first_conv(variables, 2)
                                if flow_mode == "two_channel" else variables)
        self.trace_count = 0
        self._palette = mask_palette()

        def features(variables, clips):
            self.trace_count += 1  # runs only while tracing, i.e. once per compilation
            return module.apply(variables, clips)[1]

        self._forward = jax.jit(features)

    def metadata(self) -> dict:
        """Fields for the feature dataset's metadata."""
        return {"backbone": self.backbone, "image_size": self.image_size,
                "flow_mode": self.flow_mode, "feature_dtype": str(self.dtype)}

    # -- public API ---------------------------------------------------------------------
    def rgb(self, clips: np.ndarray) -> np.ndarray:
        """uint8 RGB [N, T, H, W, 3] -> float32 [N, 1024]."""
        clips = self._check(clips, "rgb", (5,), (3,))
        return self._run(clips, self._variables,
                         lambda c: to_unit_range(resize_clip(c, self.image_size)))

    def flow(self, clips: np.ndarray) -> np.ndarray:
        """uint8 flow [N, T, H, W, 2] (x, y mapped to [0, 255]) -> float32 [N, 1024]."""
        clips = self._check(clips, "flow", (5,), (2,))
        if self.flow_mode == "two_channel":
            prep = lambda c: to_unit_range(resize_clip(c, self.image_size))
        else:
            prep = lambda c: flow_to_colour(resize_clip(c, self.image_size)) * 2.0 - 1.0
        return self._run(clips, self._flow_variables, prep)

    def mask(self, clips: np.ndarray) -> np.ndarray:
        """uint8/bool label masks [N, T, H, W] or rendered masks [N, T, H, W, 3] -> [N, 1024]."""
        clips = self._check(clips, "mask", (4, 5), (3,))
        if clips.ndim == 5:
            prep = lambda c: to_unit_range(resize_clip(c, self.image_size))
        else:
            prep = lambda c: to_unit_range(
                self._palette[resize_clip(c, self.image_size, cv2.INTER_NEAREST)])
        return self._run(clips, self._variables, prep)

    def extract(self, modality: str, clips: np.ndarray) -> np.ndarray:
        """Dispatches to `rgb`, `flow` or `mask` by name."""
        if modality not in MODALITIES:
            raise ValueError(f"I3DFeatureExtractor.extract: modality must be one of "
                             f"{MODALITIES}, got {modality!r}")
        return getattr(self, modality)(clips)

    # -- internals ----------------------------------------------------------------------
    @staticmethod
    def _check(clips, name: str, ndims: tuple, channels: tuple) -> np.ndarray:
        clips = np.asarray(clips)
        if clips.dtype == np.bool_ and name == "mask":
            clips = clips.astype(np.uint8)
        if clips.dtype != np.uint8:
            raise TypeError(f"I3DFeatureExtractor.{name}: clips must be uint8 (0-255), got "
                            f"{clips.dtype}; convert frames with np.uint8 before extraction")
        shape_ok = clips.ndim in ndims and (clips.ndim == 4 or clips.shape[-1] in channels)
        if not shape_ok or clips.shape[0] == 0 or 0 in clips.shape[1:4]:
            want = " or ".join("[N, T, H, W]" if n == 4 else f"[N, T, H, W, {channels[0]}]"
                               for n in ndims)
            raise ValueError(f"I3DFeatureExtractor.{name}: expected non-empty {want}, got "
                             f"shape {clips.shape}")
        return clips

    def _run(self, clips: np.ndarray, variables: dict, prep) -> np.ndarray:
        out = []
        for start in range(0, clips.shape[0], self.batch_size):
            batch = np.stack([prep(c) for c in clips[start:start + self.batch_size]])
            n = batch.shape[0]
            if n < self.batch_size:  # pad so that every call has the compiled shape
                pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
                batch = np.concatenate([batch, pad])
            feats = self._forward(variables, jnp.asarray(batch, jnp.float32))
            out.append(np.asarray(feats[:n], np.float32))
        return np.concatenate(out)
