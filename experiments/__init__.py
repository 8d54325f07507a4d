"""Reproductions of the paper's Tables I-V and Fig. 4 (see experiments/cli.py)."""

import os

# TensorFlow only reads the feature datasets here; this silences its oneDNN banner.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
