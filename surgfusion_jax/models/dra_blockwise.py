"""DRA's attention core (Eqs. 11, 13-18) on projected heads: dense, causal and blockwise.

Everything here takes the projected `query`, `key`, `value` [batch..., length, H, d_h]
(keys and values with as many heads as the queries) and alpha from Eq. 12, and is shared
by the linen `DRA` and `DRANNX`. Three paths (docs/design.md §3.7-3.8):

  * dense, non-causal: the score matrix at once (`regulated_weights`);
  * causal (`surgfusion_jax.models.dra_decode`): coefficients per query row from the
    Gram matrix of the score rows seen so far, carried from block to block;
  * blockwise: memory O(block x kv_len) instead of O(q_len x kv_len). c_h and beta_h of
    Eq. 15 are sums over the whole score matrix, so the non-causal form takes two passes
    over the query blocks: the first accumulates <A_mix_h, P_main> and ||P_main||^2,
    the second forms A_final, the softmax and the values block by block. The causal form
    needs one pass (row t only needs rows <= t). Each block is rematerialised in the
    backward pass (`jax.checkpoint`), so gradients stay memory-bounded too.

Writing a = 2 alpha - 1, Eq. 13 is A_mix = a A+, and Eqs. 14-17 give
A_final_h = sum_g w_hg A+_g with w_hg = (1 + beta_h) a_h [h = g] - beta_h c_h a_g / H: a
dot-product attention with a wider query. `augmented_query_key` builds it, so a custom
`attention_fn` (e.g. a fused kernel) can run Eq. 18 of the diversified forms.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from surgfusion_jax.models import dra_decode

Array = jax.Array
Einsum = Callable[..., Array]


# ----------------------------------------------------------------------------- dense math

def scaled_query(query: Array) -> Array:
    """Q_h / sqrt(d_h), in the query's dtype (Flax scales the query before the product)."""
    return query / jnp.sqrt(query.shape[-1]).astype(query.dtype)


def attention_scores(query: Array, key: Array, precision: Any = None,
                     einsum: Einsum | None = None) -> Array:
    """Eq. 11: A+ = Q K^T / sqrt(d_h) as float32 [batch..., heads, q_len, kv_len].

    query, key: [batch..., length, heads, d_h]. As in Flax, the query is scaled first and
    the product is taken in the inputs' dtype (`einsum` replaces `jnp.einsum`).
    """
    scaled = scaled_query(query)
    if einsum is None:
        einsum = functools.partial(jnp.einsum, precision=precision)
    return einsum("...qhd,...khd->...hqk", scaled, key).astype(jnp.float32)


def fixed_alpha(mixing: str, scores: Array) -> Array:
    """alpha for the non-adaptive modes: 1 ('positive') or 0 ('negative'), [batch..., heads]."""
    return jnp.full(scores.shape[:-2], 1.0 if mixing == "positive" else 0.0, jnp.float32)


def mix_and_diversify(scores: Array, alpha: Array, *, diversify: bool,
                      eps: float, relative_eps: float = 0.0) -> tuple[Array, Array]:
    """Eqs. 13-17 on raw scores A+ [batch, heads, q_len, kv_len], alpha [batch, heads].

    Returns (A_final, beta) with beta [batch, heads] (ones when not diversifying).
    """
    a = alpha[..., None, None]
    mixed = a * scores + (1.0 - a) * (-scores)  # Eq. 13
    if not diversify:
        return mixed, jnp.ones(alpha.shape, scores.dtype)
    main = jnp.mean(mixed, axis=-3, keepdims=True)  # Eq. 14: [b, 1, q, k]
    inner = jnp.sum(mixed * main, axis=(-2, -1))  # <A_mix_h, P_main>: [b, h]
    norm_sq = jnp.sum(main * main, axis=(-2, -1))  # ||P_main||^2: [b, 1]
    head_norm_sq = jnp.sum(mixed * mixed, axis=(-2, -1)) if relative_eps else None
    coeff, beta = dra_decode.projection_coefficients(  # Eq. 15
        inner, norm_sq, head_norm_sq, eps=eps, relative_eps=relative_eps)
    divergence = mixed - coeff[..., None, None] * main  # Eq. 16
    return mixed + beta[..., None, None] * divergence, beta  # Eq. 17


def masked_softmax(final: Array, mask: Array | None = None, bias: Array | None = None) -> Array:
    """Eq. 18's softmax in float32; `bias` is added to and `mask` applied on A_final."""
    if bias is not None:
        final = final + bias.astype(jnp.float32)
    if mask is not None:
        final = jnp.where(mask, final, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(final, axis=-1)


def regulated_weights(scores: Array, alpha: Array, *, diversify: bool, eps: float,
                      mask: Array | None = None, bias: Array | None = None,
                      relative_eps: float = 0.0) -> tuple[Array, Array]:
    """Eqs. 13-18 up to the softmax: returns (attention weights, beta)."""
    final, beta = mix_and_diversify(scores, alpha, diversify=diversify, eps=eps,
                                    relative_eps=relative_eps)
    return masked_softmax(final, mask, bias), beta


def regulated_scores(scores: Array, a: Array, coeff: Array | None = None,
                     beta: Array | None = None) -> Array:
    """Eqs. 13, 14, 16, 17 with given coefficients.

    scores: [..., H, B, K]; a, coeff, beta: [..., H, B] (per row) or [..., H, 1].
    Without coefficients returns A_mix = a A+.
    """
    mixed = a[..., None] * scores
    if coeff is None:
        return mixed
    main = jnp.mean(mixed, axis=-3, keepdims=True)
    return mixed + beta[..., None] * (mixed - coeff[..., None] * main)


def dropout_weights(weights: Array, rng: Array, rate: float, broadcast: bool,
                    dtype: Any) -> Array:
    """Attention-weight dropout as Flax's `dot_product_attention_weights` draws it."""
    keep_prob = 1.0 - rate
    shape = ((1,) * (weights.ndim - 2) + weights.shape[-2:]) if broadcast else weights.shape
    keep = jax.random.bernoulli(rng, keep_prob, shape)
    return weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype))


def weighted_values(weights: Array, value: Array, *, compute_dtype: Any, keep_fp32: bool,
                    dropout: tuple[Array, float, bool] | None, precision: Any = None,
                    einsum: Einsum | None = None) -> Array:
    """Eq. 18's product with V: weights f32 -> compute dtype (unless `keep_fp32`, as Flax's
    `force_fp32_for_softmax`), dropout (rng, rate, broadcast), then sum over keys."""
    if not keep_fp32:
        weights = weights.astype(compute_dtype)
    if dropout is not None:
        weights = dropout_weights(weights, *dropout, compute_dtype)
    if einsum is None:
        einsum = functools.partial(jnp.einsum, precision=precision)
    return einsum("...hqk,...khd->...qhd", weights, value)


# ----------------------------------------------------------------------------- blocks

def _split_rows(x: Array, axis: int, block: int, blocks: int) -> Array:
    """Pads `axis` to blocks * block and moves the block index to the front."""
    axis %= x.ndim
    pad = blocks * block - x.shape[axis]
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths)
    x = x.reshape(x.shape[:axis] + (blocks, block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge_rows(x: Array, axis: int, length: int) -> Array:
    """Inverse of `_split_rows`; `axis` counts in the merged array (negative)."""
    x = jnp.moveaxis(x, 0, axis - 1 if axis < 0 else axis)
    axis = axis - 1 if axis < 0 else axis
    axis %= x.ndim
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _has_rows(x: Array | None, q_len: int) -> bool:
    return x is not None and x.ndim >= 2 and x.shape[-2] == q_len and q_len > 1


def global_coefficients(query: Array, key: Array, alpha: Array, *, eps: float,
                        block_size: int | None = None, precision: Any = None,
                        einsum: Einsum | None = None, relative_eps: float = 0.0
                        ) -> tuple[Array, Array]:
    """Eq. 15 over the whole score matrix, accumulated over query blocks (first pass).

    alpha: [..., H]. Returns (c, beta), both [..., H]. Zero-padded query rows add nothing.
    """
    q_len = query.shape[-3]
    block = min(block_size or q_len, q_len)
    blocks = math.ceil(q_len / block)
    a = (2.0 * alpha - 1.0)[..., None, None]

    @jax.checkpoint
    def body(acc, q_blk):
        mixed = a * attention_scores(q_blk, key, precision, einsum)
        main = jnp.mean(mixed, axis=-3, keepdims=True)
        return (acc[0] + jnp.sum(mixed * main, axis=(-2, -1)),
                acc[1] + jnp.sum(main * main, axis=(-2, -1)),
                acc[2] + jnp.sum(mixed * mixed, axis=(-2, -1))), None

    zeros = jnp.zeros(alpha.shape, jnp.float32)
    (inner, norm_sq, head_norm_sq), _ = jax.lax.scan(
        body, (zeros, zeros[..., :1], zeros), _split_rows(query, -3, block, blocks))
    return dra_decode.projection_coefficients(inner, norm_sq, head_norm_sq, eps=eps,
                                              relative_eps=relative_eps)


def causal_row_coefficients(query: Array, key: Array, alpha_rows: Array, *, eps: float,
                            block_size: int | None = None, q_start: Array | int = 0,
                            gram: Array | None = None, precision: Any = None,
                            einsum: Einsum | None = None, relative_eps: float = 0.0
                            ) -> tuple[Array, Array, Array]:
    """c and beta of every query row under the causal rule (`dra_decode`).

    alpha_rows: [..., L, H]. Returns (c [..., L, H], beta [..., L, H], G after the last row).
    """
    q_len, heads = query.shape[-3], query.shape[-2]
    block = min(block_size or q_len, q_len)
    blocks = math.ceil(q_len / block)
    a_rows = jnp.swapaxes(2.0 * alpha_rows - 1.0, -1, -2)
    if gram is None:
        gram = jnp.zeros(query.shape[:-3] + (heads, heads), jnp.float32)

    @jax.checkpoint
    def body(carry, xs):
        i, q_blk, a_blk = xs
        scores = attention_scores(q_blk, key, precision, einsum)
        coeff, beta, carry = dra_decode.causal_coefficients(scores, a_blk, carry,
                                                            q_start + i * block, eps,
                                                            relative_eps)
        return carry, (coeff, beta)

    gram, (coeff, beta) = jax.lax.scan(
        body, gram, (jnp.arange(blocks), _split_rows(query, -3, block, blocks),
                     _split_rows(a_rows, -1, block, blocks)))
    coeff, beta = (jnp.swapaxes(_merge_rows(x, -1, q_len), -1, -2) for x in (coeff, beta))
    return coeff, beta, gram


def regulated_attention(
    query: Array, key: Array, value: Array, alpha: Array, *, diversify: bool, eps: float,
    causal: bool = False, q_start: Array | int = 0, gram: Array | None = None,
    mask: Array | None = None, bias: Array | None = None, block_size: int | None = None,
    dropout: tuple[Array, float, bool] | None = None, keep_fp32: bool = False,
    precision: Any = None, qk_einsum: Einsum | None = None, wv_einsum: Einsum | None = None,
    return_weights: bool = False, relative_eps: float = 0.0,
) -> tuple[Array, Array | None, Array, Array | None]:
    """Eqs. 11, 13-18 on projected heads; the memory-bounded path when `block_size` is set.

    Args:
      query: [..., Lq, H, d]; key, value: [..., Lk, H, d] (same head count).
      alpha: Eq. 12, [..., H], or [..., Lq, H] per row when `causal`.
      diversify, eps, relative_eps: as in `DRA`.
      causal: key j visible from row i iff j <= q_start + i, coefficients per row (`dra_decode`).
      q_start, gram: the first row's index and the Gram matrix of the rows before it
        (decoding from a cache); `gram` defaults to zeros.
      mask, bias: as `DRA`'s, broadcastable to [..., H, Lq, Lk]; act on A_final.
      block_size: query rows per block; None = one block. Non-causal inputs that fit in
        one block take the dense path, bit-identical to the previous releases.
      dropout: (rng, rate, broadcast) or None. Blocks after the first draw their mask from
        `fold_in(rng, block)`, so blockwise dropout differs from the dense draw.
      keep_fp32: leave the weights in float32 for the value product.
      return_weights: also return the float32 weights [..., H, Lq, Lk] (O(Lq Lk) memory).

    Returns:
      (heads [..., Lq, H, d], weights or None, beta, G after the last row or None);
      beta is [..., H], or [..., Lq, H] when causal.
    """
    dtype = query.dtype
    q_len, kv_len = query.shape[-3], key.shape[-3]
    values = functools.partial(weighted_values, compute_dtype=dtype, keep_fp32=keep_fp32,
                               precision=precision, einsum=wv_einsum)
    if not causal and (block_size is None or q_len <= block_size):
        scores = attention_scores(query, key, precision, qk_einsum)
        weights, beta = regulated_weights(scores, alpha, diversify=diversify, eps=eps,
                                          mask=mask, bias=bias, relative_eps=relative_eps)
        return values(weights, value, dropout=dropout), weights, beta, None

    block = min(block_size or q_len, q_len)
    blocks = math.ceil(q_len / block)
    xs: dict[str, Array] = {"i": jnp.arange(blocks), "q": _split_rows(query, -3, block, blocks)}
    for name, x in (("mask", mask), ("bias", bias)):
        if _has_rows(x, q_len):
            xs[name] = _split_rows(x, -2, block, blocks)
    heads = query.shape[-2]
    if causal:
        xs["a"] = _split_rows(jnp.swapaxes(2.0 * alpha - 1.0, -1, -2), -1, block, blocks)
        if gram is None:
            gram = jnp.zeros(query.shape[:-3] + (heads, heads), jnp.float32)
        glob = None
    else:
        a = (2.0 * alpha - 1.0)[..., None]
        glob = (a, None, None)
        if diversify:
            coeff, beta = global_coefficients(query, key, alpha, eps=eps, block_size=block,
                                              precision=precision, einsum=qk_einsum,
                                              relative_eps=relative_eps)
            glob = (a, coeff[..., None], beta[..., None])
        gram = jnp.zeros((), jnp.float32)  # unused carry

    @jax.checkpoint
    def body(carry, x):
        scores = attention_scores(x["q"], key, precision, qk_einsum)
        blk_mask = x.get("mask", mask if not _has_rows(mask, q_len) else None)
        blk_bias = x.get("bias", bias if not _has_rows(bias, q_len) else None)
        if causal:
            start = q_start + x["i"] * block
            if diversify:
                coeff, beta, carry = dra_decode.causal_coefficients(scores, x["a"], carry,
                                                                    start, eps, relative_eps)
                final = regulated_scores(scores, x["a"], coeff, beta)
            else:
                final, beta = regulated_scores(scores, x["a"]), jnp.ones_like(x["a"])
            visible = dra_decode.causal_visibility(scores.shape[-2], kv_len, start)
            blk_mask = visible if blk_mask is None else jnp.logical_and(blk_mask, visible)
        else:
            final, beta = regulated_scores(scores, *glob), jnp.zeros(())
        weights = masked_softmax(final, blk_mask, blk_bias)
        drop = None
        if dropout is not None:
            rng = dropout[0] if blocks == 1 else jax.random.fold_in(dropout[0], x["i"])
            drop = (rng,) + tuple(dropout[1:])
        out = values(weights, value, dropout=drop)
        return carry, (out, weights if return_weights else None, beta)

    gram, (out, weights, beta) = jax.lax.scan(body, gram, xs)
    out = _merge_rows(out, -3, q_len)
    if weights is not None:
        weights = _merge_rows(weights, -2, q_len)
    if causal:
        beta = jnp.swapaxes(_merge_rows(beta, -1, q_len), -1, -2)
        return out, weights, beta, gram
    beta = glob[2][..., 0] if diversify else jnp.ones(alpha.shape, jnp.float32)
    return out, weights, beta, None


def augmented_query_key(query: Array, key: Array, alpha: Array, coeff: Array,
                        beta: Array) -> tuple[Array, Array]:
    """A dot-product problem whose scores are A_final (Eqs. 13-17), for an `attention_fn`.

    query [..., Lq, H, d], key [..., Lk, H, d]; alpha, coeff, beta [..., H] or per row
    [..., Lq, H]. Returns (query' [..., Lq, H, H d], key' [..., Lk, H, H d]) with
    query'_h . key'_h / sqrt(H d) = sum_g w_hg A+_g (module docstring).
    """
    heads, depth = query.shape[-2:]
    if alpha.ndim == query.ndim - 2:  # one set of coefficients for all rows
        alpha, coeff, beta = (x[..., None, :] for x in (alpha, coeff, beta))
    a = 2.0 * alpha - 1.0
    w = (((1.0 + beta) * a)[..., :, None] * jnp.eye(heads)
         - (beta * coeff)[..., :, None] * a[..., None, :] / heads)  # [..., Lq|1, H, H]
    q_aug = jnp.einsum("...qhg,...qgd->...qhgd", w, query.astype(jnp.float32))
    q_aug = (q_aug * math.sqrt(heads)).reshape(q_aug.shape[:-2] + (heads * depth,))
    k_flat = key.reshape(key.shape[:-2] + (1, heads * depth))
    k_aug = jnp.broadcast_to(k_flat, key.shape[:-2] + (heads, heads * depth))
    return q_aug.astype(query.dtype), k_aug


def dispatch(query: Array, key: Array, value: Array, alpha: Array, *, mixing: str,
             diversify: bool, eps: float, causal: bool, q_start: Array | int,
             gram: Array | None, mask: Array | None, bias: Array | None,
             call_attention_fn: Callable[..., Array], default_attention_fn: bool,
             block_size: int | None, dropout: tuple | None, keep_fp32: bool,
             precision: Any, qk_einsum: Callable | None, wv_einsum: Callable | None,
             sow_weights: bool, owner: str, mask_causal_for_fn: bool | None = None,
             relative_eps: float = 0.0) -> tuple[Array, Array | None, Array, Array | None]:
    """Routes Eqs. 13-18 to `attention_fn` or to `regulated_attention` (docs/design.md §3.5).

    Blockwise (q_len > block_size) and diversified forms with Flax's default `attention_fn`
    run `regulated_attention`. Otherwise `call_attention_fn(query, key, value, mask, bias)`
    calls the layer's `attention_fn` with its other arguments (dropout, dtype, sowing):
    with the query scaled by 2 alpha - 1 (Eq. 13) without diversification, with the
    widened query/key of `augmented_query_key` with it. `mask_causal_for_fn` (default
    `causal`) adds the causal mask to the one handed to `attention_fn`.

    Returns (heads, weights to sow or None, beta, updated Gram matrix or None).
    """
    q_len, kv_len = query.shape[-3], key.shape[-3]
    if block_size is not None and q_len > block_size:
        if not default_attention_fn:
            raise ValueError(f"{owner}: query_block_size runs DRA's own blockwise attention; "
                             "it cannot be combined with a custom attention_fn.")
        internal = True
    else:
        internal = diversify and default_attention_fn
    if internal:
        if qk_einsum is not None or wv_einsum is not None:  # as Flax's dot_product_attention
            if (qk_einsum is None) != (wv_einsum is None):
                raise ValueError("qk_attn_weights_einsum and attn_weights_value_einsum must "
                                 "be specified together.")
            if precision is not None:
                raise ValueError("precision and qk_attn_weights_einsum/"
                                 "attn_weights_value_einsum are mutually exclusive.")
        heads, weights, beta, gram = regulated_attention(
            query, key, value, alpha, diversify=diversify, eps=eps, causal=causal,
            q_start=q_start, gram=gram, mask=mask, bias=bias, block_size=block_size,
            dropout=dropout, keep_fp32=keep_fp32, precision=precision, qk_einsum=qk_einsum,
            wv_einsum=wv_einsum, return_weights=sow_weights, relative_eps=relative_eps)
        return heads, weights, beta, gram

    if causal if mask_causal_for_fn is None else mask_causal_for_fn:
        visible = dra_decode.causal_visibility(q_len, kv_len, q_start)
        visible = visible.reshape((1,) * (query.ndim - 2) + visible.shape)
        mask = visible if mask is None else jnp.logical_and(mask, visible)
    if diversify:  # custom attention_fn: coefficients here, Eq. 18 there
        if causal:
            coeff, beta, gram = causal_row_coefficients(
                query, key, alpha, eps=eps, block_size=block_size, q_start=q_start, gram=gram,
                precision=precision, einsum=qk_einsum, relative_eps=relative_eps)
        else:
            coeff, beta = global_coefficients(query, key, alpha, eps=eps,
                                              block_size=block_size, precision=precision,
                                              einsum=qk_einsum, relative_eps=relative_eps)
        query, key = augmented_query_key(query, key, alpha, coeff, beta)
        return call_attention_fn(query, key, value, mask, bias), None, beta, gram
    if mixing == "negative":
        query = -query
    elif mixing == "adaptive":  # A_mix = (2 alpha - 1) A+: scale the query (Eq. 13)
        a = (2.0 * alpha - 1.0).astype(query.dtype)
        query = query * (a[..., None] if causal else a[..., None, :, None])
    beta = jnp.ones(alpha.shape, jnp.float32)
    return call_attention_fn(query, key, value, mask, bias), None, beta, gram
