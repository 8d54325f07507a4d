"""Causal DRA: the rule that makes token-by-token decoding exact (docs/design.md §3.7).

Eqs. 12 and 15 are statistics over the whole sequence (the mean query, the inner products
over the score matrix), so a decoder that sees one token at a time cannot compute them as
written. With `causal=True` DRA replaces them by their causal counterparts; the output of
query row t then depends on the tokens 0..t only, and feeding the tokens one by one
(`decode=True`, with a cache) gives the same output as the full sequence:

  alpha_h(t)  = sigmoid(MLP(mean_{s<=t} Q_h[s]))                       (Eq. 12 on the prefix)
  a_h(t)      = 2 alpha_h(t) - 1,   A_mix_h = a_h(t) A+_h               (Eq. 13)
  G_hg(t)     = sum_{s<=t} sum_{j<=s} A+_h[s, j] A+_g[s, j]             (the score rows seen so far)
  c_h(t)      = a_h sum_g a_g G_hg / H  /  (sum_{g,g'} a_g a_g' G_gg' / H^2 + eps)   (Eq. 15)
                (+ rho mean_h a_h^2 G_hh in the denominator: `projection_coefficients`)
  beta_h(t)   = sigmoid(1 - c_h(t))

which is Eq. 15 with <A_mix_h, P_main> and ||P_main||^2 summed over the causal triangle
{(s, j): j <= s <= t} and alpha taken at t. G is an H x H matrix per sample, so the cache
holds only the running query sum [H, d_h] and G [H, H] besides Flax's keys and values.
Eqs. 14, 16-18 are unchanged on row t (P_main uses a(t)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def causal_visibility(q_len: int, kv_len: int, q_start: Array | int = 0) -> Array:
    """bool [q_len, kv_len]: key j is visible from query row i iff j <= q_start + i."""
    rows = jnp.arange(q_len) + q_start
    return jnp.arange(kv_len)[None, :] <= rows[:, None]


def prefix_mean(query: Array) -> Array:
    """Running mean over the query rows, float32: [..., L, H, d] -> [..., L, H, d] (Eq. 12)."""
    total = jnp.cumsum(query.astype(jnp.float32), axis=-3)
    count = jnp.arange(1, query.shape[-3] + 1, dtype=jnp.float32)
    return total / count[:, None, None]


def projection_coefficients(inner: Array, norm_sq: Array, head_norm_sq: Array, *,
                            eps: float, relative_eps: float = 0.0) -> tuple[Array, Array]:
    """Eq. 15: c_h = <A_mix_h, P_main> / (||P_main||^2 + eps + rho m) and
    beta_h = sigmoid(1 - c_h), with m = mean_h ||A_mix_h||^2 and rho = `relative_eps`.

    rho = 0 is the paper's formula. When the heads' scores cancel in P_main (||P_main||
    small beside the heads' own scores) its c_h and the gradient through it grow without
    bound (~ ||A_mix|| / ||P_main||); rho > 0 bounds |c_h| by sqrt(H) / (2 sqrt(rho))
    and leaves aligned heads nearly unchanged (c = 1 / (1 + rho) when all heads agree).
    docs/design.md §3.6 and docs/parity.md have the measurements.

    inner [..., H], norm_sq [..., 1], head_norm_sq [..., H] (||A_mix_h||^2).
    """
    denominator = norm_sq + eps
    if relative_eps:
        denominator = denominator + relative_eps * jnp.mean(head_norm_sq, axis=-1,
                                                            keepdims=True)
    coeff = inner / denominator
    return coeff, jax.nn.sigmoid(1.0 - coeff)


def gram_coefficients(gram: Array, a: Array, eps: float,
                      relative_eps: float = 0.0) -> tuple[Array, Array]:
    """Eq. 15 from the Gram matrix of the score maps.

    Args:
      gram: [..., H, H], G_hg = sum over the entries of A+_h A+_g.
      a: [..., H] signed mixing 2 alpha - 1 (A_mix_h = a_h A+_h).
      eps, relative_eps: as in `projection_coefficients`.

    Returns:
      (c, beta), both [..., H]: <A_mix_h, P_main> = a_h (G a)_h / H,
      ||P_main||^2 = a.G a / H^2 and ||A_mix_h||^2 = a_h^2 G_hh.
    """
    heads = a.shape[-1]
    ga = jnp.einsum("...hg,...g->...h", gram, a)
    inner = a * ga / heads
    norm_sq = jnp.sum(a * ga, axis=-1, keepdims=True) / heads**2
    head_norm_sq = a * a * jnp.diagonal(gram, axis1=-2, axis2=-1)
    return projection_coefficients(inner, norm_sq, head_norm_sq, eps=eps,
                                   relative_eps=relative_eps)


def causal_coefficients(scores: Array, a_rows: Array, gram: Array, q_start: Array | int,
                        eps: float, relative_eps: float = 0.0
                        ) -> tuple[Array, Array, Array]:
    """Per-row c and beta for a block of consecutive query rows (module docstring).

    Args:
      scores: float32 A+ [..., H, B, K] of query rows q_start .. q_start + B - 1.
      a_rows: [..., H, B] signed mixing of those rows.
      gram: [..., H, H] G accumulated over the rows before q_start.
      q_start: index of the block's first row.
      eps, relative_eps: as in `projection_coefficients`.

    Returns:
      (c [..., H, B], beta [..., H, B], G after the block's last row [..., H, H]).
    """
    visible = causal_visibility(scores.shape[-2], scores.shape[-1], q_start)
    seen = jnp.where(visible, scores, 0.0)
    row_gram = jnp.einsum("...hqk,...gqk->...qhg", seen, seen)  # [..., B, H, H]
    grams = gram[..., None, :, :] + jnp.cumsum(row_gram, axis=-3)
    coeff, beta = gram_coefficients(grams, jnp.swapaxes(a_rows, -1, -2), eps, relative_eps)
    return jnp.swapaxes(coeff, -1, -2), jnp.swapaxes(beta, -1, -2), grams[..., -1, :, :]


def needs_statistics(mixing: str, diversify: bool) -> bool:
    """Whether the form uses whole-sequence statistics (Eq. 12 or Eq. 15)."""
    return mixing == "adaptive" or diversify


def check_decode(owner: str, mixing: str, diversify: bool, causal: bool) -> None:
    """Decoding (one token at a time) is defined for the statistics forms only when causal."""
    if needs_statistics(mixing, diversify) and not causal:
        raise ValueError(
            f"{owner}: decode=True with mixing={mixing!r}, diversify={diversify} needs "
            "causal=True: alpha (Eq. 12) and beta (Eq. 15) are whole-sequence statistics, "
            "and only their causal form (docs/design.md §3.7) can be computed token by "
            "token. Build the layer with causal=True for training and decoding alike.")


def pooled_query(query: Array, *, causal: bool, query_sum: Array | None = None,
                 q_start: Array | None = None) -> tuple[Array, Array | None]:
    """The input of Eq. 12's MLP, in the query's dtype, and the updated running sum.

    Non-causal: the mean over the query rows [..., H, d]. Causal: the running mean
    [..., L, H, d]; when decoding one row, from the cached float32 sum of the previous
    rows (`query_sum`, [..., H, d]) and the row's index `q_start`.
    """
    if query_sum is not None:
        total = query_sum + query[..., 0, :, :].astype(jnp.float32)
        pooled = (total / (q_start + 1).astype(jnp.float32))[..., None, :, :]
        return pooled.astype(query.dtype), total
    if causal:
        return prefix_mean(query).astype(query.dtype), None
    return jnp.mean(query, axis=-3), None
