"""Helpers for the model tests: independent NumPy references and small utilities."""
from __future__ import annotations

import math

import numpy as np


def np_pool2(x, valid):
    """Reference stride-2 masked average pooling, written with explicit loops."""
    b, t, c = x.shape
    out_t = math.ceil(t / 2)
    out = np.zeros((b, out_t, c))
    out_valid = np.zeros((b, out_t), bool)
    for i in range(b):
        for j in range(out_t):
            idx = [s for s in (2 * j, 2 * j + 1) if s < t and valid[i, s]]
            if idx:
                out[i, j] = x[i, idx].mean(0)
                out_valid[i, j] = True
    return out, out_valid


def np_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def np_dense(x, p):
    """A flax Dense / DenseGeneral (kernel [in, out...]) applied to the last axis."""
    k = np.asarray(p["kernel"])
    y = np.tensordot(x, k.reshape(k.shape[0], -1), axes=([-1], [0]))
    y = y.reshape(x.shape[:-1] + k.shape[1:])
    return y + np.asarray(p["bias"]) if "bias" in p else y


def tree_copy(tree):
    """A structural copy of a nested dict of arrays (so sub-dicts can be replaced)."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: tree_copy(v) for k, v in tree.items()}
    return tree
