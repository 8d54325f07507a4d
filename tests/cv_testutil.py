"""The tiny cross-validation the training tests share: its features, its config, and
`shared_dir`, which builds a directory once per test session for all pytest-xdist
workers (a tiny run costs ~1.5 min, nearly all of it XLA compile time; several test
files read the same one instead of training their own).

Fixtures built on these (`data_dir`, `full_run`, `group_run`) live in
tests/training/conftest.py.
"""
import fcntl
import os
import shutil

import numpy as np

from surgfusion_jax import config_lib
from surgfusion_jax.data import feature_dataset as fd

N, DIM = 32, 16
SCORE_MAX = 30.0  # config_lib's default
NORMALISED = 2 * SCORE_MAX  # score units per unit of model output
META = dict(backbone="test", fps=10, segment_length=32, modalities=list(fd.MODALITIES))
# `tiny_config` overrides of the run-group tests: 2 seeds x 2 folds, 2 + 2 epochs.
GROUP = dict(num_seeds=2, unimodal__num_epochs=2, fusion__num_epochs=2, checkpoint_every_epochs=10)


def write_features(data_dir, name, seed, signal):
    """N videos of 5-30 segments; with `signal`, score = 18 + 10 a and every modality's
    features carry a * u along one direction u (else scores are unrelated noise)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=DIM)
    u /= np.linalg.norm(u)
    examples = []
    for i in range(N):
        n = int(rng.integers(5, 31))
        a = rng.uniform(-1, 1)
        ex = dict(video_id=f"vid{i:02d}", score=float(18 + 10 * a if signal else rng.uniform(8, 28)),
                  source_video=f"src{i // 2}")  # two samples per source video
        for m in fd.MODALITIES:
            ex[m] = rng.normal(size=(n, DIM)) + (4.0 * a * u if signal else 0.0)
        examples.append(ex)
    fd.write_feature_dataset(str(data_dir), name, examples, META, feature_dim=DIM)


def tiny_config(data_dir, name, **overrides):
    """The small model on dataset `name` of `data_dir`: 2 folds with an inner validation
    split, 3 + 3 epochs of batch 4. `overrides`: field=value or section__field=value."""
    c = config_lib.small(config_lib.get_config())
    c.data.data_dir, c.data.name, c.data.window = str(data_dir), name, 8
    c.cv.num_folds, c.cv.inner_val_fraction = 2, 0.25
    c.unimodal.num_epochs = c.fusion.num_epochs = 3
    c.unimodal.batch_size = c.fusion.batch_size = 4
    c.fusion.head_lr_factor = 1.0  # short runs: the MAQA x0.1 head would barely move
    c.eval_batch_size, c.min_bucket, c.checkpoint_every_epochs = 8, 32, 2
    c.progress_bar = False
    for key, value in overrides.items():
        section, field = key.split("__") if "__" in key else (None, key)
        (c[section] if section else c)[field] = value
    return c


def shared_dir(tmp_path_factory, name, build):
    """<session temp>/<name>, filled by `build(path)` once per test session: the first
    worker to ask builds it under a file lock, the others wait and read it. A build that
    failed is retried by the next caller. Readers must not modify it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    path = root / name
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            (root / f"{name}.done").touch()
    return path


def assert_same_predictions(got, want, tol):
    """Final-epoch test predictions of every head of every run of `got` and `want`
    (results.json dicts, runs in the same order) within `tol(head)` of the model output."""
    for a, b in zip(got["folds"], want["folds"]):
        assert (a["seed"], a["name"]) == (b["seed"], b["name"])
        for model in ("rgb", "flow", "mask", "fused"):
            np.testing.assert_allclose(a["models"][model]["predictions"]["final"]["pred"],
                                       b["models"][model]["predictions"]["final"]["pred"],
                                       atol=tol(model) * NORMALISED)
