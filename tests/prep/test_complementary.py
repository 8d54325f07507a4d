"""Tests for data_prep/complementary.py: determinism, the score scale, that each modality
predicts its own skill component and nothing of the others' (held-out ridge, numpy), and
that the written dataset loads through the library."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import complementary
from data_prep.common import PrepError
from surgfusion_jax.data import feature_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Many short videos: the held-out correlations below are accurate to ~0.07.
LARGE = dict(num_videos=400, feature_dim=16)


def _pooled(samples, modality):
    return np.stack([s[modality].mean(axis=0) for s in samples]).astype(np.float64)


def _held_out_ridge(x, y, penalty=10.0):
    """Fit ridge on the first half, predict the second half (closed form)."""
    half = len(y) // 2
    mean_x, mean_y = x[:half].mean(0), y[:half].mean()
    a = x[:half] - mean_x
    w = np.linalg.solve(a.T @ a + penalty * np.eye(a.shape[1]), a.T @ (y[:half] - mean_y))
    return (x[half:] - mean_x) @ w + mean_y, half


def test_same_seed_same_dataset_other_seed_differs():
    a, meta_a, u_a = complementary.generate(num_videos=12, seed=3)
    b, meta_b, u_b = complementary.generate(num_videos=12, seed=3)
    c, _, u_c = complementary.generate(num_videos=12, seed=4)
    assert meta_a == meta_b and np.array_equal(u_a, u_b)
    for sa, sb in zip(a, b):
        assert sa["video_id"] == sb["video_id"] and sa["score"] == sb["score"]
        for m in feature_dataset.MODALITIES:
            assert np.array_equal(sa[m], sb[m])
    assert not np.allclose(u_a, u_c)
    assert not np.allclose(a[0]["rgb"][:4], c[0]["rgb"][:4])


def test_scores_are_the_sum_of_per_modality_items_on_the_stated_scale():
    samples, meta, u = complementary.generate(num_videos=200, min_segments=3, max_segments=9)
    scores = np.array([s["score"] for s in samples])
    items = np.stack([s["item_scores"] for s in samples])
    assert meta["item_names"] == list(meta["modalities"]) == list(feature_dataset.MODALITIES)
    np.testing.assert_allclose(items.sum(1), scores, rtol=1e-5)
    assert (meta["score_scale"], meta["score_min"], meta["score_max"]) == ("gears", 6.0, 30.0)
    assert scores.min() >= 6.0 and scores.max() <= 30.0 and scores.std() > 2.0
    # each item is an affine function of its own latent component
    np.testing.assert_allclose(items, 6.0 + 4.0 * u, rtol=1e-5)  # (6 + 30) / 6 + (30 - 6) / 6 * u
    lengths = {s["rgb"].shape[0] for s in samples}
    assert min(lengths) == 3 and max(lengths) == 9
    assert all(s[m].shape == (s["rgb"].shape[0], 64) for s in samples
               for m in feature_dataset.MODALITIES)
    assert len({s["surgeon_id"] for s in samples}) == 8


def test_each_modality_alone_predicts_only_its_own_component():
    samples, meta, u = complementary.generate(seed=1, **LARGE)
    corr = np.zeros((3, 3))  # [features of modality m, component k]
    for m, modality in enumerate(meta["modalities"]):
        x = _pooled(samples, modality)
        for k in range(3):
            pred, half = _held_out_ridge(x, u[:, k])
            corr[m, k] = np.corrcoef(pred, u[half:, k])[0, 1]
    own = np.diag(corr)
    others = corr[~np.eye(3, dtype=bool)]
    assert own.min() > 0.8, corr.round(2)
    assert np.abs(others).max() < 0.25, corr.round(2)


def test_only_all_modalities_together_predict_the_score():
    samples, meta, _ = complementary.generate(seed=2, **LARGE)
    y = np.array([s["score"] for s in samples])
    scc = {}
    for name, mods in [(m, [m]) for m in meta["modalities"]] + [("all", meta["modalities"])]:
        x = np.concatenate([_pooled(samples, m) for m in mods], axis=1)
        pred, half = _held_out_ridge(x, y)
        scc[name] = np.corrcoef(pred, y[half:])[0, 1]
    singles = [scc[m] for m in meta["modalities"]]
    assert max(singles) < 0.7 and min(singles) > 0.3, scc  # one third of the variance each
    assert scc["all"] > max(singles) + 0.25, scc


def test_bad_options_name_the_flag():
    with pytest.raises(PrepError, match="--min_segments"):
        complementary.generate(min_segments=9, max_segments=3)
    with pytest.raises(PrepError, match="--modalities"):
        complementary.generate(modalities=("rgb", "audio"))
    with pytest.raises(TypeError, match="unknown options"):
        complementary.generate(num_video=3)


def test_cli_writes_a_dataset_the_library_loads(tmp_path):
    cmd = [sys.executable, "-m", "data_prep.complementary", f"--out_dir={tmp_path}",
           "--name=comp", "--num_videos=10", "--feature_dim=8", "--min_segments=4",
           "--max_segments=7", "--num_surgeons=5", "--seed=7"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-3000:]
    dataset = feature_dataset.load_feature_dataset(str(tmp_path), "comp")
    expected, _, _ = complementary.generate(num_videos=10, feature_dim=8, min_segments=4,
                                            max_segments=7, num_surgeons=5, seed=7)
    assert [s["video_id"] for s in dataset.samples] == [s["video_id"] for s in expected]
    for got, want in zip(dataset.samples, expected):
        assert got["num_segments"] == want["rgb"].shape[0]
        np.testing.assert_allclose(got["score"], want["score"], rtol=1e-6)
        for m in feature_dataset.MODALITIES:
            np.testing.assert_array_equal(got[m], want[m])
    meta = dataset.metadata
    assert meta["feature_dim"] == 8 and meta["score_max"] == 30.0
    assert meta["generator"]["options"]["seed"] == 7
    with open(os.path.join(dataset.path, "surgfusion_metadata.json")) as fh:
        assert json.load(fh)["source"] == "complementary"
    assert feature_dataset.backbone_note(meta, "comp") is not None  # not the paper's features
