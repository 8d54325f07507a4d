"""Divergence Regulated Attention (DRA), Eqs. 11-18 of He et al. (SurgFusion-Net).

`DRA` is a drop-in replacement for `flax.linen.MultiHeadDotProductAttention`:
same constructor fields (where they apply), same call signature, same parameter
names and shapes for the `query`, `key`, `value` and `out` projections. Per head h,
with Q_h, K_h the projected inputs and d_h = qkv_features / num_heads:

  A+_h     = Q_h K_h^T / sqrt(d_h),  A-_h = -A+_h                     (Eq. 11)
  alpha_h  = sigmoid(MLP(mean over queries of Q_h))                   (Eq. 12)
  Amix_h   = alpha_h A+_h + (1 - alpha_h) A-_h                         (Eq. 13)
  P_main   = mean_h Amix_h                                            (Eq. 14)
  c_h      = <Amix_h, P_main> / (||P_main||^2 + eps)
  beta_h   = sigmoid(1 - c_h)                                         (Eq. 15)
  Adivg_h  = Amix_h - c_h P_main                                      (Eq. 16)
  Afinal_h = Amix_h + beta_h Adivg_h                                  (Eq. 17)
  head_h   = softmax(Afinal_h + bias, masked) V_h                     (Eq. 18)

Inner products and norms in Eq. 15 run over the whole q_len x kv_len score matrix of
one sample and head. A boolean `mask` and an additive `bias` act on A_final only:
applying them before Eq. 13 would let the negative branch turn a -1e9 mask into +1e9.

Decisions the paper leaves open (docs/design.md §3):
  * The alpha MLP (Eq. 12) is shared by all heads: Dense(d_h -> hidden) + GELU +
    Dense(-> 1), applied to each head's mean query. Sharing keeps the parameter
    count independent of the head count, so the heads ablation (Table V) changes
    only how the width is split. The last bias starts at `alpha_bias_init` (2.0,
    alpha ~ 0.88): at alpha = 0.5, Eq. 13 cancels every score and the layer would
    start as uniform attention.
  * Eqs. 13-18 run in float32 whatever `dtype` is (scores of bf16 models are upcast
    before the softmax and divergence terms and cast back afterwards).
  * `mixing='positive'` fixes alpha = 1 (vanilla attention), `'negative'` fixes
    alpha = 0 (the complementary attention of MAQA); `diversify=False` skips
    Eqs. 14-17. With one head Eq. 16 vanishes up to eps, so adaptive DRA with and
    without diversification agree (the paper's remark under Table V).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

MIXING_MODES = ("adaptive", "positive", "negative")


def mix_and_diversify(
    scores: Array,
    alpha: Array,
    *,
    diversify: bool,
    eps: float,
) -> tuple[Array, Array]:
    """Eqs. 13-17 on raw scores A+ of shape [batch, heads, q_len, kv_len].

    Args:
      scores: A+ (Eq. 11), already divided by sqrt(d_h).
      alpha: [batch, heads] mixing factors (Eq. 12).
      diversify: apply Eqs. 14-17; otherwise A_final = A_mix.
      eps: the epsilon of Eq. 15.

    Returns:
      (A_final, beta) with beta of shape [batch, heads] (ones when not diversifying;
      reported for inspection only).
    """
    a = alpha[..., None, None]
    mixed = a * scores + (1.0 - a) * (-scores)  # Eq. 13
    if not diversify:
        return mixed, jnp.ones(alpha.shape, scores.dtype)
    main = jnp.mean(mixed, axis=-3, keepdims=True)  # Eq. 14: [b, 1, q, k]
    inner = jnp.sum(mixed * main, axis=(-2, -1))  # <A_mix_h, P_main>: [b, h]
    norm_sq = jnp.sum(main * main, axis=(-2, -1))  # ||P_main||^2: [b, 1]
    coeff = inner / (norm_sq + eps)
    beta = jax.nn.sigmoid(1.0 - coeff)  # Eq. 15
    divergence = mixed - coeff[..., None, None] * main  # Eq. 16
    final = mixed + beta[..., None, None] * divergence  # Eq. 17
    return final, beta


def attention_scores(query: Array, key: Array, precision: Any = None) -> Array:
    """Eq. 11: A+ = Q K^T / sqrt(d_h) as float32 [batch..., heads, q_len, kv_len].

    query, key: [batch..., length, heads, d_h] (the query is scaled first, as Flax does).
    """
    scaled = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    return jnp.einsum("...qhd,...khd->...hqk", scaled, key,
                      precision=precision).astype(jnp.float32)


def fixed_alpha(mixing: str, scores: Array) -> Array:
    """alpha for the non-adaptive modes: 1 ('positive') or 0 ('negative'), [batch..., heads]."""
    return jnp.full(scores.shape[:-2], 1.0 if mixing == "positive" else 0.0, jnp.float32)


def regulated_weights(scores: Array, alpha: Array, *, diversify: bool, eps: float,
                      mask: Array | None = None, bias: Array | None = None
                      ) -> tuple[Array, Array]:
    """Eqs. 13-18 up to the softmax: returns (attention weights, beta).

    `bias` is added to and `mask` applied on A_final only (see the module docstring).
    """
    final, beta = mix_and_diversify(scores, alpha, diversify=diversify, eps=eps)
    if bias is not None:
        final = final + bias.astype(jnp.float32)
    if mask is not None:
        final = jnp.where(mask, final, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(final, axis=-1), beta  # Eq. 18


class AlphaMLP(nn.Module):
    """Eq. 12: alpha_h = sigmoid(MLP(AvgPool(Q_h))), one MLP shared by the heads."""

    hidden_features: int
    bias_init_value: float = 2.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled_query: Array) -> Array:
        # pooled_query: [batch, heads, d_h] -> alpha: [batch, heads]
        x = nn.Dense(self.hidden_features, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="hidden")(pooled_query)
        x = nn.gelu(x)
        x = nn.Dense(1, dtype=self.dtype, param_dtype=self.param_dtype,
                     bias_init=nn.initializers.constant(self.bias_init_value),
                     name="logit")(x)
        return jax.nn.sigmoid(x[..., 0].astype(jnp.float32))


class DRA(nn.Module):
    """Divergence Regulated Attention; a drop-in for `nn.MultiHeadDotProductAttention`.

    Attributes (as in Flax's multi-head attention, plus):
      mixing: 'adaptive' (Eq. 12-13), 'positive' (alpha = 1) or 'negative' (alpha = 0).
      diversify: apply the divergence constraint of Eqs. 14-17.
      eps: epsilon of Eq. 15.
      alpha_hidden_features: hidden width of the alpha MLP (default d_h).
      alpha_bias_init: initial logit of alpha (see module docstring).

    Example:
      >>> layer = DRA(num_heads=2, qkv_features=16)
      >>> q, kv = jnp.ones((4, 1, 8)), jnp.ones((4, 3, 8))
      >>> variables = layer.init(jax.random.key(0), q, kv)
      >>> layer.apply(variables, q, kv).shape
      (4, 1, 8)
    """

    num_heads: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    qkv_features: int | None = None
    out_features: int | None = None
    broadcast_dropout: bool = True
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    precision: Any = None
    kernel_init: Initializer = nn.linear.default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    use_bias: bool = True
    mixing: str = "adaptive"
    diversify: bool = True
    eps: float = 1e-8
    alpha_hidden_features: int | None = None
    alpha_bias_init: float = 2.0

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        deterministic: bool | None = None,
        dropout_rng: Array | None = None,
        sow_weights: bool = False,
    ) -> Array:
        """Applies DRA.

        Args:
          inputs_q: queries [batch..., q_len, features].
          inputs_k: keys [batch..., kv_len, features]; defaults to `inputs_q`.
          inputs_v: values; defaults to `inputs_k`.
          mask: boolean, True = attend; broadcastable to [batch..., heads, q_len, kv_len].
          bias: additive float bias, same broadcasting; added to A_final.
          deterministic: disables attention dropout (merged with the attribute).
          dropout_rng: explicit key for attention dropout.
          sow_weights: sow `attention_weights`, `alpha` and `beta` into `intermediates`.

        Returns:
          [batch..., q_len, out_features].
        """
        if self.mixing not in MIXING_MODES:
            raise ValueError(f"DRA.mixing must be one of {MIXING_MODES}, got {self.mixing!r}.")
        if inputs_k is None:
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k

        out_features = self.out_features or inputs_q.shape[-1]
        qkv_features = self.qkv_features or inputs_q.shape[-1]
        if qkv_features % self.num_heads:
            raise ValueError(
                f"DRA: qkv_features ({qkv_features}) must be divisible by num_heads "
                f"({self.num_heads}).")
        head_dim = qkv_features // self.num_heads

        dense = functools.partial(
            nn.DenseGeneral, axis=-1, features=(self.num_heads, head_dim),
            dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
            bias_init=self.bias_init, use_bias=self.use_bias, precision=self.precision)
        # [batch..., length, heads, head_dim]
        query = dense(name="query")(inputs_q)
        key = dense(name="key")(inputs_k)
        value = dense(name="value")(inputs_v)

        compute_dtype = query.dtype
        scores = attention_scores(query, key, self.precision)  # Eq. 11
        if self.mixing == "adaptive":
            pooled = jnp.mean(query, axis=-3)  # mean over queries: [batch..., heads, d_h]
            alpha = AlphaMLP(self.alpha_hidden_features or head_dim, self.alpha_bias_init,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             name="alpha_mlp")(pooled)
        else:
            alpha = fixed_alpha(self.mixing, scores)
        weights, beta = regulated_weights(scores, alpha, diversify=self.diversify,
                                          eps=self.eps, mask=mask, bias=bias)

        if sow_weights:
            self.sow("intermediates", "attention_weights", weights)
            self.sow("intermediates", "alpha", alpha)
            self.sow("intermediates", "beta", beta)

        weights = weights.astype(compute_dtype)
        if self.dropout_rate > 0.0:
            m_deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            if not m_deterministic:
                if dropout_rng is None:
                    dropout_rng = self.make_rng("dropout")
                keep_prob = 1.0 - self.dropout_rate
                if self.broadcast_dropout:
                    drop_shape = (1,) * (weights.ndim - 2) + weights.shape[-2:]
                else:
                    drop_shape = weights.shape
                keep = jax.random.bernoulli(dropout_rng, keep_prob, drop_shape)
                weights = weights * (keep.astype(compute_dtype) / keep_prob)

        heads = jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=self.precision)
        return nn.DenseGeneral(
            features=out_features, axis=(-2, -1), kernel_init=self.kernel_init,
            bias_init=self.bias_init, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision, name="out")(heads)
