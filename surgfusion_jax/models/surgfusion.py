"""SurgFusion-Net: unimodal branches + multimodal fusion branch (Section III-B, Fig. 2).

Fusion branch (docs/design.md §2, after MAQA's PAMFN). With the branch stage features
[x0, x1, x2, x3] of every modality (lengths T, T/2, T/4, 1; lengths round up):

  c = 0, width 3d, length T/2 (the zero-initialised fusion features)
  stage i = 1, 2, 3:
    c~ = ResBlock(c)                                         (d wide)
    s  = CSFB(c~, stage-i outputs x_i)                       (Eqs. 3-5)
    f  = DFB(c~, s, stage-i inputs x_{i-1})                  (Eqs. 6-10; 0 if use_dfb=False)
    c  = Concat(c~, s, f)                                    (3d wide)
    pool c: stride 2 after stage 1, global mean after stage 2 (stage 3 runs at length 1)
  head: dropout, 1x1 conv 3d -> d/2, BN, ReLU, dropout 0.5, 1x1 conv -> 1, sigmoid.

Two-phase training (Section IV-B): phase='unimodal' returns the branch scores
(branches in train mode when `train`); phase='fusion' freezes the branches
(stop_gradient on their features; BatchNorm running averages and branch dropout off
unless `frozen_branch_train`; regression heads unused in training; `trainable_branches`
excepted) and applies dropout `feature_dropout` (and `modality_dropout`) to the features
fed to the fusion branch; phase='all' returns both (use it for `init`).

Fused score. The paper's fused prediction is the fusion branch's head alone
(`fused_score='fusion_head'`). With 'mean_of_heads' (ours) the evaluation-mode 'fused'
score is the mean of that head and the M branch heads (late fusion over M + 1 heads);
training is unchanged (the fused loss still reads the fusion head alone). On data this
small the branches fit their training videos, the fusion branch is trained on those
fitted features, and its head alone does not beat the plain mean of the branch heads;
averaging both is the best readout measured (docs/parity.md, "Fused score").

Everything is masked by `valid` (see `layers`): padded steps do not change any output.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from surgfusion_jax.data.feature_dataset import MODALITIES as ALL_MODALITIES
from surgfusion_jax.models import layers
from surgfusion_jax.models.branches import UnimodalBranch
from surgfusion_jax.models.csfb import CrossStageFusionBlock
from surgfusion_jax.models.dfb import DynamicFusionBlock

Array = jax.Array
PHASES = ("unimodal", "fusion", "all")
# How the 'fused' score is read out in evaluation (config field `model.fused_score`).
FUSED_SCORES = ("fusion_head", "mean_of_heads")


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
    """How CSFB and DFB attend (docs/parity.md measures each against PAMFN's choice).

    Attributes:
      dropout: dropout on the attention weights (0.1, MAQA).
      broadcast_dropout: one dropout mask over batch and heads (Flax) or element-wise
        (False; PyTorch's nn.Dropout in PAMFN).
      output_projection: the output projection W^O (PAMFN's attention has none).
      alpha_bias_init: initial logit of DRA's alpha (Eq. 12; docs/design.md §3.2).
      dra_relative_eps: DRA's rho in Eq. 15 (`DRA.relative_eps`; 0 = the paper).
      gumbel_at_test: the DFB policy samples Gumbel noise in eval mode too (PAMFN).
    """

    dropout: float = 0.1
    broadcast_dropout: bool = True
    output_projection: bool = True
    alpha_bias_init: float = 2.0
    gumbel_at_test: bool = False
    dra_relative_eps: float = 0.0

    def block_kwargs(self) -> dict:
        return dict(attention_dropout=self.dropout, broadcast_dropout=self.broadcast_dropout,
                    output_projection=self.output_projection,
                    alpha_bias_init=self.alpha_bias_init,
                    relative_eps=self.dra_relative_eps)


class FusionStage(nn.Module):
    """One fusion stage: ResBlock, CSFB, DFB and concatenation (docs/design.md §2 steps 1-4)."""

    features: int
    num_candidates: int
    num_heads: int
    fusion: str
    use_dfb: bool
    attention: AttentionSettings
    global_pool: bool
    conventions: layers.Conventions
    dtype: layers.Dtype

    @nn.compact
    def __call__(self, c: Array, valid: Array, inputs: Sequence[Array], inputs_valid: Array,
                 outputs: Sequence[Array], *, tau: Array | None, train: bool) -> Array:
        c = layers.FusionResBlock(self.features, self.conventions, dtype=self.dtype,
                                  name="resblock")(c, valid, train=train)
        s = CrossStageFusionBlock(self.features, self.num_heads, self.fusion,
                                  dtype=self.dtype, name="csfb",
                                  **self.attention.block_kwargs())(c, outputs, train=train)
        if self.use_dfb:
            f = DynamicFusionBlock(self.features, self.num_candidates, self.num_heads,
                                   self.fusion, global_pool=self.global_pool,
                                   gumbel_at_test=self.attention.gumbel_at_test,
                                   conventions=self.conventions, dtype=self.dtype, name="dfb",
                                   **self.attention.block_kwargs())(
                c, s, inputs, inputs_valid, tau=tau, train=train)
        else:  # Table III "CSFB only": a zero placeholder for the DFB output
            f = jnp.zeros_like(s)
        return layers.zero_invalid(jnp.concatenate([c, s, f], axis=-1), valid)


class FusionBranch(nn.Module):
    """The multimodal fusion branch and its regression head."""

    features: int = 256
    num_candidates: int = 10
    num_heads: int = 2
    fusion: str = "dra"
    use_dfb: bool = True
    feature_dropout: float = 0.5
    modality_dropout: float = 0.0
    head_dropout: float = 0.0
    head_hidden_dropout: float = 0.5
    head_hidden_ratio: int = 2
    attention: AttentionSettings = AttentionSettings()
    tau_init: float = 10.0
    conventions: layers.Conventions = layers.Conventions()
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, stages: Sequence[Sequence[Array]], valids: Sequence[Array], *,
                 train: bool) -> Array:
        """stages: per modality [x0, x1, x2, x3]; valids: their masks. Returns [B]."""
        drop = nn.Dropout(self.feature_dropout, deterministic=not train)
        feats = [[drop(x) for x in per_modality] for per_modality in stages]
        if train and self.modality_dropout > 0 and len(feats) > 1:
            feats = self._drop_modalities(feats)
        tau = None
        if self.use_dfb:  # learned Gumbel temperature, shared by the stages (MAQA)
            log_tau = self.param("log_tau", nn.initializers.constant(math.log(self.tau_init)),
                                 ())
            tau = jnp.exp(log_tau)

        valid = valids[1]
        c = jnp.zeros(valid.shape + (3 * self.features,), self.dtype)
        for i in (1, 2, 3):
            c = FusionStage(self.features, self.num_candidates, self.num_heads, self.fusion,
                            self.use_dfb, self.attention, global_pool=(i == 3),
                            conventions=self.conventions, dtype=self.dtype, name=f"stage{i}")(
                c, valid, [f[i - 1] for f in feats], valids[i - 1], [f[i] for f in feats],
                tau=tau, train=train)
            if i < 3:
                c, valid = layers.pool(c, valid, global_pool=(i == 2),
                                       odd_step=self.conventions.odd_step)

        h = nn.Dropout(self.head_dropout, deterministic=not train)(c)
        h = layers.ConvBNAct(self.features // self.head_hidden_ratio, 1, nn.relu,
                             conventions=self.conventions, dtype=self.dtype,
                             name="head_hidden")(h, valid, train=train)
        h = nn.Dropout(self.head_hidden_dropout, deterministic=not train)(h)
        y = nn.Dense(1, dtype=self.dtype, name="head_out")(h)
        return jax.nn.sigmoid(y[:, 0, 0].astype(jnp.float32))

    def _drop_modalities(self, feats: list[list[Array]]) -> list[list[Array]]:
        """Modality dropout (ModDrop, Neverova et al. 2015; ours, not the paper's): each
        sample loses each modality's features with probability `modality_dropout`, never
        all of them; the kept ones are scaled by M / (number kept), so a sample's sum over
        modalities keeps its scale. On data this small every branch fits the training
        videos' whole score, and the fusion branch learns to read one of them; dropping
        whole modalities makes it use each (docs/parity.md)."""
        batch, num = feats[0][0].shape[0], len(feats)
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.modality_dropout,
                                    (batch, num))
        keep = jnp.where(keep.any(axis=1, keepdims=True), keep, True)
        scale = keep * (num / jnp.sum(keep, axis=1, keepdims=True))
        return [[x * scale[:, m].reshape((batch,) + (1,) * (x.ndim - 1)).astype(x.dtype)
                 for x in per_modality] for m, per_modality in enumerate(feats)]


class SurgFusionNet(nn.Module):
    """SurgFusion-Net.

    Attributes:
      modalities: any non-empty subset of ('rgb', 'flow', 'mask') (Table III).
      features: model width d (256).
      num_candidates: K FusionNets per DFB (10).
      num_heads: attention heads of CSFB and DFB (Table V; 2).
      fusion: 'dra' | 'vanilla_ca' | 'negative_ca' | 'avg' | 'cat' (Table IV).
      use_dfb: False = "CSFB only" (DFB output replaced by zeros).
      embed_features: hidden width of the branch embeddings (512).
      embed_dropout, branch_head_dropout: unimodal-branch dropouts (0.3, 0.5).
      feature_dropout: dropout on the frozen unimodal features fed to fusion (0.5).
      modality_dropout: probability of dropping all features of a modality per sample in
        fusion training (0: off, the paper and PAMFN; `FusionBranch._drop_modalities`).
      head_dropout, head_hidden_dropout: fusion-head dropouts (0.0 = MAQA's fc_drop, 0.5).
      head_hidden_ratio: the fusion head's hidden width is features // this (2, MAQA's fc_r).
      attention_dropout: attention-weight dropout in CSFB/DFB (0.1, MAQA).
      broadcast_dropout, attention_output_projection, alpha_bias_init, gumbel_at_test,
        dra_relative_eps: see `AttentionSettings`.
      tau_init: initial Gumbel temperature (10, MAQA); learned as `fusion/log_tau`.
      frozen_branch_train: in phase 'fusion' with train=True, run the frozen branches in
        train mode (BatchNorm batch statistics, updated running averages, branch dropout),
        as PAMFN's `model.train()` does; gradients stay stopped either way.
      fused_score: 'fusion_head' (the paper, PAMFN) or 'mean_of_heads' (ours): the
        evaluation-mode 'fused' score (module docstring, "Fused score").
      pool_odd_step: 'keep' (ours) or 'drop' (PyTorch's AvgPool1d, PAMFN): what stride-2
        pooling does with the last of an odd number of steps (`layers.Conventions`).
      bn_unbiased_running_var: BatchNorm running variances average the unbiased batch
        variance, as PyTorch's do (PAMFN); False: the biased one, as Flax's do.
      trainable_branches: modalities whose branch keeps training in phase 'fusion': its
        features carry the fused loss's gradient (no stop_gradient) and it runs in train
        mode. PAMFN leaves its third branch undetached (('mask',) in the side by side);
        the paper freezes all (()). The optimiser must label them too
        (`train.phase_optimizer` does, from the same config).
      dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.

    Call: `model.apply(variables, inputs, valid, train=..., phase=...)` with `inputs`
    a dict modality -> [B, T, F] and `valid` [B, T] bool (None: all valid). Returns
    {modality: score [B]} (phase 'unimodal'), {'fused': score [B]} ('fusion'), or both
    ('all'); scores are float32 in (0, 1). RNG streams when train: 'dropout', 'gumbel'.
    Mutable collections: 'batch_stats' (train), 'intermediates' (sown attention
    weights, see `csfb_modality_weights`).
    """

    modalities: Sequence[str] = ALL_MODALITIES
    features: int = 256
    num_candidates: int = 10
    num_heads: int = 2
    fusion: str = "dra"
    use_dfb: bool = True
    embed_features: int = 512
    embed_dropout: float = 0.3
    branch_head_dropout: float = 0.5
    feature_dropout: float = 0.5
    modality_dropout: float = 0.0
    head_dropout: float = 0.0
    head_hidden_dropout: float = 0.5
    head_hidden_ratio: int = 2
    attention_dropout: float = 0.1
    broadcast_dropout: bool = True
    attention_output_projection: bool = True
    alpha_bias_init: float = 2.0
    gumbel_at_test: bool = False
    dra_relative_eps: float = 0.0
    tau_init: float = 10.0
    frozen_branch_train: bool = False
    trainable_branches: Sequence[str] = ()
    fused_score: str = "fusion_head"
    pool_odd_step: str = "keep"
    bn_unbiased_running_var: bool = False
    dtype: layers.Dtype = jnp.float32

    def _check(self, inputs: Mapping[str, Array], phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"SurgFusionNet: phase must be one of {PHASES}, got {phase!r}.")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"SurgFusionNet.modalities must be a non-empty list of distinct "
                             f"names from {ALL_MODALITIES}, got {self.modalities!r}.")
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise KeyError(f"SurgFusionNet: inputs lack modalities {missing} (model "
                           f"modalities {tuple(self.modalities)}, inputs {sorted(inputs)}); "
                           "prepare them or drop them from the config's `modalities`.")
        if self.fused_score not in FUSED_SCORES:
            raise ValueError(f"SurgFusionNet.fused_score must be one of {FUSED_SCORES}, got "
                             f"{self.fused_score!r} (config field `model.fused_score`).")
        unknown = [m for m in self.trainable_branches if m not in self.modalities]
        if unknown:
            raise ValueError(f"SurgFusionNet.trainable_branches {unknown} are not among the "
                             f"model's modalities {tuple(self.modalities)} (config field "
                             "`model.trainable_branches`).")
        shapes = {m: tuple(inputs[m].shape[:2]) for m in self.modalities}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"SurgFusionNet: modalities disagree in [batch, time]: {shapes}.")

    @nn.compact
    def __call__(self, inputs: Mapping[str, Array], valid: Array | None = None, *,
                 train: bool = False, phase: str = "fusion") -> dict[str, Array]:
        self._check(inputs, phase)
        conventions = layers.Conventions(self.pool_odd_step, self.bn_unbiased_running_var)
        branches = {m: UnimodalBranch(self.features, self.embed_features, self.embed_dropout,
                                      self.branch_head_dropout, conventions, dtype=self.dtype,
                                      name=f"branch_{m}")
                    for m in self.modalities}
        out = {}
        # Fusion first: in phase 'all' it must read the running BN statistics before the
        # unimodal pass (train) updates them, so 'all' = 'fusion' + 'unimodal' exactly.
        if phase in ("fusion", "all"):
            stages, valids, branch_scores = [], None, []
            for m, branch in branches.items():
                trainable = m in self.trainable_branches
                # Frozen branch: no gradient; running BN statistics and no dropout unless
                # `frozen_branch_train`. A trainable one runs as in phase 'unimodal'.
                score, feats, valids = branch(
                    inputs[m], valid, train=train and (trainable or self.frozen_branch_train))
                stages.append(list(feats) if trainable
                              else [jax.lax.stop_gradient(x) for x in feats])
                branch_scores.append(score)
            attention = AttentionSettings(self.attention_dropout, self.broadcast_dropout,
                                          self.attention_output_projection,
                                          self.alpha_bias_init, self.gumbel_at_test,
                                          self.dra_relative_eps)
            out["fused"] = FusionBranch(
                self.features, self.num_candidates, self.num_heads, self.fusion, self.use_dfb,
                self.feature_dropout, self.modality_dropout, self.head_dropout,
                self.head_hidden_dropout, self.head_hidden_ratio, attention, self.tau_init,
                conventions, dtype=self.dtype, name="fusion")(stages, valids, train=train)
            if self.fused_score == "mean_of_heads" and not train:
                out["fused"] = jnp.mean(jnp.stack([out["fused"]] + branch_scores), axis=0)
        if phase in ("unimodal", "all"):
            for m, branch in branches.items():
                out[m], _, _ = branch(inputs[m], valid, train=train)
        return out


def csfb_weights_from_intermediates(intermediates: Mapping) -> list[Array]:
    """Per-stage CSFB modality weights [B, T_i, M] from a model's sown `intermediates`."""
    fusion = intermediates["fusion"]
    weights = []
    for i in (1, 2, 3):
        w = fusion[f"stage{i}"]["csfb"]["attention"]["attention_weights"][0]  # [B,T,h,1,M]
        weights.append(jnp.mean(w, axis=-3)[..., 0, :])
    return weights


def csfb_modality_weights(model: SurgFusionNet, variables: Mapping, inputs: Mapping[str, Array],
                          valid: Array | None = None) -> list[Array]:
    """CSFB attention over modalities per time step (Fig. 4), in eval mode.

    Args:
      model: a `SurgFusionNet`.
      variables: its variables ('params', 'batch_stats'; others are ignored).
      inputs, valid: as for the model.

    Returns:
      One array per fusion stage, [B, T_i, M] with T_i = ceil(T/2), ceil(T/4), 1,
      averaged over heads; each row sums to 1 over the modalities (in the order of
      `model.modalities`). Only steps valid at stage i (`layers.stage_valids(valid)[i]`)
      are meaningful. Wrap in `jax.jit(functools.partial(csfb_modality_weights, model))`
      when calling it repeatedly.
    """
    variables = {k: v for k, v in variables.items() if k != "intermediates"}
    _, state = model.apply(variables, inputs, valid, train=False, phase="fusion",
                           mutable=["intermediates"])
    return csfb_weights_from_intermediates(state["intermediates"])
