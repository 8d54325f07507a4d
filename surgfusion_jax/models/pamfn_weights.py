"""PAMFN's PyTorch parameters in SurgFusion-Net's layout (docs/design.md §4.10).

`SurgFusionNet` under preset 'pamfn' computes PAMFN's function (github.com/qinghuannn/PAMFN,
models/pamfn.py): with this mapping, a PAMFN state dict loaded into ours gives the same
scores, gradients and BatchNorm statistics (tests/models/test_pamfn_weights.py, against a
fixture written by PAMFN's own modules). The mapping is exact, not approximate; where
the two parameterise the same function differently:

* a convolution followed by BatchNorm has a bias in PAMFN and none here (BatchNorm's
  offset makes it redundant): the bias is folded into the running mean (mean - bias),
  which gives the same eval-mode output, and its train-mode gradient is zero;
* PAMFN's DFB negates its query (`q = -1 * q` in CM_Fusion.forward) before the query
  projection of its negated-score attention; here the DFB's `query_proj` carries the
  sign (kernel and bias negated). SGD, Adam and AdamW, with or without decay and
  clipping, treat a parameter and its negation alike, so training is unchanged;
* the Gumbel temperature is `log_tau` here (tau = exp(log_tau)), PAMFN's `tau` itself;
* the K FusionNets' FFNs and the M weight nets are grouped kernels here (net k's or
  modality m's outputs at channels k * width ... (k + 1) * width - 1);
* PyTorch's Conv1d kernel [out, in, k] is [k, in, out] here, Linear [out, in] is [in, out].

PAMFN's modality slots are 'V', 'F', 'A' (branches `model_r`, `model_f`, `model_a` of its
fusion model); the parity harness feeds ours rgb, flow and mask in that order
(`SLOTS`). Unused PAMFN entries (the attention LayerNorm, the zero `c`, BatchNorm's
`num_batches_tracked`) have no counterpart.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

# PAMFN's modality slot -> our modality, and the prefix of its branch in the fusion model.
SLOTS = (("V", "rgb", "model_r"), ("F", "flow", "model_f"), ("A", "mask", "model_a"))


class PamfnWeightsError(ValueError):
    """A PAMFN state dict that does not fit the model it is loaded into."""


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    """Conv1d [out, in, k] -> [k, in, out]."""
    return np.asarray(w).transpose(2, 1, 0)


def _dense_kernel(w: np.ndarray) -> np.ndarray:
    """Linear [out, in] or 1x1 Conv1d [out, in, 1] -> [in, out]."""
    w = np.asarray(w)
    return (w[..., 0] if w.ndim == 3 else w).T


class _Builder:
    """Fills our nested tree from PAMFN names, checking every shape against `template`."""

    def __init__(self, state: Mapping[str, Any], template: Mapping[str, Any], gradients: bool):
        self.state, self.template, self.gradients = state, template, gradients
        self.params: dict = {}
        self.stats: dict = {}
        self.used: set[str] = set()

    def get(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise PamfnWeightsError(f"PAMFN state dict: no entry {key!r} (the model expects "
                                    "it; check the state dict's widths, K and modalities).")
        self.used.add(key)
        return np.asarray(self.state[key], np.float64)

    def put(self, tree: dict, path: tuple[str, ...], value: np.ndarray, source: str) -> None:
        node = self.template["params" if tree is self.params else "batch_stats"]
        for p in path:
            if not isinstance(node, Mapping) or p not in node:
                raise PamfnWeightsError(f"our model has no variable {'/'.join(path)} (for "
                                        f"PAMFN's {source}); build it with preset 'pamfn'.")
            node = node[p]
        value = np.asarray(value)
        if value.size != np.size(node):
            raise PamfnWeightsError(
                f"PAMFN's {source} has {value.size} values, our {'/'.join(path)} "
                f"{np.shape(node)}: widths, K or heads differ between the two models.")
        target = tree
        for p in path[:-1]:
            target = target.setdefault(p, {})
        target[path[-1]] = value.reshape(np.shape(node)).astype(np.float32)

    # One PAMFN layer -> ours.
    def conv_bn(self, ours: tuple[str, ...], conv: str | list[str], bn: str | list[str],
                kernel: Callable[[list[np.ndarray]], np.ndarray] | None = None) -> None:
        convs, bns = ([conv] if isinstance(conv, str) else conv), ([bn] if isinstance(bn, str) else bn)
        weights = [_conv_kernel(self.get(f"{c}.weight")) for c in convs]
        self.put(self.params, ours + ("conv", "kernel"),
                 np.concatenate(weights, axis=-1) if kernel is None else kernel(weights),
                 f"{convs[0]}.weight")
        self.put(self.params, ours + ("bn", "scale"),
                 np.concatenate([self.get(f"{b}.weight") for b in bns]), f"{bns[0]}.weight")
        self.put(self.params, ours + ("bn", "bias"),
                 np.concatenate([self.get(f"{b}.bias") for b in bns]), f"{bns[0]}.bias")
        conv_bias = np.concatenate([self.get(f"{c}.bias") for c in convs])
        if self.gradients:
            return  # a bias before BatchNorm has no gradient in train mode
        mean = np.concatenate([self.get(f"{b}.running_mean") for b in bns])
        self.put(self.stats, ours + ("bn", "mean"), mean - conv_bias, f"{bns[0]}.running_mean")
        self.put(self.stats, ours + ("bn", "var"),
                 np.concatenate([self.get(f"{b}.running_var") for b in bns]),
                 f"{bns[0]}.running_var")

    def dense(self, ours: tuple[str, ...], layer: str | list[str], sign: float = 1.0) -> None:
        layers = [layer] if isinstance(layer, str) else layer
        kernel = np.concatenate([_dense_kernel(self.get(f"{l}.weight")) for l in layers], -1)
        bias = np.concatenate([self.get(f"{l}.bias") for l in layers])
        self.put(self.params, ours + ("kernel",), sign * kernel, f"{layers[0]}.weight")
        self.put(self.params, ours + ("bias",), sign * bias, f"{layers[0]}.bias")

    def branch(self, ours: str, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        self.conv_bn((ours, "embed1"), f"{p}embedding.0", f"{p}embedding.1")
        self.conv_bn((ours, "embed2"), f"{p}embedding.3", f"{p}embedding.4")
        for i in (1, 2, 3):
            for j in (1, 2):
                self.conv_bn((ours, f"stage{i}", f"conv{j}"), f"{p}stage{i}.conv{j}.0",
                             f"{p}stage{i}.conv{j}.1")
        if not self.gradients or f"{p}fc.1.weight" in self.state:  # (unused head: no grad)
            self.dense((ours, "head"), f"{p}fc.1")

    def attention(self, ours: tuple[str, ...], prefix: str) -> None:
        for name, index in (("query", 0), ("key", 1), ("value", 2)):
            self.dense(ours + (name,), f"{prefix}.linear_layers.{index}")

    def fusion_stage(self, i: int, num_modalities: int, num_candidates: int) -> None:
        ours, p = ("fusion", f"stage{i}"), f"stage{i}"
        self.conv_bn(ours + ("resblock", "conv1"), f"{p}.conv.0", f"{p}.conv.1")
        self.conv_bn(ours + ("resblock", "conv2"), f"{p}.conv.3", f"{p}.conv.4")
        self.conv_bn(ours + ("resblock", "shortcut"), f"{p}.short_cut.0", f"{p}.short_cut.1")
        self.dense(ours + ("csfb", "query_proj"), f"{p}.s_fusion.proj.0")
        self.attention(ours + ("csfb", "attention"), f"{p}.s_fusion.fusion_s")
        f, nets = f"{p}.f_fusion", ours + ("dfb", "fusion_nets")
        modalities, candidates = range(num_modalities), range(num_candidates)
        self.conv_bn(nets + ("weights_hidden",), [f"{f}.proj1.{m}.0" for m in modalities],
                     [f"{f}.proj1.{m}.1" for m in modalities])
        self.dense(nets + ("weights_out",), [f"{f}.proj1.{m}.3" for m in modalities])
        for ffn, (conv, bn) in (("ffn1", (0, 1)), ("ffn2", (3, 4))):
            self.conv_bn(nets + (ffn,), [f"{f}.ffn.{k}.{conv}" for k in candidates],
                         [f"{f}.ffn.{k}.{bn}" for k in candidates])
        self.dense(ours + ("dfb", "policy", "logits"), f"{f}.policy.0")
        self.dense(ours + ("dfb", "query_proj"), f"{f}.proj2.0", sign=-1.0)
        self.attention(ours + ("dfb", "attention"), f"{f}.fusion_f")


def from_pamfn(state: Mapping[str, Any], template: Mapping[str, Any], *,
               gradients: bool = False, branch_only: str | None = None) -> dict[str, Any]:
    """PAMFN parameters (or their gradients) as our variables.

    Args:
      state: PAMFN names -> arrays: a `PAMFN` model's state dict (its branches under
        model_r/model_f/model_a), or with `branch_only` one `BaseModel`'s.
      template: our model's variables ({'params': ..., 'batch_stats': ...}, e.g. from
        `train.init_variables` or `jax.eval_shape`), built with preset 'pamfn' at PAMFN's
        widths; every shape is checked against it.
      gradients: `state` holds gradients (`p.grad` by parameter name): the conv biases
        before BatchNorm are dropped, d/d log_tau = tau * d/d tau needs `tau` in
        `state` under 'tau_value', and no batch statistics are returned.
      branch_only: the modality ('rgb', 'flow' or 'mask') of a single `BaseModel` state.

    Returns:
      {'params': ..., 'batch_stats': ...} holding exactly the entries `state` covers
      (for `branch_only`, the one branch); merge into the template for a whole model.

    Raises:
      PamfnWeightsError: an entry is missing, left over, or of a different size.
    """
    builder = _Builder(state, template, gradients)
    if branch_only is not None:
        builder.branch(f"branch_{branch_only}", "")
    else:
        fusion = template["params"].get("fusion", {})
        num_modalities = sum(f"branch_{ours}" in template["params"] for _, ours, _ in SLOTS)
        num_candidates = np.size(fusion["stage1"]["dfb"]["policy"]["logits"]["bias"])
        for _, ours, prefix in SLOTS:  # (gradients: only the branches that have them)
            if f"branch_{ours}" in template["params"] and f"{prefix}.embedding.0.weight" in state:
                builder.branch(f"branch_{ours}", prefix)
        for i in (1, 2, 3):
            builder.fusion_stage(i, num_modalities, num_candidates)
        builder.conv_bn(("fusion", "head_hidden"), "fc.1", "fc.2")
        builder.dense(("fusion", "head_out"), "fc.5")
        tau = builder.get("tau_value" if gradients else "tau")
        log_tau = builder.get("tau") * tau if gradients else np.log(tau)
        builder.put(builder.params, ("fusion", "log_tau"), log_tau, "tau")
    unused = {k for k in state if k not in builder.used and not k.endswith(
        ("num_batches_tracked", ".norm.weight", ".norm.bias")) and k != "c"}
    if unused:
        raise PamfnWeightsError(f"PAMFN state dict entries with no counterpart in our model: "
                                f"{sorted(unused)[:5]}{' ...' if len(unused) > 5 else ''}.")
    out = {"params": builder.params}
    if not gradients:
        out["batch_stats"] = builder.stats
    return out


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`base` (nested dicts) with the entries of `update` replacing its own."""
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(update))
    return traverse_util.unflatten_dict(flat)
