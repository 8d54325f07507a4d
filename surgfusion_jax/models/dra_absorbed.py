"""DRA with the key and value projections moved to the query side (`DRA.absorb_projections`).

Scores and outputs are linear in the key and value tokens, so for every head h

  A+_h[q, k] = Q_h[q] . (x_k W^k_h + b^k_h) / sqrt(d_h)
             = (Q_h[q] W^k_h^T) . x_k / sqrt(d_h) + Q_h[q] . b^k_h / sqrt(d_h)      (Eq. 11)
  head_h[q]  = sum_k P_h[q, k] (x_k W^v_h + b^v_h)
             = (sum_k P_h[q, k] x_k) W^v_h + (sum_k P_h[q, k]) b^v_h             (Eq. 18)

with x_k the unprojected key/value tokens, W_h = kernel[:, h, :] [d_in, d_h] and P the
attention weights after Eqs. 13-17, the softmax and dropout. The right-hand sides never
project the kv_len tokens: per query they cost 2 d_in d_h H + 2 H kv_len d_in instead
of 2 kv_len d_in d_h H. The DFB attends with one query per time step over the K = 10
FusionNet candidates, so its two projections shrink K-fold. The
parameters are the `key` / `value` DenseGeneral parameters of the projected form and the
results equal it to float round-off; Eqs. 13-17 act on the same score matrix (the key
bias term is kept: a shift of every score of a row changes Eq. 15's coefficients).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from surgfusion_jax.models.dra_blockwise import dropout_weights, regulated_weights, scaled_query

Array = jax.Array


def absorbed_attention(query: Array, inputs_k: Array, inputs_v: Array,
                       key_params: dict, value_params: dict, alpha: Array, *,
                       diversify: bool, eps: float, relative_eps: float = 0.0,
                       mask: Array | None = None, bias: Array | None = None,
                       dropout: tuple[Array, float, bool] | None = None,
                       keep_fp32: bool = False, precision: Any = None
                       ) -> tuple[Array, Array, Array]:
    """Eqs. 11, 13-18 from the projected query and the unprojected key/value tokens.

    Args:
      query: [..., Lq, H, d_h], projected (as `DRA` projects it).
      inputs_k, inputs_v: [..., Lk, d_in] key and value tokens, before projection.
      key_params, value_params: DenseGeneral parameters, `kernel` [d_in, H, d_h] and
        optional `bias` [H, d_h].
      alpha: Eq. 12, [..., H].
      diversify, eps, relative_eps, mask, bias, keep_fp32, precision: as `DRA`'s.
      dropout: (rng, rate, broadcast) or None, drawn as the projected form draws it.

    Returns:
      (heads [..., Lq, H, d_h] in the query's dtype, float32 weights [..., H, Lq, Lk],
      beta [..., H]).
    """
    dtype = query.dtype
    w_k = key_params["kernel"].astype(dtype)
    w_v = value_params["kernel"].astype(dtype)
    scaled = scaled_query(query)
    query_in = jnp.einsum("...qhe,dhe->...qhd", scaled, w_k, precision=precision)
    scores = jnp.einsum("...qhd,...kd->...hqk", query_in, inputs_k.astype(dtype),
                        precision=precision).astype(jnp.float32)
    if "bias" in key_params:
        row_shift = jnp.einsum("...qhe,he->...hq", scaled, key_params["bias"].astype(dtype),
                               precision=precision)
        scores = scores + row_shift.astype(jnp.float32)[..., None]
    weights, beta = regulated_weights(scores, alpha, diversify=diversify, eps=eps, mask=mask,
                                      bias=bias, relative_eps=relative_eps)
    used = weights if keep_fp32 else weights.astype(dtype)
    if dropout is not None:
        used = dropout_weights(used, *dropout, dtype)
    pooled = jnp.einsum("...hqk,...kd->...qhd", used, inputs_v.astype(used.dtype),
                        precision=precision)
    heads = jnp.einsum("...qhd,dhe->...qhe", pooled, w_v.astype(pooled.dtype),
                       precision=precision)
    if "bias" in value_params:
        mass = jnp.swapaxes(jnp.sum(used, axis=-1), -1, -2)  # [..., Lq, H]: 1 without dropout
        heads = heads + mass[..., None] * value_params["bias"].astype(heads.dtype)
    return heads.astype(dtype), weights, beta
