"""Initial variables read from a file instead of drawn (config field `model.init_weights`).

Every run starts from `train.init_variables` (drawn with the run's key and `model.init`)
unless `model.init_weights` names a file: then the run of seed s starts from the
variables in that file, `{seed}` in its name replaced by s (so every fold of a seed starts
alike, as in PAMFN, which reseeds before each run). The file is an .npz of every
parameter and BatchNorm statistic, one array per entry named by its path
('params/branch_rgb/embed1/kernel', 'batch_stats/...'), as `save` writes it.

Its use: a comparison that starts two implementations from the same draws, e.g.
`benchmarks/peer_parity.py`, whose `model.init_weights=pamfn` writes PAMFN's own initial
weights in our layout (`models/pamfn_weights.from_pamfn`), so that the two sides differ
only in their training streams, not in their initial draws.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from surgfusion_jax import errors

FIELD = "model.init_weights"
SEP = "/"


class InitialWeightsError(errors.UserError, ValueError):
    """A `model.init_weights` file that is missing or does not fit the model."""


def path_for_seed(pattern: str, seed: int) -> str:
    """The file of seed `seed`: `{seed}` in `pattern` replaced (other braces kept)."""
    return pattern.replace("{seed}", str(int(seed)))


def save(path: str, variables: Mapping[str, Any]) -> None:
    """Writes `variables` ({'params': ..., 'batch_stats': ...}) to `path` atomically."""
    flat = {SEP.join(k): np.asarray(v) for k, v in
            traverse_util.flatten_dict(dict(variables)).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load(path: str, template: Mapping[str, Any]) -> dict[str, Any]:
    """The variables in `path`, checked entry by entry against `template` (the model's
    variables or their shapes, e.g. `train.abstract_variables`) and cast to its dtypes.

    Raises:
      InitialWeightsError: the file is missing or unreadable, or an entry is missing,
        left over or of another shape; the message names the file and the entry.
    """
    fix = (f"write it with surgfusion_jax.training.initial_weights.save for this model, "
           f"or set --config.{FIELD}='' to draw the initial weights")
    if not os.path.isfile(path):
        raise InitialWeightsError(f"config.{FIELD}: {path} does not exist; {fix}.")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            got = {tuple(name.split(SEP)): arrays[name] for name in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InitialWeightsError(f"config.{FIELD}: cannot read {path} "
                                  f"({errors.first_line(e)}); {fix}.") from None
    want = traverse_util.flatten_dict(dict(template))
    for what, names in (("lacks", set(want) - set(got)), ("has extra", set(got) - set(want))):
        if names:
            shown = ", ".join(SEP.join(n) for n in sorted(names)[:3])
            raise InitialWeightsError(f"config.{FIELD}: {path} {what} entries ({len(names)}: "
                                      f"{shown}{' ...' if len(names) > 3 else ''}) for this "
                                      f"model; {fix}.")
    out = {}
    for name, spec in want.items():
        value = got[name]
        if tuple(value.shape) != tuple(spec.shape):
            raise InitialWeightsError(f"config.{FIELD}: {path} entry {SEP.join(name)} has shape "
                                      f"{tuple(value.shape)}, the model {tuple(spec.shape)}; "
                                      f"{fix}.")
        out[name] = value.astype(spec.dtype)
    return traverse_util.unflatten_dict(out)
