"""Video Swin Transformer (Liu et al., CVPR 2022) in Flax linen, inference only.

The paper extracts RGB and mask features with a Kinetics-pretrained Video Swin
(§III-B.4); MAQA's extraction uses `swin_base_patch244_window877_kinetics600_22k`. This
module is the network of the official release (and of torchvision's `swin3d_t/s/b`, which
ports those weights), channels last:

  clip [B, T, H, W, 3] -> patch embedding (Conv 2x4x4 / 2x4x4, LayerNorm)
    -> 4 stages of Swin blocks (window 8x7x7, shifted by half a window in every second
       block), patch merging (2x2 spatial, LayerNorm, Linear 4C -> 2C) between stages
    -> LayerNorm -> mean over time and space = `features` [B, 8C] -> Linear = `logits`.

A block is `x + Attn(LN(x))`, then `x + MLP(LN(x))` (MLP ratio 4, exact GELU, LayerNorm
eps 1e-5). The attention runs inside non-overlapping windows with a learned relative
position bias; both reference implementations share three details that we reproduce
exactly, because the weights were trained with them:
* a window larger than the feature map is clipped to it, and no shift is applied along
  that axis;
* the map is zero-padded (after LN) to a multiple of the window; padded tokens take part
  in the attention of unshifted windows, and in shifted windows they belong to the last
  region of the -100 attention mask;
* with a clipped window of N tokens the bias is `table[index[:N, :N]]`, the first N rows
  and columns of the index built for the full window (not the index of the smaller
  window).

Parameter tree (ours): `patch_embed_proj`, `patch_embed_norm`, `stage_<i>_block_<j>/
{norm1, attn/{qkv, proj, relative_position_bias_table}, norm2, fc1, fc2}`,
`stage_<i>_merge/{norm, reduction}`, `norm`, `head`. `convert_state_dict` maps the
official (`backbone.layers.N.blocks.M...`, `cls_head.fc_cls`) and the torchvision
(`features.N.M...`, `head`) names onto it, and `config_from_state_dict` reads the
architecture (width, depths, heads, window, patch, classes) from the tensor shapes.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LN_EPS = 1e-5
MASK_VALUE = -100.0   # the references' value for tokens of different shifted regions


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """Architecture of one Video Swin network."""

    embed_dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    window_size: tuple = (8, 7, 7)
    patch_size: tuple = (2, 4, 4)
    mlp_ratio: float = 4.0
    num_classes: int = 400
    in_channels: int = 3
    patch_norm: bool = True

    @property
    def feature_dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


# torchvision's / the official release's standard sizes (Video Swin paper, Table 1).
STANDARD = {
    "swin3d_t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin3d_s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin3d_b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


def clipped_window(size: Sequence[int], window: Sequence[int],
                   shift: Sequence[int]) -> tuple[tuple, tuple]:
    """Window and shift along (T, H, W) for a map of `size` (see the module docstring)."""
    w, s = list(window), list(shift)
    for i in range(3):
        if size[i] <= window[i]:
            w[i], s[i] = size[i], 0
    return tuple(w), tuple(s)


def relative_position_index(window: Sequence[int]) -> np.ndarray:
    """[N, N] index into the bias table for the full window (N = Wd*Wh*Ww)."""
    coords = np.stack(np.meshgrid(*[np.arange(w) for w in window], indexing="ij"))
    flat = coords.reshape(3, -1)
    rel = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0)
    rel = rel + np.asarray(window) - 1
    wd, wh, ww = window
    return rel[..., 0] * (2 * wh - 1) * (2 * ww - 1) + rel[..., 1] * (2 * ww - 1) + rel[..., 2]


def shift_mask(padded: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> np.ndarray:
    """[num_windows, N, N] additive mask (0 or -100) of the shifted windows."""
    regions = np.zeros(tuple(padded), np.int32)
    count = 0
    spans = [((0, -window[i]), (-window[i], -shift[i]), (-shift[i], None)) for i in range(3)]
    for d, h, w in itertools.product(*spans):
        regions[d[0]:d[1], h[0]:h[1], w[0]:w[1]] = count
        count += 1
    win = _partition_np(regions[None, ..., None], window)[..., 0]   # [nW, N]
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, MASK_VALUE, 0.0).astype(np.float32)


def _partition_np(x: np.ndarray, window: Sequence[int]) -> np.ndarray:
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def _partition(x: jax.Array, window: Sequence[int]) -> jax.Array:
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def _reverse(windows: jax.Array, window: Sequence[int], b: int, d: int, h: int,
             w: int) -> jax.Array:
    wd, wh, ww = window
    x = windows.reshape(b, d // wd, h // wh, w // ww, wd, wh, ww, -1)
    return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with the relative position bias."""

    dim: int
    num_heads: int
    window_size: tuple
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, windows: jax.Array, n_tokens: int,
                 mask: Optional[np.ndarray]) -> jax.Array:
        wd, wh, ww = self.window_size
        table = self.param("relative_position_bias_table", nn.initializers.normal(0.02),
                           ((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), self.num_heads))
        index = relative_position_index(self.window_size)[:n_tokens, :n_tokens]
        bias = jnp.take(table, jnp.asarray(index.reshape(-1)), axis=0)
        bias = bias.reshape(n_tokens, n_tokens, self.num_heads).transpose(2, 0, 1)

        bw, n, c = windows.shape
        head_dim = c // self.num_heads
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(windows)
        qkv = qkv.reshape(bw, n, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (head_dim ** -0.5), qkv[1], qkv[2]
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) + bias[None]
        if mask is not None:
            nw = mask.shape[0]
            logits = (logits.reshape(bw // nw, nw, self.num_heads, n, n)
                      + jnp.asarray(mask)[None, :, None])
            logits = logits.reshape(bw, self.num_heads, n, n)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bhkd->bqhd", weights, v).reshape(bw, n, c)
        return nn.Dense(c, dtype=self.dtype, name="proj")(out)


class SwinBlock(nn.Module):
    """`x + W-MSA(LN(x))`, `x + MLP(LN(x))` on [B, D, H, W, C]; shifted when `shifted`."""

    dim: int
    num_heads: int
    window_size: tuple
    shifted: bool
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, d, h, w, c = x.shape
        half = tuple(s // 2 for s in self.window_size) if self.shifted else (0, 0, 0)
        window, shift = clipped_window((d, h, w), self.window_size, half)
        y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm1")(x)
        pads = [(-n) % wn for n, wn in zip((d, h, w), window)]
        y = jnp.pad(y, ((0, 0), (0, pads[0]), (0, pads[1]), (0, pads[2]), (0, 0)))
        padded = (d + pads[0], h + pads[1], w + pads[2])
        mask = None
        if any(shift):
            y = jnp.roll(y, tuple(-s for s in shift), axis=(1, 2, 3))
            mask = shift_mask(padded, window, shift)
        n_tokens = window[0] * window[1] * window[2]
        attn = WindowAttention(self.dim, self.num_heads, tuple(self.window_size),
                               dtype=self.dtype, name="attn")
        y = _reverse(attn(_partition(y, window), n_tokens, mask), window, b, *padded)
        if any(shift):
            y = jnp.roll(y, shift, axis=(1, 2, 3))
        x = x + y[:, :d, :h, :w].astype(x.dtype)
        y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm2")(x)
        y = nn.Dense(int(c * self.mlp_ratio), dtype=self.dtype, name="fc1")(y)
        y = nn.Dense(c, dtype=self.dtype, name="fc2")(nn.gelu(y, approximate=False))
        return x + y.astype(x.dtype)


class PatchMerging(nn.Module):
    """2x2 spatial neighbours concatenated (order x00, x10, x01, x11), LN, Linear 4C -> 2C."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, w = x.shape[2], x.shape[3]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2],
                             x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], axis=-1)
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(x)
        return nn.Dense(2 * self.dim, use_bias=False, dtype=self.dtype, name="reduction")(x)


class SwinTransformer3D(nn.Module):
    """Video Swin; `__call__(clip [B, T, H, W, C])` -> {'features' [B, 8C], 'logits' [B, K]}.

    The clip must already be preprocessed (`data_prep.backbones.preprocess`). `dtype` is
    the computation dtype (bfloat16 on GPU): parameters stay float32, and the attention
    softmax, the final pooling and the head run in float32. `logits` is left out when the
    checkpoint has no classification head (num_classes = 0).
    """

    config: SwinConfig = SwinConfig()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, clip: jax.Array) -> dict[str, jax.Array]:
        cfg = self.config
        if clip.ndim != 5 or clip.shape[-1] != cfg.in_channels:
            raise ValueError(f"SwinTransformer3D expects a clip [B, T, H, W, {cfg.in_channels}], "
                             f"got shape {clip.shape}")
        x = clip.astype(self.dtype)
        pads = [(-n) % p for n, p in zip(x.shape[1:4], cfg.patch_size)]
        x = jnp.pad(x, ((0, 0), (0, pads[0]), (0, pads[1]), (0, pads[2]), (0, 0)))
        x = nn.Conv(cfg.embed_dim, cfg.patch_size, strides=cfg.patch_size, padding="VALID",
                    dtype=self.dtype, name="patch_embed_proj")(x)
        if cfg.patch_norm:
            x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="patch_embed_norm")(x)
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            dim = cfg.embed_dim * 2 ** i
            for j in range(depth):
                x = SwinBlock(dim, heads, tuple(cfg.window_size), shifted=j % 2 == 1,
                              mlp_ratio=cfg.mlp_ratio, dtype=self.dtype,
                              name=f"stage_{i}_block_{j}")(x)
            if i < len(cfg.depths) - 1:
                x = PatchMerging(dim, dtype=self.dtype, name=f"stage_{i}_merge")(x)
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(x)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))
        out = {"features": features}
        if cfg.num_classes:
            out["logits"] = nn.Dense(cfg.num_classes, name="head")(features)
        return out


# -- checkpoint conversion --------------------------------------------------------------

class SwinCheckpointError(ValueError):
    """The state dict is not a Video Swin of a supported naming, or is inconsistent."""


_OFFICIAL_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_OFFICIAL_MERGE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
_TV_FEATURE = re.compile(r"^features\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "norm1.weight": ("norm1", "scale"), "norm1.bias": ("norm1", "bias"),
    "norm2.weight": ("norm2", "scale"), "norm2.bias": ("norm2", "bias"),
    "attn.qkv.weight": ("attn/qkv", "kernel"), "attn.qkv.bias": ("attn/qkv", "bias"),
    "attn.proj.weight": ("attn/proj", "kernel"), "attn.proj.bias": ("attn/proj", "bias"),
    "attn.relative_position_bias_table": ("attn", "relative_position_bias_table"),
    "mlp.fc1.weight": ("fc1", "kernel"), "mlp.fc1.bias": ("fc1", "bias"),
    "mlp.fc2.weight": ("fc2", "kernel"), "mlp.fc2.bias": ("fc2", "bias"),
    # torchvision's MLP is a Sequential: Linear (0), GELU, Dropout, Linear (3), Dropout.
    "mlp.0.weight": ("fc1", "kernel"), "mlp.0.bias": ("fc1", "bias"),
    "mlp.3.weight": ("fc2", "kernel"), "mlp.3.bias": ("fc2", "bias"),
}
_MERGE_PARTS = {"norm.weight": ("norm", "scale"), "norm.bias": ("norm", "bias"),
                "reduction.weight": ("reduction", "kernel")}
_TOP_PARTS = {
    "patch_embed.proj.weight": ("patch_embed_proj", "kernel"),
    "patch_embed.proj.bias": ("patch_embed_proj", "bias"),
    "patch_embed.norm.weight": ("patch_embed_norm", "scale"),
    "patch_embed.norm.bias": ("patch_embed_norm", "bias"),
    "norm.weight": ("norm", "scale"), "norm.bias": ("norm", "bias"),
    "head.weight": ("head", "kernel"), "head.bias": ("head", "bias"),
    "cls_head.fc_cls.weight": ("head", "kernel"), "cls_head.fc_cls.bias": ("head", "bias"),
}


def detect_naming(keys) -> str:
    """'official' (backbone.layers.N.blocks.M...), 'torchvision' (features.N.M...) or ''."""
    keys = [k[len("backbone."):] if k.startswith("backbone.") else k for k in keys]
    if any(_OFFICIAL_BLOCK.match(k) for k in keys):
        return "official"
    if any(re.match(r"^features\.\d+\.\d+\.attn\.qkv\.weight$", k) for k in keys):
        return "torchvision"
    return ""


def _rename(key: str, naming: str) -> tuple[Optional[str], Optional[str], Optional[tuple]]:
    """(module path, leaf, (stage, block or None)) for a checkpoint key; (None, ...) to skip."""
    k = key[len("backbone."):] if key.startswith("backbone.") else key
    if k in _TOP_PARTS:
        mod, leaf = _TOP_PARTS[k]
        return mod, leaf, None
    if naming == "official":
        m = _OFFICIAL_BLOCK.match(k)
        if m:
            stage, block, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            return _block_entry(stage, block, rest)
        m = _OFFICIAL_MERGE.match(k)
        if m and m.group(2) in _MERGE_PARTS:
            mod, leaf = _MERGE_PARTS[m.group(2)]
            return f"stage_{int(m.group(1))}_merge/{mod}", leaf, (int(m.group(1)), None)
    else:
        m = _TV_FEATURE.match(k)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            if idx % 2 == 0:
                bm = re.match(r"^(\d+)\.(.+)$", rest)
                if bm:
                    return _block_entry(idx // 2, int(bm.group(1)), bm.group(2))
            elif rest in _MERGE_PARTS:
                mod, leaf = _MERGE_PARTS[rest]
                return f"stage_{idx // 2}_merge/{mod}", leaf, (idx // 2, None)
    return None, None, None


def _block_entry(stage: int, block: int, rest: str):
    if rest == "attn.relative_position_index":
        return None, "index", (stage, block)
    if rest not in _BLOCK_PARTS:
        return None, None, None
    mod, leaf = _BLOCK_PARTS[rest]
    return f"stage_{stage}_block_{block}/{mod}", leaf, (stage, block)


def _window_from_table(rows: int, n_tokens: Optional[int]) -> tuple:
    """(Wd, Wh, Ww) with Wh == Ww from the bias-table rows (and index size when known)."""
    found = []
    for wd in range(1, 65):
        for wh in range(1, 33):
            if (2 * wd - 1) * (2 * wh - 1) ** 2 == rows and (n_tokens is None or
                                                           wd * wh * wh == n_tokens):
                found.append((wd, wh, wh))
    if (8, 7, 7) in found:
        return (8, 7, 7)
    if len(found) == 1:
        return found[0]
    raise SwinCheckpointError(f"cannot tell the attention window from a bias table of {rows} "
                              f"rows (candidates {found}); pass window_size explicitly.")


def config_from_state_dict(sd: Mapping[str, Any], window_size: Optional[Sequence[int]] = None
                           ) -> tuple[SwinConfig, str]:
    """The architecture held by a state dict of {name: array or TensorRef} (shapes only)."""
    naming = detect_naming(sd)
    if not naming:
        sample = sorted(sd)[:6]
        raise SwinCheckpointError(
            f"not a Video Swin checkpoint of a known naming (expected keys like "
            f"'backbone.layers.0.blocks.0.attn.qkv.weight' or "
            f"'features.0.0.attn.qkv.weight'; found {sample} ...)")
    shape = {k[len("backbone."):] if k.startswith("backbone.") else k: tuple(v.shape)
             for k, v in sd.items()}
    if "patch_embed.proj.weight" not in shape:
        raise SwinCheckpointError("the checkpoint has no patch_embed.proj.weight")
    embed_dim, in_ch, *patch = shape["patch_embed.proj.weight"]
    blocks: dict[int, set] = {}
    heads: dict[int, int] = {}
    table_rows, n_tokens = None, None
    for key in sd:
        mod, leaf, pos = _rename(key, naming)
        if pos is None or pos[1] is None:
            continue
        blocks.setdefault(pos[0], set()).add(pos[1])
        k = key[len("backbone."):] if key.startswith("backbone.") else key
        if mod and leaf == "relative_position_bias_table":
            table_rows = shape[k][0]
            heads[pos[0]] = shape[k][1]
        if leaf == "index":
            n_tokens = shape[k][0] if len(shape[k]) == 2 else int(round(shape[k][0] ** 0.5))
    stages = sorted(blocks)
    if not stages or stages != list(range(len(stages))):
        raise SwinCheckpointError(f"stages {stages} are not numbered 0..n-1")
    depths = tuple(len(blocks[s]) for s in stages)
    for s in stages:
        if sorted(blocks[s]) != list(range(depths[s])):
            raise SwinCheckpointError(f"stage {s} has blocks {sorted(blocks[s])}")
    window = tuple(window_size) if window_size else _window_from_table(table_rows, n_tokens)
    head_key = "head.weight" if "head.weight" in shape else "cls_head.fc_cls.weight"
    num_classes = shape[head_key][0] if head_key in shape else 0
    fc1 = [k for k in shape if re.search(r"(mlp\.fc1|mlp\.0)\.weight$", k)]
    ratio = shape[fc1[0]][0] / shape[fc1[0]][1] if fc1 else 4.0
    cfg = SwinConfig(embed_dim=int(embed_dim), depths=depths,
                     num_heads=tuple(int(heads[s]) for s in stages), window_size=window,
                     patch_size=tuple(int(p) for p in patch), mlp_ratio=float(ratio),
                     num_classes=int(num_classes), in_channels=int(in_ch),
                     patch_norm="patch_embed.norm.weight" in shape)
    return cfg, naming


def convert_state_dict(sd: Mapping[str, Any], config: SwinConfig, naming: str) -> dict:
    """{'params': ...} for `SwinTransformer3D(config)` from a state dict of arrays.

    Linear weights [out, in] become kernels [in, out]; the patch conv [out, in, t, h, w]
    becomes [t, h, w, in, out]. A stored `relative_position_index` must equal the one we
    compute for the window, otherwise the window was inferred wrongly.
    """
    params: dict = {}
    used = set()
    expected_index = relative_position_index(config.window_size)
    for key, value in sd.items():
        mod, leaf, _ = _rename(key, naming)
        if leaf == "index":
            arr = np.asarray(value).reshape(expected_index.shape)
            if not np.array_equal(arr, expected_index):
                raise SwinCheckpointError(f"{key} does not match a {config.window_size} window")
            used.add(key)
            continue
        if mod is None:
            continue
        arr = np.asarray(value, np.float32)
        if leaf == "kernel":
            arr = arr.transpose(2, 3, 4, 1, 0) if arr.ndim == 5 else arr.T
        node = params
        for part in mod.split("/"):
            node = node.setdefault(part, {})
        node[leaf] = arr
        used.add(key)
    return {"params": params}
