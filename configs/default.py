"""The shared defaults, every field documented in `surgfusion_jax/config_lib.py`.

  python -m surgfusion_jax.main --config=configs/default.py --config.data.name=<dataset>

Dataset configs (`rarp.py`, `rah.py`, `jigsaws_*.py`, `demo.py`) start from the same
builder; `--config=configs/default.py:small` is a quick check with a tiny model.
"""

import ml_collections

from surgfusion_jax import config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return config_lib.with_arg(config_lib.get_config(), arg)
