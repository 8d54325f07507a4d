"""Masked temporal building blocks shared by the branches and fusion blocks (docs/design.md §2).

Every sequence is channels-last, `[batch, time, channels]`, with a boolean `valid`
mask `[batch, time]` (True = real segment). Padded steps (valid=False) must not
influence anything, so every block here follows four rules:

  * inputs are zeroed at invalid steps before every convolution, so the SAME zero
    padding at a sample's true end sees the same zeros as an unpadded sample;
  * BatchNorm statistics (train mode) are computed over valid steps only;
  * stride-2 average pooling is a masked mean over each pair of steps (a window with
    a single valid step returns that step; the pooled step is valid if either is;
    `Conventions.odd_step='drop'` instead drops it, as PyTorch's AvgPool1d(2, 2) does);
    odd lengths are padded internally with one invalid step;
  * global pooling is the masked mean over valid steps.

Block outputs are zero at invalid steps, so the stage features handed to the fusion
branch are clean as well.
"""

from __future__ import annotations

import dataclasses
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
ODD_STEPS = ("keep", "drop")


@dataclasses.dataclass(frozen=True)
class Conventions:
    """Where PyTorch's layers (PAMFN's) and ours compute differently; ours by default.

    Attributes:
      odd_step: stride-2 pooling of an odd number of valid steps: 'keep' (ours) pools the
        last step alone, 'drop' drops it, as PyTorch's AvgPool1d(2, 2) does (config field
        `model.pool_odd_step`).
      unbiased_running_var: BatchNorm's running variance averages the unbiased batch
        variance (n / (n - 1) times the biased one, PyTorch) instead of the biased one
        (Flax); the normalisation itself uses the biased one in both (config field
        `model.bn_unbiased_running_var`).
    """

    odd_step: str = "keep"
    unbiased_running_var: bool = False

    def __post_init__(self):
        if self.odd_step not in ODD_STEPS:
            raise ValueError(f"odd_step must be one of {ODD_STEPS}, got {self.odd_step!r} "
                             "(config field `model.pool_odd_step`).")


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


def masked_avg_pool2(x: Array, valid: Array, odd_step: str = "keep") -> tuple[Array, Array]:
    """Average pooling with window and stride 2 over valid steps (Eq. 2).

    Args:
      x: [B, T, C] features.
      valid: [B, T] mask.
      odd_step: 'keep': a pair with one valid step pools to that step; 'drop': it is
        invalid (zero), so a sequence of n valid steps pools to floor(n / 2), as PyTorch's
        AvgPool1d(2, 2) does.

    Returns:
      ([B, ceil(T/2), C] pooled features, [B, ceil(T/2)] mask of the valid pooled steps).
      Sums run in float32; the result has the dtype of x.
    """
    x, valid = pad_to_even(x, valid)
    b, t, c = x.shape
    pairs = x.reshape(b, t // 2, 2, c).astype(jnp.float32)
    pair_valid = valid.reshape(b, t // 2, 2, 1)
    total = jnp.sum(jnp.where(pair_valid, pairs, 0.0), axis=2)
    count = jnp.sum(pair_valid, axis=2).astype(jnp.float32)
    if odd_step == "drop":
        total, count = jnp.where(count == 2, total, 0.0), jnp.where(count == 2, count, 0.0)
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


def pool(x: Array, valid: Array, *, global_pool: bool, odd_step: str = "keep"
         ) -> tuple[Array, Array]:
    """The stage pooling: global masked mean or stride-2 masked average."""
    return (masked_global_mean(x, valid) if global_pool
            else masked_avg_pool2(x, valid, odd_step))


def stage_valids(valid: Array, odd_step: str = "keep") -> list[Array]:
    """The masks [v0, v1, v2, v3] of the four stage features for an input mask `valid`.

    Lengths are T, ceil(T/2), ceil(T/4) and 1, as the branches produce them; `odd_step`
    as the model's (`Conventions`).
    """
    dummy = jnp.zeros(valid.shape + (1,), jnp.float32)
    _, v1 = masked_avg_pool2(dummy, valid, odd_step)
    _, v2 = masked_avg_pool2(dummy[:, : v1.shape[1]], v1, odd_step)
    return [valid, v1, v2, jnp.any(valid, axis=1, keepdims=True)]


class TemporalConv(nn.Module):
    """1-D SAME convolution [B, T, C_in] -> [B, T, features] written as one matrix product.

    Same parameters and results as `nn.Conv(features, (kernel_size,), padding="SAME",
    feature_group_count=...)` (kernel [k, C_in / groups, features], optional bias), but
    computed as a single (grouped) product of the k shifted inputs stacked along the
    channels (im2col: [B, T, k C_in] @ [k C_in, features]). XLA's CPU backend runs
    convolutions inside loops (`lax.scan`, which `train.train_epoch` uses) through a slow
    generic kernel (`benchmarks/conv_in_scan.py`), and k separate shifted products cost
    k passes over the activations and the gradient; one product per convolution is the
    fastest form measured (docs/performance.md).
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
        b, length = x.shape[:2]
        c_g, d_g = c_in // groups, self.features // groups
        x = x.reshape(b, length, groups, c_g)  # free: channel g * C_in/G + c is group g's
        if k > 1:
            before = (k - 1) // 2  # XLA's SAME padding: the extra zero goes after
            x = jnp.pad(x, ((0, 0), (before, k - 1 - before), (0, 0), (0, 0)))
            # the k shifts stacked next to the channels: [B, T, G, k, C_in/G], no transpose
            x = jnp.stack([x[:, i:i + length] for i in range(k)], axis=3)
        x = x.reshape(b, length, groups, k * c_g)
        if groups == 1:
            y = x[:, :, 0] @ kernel.reshape(k * c_in, self.features)
        else:
            # kernel [k, C_in/G, G * D/G]: output channel g * D/G + o belongs to group g
            w = kernel.reshape(k, c_g, groups, d_g).transpose(2, 0, 1, 3).reshape(
                groups, k * c_g, d_g)
            y = jnp.einsum("btgc,gcd->btgd", x, w).reshape(b, length, self.features)
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
    conventions: Conventions = Conventions()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, valid: Array, *, train: bool) -> Array:
        x = zero_invalid(x, valid)  # SAME padding must see zeros past the true end
        x = TemporalConv(self.features, self.kernel_size,
                         feature_group_count=self.feature_group_count, dtype=self.dtype,
                         name="conv")(x)
        # nn.BatchNorm's computation and variables, statistics over valid steps only
        x = StackedBatchNorm(not train, unbiased_running_var=self.conventions.unbiased_running_var,
                             dtype=self.dtype, name="bn")(x[None], valid)[0]
        return zero_invalid(self.activation(x), valid)


class ResidualConvBlock(nn.Module):
    """Unimodal residual block, Eq. 1: x + Conv(Conv(x)), Conv = conv k=3 + BN + GELU."""

    kernel_size: int = 3
    conventions: Conventions = Conventions()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, valid: Array, *, train: bool) -> Array:
        features = x.shape[-1]
        y = ConvBNAct(features, self.kernel_size, exact_gelu, conventions=self.conventions,
                      dtype=self.dtype, name="conv1")(x, valid, train=train)
        y = ConvBNAct(features, self.kernel_size, exact_gelu, conventions=self.conventions,
                      dtype=self.dtype, name="conv2")(y, valid, train=train)
        return zero_invalid(x, valid) + y


class FusionResBlock(nn.Module):
    """Fusion-branch residual block (docs/design.md §2, stage step 1; MAQA's FusionBlock conv).

    Two conv k=3 + BN + ReLU (in -> features -> features) plus a 1x1 conv + BN + ReLU
    shortcut (in -> features); the two paths are summed.
    """

    features: int
    conventions: Conventions = Conventions()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, valid: Array, *, train: bool) -> Array:
        block = functools.partial(ConvBNAct, self.features, activation=nn.relu,
                                  conventions=self.conventions, dtype=self.dtype)
        y = block(kernel_size=3, name="conv1")(x, valid, train=train)
        y = block(kernel_size=3, name="conv2")(y, valid, train=train)
        shortcut = block(kernel_size=1, name="shortcut")(x, valid, train=train)
        return y + shortcut


def zero_invalid_stacked(x: Array, valid: Array) -> Array:
    """Sets x [K, B, T, C] (K nets stacked on a leading axis) to zero at invalid steps."""
    return jnp.where(valid[None, ..., None], x, jnp.zeros((), x.dtype))


class StackedTemporalConv(nn.Module):
    """K independent SAME 1-D convolutions, inputs stacked on a leading axis.

    x [K, B, T, C] -> [K, B, T, D], net k convolving x[k] with its own kernel. The
    parameter is exactly that of `TemporalConv(K * D, kernel_size, feature_group_count=K)`
    (kernel [kernel_size, C, K * D], group k's outputs at channels k * D ... k * D + D - 1),
    so it is that grouped convolution with the groups moved to the front: each net is one
    plain [B T, k C] @ [k C, D] product, batched over K, with no transposes of the
    activations (XLA's CPU dot transposes a batch axis that is not leading: measured 1.5x
    slower, docs/performance.md).
    """

    features: int
    kernel_size: int = 1
    dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        nets, b, length, c_in = x.shape
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, c_in, nets * self.features))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if k > 1:
            before = (k - 1) // 2
            x = jnp.pad(x, ((0, 0), (0, 0), (before, k - 1 - before), (0, 0)))
            x = jnp.stack([x[:, :, i:i + length] for i in range(k)], axis=3)
        x = x.reshape(nets, b * length, k * c_in)
        w = kernel.reshape(k, c_in, nets, self.features).transpose(2, 0, 1, 3).reshape(
            nets, k * c_in, self.features)
        return jnp.einsum("knc,kcd->knd", x, w).reshape(nets, b, length, self.features)


class StackedBatchNorm(nn.Module):
    """BatchNorm of K stacked nets, x [K, B, T, D], statistics per (net, channel) over
    the valid steps of B and T (K = 1: the BatchNorm of `ConvBNAct`).

    Computes what `nn.BatchNorm` computes on the same data laid out as [B, T, K * D]
    (float32 statistics, E[x^2] - E[x]^2 variance clipped at 0, running averages not
    updated while initialising), with the same variables: params `scale`, `bias` and
    batch_stats `mean`, `var`, each [K * D], net k's at k * D ... k * D + D - 1. With
    `unbiased_running_var` the running variance averages n / (n - 1) times the batch
    variance, n the number of valid steps, as PyTorch's BatchNorm1d does.
    """

    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    unbiased_running_var: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, valid: Array) -> Array:
        nets, _, _, d = x.shape
        size = (nets * d,)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), size)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), size)
        scale = self.param("scale", nn.initializers.ones_init(), size).reshape(nets, 1, 1, d)
        bias = self.param("bias", nn.initializers.zeros_init(), size).reshape(nets, 1, 1, d)
        if self.use_running_average:
            mean, var = ra_mean.value.reshape(nets, d), ra_var.value.reshape(nets, d)
        else:
            x32 = x.astype(jnp.float32)
            where = jnp.broadcast_to(valid[None, ..., None], x.shape)
            mean = x32.mean((1, 2), where=where)
            var = jnp.maximum(0.0, (x32 * x32).mean((1, 2), where=where) - mean * mean)
            if not self.is_initializing():
                m, running_var = self.momentum, var
                if self.unbiased_running_var:
                    n = jnp.sum(valid).astype(jnp.float32)
                    running_var = var * (n / jnp.maximum(n - 1.0, 1.0))
                ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(size)
                ra_var.value = m * ra_var.value + (1 - m) * running_var.reshape(size)
        y = x - mean[:, None, None, :]
        y = y * (jax.lax.rsqrt(var + self.epsilon)[:, None, None, :] * scale) + bias
        return y.astype(self.dtype)


class StackedConvBNAct(nn.Module):
    """`ConvBNAct` of K independent nets on stacked inputs [K, B, T, C] -> [K, B, T, D].

    Same variables (conv/kernel, bn/scale, bn/bias, bn/mean, bn/var) and the same
    results as `ConvBNAct(K * D, kernel_size, feature_group_count=K)` on the inputs laid
    out as [B, T, K * C]; see `StackedTemporalConv` for why the nets are stacked.
    """

    features: int
    kernel_size: int = 1
    activation: Callable[[Array], Array] = nn.relu
    conventions: Conventions = Conventions()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, valid: Array, *, train: bool) -> Array:
        x = zero_invalid_stacked(x, valid)
        x = StackedTemporalConv(self.features, self.kernel_size, dtype=self.dtype,
                                name="conv")(x)
        x = StackedBatchNorm(not train, unbiased_running_var=self.conventions.unbiased_running_var,
                             dtype=self.dtype, name="bn")(x, valid)
        return zero_invalid_stacked(self.activation(x), valid)
