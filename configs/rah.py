"""RAH-skill (M-GEARS 14-30, 37 videos x 3 phases): random 4-fold CV, batch 32, 300 + 300 epochs.

Paper settings (§IV-B). Prepare the features, then train:

  python -m data_prep.prepare --manifest=<rah.csv> --data_dir=data/features --name=rah_skill

  python -m surgfusion_jax.main --config=configs/rah.py --config.workdir=runs/rah

Splits are grouped by source video, so a video's three phase scores stay in one fold.

Quick check with a tiny model: `--config=configs/rah.py:small`.
"""

import ml_collections

from surgfusion_jax import config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return config_lib.with_arg(config_lib.paper_config("rah_skill", "rah", batch_size=32), arg)
