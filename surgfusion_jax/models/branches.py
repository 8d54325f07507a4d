"""Unimodal branch of SurgFusion-Net (Section III-B.2, Eqs. 1-2; docs/design.md §2).

One branch per modality:

  embedding  two 1x1 convs in -> embed_features -> features, each BN + ReLU, dropout
  stage i    x~_i = x_i + Conv(Conv(x_i))                              (Eq. 1)
             x_{i+1} = AvgPool(x~_i): stride 2 after stages 1-2,
             global average after stage 3                             (Eq. 2)
  head       dropout + linear + sigmoid on x_3

The branch returns its score and the four stage features [x0, x1, x2, x3] (the
embedding output and the three stage outputs; lengths T, ceil(T/2), ceil(T/4), 1),
which the fusion branch consumes, with their validity masks. All pooling and
normalisation is masked (see `layers`), so padded steps change nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from surgfusion_jax.models import layers

Array = jax.Array


class UnimodalBranch(nn.Module):
    """Residual 1-D CNN on one modality's segment features.

    Attributes:
      features: model width d (256 in the paper).
      embed_features: hidden width of the embedding (512).
      embed_dropout: dropout after the embedding (0.3, MAQA).
      head_dropout: dropout before the regression layer (0.5, MAQA's `drop_rate`).
      conventions: PyTorch's pooling / BatchNorm conventions or ours (`layers.Conventions`).
      dtype: computation dtype; parameters are float32.
    """

    features: int = 256
    embed_features: int = 512
    embed_dropout: float = 0.3
    head_dropout: float = 0.5
    conventions: layers.Conventions = layers.Conventions()
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, valid: Array | None = None, *, train: bool
                 ) -> tuple[Array, list[Array], list[Array]]:
        """Runs the branch.

        Args:
          x: [B, T, F] segment features.
          valid: [B, T] bool mask, True = real segment (None: all valid).
          train: BatchNorm batch statistics and dropout on.

        Returns:
          (score [B] in (0, 1), float32; stages [x0, x1, x2, x3] with shapes
          [B, T, d], [B, ceil(T/2), d], [B, ceil(T/4), d], [B, 1, d]; their masks).
        """
        if x.ndim != 3:
            raise ValueError(
                f"UnimodalBranch: x must be [batch, time, features], got shape {x.shape}.")
        valid = layers.all_valid(x) if valid is None else jnp.asarray(valid, bool)
        if valid.shape != x.shape[:2]:
            raise ValueError(f"UnimodalBranch: valid has shape {valid.shape}; expected "
                             f"{x.shape[:2]} (the [batch, time] of x).")
        x = x.astype(self.dtype)

        conv = functools.partial(layers.ConvBNAct, kernel_size=1, activation=nn.relu,
                                 conventions=self.conventions, dtype=self.dtype)
        h = conv(self.embed_features, name="embed1")(x, valid, train=train)
        h = conv(self.features, name="embed2")(h, valid, train=train)
        h = nn.Dropout(self.embed_dropout, deterministic=not train)(h)

        stages, valids = [h], [valid]
        for i in (1, 2, 3):
            h = layers.ResidualConvBlock(conventions=self.conventions, dtype=self.dtype,
                                         name=f"stage{i}")(h, valid, train=train)  # Eq. 1
            h, valid = layers.pool(h, valid, global_pool=(i == 3),
                                   odd_step=self.conventions.odd_step)  # Eq. 2
            stages.append(h)
            valids.append(valid)

        y = nn.Dropout(self.head_dropout, deterministic=not train)(h[:, 0])
        y = nn.Dense(1, dtype=self.dtype, name="head")(y)
        score = jax.nn.sigmoid(y[:, 0].astype(jnp.float32))
        return score, stages, valids
