"""Divergence Regulated Attention (DRA), Eqs. 11-18 of He et al. (SurgFusion-Net).

`DRA` is a drop-in replacement for `flax.linen.MultiHeadDotProductAttention`: every field
and call argument of Flax's layer (flax 0.12.8), the same `query/key/value/out` (and
`query_ln/key_ln`) parameters and the same `cache` variables. Per head h, with Q_h, K_h
the projected inputs and d_h = qkv_features / num_heads:

  A+_h     = Q_h K_h^T / sqrt(d_h),  A-_h = -A+_h                     (Eq. 11)
  alpha_h  = sigmoid(MLP(mean over queries of Q_h))                   (Eq. 12)
  Amix_h   = alpha_h A+_h + (1 - alpha_h) A-_h                         (Eq. 13)
  P_main   = mean_h Amix_h                                            (Eq. 14)
  c_h      = <Amix_h, P_main> / (||P_main||^2 + eps)
  beta_h   = sigmoid(1 - c_h)                                         (Eq. 15)
  Adivg_h  = Amix_h - c_h P_main                                      (Eq. 16)
  Afinal_h = Amix_h + beta_h Adivg_h                                  (Eq. 17)
  head_h   = softmax(Afinal_h + bias, masked) V_h                     (Eq. 18)

Inner products and norms in Eq. 15 run over the whole q_len x kv_len score matrix of one
sample and head. A boolean `mask` and an additive `bias` act on A_final only: applied
before Eq. 13 the negative branch would turn a -1e9 mask into +1e9 (docs/design.md §3).

How the forms run (docs/design.md §3.5-3.8):
  * Without diversification A_final_h = (2 alpha_h - 1) A+_h, i.e. dot-product attention
    with the query scaled by 2 alpha_h - 1, so `attention_fn` (Flax's by default) runs
    Eq. 18 with exactly Flax's dtypes, dropout and sowing. `mixing='positive',
    diversify=False` is Flax's layer, bit for bit; `'negative'` negates the query.
  * Diversified forms compute Eqs. 12-17 in float32 and their softmax in float32; the
    weights are then cast to `dtype` unless `force_fp32_for_softmax` (as in Flax). A
    custom `attention_fn` receives the equivalent widened query/key (`dra_blockwise`).
  * `causal=True`: Eqs. 12 and 15 over the prefix (`dra_decode`), so `decode=True`
    (Flax's cache plus the running query sum and an H x H Gram matrix) reproduces the
    full-sequence output token by token.
  * `query_block_size`: memory O(block x kv_len) for long sequences (`dra_blockwise`).

Decisions the paper leaves open (docs/design.md §3.2): the alpha MLP is shared by all
heads, Dense(d_h -> hidden) + GELU + Dense(-> 1), last bias `alpha_bias_init` (2.0,
alpha ~ 0.88; at alpha = 0.5 Eq. 13 cancels every score).

Flax's own attention tests pass with DRA in Flax's place (23/23). The adapted copy lives
outside the repository: `tests/linen/linen_attention_test.py` of google/flax at the 0.12.8
release (commit 3a491108), with every `nn.MultiHeadDotProductAttention(` replaced by
`functools.partial(DRA, mixing="positive", diversify=False)(` and the submodule names
`'MultiHeadDotProductAttention_<i>'` by `'DRA_<i>'` (`nn.MultiHeadAttention`, Flax's alias,
stays Flax's, so the alias tests compare DRA with Flax bit for bit). Run it with

  cd /tmp/flax_attn_check && /work/main/.venv/bin/python -m pytest -q dra_linen_attention_test.py

(`/tmp/flax_attn_check/adapt.sh` rebuilds it from `linen_attention_test_orig.py`;
`adapt_nnx.sh` does the same for `tests/nnx/nn/attention_test.py` and `DRANNX`, 110/110.)
Our own tests of the same behaviours: tests/models/test_dra_flax_parity.py.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import unfreeze
from jax import lax

from surgfusion_jax.models.dra_absorbed import absorbed_attention
from surgfusion_jax.models.dra_blockwise import (  # noqa: F401  (re-exported)
    attention_scores, dispatch, fixed_alpha, mix_and_diversify, regulated_attention,
    regulated_weights)
from surgfusion_jax.models.dra_decode import check_decode, pooled_query

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

MIXING_MODES = ("adaptive", "positive", "negative")


class AlphaMLP(nn.Module):
    """Eq. 12: alpha_h = sigmoid(MLP(AvgPool(Q_h))), one MLP shared by the heads."""

    hidden_features: int
    bias_init_value: float = 2.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled_query: Array) -> Array:
        # pooled_query: [..., heads, d_h] -> alpha: [..., heads] (float32)
        x = nn.Dense(self.hidden_features, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="hidden")(pooled_query)
        x = nn.gelu(x)
        x = nn.Dense(1, dtype=self.dtype, param_dtype=self.param_dtype,
                     bias_init=nn.initializers.constant(self.bias_init_value),
                     name="logit")(x)
        return jax.nn.sigmoid(x[..., 0].astype(jnp.float32))


def check_mixing(owner: str, mixing: str) -> None:
    if mixing not in MIXING_MODES:
        raise ValueError(f"{owner}.mixing must be one of {MIXING_MODES}, got {mixing!r}.")


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class DRA(nn.Module):
    """Divergence Regulated Attention; a drop-in for `nn.MultiHeadDotProductAttention`.

    Attributes: all of Flax's (`num_heads` ... `attn_weights_value_einsum_cls`, same
    defaults and meaning), plus
      mixing: 'adaptive' (Eqs. 12-13), 'positive' (alpha = 1) or 'negative' (alpha = 0).
      diversify: apply the divergence constraint of Eqs. 14-17.
      eps: epsilon of Eq. 15 (1e-8, the paper).
      relative_eps: rho, a second term rho * mean_h ||A_mix_h||^2 in Eq. 15's denominator
        that bounds c_h when the heads cancel in P_main (`dra_decode.
        projection_coefficients`); 0 = the paper's Eq. 15.
      alpha_hidden_features: hidden width of the alpha MLP (default d_h).
      alpha_bias_init: initial logit of alpha (module docstring).
      causal: causal attention with prefix statistics (`dra_decode`); required by
        `decode=True` for the forms with statistics (adaptive or diversified).
      query_block_size: query rows per block of the memory-bounded path; None = dense.
      output_projection: False returns the concatenated heads without the output
        projection W^O (PAMFN's attention has none; needs out_features = qkv_features).
      absorb_projections: apply W^k and W^v on the query side (`dra_absorbed`): the same
        parameters and results to round-off, without projecting the key/value tokens,
        which is ~kv_len times cheaper for short queries over many tokens (SurgFusion-Net's
        DFB and CSFB: one query per time step). Dense, non-causal, Flax's default
        attention_fn only.

    Call: Flax's arguments (`inputs_q, inputs_k, inputs_v, *, inputs_kv, mask,
    deterministic, dropout_rng, sow_weights`) plus `bias`, an additive float bias
    broadcastable to [batch..., heads, q_len, kv_len] added to A_final (passed to
    `attention_fn` as its `bias`). `sow_weights` also sows `alpha` and `beta`
    ([batch..., heads], with a q_len axis before heads when causal).

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
    out_kernel_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros_init()
    out_bias_init: Initializer | None = None
    use_bias: bool = True
    attention_fn: Callable[..., Array] = nn.dot_product_attention
    decode: bool = False
    normalize_qk: bool = False
    force_fp32_for_softmax: bool = False
    qkv_dot_general: Any = None
    out_dot_general: Any = None
    qkv_dot_general_cls: Any = None
    out_dot_general_cls: Any = None
    qk_attn_weights_einsum_cls: Callable[..., Callable[..., Array]] | None = None
    attn_weights_value_einsum_cls: Callable[..., Callable[..., Array]] | None = None
    mixing: str = "adaptive"
    diversify: bool = True
    eps: float = 1e-8
    relative_eps: float = 0.0
    alpha_hidden_features: int | None = None
    alpha_bias_init: float = 2.0
    causal: bool = False
    query_block_size: int | None = None
    output_projection: bool = True
    absorb_projections: bool = False

    def _check_absorbable(self) -> None:
        unsupported = {"decode": self.decode, "normalize_qk": self.normalize_qk,
                       "causal": self.causal, "query_block_size": self.query_block_size,
                       "attention_fn": self.attention_fn is not nn.dot_product_attention,
                       "qkv_dot_general": self.qkv_dot_general or self.qkv_dot_general_cls,
                       "qk/wv einsum": (self.qk_attn_weights_einsum_cls
                                        or self.attn_weights_value_einsum_cls)}
        used = [name for name, value in unsupported.items() if value]
        if used:
            raise ValueError(f"DRA: absorb_projections=True runs its own dense attention "
                             f"and cannot be combined with {', '.join(used)}.")

    def _resolve_inputs(self, inputs_q, inputs_k, inputs_v, inputs_kv):
        """Flax's rules for the optional key/value inputs, with its errors and warnings."""
        if inputs_kv is not None:
            if inputs_k is not None or inputs_v is not None:
                raise ValueError(
                    "If either `inputs_k` or `inputs_v` is not None, `inputs_kv` must be None. "
                    "If `inputs_kv` is not None, both `inputs_k` and `inputs_v` must be None. "
                    "Use `inputs_k` and `inputs_v`.")
            warnings.warn("The inputs_kv arg will be deprecated soon. Use inputs_k and "
                          "inputs_v instead.", DeprecationWarning, stacklevel=3)
            return inputs_kv, inputs_kv
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError(
                    "`inputs_k` cannot be None if `inputs_v` is not None. To have both "
                    "`inputs_k` and `inputs_v` be the same value, pass in the value to "
                    "`inputs_k` and leave `inputs_v` as None.")
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        elif inputs_v.shape[-1] == inputs_v.shape[-2]:
            warnings.warn(
                f"You are passing an array of shape {inputs_v.shape} to the `inputs_v` arg, "
                "when you may have intended to pass it to the `mask` arg. As in Flax >= "
                "0.7.4, the function signature of MultiHeadDotProductAttention's `__call__` "
                "method has changed to `__call__(inputs_q, inputs_k=None, inputs_v=None, *, "
                "inputs_kv=None, mask=None, deterministic=None)`. Use the kwarg `mask`.",
                DeprecationWarning, stacklevel=3)
        return inputs_k, inputs_v

    def _decode_cache(self, query, key, value, mask):
        """Flax's cache (`cached_key`, `cached_value`, `cache_index`) plus the causal
        statistics: `cached_query_sum` [..., H, d_h] and `cached_gram` [..., H, H]."""
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape,
                                     value.dtype)
        cache_index = self.variable("cache", "cache_index",
                                    lambda: jnp.array(0, dtype=jnp.int32))
        batch = query.shape[:-3]
        heads, depth = query.shape[-2:]
        stats = {}
        if self.mixing == "adaptive":
            stats["query_sum"] = self.variable("cache", "cached_query_sum", jnp.zeros,
                                               batch + (heads, depth), jnp.float32)
        if self.diversify:
            stats["gram"] = self.variable("cache", "cached_gram", jnp.zeros,
                                          batch + (heads, heads), jnp.float32)
        if not initialized:
            return key, value, mask, None
        *batch_dims, max_length, num_heads, depth_per_head = cached_key.value.shape
        expected = tuple(batch_dims) + (1, num_heads, depth_per_head)
        if expected != query.shape:
            raise ValueError("Autoregressive cache shape error, expected query shape "
                             f"{expected} instead got {query.shape}.")
        cur_index = cache_index.value
        zero = jnp.array(0, dtype=lax.dtype(cur_index.dtype))
        indices = (zero,) * len(batch_dims) + (cur_index, zero, zero)
        key = lax.dynamic_update_slice(cached_key.value, key, indices)
        value = lax.dynamic_update_slice(cached_value.value, value, indices)
        cached_key.value, cached_value.value = key, value
        cache_index.value = cache_index.value + 1
        mask = nn.combine_masks(mask, jnp.broadcast_to(
            jnp.arange(max_length) <= cur_index, tuple(batch_dims) + (1, 1, max_length)))
        return key, value, mask, (cur_index, stats)

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        inputs_kv: Array | None = None,
        mask: Array | None = None,
        bias: Array | None = None,
        deterministic: bool | None = None,
        dropout_rng: Array | None = None,
        sow_weights: bool = False,
    ) -> Array:
        """Applies DRA; arguments as `nn.MultiHeadDotProductAttention.__call__` plus `bias`.

        Returns:
          [batch..., q_len, out_features].
        """
        check_mixing("DRA", self.mixing)
        if self.absorb_projections:
            self._check_absorbable()
        if self.decode:
            check_decode("DRA", self.mixing, self.diversify, self.causal)
        inputs_k, inputs_v = self._resolve_inputs(inputs_q, inputs_k, inputs_v, inputs_kv)
        out_features = self.out_features or inputs_q.shape[-1]
        qkv_features = self.qkv_features or inputs_q.shape[-1]
        if qkv_features % self.num_heads:
            raise ValueError(f"DRA: qkv_features ({qkv_features}) must be divisible by "
                             f"num_heads ({self.num_heads}).")
        head_dim = qkv_features // self.num_heads

        dense = functools.partial(
            nn.DenseGeneral, axis=-1, features=(self.num_heads, head_dim), dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=self.kernel_init,
            bias_init=self.bias_init, use_bias=self.use_bias, precision=self.precision,
            dot_general=self.qkv_dot_general, dot_general_cls=self.qkv_dot_general_cls)
        # [batch..., length, heads, head_dim]
        query = dense(name="query")(inputs_q)
        if self.absorb_projections:  # the same parameters; the kv tokens are never projected
            projections = {}
            for name, tokens in (("key", inputs_k), ("value", inputs_v)):
                layer = dense(name=name)
                layer(jnp.zeros((1, tokens.shape[-1]), tokens.dtype))  # creates its params
                projections[name] = layer.variables["params"]
            key, value = inputs_k, inputs_v
        else:
            key = dense(name="key")(inputs_k)
            value = dense(name="value")(inputs_v)
        if self.normalize_qk:
            ln = functools.partial(nn.LayerNorm, use_bias=False, dtype=self.dtype,
                                   param_dtype=self.param_dtype)
            query, key = ln(name="query_ln")(query), ln(name="key_ln")(key)

        decoding = None
        if self.decode:
            key, value, mask, decoding = self._decode_cache(query, key, value, mask)

        if self.dropout_rate > 0.0:
            m_deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            if not m_deterministic and dropout_rng is None:
                dropout_rng = self.make_rng("dropout")
        else:
            m_deterministic = True

        # Eq. 12 (per query row when causal; decoding the stats forms implies causal)
        causal = self.causal
        q_start, gram = 0, None
        if self.mixing == "adaptive":
            mlp = AlphaMLP(self.alpha_hidden_features or head_dim, self.alpha_bias_init,
                           dtype=self.dtype, param_dtype=self.param_dtype, name="alpha_mlp")
            if decoding is not None:
                q_start, stats = decoding
                pooled, stats["query_sum"].value = pooled_query(
                    query, causal=True, query_sum=stats["query_sum"].value, q_start=q_start)
            else:
                pooled, _ = pooled_query(query, causal=causal)
            alpha = mlp(pooled)
        else:
            shape = query.shape[:-3] + ((query.shape[-3],) if causal else ()) + (self.num_heads,)
            alpha = jnp.full(shape, 1.0 if self.mixing == "positive" else 0.0, jnp.float32)
        if decoding is not None:
            q_start, stats = decoding
            gram = stats["gram"].value if self.diversify else None

        qk_einsum = self.qk_attn_weights_einsum_cls() if self.qk_attn_weights_einsum_cls else None
        wv_einsum = (self.attn_weights_value_einsum_cls()
                     if self.attn_weights_value_einsum_cls else None)
        default_fn = self.attention_fn is nn.dot_product_attention

        def call_attention_fn(q, k, v, attn_mask, attn_bias):
            kwargs = dict(mask=attn_mask, dropout_rng=dropout_rng,
                          dropout_rate=self.dropout_rate,
                          broadcast_dropout=self.broadcast_dropout,
                          deterministic=m_deterministic, dtype=self.dtype,
                          precision=self.precision,
                          force_fp32_for_softmax=self.force_fp32_for_softmax,
                          qk_attn_weights_einsum=qk_einsum,
                          attn_weights_value_einsum=wv_einsum)
            accepted = inspect.signature(self.attention_fn).parameters
            kwargs = {n: x for n, x in kwargs.items() if n in accepted}
            if attn_bias is not None:
                if not _accepts(self.attention_fn, "bias"):
                    raise ValueError("DRA: `bias=` needs an attention_fn with a `bias` "
                                     "argument.")
                kwargs["bias"] = attn_bias
            if sow_weights:
                kwargs["module"] = self
            return self.attention_fn(q, k, v, **kwargs)

        dropout = None
        if not m_deterministic:
            dropout = (dropout_rng, self.dropout_rate, self.broadcast_dropout)
        if self.absorb_projections:
            heads, weights, beta = absorbed_attention(
                query, key, value, projections["key"], projections["value"], alpha,
                diversify=self.diversify, eps=self.eps, relative_eps=self.relative_eps,
                mask=mask, bias=bias, dropout=dropout, keep_fp32=self.force_fp32_for_softmax,
                precision=self.precision)
            weights = weights if sow_weights else None
        else:
            heads, weights, beta, gram = dispatch(
                query, key, value, alpha, mixing=self.mixing, diversify=self.diversify,
                eps=self.eps, causal=causal, q_start=q_start, gram=gram, mask=mask, bias=bias,
                call_attention_fn=call_attention_fn, default_attention_fn=default_fn,
                block_size=self.query_block_size, dropout=dropout,
                keep_fp32=self.force_fp32_for_softmax, precision=self.precision,
                qk_einsum=qk_einsum, wv_einsum=wv_einsum, sow_weights=sow_weights,
                owner="DRA", relative_eps=self.relative_eps)
        if decoding is not None and self.diversify:
            decoding[1]["gram"].value = gram

        if sow_weights:
            if weights is not None:
                self.sow("intermediates", "attention_weights", weights)
            self.sow("intermediates", "alpha", alpha)
            self.sow("intermediates", "beta", beta)
        if not self.output_projection:
            if out_features != heads.shape[-2] * heads.shape[-1]:
                raise ValueError(f"DRA: output_projection=False needs out_features "
                                 f"({out_features}) = qkv_features "
                                 f"({heads.shape[-2] * heads.shape[-1]}).")
            return heads.reshape(heads.shape[:-2] + (-1,))
        return nn.DenseGeneral(
            features=out_features, axis=(-2, -1),
            kernel_init=self.out_kernel_init or self.kernel_init,
            bias_init=self.out_bias_init or self.bias_init, use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            dot_general=self.out_dot_general, dot_general_cls=self.out_dot_general_cls,
            name="out")(heads)


# ----------------------------------------------------------------------------- migration

def _is_mha_params(tree: Any) -> bool:
    return isinstance(tree, Mapping) and all(
        isinstance(tree.get(n), Mapping) and "kernel" in tree[n]
        for n in ("query", "key", "value", "out"))


def alpha_mlp_params(head_dim: int, *, hidden_features: int | None = None,
                     initial_alpha: float = 0.99, rng: Array | None = None,
                     dtype: Any = jnp.float32) -> dict:
    """`alpha_mlp` parameters with alpha = `initial_alpha` for every input (Eq. 12).

    The last layer's kernel is zero and its bias logit(initial_alpha); the hidden layer
    keeps a random (lecun-normal) kernel, so the gradient reaches the zero kernel at once.
    """
    if not 0.0 < initial_alpha < 1.0:
        raise ValueError(f"initial_alpha must lie in (0, 1), got {initial_alpha}.")
    hidden = hidden_features or head_dim
    rng = jax.random.key(0) if rng is None else rng
    logit = float(np.log(initial_alpha) - np.log1p(-initial_alpha))
    return {
        "hidden": {"kernel": nn.initializers.lecun_normal()(rng, (head_dim, hidden), dtype),
                   "bias": jnp.zeros((hidden,), dtype)},
        "logit": {"kernel": jnp.zeros((hidden, 1), dtype),
                  "bias": jnp.full((1,), logit, dtype)},
    }


def from_mha_params(params: Mapping, *, mixing: str = "adaptive", initial_alpha: float = 0.99,
                    alpha_hidden_features: int | None = None,
                    rng: Array | None = None) -> dict:
    """Turns `MultiHeadDotProductAttention` parameters into `DRA` parameters.

    `params` is one attention layer's parameters, a whole model's parameter tree or its
    variables (`{'params': ..., ...}`); every sub-dict with `query/key/value/out` kernels
    (and no `alpha_mlp` yet) is converted. The projections are kept as they are; for
    `mixing='adaptive'` an `alpha_mlp` is added with alpha = `initial_alpha` for every
    input, so A_mix = (2 alpha - 1) A+ starts at 0.98 A+ with the default and
    `DRA(mixing='adaptive', diversify=False)` starts close to the original layer. The
    divergence term (Eqs. 15-17) has no parameters: diversified forms start from the
    original scores plus beta (A_mix - c P_main). Build the DRA with the same
    `alpha_hidden_features`; keep the layer's `name=` so the paths match.

    Returns a new tree of the same structure (the input is not modified).
    """
    check_mixing("from_mha_params", mixing)
    rng = jax.random.key(0) if rng is None else rng
    found = []

    def convert(tree):
        if _is_mha_params(tree):
            new = dict(tree)
            if mixing == "adaptive" and "alpha_mlp" not in tree:
                kernel = tree["query"]["kernel"]
                new["alpha_mlp"] = alpha_mlp_params(
                    kernel.shape[-1], hidden_features=alpha_hidden_features,
                    initial_alpha=initial_alpha, rng=jax.random.fold_in(rng, len(found)),
                    dtype=kernel.dtype)
            found.append(new)
            return new
        if isinstance(tree, Mapping):
            return {k: convert(v) for k, v in tree.items()}
        return tree

    result = convert(unfreeze(params))
    if not found:
        raise ValueError("from_mha_params: no MultiHeadDotProductAttention parameters "
                         "(sub-dicts with query/key/value/out kernels) found.")
    return result
