"""Divergence Regulated Attention (Eqs. 11-18) as a native `flax.nnx.Module`.

`DRANNX` mirrors `flax.nnx.MultiHeadAttention` (flax 0.12.8) as the linen `DRA` mirrors
`MultiHeadDotProductAttention`: the same constructor arguments (including
`num_kv_heads`, `attention_fn`, `decode`, `normalize_qk`, the promote-dtype functions and
parameter metadata), the same call (`mask`, `deterministic`, `rngs`, `sow_weights`,
`decode`, `is_causal`, `out_sharding`, `qkv_sharding`) plus `bias`, `init_cache` and
`set_view`, and the same parameter and cache layout. The DRA arguments (`mixing`,
`diversify`, `eps`, `relative_eps`, `alpha_hidden_features`, `alpha_bias_init`, `causal`,
`query_block_size`) are those of the linen `DRA`, with the same math: both route through
`surgfusion_jax.models.dra_blockwise.dispatch` (docs/design.md §3):

  A+_h = Q_h K_h^T / sqrt(d_h)                         (Eq. 11)
  alpha_h = sigmoid(MLP(mean over queries of Q_h))     (Eq. 12, one MLP shared by heads)
  A_final_h from Eqs. 13-17, head_h = softmax(A_final_h + bias, masked) V_h   (Eq. 18)

`mixing='positive', diversify=False` calls `attention_fn` exactly as
`nnx.MultiHeadAttention` does. Where it differs: `decode=None` everywhere means no cache
(Flax raises), and `is_causal=True` (or `causal=True`) also makes alpha and beta causal
(`surgfusion_jax.models.dra_decode`); decoding the adaptive or diversified forms needs it.
`dra_nnx_from_linen` loads the variables of a linen `DRA`.

Example:
  >>> from flax import nnx
  >>> layer = DRANNX(num_heads=2, in_features=8, qkv_features=16, rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((4, 1, 8)), jnp.ones((4, 3, 8))).shape
  (4, 1, 8)
"""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.core import unfreeze
from flax.nnx.nn import dtypes
from jax import lax

from surgfusion_jax.models.dra import DRA, check_mixing
from surgfusion_jax.models.dra_blockwise import dispatch
from surgfusion_jax.models.dra_decode import check_decode, pooled_query

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
_EMPTY = MappingProxyType({})


class AlphaMLPNNX(nnx.Module):
    """Eq. 12: alpha_h = sigmoid(MLP(AvgPool(Q_h))); Linear -> GELU -> Linear(1)."""

    def __init__(self, in_features: int, hidden_features: int, *, bias_init_value: float = 2.0,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_features, hidden_features, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
        self.logit = nnx.Linear(hidden_features, 1, dtype=dtype, param_dtype=param_dtype,
                                bias_init=nnx.initializers.constant(bias_init_value), rngs=rngs)

    def __call__(self, pooled_query: Array) -> Array:
        # pooled_query: [..., heads, d_h] -> alpha: [..., heads] (float32)
        x = self.logit(nnx.gelu(self.hidden(pooled_query)))
        return jax.nn.sigmoid(x[..., 0].astype(jnp.float32))


class DRANNX(nnx.Module):
    """Divergence Regulated Attention in NNX; a drop-in for `nnx.MultiHeadAttention`.

    Arguments as `nnx.MultiHeadAttention`, plus `mixing` ('adaptive' | 'positive' |
    'negative'), `diversify`, `eps`, `relative_eps`, `alpha_hidden_features` (default d_h),
    `alpha_bias_init`, `causal` and `query_block_size`, as in the linen `DRA`.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        mixing: str = "adaptive",
        diversify: bool = True,
        eps: float = 1e-8,
        relative_eps: float = 0.0,
        alpha_hidden_features: int | None = None,
        alpha_bias_init: float = 2.0,
        causal: bool = False,
        query_block_size: int | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: Any = None,
        kernel_init: Initializer = nnx.nn.linear.default_kernel_init,
        out_kernel_init: Initializer | None = None,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        out_bias_init: Initializer | None = None,
        use_bias: bool = True,
        attention_fn: Callable[..., Array] = nnx.dot_product_attention,
        decode: bool | None = None,
        normalize_qk: bool = False,
        qkv_promote_dtype: Callable = dtypes.promote_dtype,
        out_promote_dtype: Callable = dtypes.promote_dtype,
        ln_promote_dtype: Callable = dtypes.promote_dtype,
        qkv_dot_general: Any = None,
        out_dot_general: Any = None,
        qkv_dot_general_cls: Any = None,
        out_dot_general_cls: Any = None,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
        kernel_metadata: Mapping[str, Any] = _EMPTY,
        out_kernel_metadata: Mapping[str, Any] = _EMPTY,
        bias_metadata: Mapping[str, Any] = _EMPTY,
        out_bias_metadata: Mapping[str, Any] = _EMPTY,
        query_ln_scale_metadata: Mapping[str, Any] = _EMPTY,
        key_ln_scale_metadata: Mapping[str, Any] = _EMPTY,
    ):
        check_mixing("DRANNX", mixing)
        self.num_heads = num_heads
        self.in_features = in_features
        self.qkv_features = qkv_features if qkv_features is not None else in_features
        self.out_features = out_features if out_features is not None else in_features
        self.in_kv_features = in_kv_features if in_kv_features is not None else in_features
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads "
                             f"({self.num_kv_heads}).")
        if self.qkv_features % num_heads:
            raise ValueError(f"DRANNX: qkv_features ({self.qkv_features}) must be divisible "
                             f"by num_heads ({num_heads}).")
        self.head_dim = self.qkv_features // num_heads
        self.mixing, self.diversify, self.eps = mixing, diversify, eps
        self.relative_eps = relative_eps
        self.causal, self.query_block_size = causal, query_block_size
        self.dtype, self.param_dtype = dtype, param_dtype
        self.broadcast_dropout, self.dropout_rate = broadcast_dropout, dropout_rate
        self.deterministic, self.precision, self.use_bias = deterministic, precision, use_bias
        self.attention_fn, self.decode, self.normalize_qk = attention_fn, decode, normalize_qk
        self.qkv_promote_dtype, self.out_promote_dtype = qkv_promote_dtype, out_promote_dtype
        self.ln_promote_dtype = ln_promote_dtype
        self.qkv_dot_general, self.out_dot_general = qkv_dot_general, out_dot_general
        self.qkv_dot_general_cls = qkv_dot_general_cls
        self.out_dot_general_cls = out_dot_general_cls

        proj = functools.partial(
            nnx.LinearGeneral, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
            bias_init=bias_init, use_bias=use_bias, precision=precision,
            promote_dtype=qkv_promote_dtype, dot_general=qkv_dot_general,
            dot_general_cls=qkv_dot_general_cls, kernel_metadata=kernel_metadata,
            bias_metadata=bias_metadata)
        self.query = proj(in_features, (num_heads, self.head_dim), rngs=rngs)
        self.key = proj(self.in_kv_features, (self.num_kv_heads, self.head_dim), rngs=rngs)
        self.value = proj(self.in_kv_features, (self.num_kv_heads, self.head_dim), rngs=rngs)
        if normalize_qk:
            ln = functools.partial(nnx.LayerNorm, self.head_dim, use_bias=False, dtype=dtype,
                                   param_dtype=param_dtype, promote_dtype=ln_promote_dtype,
                                   rngs=rngs)
            self.query_ln = ln(scale_metadata=query_ln_scale_metadata)
            self.key_ln = ln(scale_metadata=key_ln_scale_metadata)
        else:
            self.query_ln = nnx.data(None)
            self.key_ln = nnx.data(None)
        self.out = nnx.LinearGeneral(
            (num_heads, self.head_dim), self.out_features, axis=(-2, -1),
            kernel_init=out_kernel_init or kernel_init, bias_init=out_bias_init or bias_init,
            use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
            promote_dtype=out_promote_dtype, dot_general=out_dot_general,
            dot_general_cls=out_dot_general_cls, rngs=rngs,
            kernel_metadata=out_kernel_metadata or kernel_metadata,
            bias_metadata=out_bias_metadata or bias_metadata)
        if mixing == "adaptive":
            self.alpha_mlp = AlphaMLPNNX(
                self.head_dim, alpha_hidden_features or self.head_dim,
                bias_init_value=alpha_bias_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.alpha_mlp = nnx.data(None)
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else nnx.data(None)
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)
        self.cache_index = nnx.data(None)
        self.cached_query_sum = nnx.data(None)
        self.cached_gram = nnx.data(None)

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
        decode: bool | None = None,
        is_causal: bool = False,
        out_sharding: Any = None,
        qkv_sharding: Any = None,
    ) -> Array:
        """Applies DRA; arguments as `nnx.MultiHeadAttention.__call__` plus `bias` (added to
        A_final). With `sow_weights`, `attention_weights`, `alpha` and `beta` are sown as
        `nnx.Intermediate` (collect them with `nnx.capture`)."""
        if rngs is None:
            rngs = self.rngs
        elif isinstance(rngs, nnx.Rngs):
            rngs = rngs.dropout
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError("`inputs_k` cannot be None if `inputs_v` is not None. To "
                                 "have both `inputs_k` and `inputs_v` be the same value, pass "
                                 "in the value to `inputs_k` and leave `inputs_v` as None.")
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(f"DRANNX: incompatible input dimension, got {inputs_q.shape[-1]} "
                             f"but module expects in_features={self.in_features}.")

        query = self.query(inputs_q, out_sharding=qkv_sharding)
        key = self.key(inputs_k, out_sharding=qkv_sharding)
        value = self.value(inputs_v, out_sharding=qkv_sharding)
        if self.normalize_qk:
            query, key = self.query_ln(query), self.key_ln(key)

        causal = self.causal or is_causal
        q_start, gram, decoding = 0, None, False
        if decode if decode is not None else bool(self.decode):
            check_decode("DRANNX", self.mixing, self.diversify, causal)
            key, value, mask, q_start = self._update_cache(key, value, mask)
            gram = self.cached_gram[...] if self.diversify else None
            decoding = True

        if self.dropout_rate > 0.0:
            det = deterministic if deterministic is not None else self.deterministic
            if det is None:
                raise ValueError("DRANNX: dropout_rate > 0 needs `deterministic` (call argument, "
                                 "constructor argument, or module.eval()/module.train()).")
            if not det and rngs is None:
                raise ValueError("'rngs' must be provided to __call__ method if DRANNX "
                                 "instance is defined with keep_rngs=False.")
            dropout_rng = None if det else rngs()
        else:
            det, dropout_rng = True, None

        if self.mixing == "adaptive":  # Eq. 12
            if decoding:
                pooled, self.cached_query_sum[...] = pooled_query(
                    query, causal=True, query_sum=self.cached_query_sum[...], q_start=q_start)
            else:
                pooled, _ = pooled_query(query, causal=causal)
            alpha = self.alpha_mlp(pooled)
        else:
            rows = (query.shape[-3],) if causal else ()
            alpha = jnp.full(query.shape[:-3] + rows + (self.num_heads,),
                             1.0 if self.mixing == "positive" else 0.0, jnp.float32)

        default_fn = self.attention_fn is nnx.dot_product_attention
        blockwise = self.query_block_size is not None and query.shape[-3] > self.query_block_size
        if self.num_kv_heads != self.num_heads and (self.diversify or blockwise):
            repeat = self.num_heads // self.num_kv_heads  # grouped heads share keys (GQA)
            key, value = (jnp.repeat(x, repeat, axis=-2) for x in (key, value))

        def call_attention_fn(q, k, v, attn_mask, attn_bias):
            kwargs = {} if attn_bias is None else {"bias": attn_bias}
            return self.attention_fn(
                q, k, v, mask=attn_mask, dropout_rng=dropout_rng,
                dropout_rate=self.dropout_rate, broadcast_dropout=self.broadcast_dropout,
                deterministic=det, dtype=self.dtype, precision=self.precision,
                module=self if sow_weights else None, is_causal=is_causal, **kwargs)

        dropout = None if det else (dropout_rng, self.dropout_rate, self.broadcast_dropout)
        heads, weights, beta, gram = dispatch(
            query, key, value, alpha, mixing=self.mixing, diversify=self.diversify,
            eps=self.eps, causal=causal, q_start=q_start, gram=gram, mask=mask, bias=bias,
            call_attention_fn=call_attention_fn, default_attention_fn=default_fn,
            block_size=self.query_block_size, dropout=dropout, keep_fp32=False,
            precision=self.precision, qk_einsum=None, wv_einsum=None,
            sow_weights=sow_weights, owner="DRANNX", mask_causal_for_fn=self.causal,
            relative_eps=self.relative_eps)
        if decoding and self.diversify:
            self.cached_gram[...] = gram

        if sow_weights:
            if weights is not None:
                self.sow(nnx.Intermediate, "attention_weights", weights)
            self.sow(nnx.Intermediate, "alpha", alpha)
            self.sow(nnx.Intermediate, "beta", beta)
        return self.out(heads, out_sharding=out_sharding)

    def _update_cache(self, key, value, mask):
        """`nnx.MultiHeadAttention`'s cache update; returns (key, value, mask, row index)."""
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
        *batch_dims, max_length, num_kv_heads, depth_per_head = self.cached_key.shape
        expected = tuple(batch_dims) + (1, num_kv_heads, depth_per_head)
        if expected != key.shape:
            raise ValueError("Autoregressive cache shape error, expected key shape "
                             f"{expected} instead got {key.shape}.")
        cur_index = self.cache_index[...]
        zero = jnp.array(0, dtype=lax.dtype(cur_index.dtype))
        indices = (zero,) * len(batch_dims) + (cur_index, zero, zero)
        key = lax.dynamic_update_slice(self.cached_key[...], key, indices)
        value = lax.dynamic_update_slice(self.cached_value[...], value, indices)
        self.cached_key[...] = key
        self.cached_value[...] = value
        self.cache_index[...] += 1
        mask = nnx.combine_masks(mask, jnp.broadcast_to(
            jnp.arange(max_length) <= cur_index, tuple(batch_dims) + (1, 1, max_length)))
        return key, value, mask, cur_index

    def init_cache(self, input_shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> None:
        """As `nnx.MultiHeadAttention.init_cache`, plus the causal statistics (float32):
        `cached_query_sum` [batch..., H, d_h] (adaptive) and `cached_gram` [batch..., H, H]
        (diversified)."""
        batch, max_length = tuple(input_shape[:-2]), input_shape[-2]
        shape = batch + (max_length, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))
        if self.mixing == "adaptive":
            self.cached_query_sum = nnx.Cache(
                jnp.zeros(batch + (self.num_heads, self.head_dim), jnp.float32))
        if self.diversify:
            self.cached_gram = nnx.Cache(
                jnp.zeros(batch + (self.num_heads, self.num_heads), jnp.float32))

    def set_view(self, deterministic: bool | None = None, decode: bool | None = None,
                 batch_size: int | tuple[int, ...] | None = None,
                 max_length: int | None = None) -> None:
        """As `nnx.MultiHeadAttention.set_view` (used by `nnx.view`)."""
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is not None:
            self.decode = decode
            if self.cached_key is None:
                if batch_size is None:
                    raise TypeError("'batch_size' must be provided when initializing cache.")
                if max_length is None:
                    raise TypeError("'max_length' must be provided when initializing cache.")
                if isinstance(batch_size, int):
                    batch_size = (batch_size,)
                self.init_cache(tuple(batch_size) + (max_length, self.in_features),
                                self.dtype or jnp.float32)


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
    if (m.attention_fn is not nn.dot_product_attention or m.force_fp32_for_softmax
            or m.qk_attn_weights_einsum_cls is not None or m.qkv_dot_general is not None
            or m.qkv_dot_general_cls is not None):
        raise ValueError("dra_nnx_from_linen: attention_fn, force_fp32_for_softmax, einsum and "
                         "dot_general overrides are not carried over; build the DRANNX "
                         "yourself.")
    module = DRANNX(
        num_heads, in_features, num_heads * head_dim, params["out"]["kernel"].shape[-1],
        in_kv_features=k_kernel.shape[0], mixing=m.mixing, diversify=m.diversify, eps=m.eps,
        relative_eps=m.relative_eps,
        alpha_hidden_features=alpha_hidden, alpha_bias_init=m.alpha_bias_init,
        causal=m.causal, query_block_size=m.query_block_size, dtype=m.dtype,
        param_dtype=m.param_dtype, broadcast_dropout=m.broadcast_dropout,
        dropout_rate=m.dropout_rate, deterministic=m.deterministic, precision=m.precision,
        kernel_init=m.kernel_init, out_kernel_init=m.out_kernel_init, bias_init=m.bias_init,
        out_bias_init=m.out_bias_init, use_bias=m.use_bias, decode=m.decode,
        normalize_qk=m.normalize_qk, rngs=rngs if rngs is not None else nnx.Rngs(0))

    state = nnx.state(module, nnx.Param)
    expected = jax.tree.map(jnp.shape, state.to_pure_dict())
    given = jax.tree.map(jnp.shape, params)
    if expected != given:
        raise ValueError(f"dra_nnx_from_linen: parameter shapes differ; DRANNX expects "
                         f"{expected}, variables hold {given}.")
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
    nnx.update(module, state)
    return module
