"""RARP-skill (M-GEARS 18-28, 33 videos): random 4-fold CV, batch 16, 300 + 300 epochs.

Paper settings (§IV-B). Prepare the features, then train:

  python -m data_prep.prepare --manifest=<rarp.csv> --data_dir=data/features --name=rarp_skill

  python -m surgfusion_jax.main --config=configs/rarp.py --config.workdir=runs/rarp

Quick check with a tiny model: `--config=configs/rarp.py:small`.
"""

import ml_collections

from surgfusion_jax import config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return config_lib.with_arg(config_lib.paper_config("rarp_skill", "rarp", batch_size=16), arg)
