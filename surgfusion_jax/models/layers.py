"""Masked temporal building blocks shared by the branches and fusion blocks (docs/design.md §2).

Every sequence is channels-last, `[batch, time, channels]`, with a boolean `valid`
mask `[batch, time]` (True = real segment). Padded steps (valid=False) must not
influence anything, so every block here follows four rules:

  * inputs are zeroed at invalid steps before every convolution, so the SAME zero
    padding at a sample's true end sees the same zeros as an unpadded sample;
  * BatchNorm statistics (train mode) are computed over valid steps only;
  * stride-2 average pooling is a masked mean over each pair of steps (a window with
    a single valid step returns that step; the pooled step is valid if either is);
    odd lengths are padded internally with one invalid step;
  * global pooling is the masked mean over valid steps.

Block outputs are zero at invalid steps, so the stage features handed to the fusion
branch are clean as well.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
Dtype = Any

# PyTorch BatchNorm1d defaults (momentum 0.1 in PyTorch's convention).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# PyTorch's nn.GELU is the exact (erf) GELU; flax defaults to the tanh approximation.
exact_gelu = functools.partial(nn.gelu, approximate=False)


def all_valid(x: Array) -> Array:
    """A mask marking every step of `x` [B, T, ...] valid."""
    return jnp.ones(x.shape[:2], dtype=bool)


def zero_invalid(x: Array, valid: Array) -> Array:
    """Sets x [B, T, C] to zero at invalid steps."""
    return jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))


def pad_to_even(x: Array, valid: Array) -> tuple[Array, Array]:
    """Appends one invalid zero step when the length is odd."""
    if x.shape[1] % 2 == 0:
        return x, valid
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
    valid = jnp.pad(valid, ((0, 0), (0, 1)), constant_values=False)
    return x, valid


def masked_avg_pool2(x: Array, valid: Array) -> tuple[Array, Array]:
    """Average pooling with window and stride 2 over valid steps (Eq. 2).

    Args:
      x: [B, T, C] features.
      valid: [B, T] mask.

    Returns:
      ([B, ceil(T/2), C] pooled features, [B, ceil(T/2)] mask: any step of the pair
      valid). Sums run in float32; the result has the dtype of x.
    """
    x, valid = pad_to_even(x, valid)
    b, t, c = x.shape
    pairs = x.reshape(b, t // 2, 2, c).astype(jnp.float32)
    pair_valid = valid.reshape(b, t // 2, 2, 1)
    total = jnp.sum(jnp.where(pair_valid, pairs, 0.0), axis=2)
    count = jnp.sum(pair_valid, axis=2).astype(jnp.float32)
    return (total / jnp.maximum(count, 1.0)).astype(x.dtype), count[..., 0] > 0


def masked_global_mean(x: Array, valid: Array) -> tuple[Array, Array]:
    """Global average over valid steps (Eq. 2 after stage 3).

    Returns:
      ([B, 1, C] mean, [B, 1] mask: the sample has a valid step).
    """
    # Accumulate in float32: bfloat16 sums (and counts > 256) over long videos are lossy.
    total = jnp.sum(zero_invalid(x.astype(jnp.float32), valid), axis=1, keepdims=True)
    count = jnp.sum(valid, axis=1, keepdims=True).astype(jnp.float32)[..., None]
    mean = (total / jnp.maximum(count, 1.0)).astype(x.dtype)
    return mean, jnp.any(valid, axis=1, keepdims=True)


def pool(x: Array, valid: Array, *, global_pool: bool) -> tuple[Array, Array]:
    """The stage pooling: global masked mean or stride-2 masked average."""
    return masked_global_mean(x, valid) if global_pool else masked_avg_pool2(x, valid)


def stage_valids(valid: Array) -> list[Array]:
    """The masks [v0, v1, v2, v3] of the four stage features for an input mask `valid`.

    Lengths are T, ceil(T/2), ceil(T/4) and 1, as the branches produce them.
    """
    dummy = jnp.zeros(valid.shape + (1,), jnp.float32)
    _, v1 = masked_avg_pool2(dummy, valid)
    _, v2 = masked_avg_pool2(dummy[:, : v1.shape[1]], v1)
    return [valid, v1, v2, jnp.any(valid, axis=1, keepdims=True)]


class TemporalConv(nn.Module):
    """1-D SAME convolution [B, T, C_in] -> [B, T, features] written as matrix products.

    Same parameters and results as `nn.Conv(features, (kernel_size,), padding="SAME",
    feature_group_count=...)` (kernel [k, C_in / groups, features], optional bias), but
    computed as k shifted (grouped) matrix products. XLA's CPU backend runs convolutions
    inside loops (`lax.scan`, which `train.train_epoch` uses) through a slow generic
    kernel: a 1x1 convolution with 1024 inputs trained inside a scan measured ~60x
    slower than the same matrix product (`benchmarks/conv_in_scan.py`).
    """

    features: int
    kernel_size: int = 1
    feature_group_count: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        groups, k = self.feature_group_count, self.kernel_size
        c_in = x.shape[-1]
        if c_in % groups or self.features % groups:
            raise ValueError(f"TemporalConv: {c_in} input and {self.features} output channels "
                             f"must both divide into feature_group_count={groups} groups.")
        kernel = self.param("kernel", self.kernel_init, (k, c_in // groups, self.features))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        before = (k - 1) // 2  # XLA's SAME padding: the extra zero goes after
        if k > 1:
            x = jnp.pad(x, ((0, 0), (before, k - 1 - before), (0, 0)))
        length = x.shape[1] - (k - 1)
        b = x.shape[0]
        # kernel[i] [C_in/G, G * D]: output channel g * D + o belongs to group g
        grouped = kernel.reshape(k, c_in // groups, groups, self.features // groups)
        y = sum(jnp.einsum("btgc,cgd->btgd",
                           x[:, i:i + length].reshape(b, length, groups, c_in // groups),
                           grouped[i]) for i in range(k))
        y = y.reshape(b, length, self.features)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,)
                               ).astype(self.dtype)
        return y


class ConvBNAct(nn.Module):
    """Masked 1-D convolution + BatchNorm + activation.

    The convolution has no bias: the BatchNorm offset that follows makes it redundant.

    Attributes:
      features: output channels.
      kernel_size: temporal kernel (1 = a 1x1 convolution, 3 = SAME-padded k=3).
      activation: applied after BatchNorm.
      feature_group_count: grouped convolution (used to run K FusionNets at once).
      dtype: computation dtype (parameters stay float32).
    """

    features: int
    kernel_size: int = 1
    activation: Callable[[Array], Array] = nn.relu
    feature_group_count: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, valid: Array, *, train: bool) -> Array:
        x = zero_invalid(x, valid)  # SAME padding must see zeros past the true end
        x = TemporalConv(self.features, self.kernel_size,
                         feature_group_count=self.feature_group_count, dtype=self.dtype,
                         name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                         epsilon=BN_EPSILON, dtype=self.dtype, name="bn")(
            x, mask=valid[..., None])  # statistics over valid steps only
        return zero_invalid(self.activation(x), valid)


class ResidualConvBlock(nn.Module):
    """Unimodal residual block, Eq. 1: x + Conv(Conv(x)), Conv = conv k=3 + BN + GELU."""

    kernel_size: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, valid: Array, *, train: bool) -> Array:
        features = x.shape[-1]
        y = ConvBNAct(features, self.kernel_size, exact_gelu, dtype=self.dtype,
                      name="conv1")(x, valid, train=train)
        y = ConvBNAct(features, self.kernel_size, exact_gelu, dtype=self.dtype,
                      name="conv2")(y, valid, train=train)
        return zero_invalid(x, valid) + y


class FusionResBlock(nn.Module):
    """Fusion-branch residual block (docs/design.md §2, stage step 1; MAQA's FusionBlock conv).

    Two conv k=3 + BN + ReLU (in -> features -> features) plus a 1x1 conv + BN + ReLU
    shortcut (in -> features); the two paths are summed.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, valid: Array, *, train: bool) -> Array:
        y = ConvBNAct(self.features, 3, nn.relu, dtype=self.dtype, name="conv1")(
            x, valid, train=train)
        y = ConvBNAct(self.features, 3, nn.relu, dtype=self.dtype, name="conv2")(
            y, valid, train=train)
        shortcut = ConvBNAct(self.features, 1, nn.relu, dtype=self.dtype,
                             name="shortcut")(x, valid, train=train)
        return y + shortcut
