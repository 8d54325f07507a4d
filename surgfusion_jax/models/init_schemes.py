"""Parameter initialisation schemes: Flax's defaults or PyTorch's (PAMFN).

The modules initialise like every Flax layer (kernels lecun-normal, biases zero). PAMFN,
whose training the `pamfn` preset reproduces, uses PyTorch's `reset_parameters` of
`nn.Linear` / `nn.Conv1d`: kernel kaiming-uniform with a = sqrt(5), i.e.
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with
fan_in = input channels per group x kernel width. `reinit(params, rng, 'torch')` redraws
every kernel and its bias that way after `init`; normalisation parameters (scale 1,
bias 0 in both frameworks), the Gumbel temperature and DRA's alpha MLP (its own initial
alpha, docs/design.md §3.2) keep their values.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import traverse_util

SCHEMES = ("flax", "torch")

# DenseGeneral kernels [in, heads, head_dim] of the attention inputs: fan_in is axis 0.
_HEADS_OUT = ("query", "key", "value")
_KEEP = ("alpha_mlp",)


def _fan_in(path: tuple[str, ...], shape: tuple[int, ...]) -> int:
    if len(path) >= 2 and path[-2] in _HEADS_OUT and len(shape) == 3:
        return shape[0]
    # Dense [in, out], TemporalConv [k, in / groups, out], StackedTemporalConv
    # [k, in, nets * out], attention output [heads, head_dim, out]: all but the last axis.
    return math.prod(shape[:-1])


def reinit(params: Any, rng: jax.Array, scheme: str) -> Any:
    """`params` with every kernel (and the bias beside it) redrawn by `scheme`.

    'flax' returns `params` unchanged; 'torch' draws PyTorch's defaults (module
    docstring). Deterministic in `rng`.
    """
    if scheme == "flax":
        return params
    if scheme != "torch":
        raise ValueError(f"unknown initialisation scheme {scheme!r}; expected one of "
                         f"{SCHEMES} (config field `model.init`).")
    flat = traverse_util.flatten_dict(params)
    out = dict(flat)
    for i, (path, kernel) in enumerate(sorted(flat.items())):
        if path[-1] != "kernel" or any(k in path for k in _KEEP):
            continue
        bound = 1.0 / math.sqrt(_fan_in(path, kernel.shape))
        k_rng, b_rng = jax.random.split(jax.random.fold_in(rng, i))
        out[path] = jax.random.uniform(k_rng, kernel.shape, kernel.dtype, -bound, bound)
        bias_path = path[:-1] + ("bias",)
        if bias_path in flat:
            bias = flat[bias_path]
            out[bias_path] = jax.random.uniform(b_rng, bias.shape, bias.dtype, -bound, bound)
    return traverse_util.unflatten_dict(out)


def uniform_bound(params: Any) -> dict[str, float]:
    """1/sqrt(fan_in) per kernel path ('/'-joined): the 'torch' scheme's bounds (tests)."""
    flat = traverse_util.flatten_dict(params)
    return {"/".join(p): 1.0 / math.sqrt(_fan_in(p, v.shape)) for p, v in flat.items()
            if p[-1] == "kernel" and not any(k in p for k in _KEEP)}

