"""JIGSAWS Needle Passing (GRS 6-30, 28 videos): LOSO CV, batch 16, 300 + 300 epochs.

Paper settings (§IV-B). Prepare the features, then train:

  python -m data_prep.prepare --jigsaws_root=<JIGSAWS> --task=Needle_Passing --data_dir=data/features

  python -m surgfusion_jax.main --config=configs/jigsaws_needle_passing.py --config.workdir=runs/jigsaws_needle_passing

Other schemes: `--config.cv.scheme=louo` (8 folds by surgeon) or
`--config.cv.scheme=kfold` (random 4-fold); LOSO/LOUO folds follow the JIGSAWS
Experimental_setup when `--config.cv.setup_dir` points to it.

Quick check with a tiny model: `--config=configs/jigsaws_needle_passing.py:small`.
"""

import ml_collections

from surgfusion_jax import config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return config_lib.with_arg(config_lib.jigsaws_config("needle_passing"), arg)
