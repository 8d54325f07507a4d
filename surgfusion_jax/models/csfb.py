"""Cross-Stage Fusion Block (CSFB), Section III-B.2 (1), Eqs. 3-5.

At stage i, the fusion features after the residual block, f~_i^mm [B, T_i, d], query
the stage-i unimodal OUTPUTS f_{i+1}^m (one per modality, each [B, T_i, d]):

  Q_i = W^q f~_i^mm,  K_i = W^k f_i^sm,  V_i = W^v f_i^sm                 (Eq. 3)
  f_i^sm = Concat(f_{i+1}^r, f_{i+1}^f, f_{i+1}^m)                       (Eq. 4)
  s_i = DRA(Q_i, K_i, V_i)                                               (Eq. 5)

As in MAQA's MS_Fusion, the concatenation of Eq. 4 is over tokens, and attention runs
independently at every time step: one query token proj(c_t) attends over the M
modality tokens of step t. Its attention weights are therefore a distribution over
modalities per time step (the per-modality curves of Fig. 4). `proj` is a 1x1
convolution (a Dense layer on the channel axis); W^q, W^k, W^v are the DRA's own
projections. Because nothing mixes time steps, the block needs no validity mask.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from surgfusion_jax.models.fusion_strategies import make_fusion
from surgfusion_jax.models.layers import Dtype

Array = jax.Array


class CrossStageFusionBlock(nn.Module):
    """Per-time-step cross-attention from the fusion features to the modalities.

    Attributes:
      features: width d of queries, tokens and output.
      num_heads: attention heads (Table V; paper default 2).
      fusion: fusion strategy (Table IV), see `fusion_strategies.STRATEGIES`.
      attention_dropout: dropout on the attention weights (0.1 in MAQA).
      broadcast_dropout, output_projection, alpha_bias_init, relative_eps: see
        `fusion_strategies.make_fusion`.
      dtype: computation dtype.

    The attention module is named `attention`; with the `intermediates` collection
    mutable it sows `attention_weights` [B, T_i, heads, 1, M].
    """

    features: int = 256
    num_heads: int = 2
    fusion: str = "dra"
    attention_dropout: float = 0.1
    broadcast_dropout: bool = True
    output_projection: bool = True
    alpha_bias_init: float = 2.0
    relative_eps: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: Array, outputs: Sequence[Array], *, train: bool) -> Array:
        """Applies Eqs. 3-5.

        Args:
          c: [B, T_i, d] fusion features after the residual block.
          outputs: the M stage-i unimodal outputs, each [B, T_i, d].
          train: enables attention dropout.

        Returns:
          s [B, T_i, d].
        """
        if not outputs:
            raise ValueError("CrossStageFusionBlock: `outputs` needs at least one modality.")
        for o in outputs:
            if o.shape[:2] != c.shape[:2]:
                raise ValueError(f"CrossStageFusionBlock: unimodal output of shape {o.shape} "
                                 f"does not match fusion features {c.shape} in [batch, time].")
        query = nn.Dense(self.features, dtype=self.dtype, name="query_proj")(c)
        query = query[..., None, :]  # one query token per time step: [B, T, 1, d]
        tokens = jnp.stack(outputs, axis=-2).astype(query.dtype)  # Eq. 4: [B, T, M, d]
        attend = make_fusion(self.fusion, features=self.features, num_heads=self.num_heads,
                             dropout_rate=self.attention_dropout,
                             broadcast_dropout=self.broadcast_dropout,
                             output_projection=self.output_projection,
                             alpha_bias_init=self.alpha_bias_init,
                             relative_eps=self.relative_eps, absorb_projections=True,
                             dtype=self.dtype, name="attention")
        s = attend(query, tokens, tokens, deterministic=not train, sow_weights=True)  # Eq. 5
        return s[..., 0, :]
