"""Divergence Regulated Attention (Eqs. 11-18) as a native `flax.nnx.Module`.

`DRANNX` is the NNX twin of the linen `surgfusion_jax.models.dra.DRA`: the same math (Eqs.
13-18 come from the shared `regulated_weights`), a constructor shaped like
`nnx.MultiHeadAttention` (num_heads, in_features, qkv_features, out_features, ...,
rngs=...) and the same parameter layout, so `dra_nnx_from_linen` can load the
variables of a linen `DRA` and reproduce its outputs.

Per head h (see `surgfusion_jax.models.dra` for the design decisions):
  A+_h = Q_h K_h^T / sqrt(d_h)                         (Eq. 11)
  alpha_h = sigmoid(MLP(mean over queries of Q_h))     (Eq. 12, one MLP shared by heads)
  A_final_h from Eqs. 13-17 (`regulated_weights`)
  head_h = softmax(A_final_h + bias, masked) V_h       (Eq. 18)

Example:
  >>> from flax import nnx
  >>> layer = DRANNX(num_heads=2, in_features=8, qkv_features=16, rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((4, 1, 8)), jnp.ones((4, 3, 8))).shape
  (4, 1, 8)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.core import unfreeze

from surgfusion_jax.models.dra import (DRA, MIXING_MODES, attention_scores, fixed_alpha,
                                regulated_weights)

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


class AlphaMLPNNX(nnx.Module):
    """Eq. 12: alpha_h = sigmoid(MLP(AvgPool(Q_h))); Linear -> GELU -> Linear(1)."""

    def __init__(self, in_features: int, hidden_features: int, *, bias_init_value: float = 2.0,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_features, hidden_features, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
        self.logit = nnx.Linear(hidden_features, 1, dtype=dtype, param_dtype=param_dtype,
                                bias_init=nnx.initializers.constant(bias_init_value), rngs=rngs)

    def __call__(self, pooled_query: Array) -> Array:
        # pooled_query: [batch..., heads, d_h] -> alpha: [batch..., heads] (float32)
        x = self.logit(nnx.gelu(self.hidden(pooled_query)))
        return jax.nn.sigmoid(x[..., 0].astype(jnp.float32))


class DRANNX(nnx.Module):
    """Divergence Regulated Attention in NNX; arguments as `nnx.MultiHeadAttention` plus
    `mixing` ('adaptive' | 'positive' | 'negative'), `diversify`, `eps`,
    `alpha_hidden_features` (default d_h) and `alpha_bias_init` (as in linen `DRA`)."""

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        in_kv_features: int | None = None,
        *,
        mixing: str = "adaptive",
        diversify: bool = True,
        eps: float = 1e-8,
        alpha_hidden_features: int | None = None,
        alpha_bias_init: float = 2.0,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: Any = None,
        kernel_init: Initializer = nn.linear.default_kernel_init,
        bias_init: Initializer = nn.initializers.zeros_init(),
        use_bias: bool = True,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
    ):
        if mixing not in MIXING_MODES:
            raise ValueError(f"DRANNX.mixing must be one of {MIXING_MODES}, got {mixing!r}.")
        self.num_heads = num_heads
        self.in_features = in_features
        self.qkv_features = qkv_features if qkv_features is not None else in_features
        self.out_features = out_features if out_features is not None else in_features
        self.in_kv_features = in_kv_features if in_kv_features is not None else in_features
        if self.qkv_features % num_heads:
            raise ValueError(
                f"DRANNX: qkv_features ({self.qkv_features}) must be divisible by num_heads "
                f"({num_heads}).")
        self.head_dim = self.qkv_features // num_heads
        self.mixing = mixing
        self.diversify = diversify
        self.eps = eps
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.broadcast_dropout = broadcast_dropout
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.precision = precision

        def proj(fan_in):
            return nnx.LinearGeneral(
                fan_in, (num_heads, self.head_dim), dtype=dtype, param_dtype=param_dtype,
                kernel_init=kernel_init, bias_init=bias_init, use_bias=use_bias,
                precision=precision, rngs=rngs)

        self.query = proj(in_features)
        self.key = proj(self.in_kv_features)
        self.value = proj(self.in_kv_features)
        self.out = nnx.LinearGeneral(
            (num_heads, self.head_dim), self.out_features, axis=(-2, -1), dtype=dtype,
            param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
            use_bias=use_bias, precision=precision, rngs=rngs)
        if mixing == "adaptive":
            self.alpha_mlp = AlphaMLPNNX(
                self.head_dim, alpha_hidden_features or self.head_dim,
                bias_init_value=alpha_bias_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.alpha_mlp = nnx.data(None)
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else nnx.data(None)

    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        sow_weights: bool = False,
    ) -> Array:
        """Applies DRA; arguments as in the linen `DRA.__call__` (Eq. 11-18).

        `rngs` (an `nnx.Rngs`, whose `dropout` stream is used, or an `RngStream`) overrides
        the stream kept at construction. With `sow_weights`, `attention_weights`
        [batch..., heads, q, k], `alpha` and `beta` [batch..., heads] are sown as
        `nnx.Intermediate` (collect them with `nnx.capture`).
        """
        if inputs_k is None:
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(f"DRANNX: inputs_q has {inputs_q.shape[-1]} features but the layer "
                             f"was built with in_features={self.in_features}.")

        query = self.query(inputs_q)  # [batch..., q_len, heads, d_h]
        key = self.key(inputs_k)
        value = self.value(inputs_v)
        compute_dtype = query.dtype

        scores = attention_scores(query, key, self.precision)  # Eq. 11
        if self.mixing == "adaptive":
            alpha = self.alpha_mlp(jnp.mean(query, axis=-3))  # Eq. 12
        else:
            alpha = fixed_alpha(self.mixing, scores)
        weights, beta = regulated_weights(scores, alpha, diversify=self.diversify, eps=self.eps,
                                          mask=mask, bias=bias)  # Eqs. 13-18

        if sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", weights)
            self.sow(nnx.Intermediate, "alpha", alpha)
            self.sow(nnx.Intermediate, "beta", beta)

        weights = weights.astype(compute_dtype)
        if self.dropout_rate > 0.0:
            det = deterministic if deterministic is not None else self.deterministic
            if det is None:
                raise ValueError("DRANNX: dropout_rate > 0 needs `deterministic` (call argument, "
                                 "constructor argument, or module.eval()/module.train()).")
            if not det:
                stream = rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs
                if stream is None:
                    stream = self.rngs
                if stream is None:
                    raise ValueError("DRANNX: dropout needs `rngs` in the call when the layer "
                                     "was built with keep_rngs=False.")
                keep_prob = 1.0 - self.dropout_rate
                shape = ((1,) * (weights.ndim - 2) + weights.shape[-2:]
                         if self.broadcast_dropout else weights.shape)
                keep = jax.random.bernoulli(stream(), keep_prob, shape)
                weights = weights * (keep.astype(compute_dtype) / keep_prob)

        heads = jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=self.precision)
        return self.out(heads)


def dra_nnx_from_linen(
    linen_module: DRA,
    variables: Mapping[str, Any],
    in_features: int | None = None,
    rngs: nnx.Rngs | None = None,
) -> DRANNX:
    """Builds a `DRANNX` holding the parameters of a linen `DRA`.

    Args:
      linen_module: the (unbound) linen `DRA` whose settings are copied.
      variables: its variables, `{'params': ...}` (or the bare params dict).
      in_features: query feature size; inferred from `query/kernel` when None and checked
        against it otherwise. The key/value feature size is read from `key/kernel`.
      rngs: used for the dropout stream (default `nnx.Rngs(0)`).

    Returns:
      A `DRANNX` whose forward pass matches `linen_module.apply(variables, ...)`.
    """
    if not isinstance(linen_module, DRA):
        raise TypeError(f"dra_nnx_from_linen: expected a linen DRA, got {type(linen_module)}.")
    params = unfreeze(variables)
    params = params.get("params", params)
    missing = [n for n in ("query", "key", "value", "out") if n not in params]
    if missing or (linen_module.mixing == "adaptive" and "alpha_mlp" not in params):
        raise ValueError(f"dra_nnx_from_linen: variables lack {missing or ['alpha_mlp']}; pass "
                         "the variables returned by DRA(...).init with the same `mixing`.")
    q_kernel = params["query"]["kernel"]  # [in, heads, d_h]
    k_kernel, v_kernel = params["key"]["kernel"], params["value"]["kernel"]
    if in_features is None:
        in_features = q_kernel.shape[0]
    if q_kernel.shape[0] != in_features:
        raise ValueError(f"dra_nnx_from_linen: in_features={in_features} but query/kernel has "
                         f"shape {q_kernel.shape}.")
    if k_kernel.shape[0] != v_kernel.shape[0]:
        raise ValueError("dra_nnx_from_linen: DRANNX needs keys and values of the same feature "
                         f"size; got key/kernel {k_kernel.shape}, value/kernel {v_kernel.shape}.")
    num_heads, head_dim = q_kernel.shape[1:]
    if num_heads != linen_module.num_heads:
        raise ValueError(f"dra_nnx_from_linen: query/kernel has {num_heads} heads, the module "
                         f"{linen_module.num_heads}.")
    alpha_hidden = (params["alpha_mlp"]["hidden"]["kernel"].shape[-1]
                    if linen_module.mixing == "adaptive" else None)
    m = linen_module
    module = DRANNX(
        num_heads, in_features, num_heads * head_dim, params["out"]["kernel"].shape[-1],
        k_kernel.shape[0], mixing=m.mixing, diversify=m.diversify, eps=m.eps,
        alpha_hidden_features=alpha_hidden, alpha_bias_init=m.alpha_bias_init, dtype=m.dtype,
        param_dtype=m.param_dtype, broadcast_dropout=m.broadcast_dropout,
        dropout_rate=m.dropout_rate, deterministic=m.deterministic, precision=m.precision,
        kernel_init=m.kernel_init, bias_init=m.bias_init, use_bias=m.use_bias,
        rngs=rngs if rngs is not None else nnx.Rngs(0))

    state = nnx.state(module, nnx.Param)
    expected = jax.tree.map(jnp.shape, state.to_pure_dict())
    given = jax.tree.map(jnp.shape, params)
    if expected != given:
        raise ValueError(f"dra_nnx_from_linen: parameter shapes differ; DRANNX expects "
                         f"{expected}, variables hold {given}.")
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
    nnx.update(module, state)
    return module
