"""Fusion strategies for the Table IV ablation, all with the call signature of `DRA`.

`make_fusion(strategy, ...)` returns the module that CSFB (Eq. 5) and DFB (Eq. 10) use
to combine one query token with their key/value tokens (modalities in CSFB, FusionNet
candidates in DFB):

  'dra'          DRA, adaptive mixing + head diversification (Eqs. 11-18).
  'vanilla_ca'   DRA(mixing='positive', diversify=False): scaled dot-product
                 cross-attention (alpha = 1).
  'negative_ca'  DRA(mixing='negative', diversify=False): the complementary (negated
                 scores) attention of MAQA (alpha = 0).
  'avg'          `AverageFusion`: the plain mean of the value tokens the mask lets
                 through, then a linear layer. No query, no learned weighting.
  'cat'          `ConcatFusion`: the value tokens concatenated along features, then a
                 linear layer. No query.

The non-attention strategies honour `mask` and `bias` so that the DFB policy still
selects candidates: 'avg' weights the tokens by softmax(0 + bias) over the unmasked
keys (uniform over the candidates a 0/-1e9 bias admits); 'cat' scales each token by
the gate exp(bias) (1 for a zero bias, 0 for -1e9; `bias` is a log-gate and must be
<= 0). The straight-through part of the DFB bias (value 0) carries policy gradients
through either. They ignore `num_heads` and attention dropout, and sow the token
weights they used (uniform / normalised gates) as `attention_weights` with one head,
so the CSFB modality weights read out the same way for every strategy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from surgfusion_jax.models.dra import DRA
from surgfusion_jax.models.layers import Dtype

Array = jax.Array

STRATEGIES = ("avg", "cat", "vanilla_ca", "negative_ca", "dra")
HEADS = (1, 2, 4, 8)  # the Table V head-count ablation


def _token_logits(inputs_q: Array, inputs_v: Array, mask: Array | None,
                  bias: Array | None) -> Array:
    """Zero scores [..., 1, q_len, kv_len] plus bias, with masked keys at -inf."""
    shape = inputs_q.shape[:-2] + (1, inputs_q.shape[-2], inputs_v.shape[-2])
    logits = jnp.zeros(shape, jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return logits


class AverageFusion(nn.Module):
    """'avg': out = Dense(mean of the admitted value tokens); the query is unused."""

    out_features: int | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_k: Array | None = None,
                 inputs_v: Array | None = None, *, mask: Array | None = None,
                 bias: Array | None = None, deterministic: bool | None = None,
                 dropout_rng: Array | None = None, sow_weights: bool = False) -> Array:
        del deterministic, dropout_rng  # no attention dropout
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        weights = jax.nn.softmax(_token_logits(inputs_q, inputs_v, mask, bias), axis=-1)
        if sow_weights:
            self.sow("intermediates", "attention_weights", weights)
        # [..., 1, q, k] x [..., k, f] -> [..., q, f]
        mean = jnp.einsum("...hqk,...kf->...qf", weights.astype(inputs_v.dtype), inputs_v)
        return nn.Dense(self.out_features or inputs_q.shape[-1], dtype=self.dtype,
                        param_dtype=self.param_dtype, name="out")(mean)


class ConcatFusion(nn.Module):
    """'cat': out = Dense(concat_k gate_k v_k), gate_k = exp(bias_k) * mask_k.

    The same output is broadcast to every query position (the query is unused).
    """

    out_features: int | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_k: Array | None = None,
                 inputs_v: Array | None = None, *, mask: Array | None = None,
                 bias: Array | None = None, deterministic: bool | None = None,
                 dropout_rng: Array | None = None, sow_weights: bool = False) -> Array:
        del deterministic, dropout_rng
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        gates = jnp.exp(_token_logits(inputs_q, inputs_v, mask, bias))  # [..., 1, q, k]
        if sow_weights:
            total = jnp.sum(gates, axis=-1, keepdims=True)
            self.sow("intermediates", "attention_weights", gates / jnp.maximum(total, 1e-30))
        # [..., 1, q, k] x [..., k, f] -> [..., q, k, f] -> [..., q, k * f]
        gated = jnp.einsum("...hqk,...kf->...qkf", gates.astype(inputs_v.dtype), inputs_v)
        gated = gated.reshape(gated.shape[:-2] + (-1,))
        return nn.Dense(self.out_features or inputs_q.shape[-1], dtype=self.dtype,
                        param_dtype=self.param_dtype, name="out")(gated)


def make_fusion(strategy: str, *, features: int, num_heads: int = 2,
                dropout_rate: float = 0.0, broadcast_dropout: bool = True,
                output_projection: bool = True, alpha_bias_init: float = 2.0,
                relative_eps: float = 0.0, absorb_projections: bool = False,
                dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Module:
    """Builds the fusion module of a Table IV strategy.

    Args:
      strategy: one of `STRATEGIES`.
      features: query/key/value and output width.
      num_heads: attention heads (attention strategies only).
      dropout_rate: attention-weight dropout (attention strategies only).
      broadcast_dropout: one dropout mask shared over the batch and heads (Flax's
        default); False drops every weight independently (PyTorch's nn.Dropout, PAMFN).
      output_projection: the attention's output projection W^O (False: PAMFN's
        attention, which has none).
      alpha_bias_init: initial logit of DRA's alpha (Eq. 12; 'dra' only).
      relative_eps: DRA's rho in Eq. 15 ('dra' only; `DRA.relative_eps`, 0 = the paper).
      absorb_projections: attention strategies compute the key/value projections on the
        query side (`DRA.absorb_projections`: same parameters and results, fewer FLOPs
        when there are many key/value tokens per query).
      dtype: computation dtype.
      name: module name.

    Returns:
      A module called as `module(q, k, v, *, mask=None, bias=None, deterministic=None,
      sow_weights=False) -> [..., q_len, features]`.
    """
    if strategy == "dra":
        kwargs = dict(mixing="adaptive", diversify=True, alpha_bias_init=alpha_bias_init,
                      relative_eps=relative_eps)
    elif strategy == "vanilla_ca":
        kwargs = dict(mixing="positive", diversify=False)
    elif strategy == "negative_ca":
        kwargs = dict(mixing="negative", diversify=False)
    elif strategy == "avg":
        return AverageFusion(out_features=features, dtype=dtype, name=name)
    elif strategy == "cat":
        return ConcatFusion(out_features=features, dtype=dtype, name=name)
    else:
        raise ValueError(f"Unknown fusion strategy {strategy!r}; expected one of "
                         f"{STRATEGIES} (config field `fusion`).")
    return DRA(num_heads=num_heads, qkv_features=features, out_features=features,
               dropout_rate=dropout_rate, broadcast_dropout=broadcast_dropout,
               output_projection=output_projection, absorb_projections=absorb_projections,
               dtype=dtype, name=name, **kwargs)
