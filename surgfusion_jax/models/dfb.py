"""Dynamic Fusion Block (DFB), Section III-B.2 (2), Eqs. 6-10 (after MAQA's CM_Fusion).

At stage i, with the stage-i unimodal INPUTS f_i^m ([B, T_in, d] each), the residual
block output c and the CSFB output s (both [B, T_out, d], T_out the pooled length):

  FusionNet k (k = 1..K): alpha_{i,k}^m = softmax over modalities m of a per-modality
      projection (1x1 conv + BN + ReLU + 1x1 conv to K channels) of f_i^m;
      f_{i,k}^cs = sum_m alpha_{i,k}^m f_i^m                                (Eq. 9)
      then a residual conv FFN (two conv k=3 + BN + ReLU) and the stage pooling.
  Q^ = W^q proj(Concat(c, s))                                               (Eq. 6)
  K^, V^ = W^k, W^v applied to the K candidates f_{i,k}^cs                  (Eqs. 7-8)
  f = DRA(Q^, K^, V^, M_i), per time step over the K candidates             (Eq. 10)

The M per-modality weight nets run as one grouped convolution (feature_group_count
= M: group m holds modality m's own weights); the K FFNs run on the K candidates
stacked on a leading axis (`layers.StackedConvBNAct`), one batched product per
convolution, with the parameters of a K-group convolution. Either way each net keeps
its own weights while the work compiles to a few large ops.

PolicyNet and the mask M_i. A 1x1 conv maps the concatenated stage inputs to K
logits per time step; they are pooled like the features (masked) and a hard
Gumbel-softmax picks one k* per output step:

  * train: z = logits + g, g ~ Gumbel(0, 1) from the rng stream 'gumbel' (drawn per
    sample and time step with `fold_in`, so a step's noise does not depend on the
    padded length); eval: z = logits, no noise (argmax).
  * y_soft = softmax(z / tau), k* = argmax z, y_hard = one_hot(k*),
    y_st = y_hard + y_soft - stop_gradient(y_soft)  (straight-through).
  * The [K] additive bias over candidates (added to DRA's A_final, Eq. 18) is
        bias_k = (-1e9 if k > k* else 0) + (y_st_k - stop_gradient(y_st_k)),
    i.e. candidates 0..k* are attended, the rest masked; the second term is zero in
    value but has d bias_k = d y_soft_k, so the task loss reaches the PolicyNet (and
    tau) through the attention logits of the admitted candidates (MAQA's gen_mask).

Temperature tau: a learned scalar shared by the three stages, initialised at 10 as
in MAQA; `SurgFusionNet` owns it (parameter `fusion/log_tau`, tau = exp(log_tau), so
it stays positive) and passes it in here.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from surgfusion_jax.models import layers
from surgfusion_jax.models.fusion_strategies import make_fusion

Array = jax.Array
MASK_VALUE = -1e9  # MAQA's additive mask for unselected candidates


def positional_gumbel(key: Array, shape: tuple[int, int, int]) -> Array:
    """Gumbel(0, 1) noise [B, T, K]; entry (b, t) depends only on (key, b, t)."""
    batch, length, k = shape

    def one_step(b, t):
        return jax.random.gumbel(jax.random.fold_in(jax.random.fold_in(key, b), t), (k,))

    steps = jax.vmap(one_step, in_axes=(None, 0))
    return jax.vmap(steps, in_axes=(0, None))(jnp.arange(batch), jnp.arange(length))


def candidate_bias(y_hard: Array, y_st: Array) -> Array:
    """The mask M_i as an additive bias [..., K] (see the module docstring)."""
    k_star = jnp.argmax(y_hard, axis=-1)[..., None]
    index = jnp.arange(y_hard.shape[-1])
    hard = jnp.where(index > k_star, MASK_VALUE, 0.0)
    return hard + (y_st - jax.lax.stop_gradient(y_st))


class PolicyNet(nn.Module):
    """1x1 conv -> K logits per step, stage pooling, hard Gumbel-softmax.

    Returns (y_hard, y_st), both float32 [B, T_out, K].
    """

    num_candidates: int
    global_pool: bool = False
    noise_at_test: bool = False
    odd_step: str = "keep"
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: Sequence[Array], valid: Array, *, tau: Array, train: bool
                 ) -> tuple[Array, Array]:
        x = layers.zero_invalid(jnp.concatenate(inputs, axis=-1), valid)
        logits = nn.Dense(self.num_candidates, dtype=self.dtype, name="logits")(x)
        logits, _ = layers.pool(logits.astype(jnp.float32), valid,
                                global_pool=self.global_pool, odd_step=self.odd_step)
        if train or self.noise_at_test:
            # PAMFN samples the policy at test time too (F.gumbel_softmax in eval mode);
            # without a 'gumbel' stream at test the noise is fixed (key 0): reproducible.
            key = (self.make_rng("gumbel") if train or self.has_rng("gumbel")
                   else jax.random.PRNGKey(0))
            logits = logits + positional_gumbel(key, logits.shape)
        y_soft = jax.nn.softmax(logits / tau, axis=-1)
        y_hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), self.num_candidates,
                                dtype=jnp.float32)
        return y_hard, y_hard + y_soft - jax.lax.stop_gradient(y_soft)


class FusionNets(nn.Module):
    """K FusionNets: Eq. 9 modality weighting + residual conv FFN + stage pooling.

    Returns (candidates [B, T_out, K, d], valid_out [B, T_out]). Sows the Eq. 9
    weights `modality_weights` [B, T_in, M, K] (softmax over M). The M weight nets run
    as one grouped convolution, the K FFNs as one batched product per convolution.
    """

    num_candidates: int
    global_pool: bool = False
    conventions: layers.Conventions = layers.Conventions()
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: Sequence[Array], valid: Array, *, train: bool
                 ) -> tuple[Array, Array]:
        k, d, m = self.num_candidates, inputs[0].shape[-1], len(inputs)
        conv = functools.partial(layers.ConvBNAct, activation=nn.relu,
                                 conventions=self.conventions, dtype=self.dtype)
        stacked_conv = functools.partial(layers.StackedConvBNAct, d, 3, nn.relu,
                                         conventions=self.conventions, dtype=self.dtype)
        stacked = jnp.stack(inputs, axis=-2)  # [B, T, M, d]
        batch_time = stacked.shape[:2]
        # Per-modality weight nets (1x1 conv + BN + ReLU + 1x1 conv to K), as grouped
        # convolutions: group m holds modality m's own weights.
        h = conv(m * d, 1, feature_group_count=m, name="weights_hidden")(
            stacked.reshape(batch_time + (m * d,)), valid, train=train)
        logits = layers.TemporalConv(m * k, 1, feature_group_count=m, use_bias=True,
                                     dtype=self.dtype, name="weights_out")(h)
        logits = logits.reshape(batch_time + (m, k))
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-2)  # over modalities
        self.sow("intermediates", "modality_weights", weights)
        # Eq. 9, the K nets stacked on a leading axis [K, B, T, d]: each FusionNet's FFN is
        # then one plain product per convolution (layers.StackedConvBNAct), with the
        # parameters of a K-group convolution.
        mixed = jnp.einsum("btmk,btmd->kbtd", weights.astype(stacked.dtype), stacked)
        y = stacked_conv(name="ffn1")(mixed, valid, train=train)
        y = stacked_conv(name="ffn2")(y, valid, train=train)
        y = layers.zero_invalid_stacked(mixed, valid) + y
        batch, length = batch_time
        out, valid_out = layers.pool(y.reshape(k * batch, length, d),
                                     jnp.tile(valid, (k, 1)), global_pool=self.global_pool,
                                     odd_step=self.conventions.odd_step)
        out = out.reshape(k, batch, out.shape[1], d).transpose(1, 2, 0, 3)  # [B, T_out, K, d]
        return out, valid_out[:batch]


class DynamicFusionBlock(nn.Module):
    """Eqs. 6-10: policy-masked DRA decoding over K FusionNet candidates.

    Attributes:
      features: width d.
      num_candidates: K (10 in the paper).
      num_heads: attention heads.
      fusion: fusion strategy (Table IV), see `fusion_strategies.STRATEGIES`.
      attention_dropout: dropout on the attention weights (0.1 in MAQA).
      broadcast_dropout, output_projection, alpha_bias_init, relative_eps: see
        `fusion_strategies.make_fusion`.
      global_pool: stage pooling is the global mean (stage 3) instead of stride 2.
      gumbel_at_test: Gumbel noise on the policy in eval mode too (PAMFN).
      conventions: PyTorch's pooling / BatchNorm conventions or ours (`layers.Conventions`).
      dtype: computation dtype.

    Submodules: `fusion_nets`, `policy`, `query_proj`, `attention`. With the
    `intermediates` collection mutable it sows `policy_choice` (y_hard [B, T_out, K]),
    the FusionNets' `modality_weights` and the attention's `attention_weights`
    [B, T_out, heads, 1, K].
    """

    features: int = 256
    num_candidates: int = 10
    num_heads: int = 2
    fusion: str = "dra"
    attention_dropout: float = 0.1
    broadcast_dropout: bool = True
    output_projection: bool = True
    alpha_bias_init: float = 2.0
    relative_eps: float = 0.0
    global_pool: bool = False
    gumbel_at_test: bool = False
    conventions: layers.Conventions = layers.Conventions()
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: Array, s: Array, inputs: Sequence[Array], valid: Array, *,
                 tau: Array, train: bool) -> Array:
        """Applies the DFB.

        Args:
          c: [B, T_out, d] residual-block output.
          s: [B, T_out, d] CSFB output.
          inputs: the M stage-i unimodal inputs, each [B, T_in, d].
          valid: [B, T_in] mask of the inputs.
          tau: Gumbel-softmax temperature (scalar).
          train: Gumbel noise, BatchNorm batch statistics and attention dropout on.

        Returns:
          f [B, T_out, d].
        """
        if not inputs:
            raise ValueError("DynamicFusionBlock: `inputs` needs at least one modality.")
        candidates, _ = FusionNets(self.num_candidates, self.global_pool, self.conventions,
                                   dtype=self.dtype, name="fusion_nets")(
            inputs, valid, train=train)
        if candidates.shape[:2] != c.shape[:2]:
            raise ValueError(
                f"DynamicFusionBlock: pooled candidates {candidates.shape[:2]} do not match "
                f"the fusion features {c.shape[:2]} in [batch, time]; check global_pool and "
                "that the inputs are the stage-i inputs (one stage before the outputs).")
        y_hard, y_st = PolicyNet(self.num_candidates, self.global_pool, self.gumbel_at_test,
                                 self.conventions.odd_step, dtype=self.dtype, name="policy")(
            inputs, valid, tau=tau, train=train)
        self.sow("intermediates", "policy_choice", y_hard)
        bias = candidate_bias(y_hard, y_st)[..., None, None, :]  # [B, T, heads, q, K]

        query = nn.Dense(self.features, dtype=self.dtype, name="query_proj")(
            jnp.concatenate([c, s], axis=-1))[..., None, :]  # Eq. 6 (before W^q)
        candidates = candidates.astype(query.dtype)
        attend = make_fusion(self.fusion, features=self.features, num_heads=self.num_heads,
                             dropout_rate=self.attention_dropout,
                             broadcast_dropout=self.broadcast_dropout,
                             output_projection=self.output_projection,
                             alpha_bias_init=self.alpha_bias_init,
                             relative_eps=self.relative_eps, absorb_projections=True,
                             dtype=self.dtype, name="attention")
        f = attend(query, candidates, candidates, bias=bias, deterministic=not train,
                   sow_weights=True)  # Eqs. 7, 8, 10
        return f[..., 0, :]
