"""The shared feature dataset: round trip, atomic replacement, clear errors."""
import os

import numpy as np
import pytest

from surgfusion_jax.data import feature_dataset as fd

META = dict(backbone="i3d-kinetics400", fps=10, segment_length=32, flow_bound=20.0,
            modalities=["rgb", "flow", "mask"])


def _examples(n=3, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        t = 2 + i
        yield dict(video_id=f"vid{i}", score=10.0 + i, surgeon_id="BCD"[i % 3], task="Suturing",
                   supertrial=i + 1, item_scores=np.arange(6) + i,
                   rgb=rng.normal(size=(t, dim)), flow=rng.normal(size=(t, dim)),
                   mask=rng.normal(size=(t, dim)))


def test_round_trip_keeps_every_field(tmp_path):
    written = list(_examples())
    fd.write_feature_dataset(tmp_path, "toy", written, META, feature_dim=8)
    ds = fd.load_feature_dataset(tmp_path, "toy")
    assert len(ds) == 3 and ds.modalities == ("rgb", "flow", "mask")
    assert ds.metadata["flow_bound"] == 20.0 and ds.metadata["feature_dim"] == 8
    for ex, got in zip(written, ds.samples):
        assert got["video_id"] == ex["video_id"] and got["surgeon_id"] == ex["surgeon_id"]
        assert got["source_video"] == ex["video_id"]  # defaults to the video id
        assert got["score"] == pytest.approx(ex["score"])
        assert got["supertrial"] == ex["supertrial"]
        assert got["num_segments"] == ex["rgb"].shape[0]
        np.testing.assert_allclose(got["item_scores"], ex["item_scores"])
        for m in fd.MODALITIES:
            np.testing.assert_allclose(got[m], ex[m].astype(np.float32))


def test_subset_of_modalities(tmp_path):
    exs = [{k: v for k, v in ex.items() if k != "mask"} for ex in _examples()]
    fd.write_feature_dataset(tmp_path, "nomask", exs, dict(META, modalities=["rgb", "flow"]),
                             feature_dim=8)
    ds = fd.load_feature_dataset(tmp_path, "nomask")
    assert ds.modalities == ("rgb", "flow") and "mask" not in ds.samples[0]


def test_failed_write_leaves_previous_dataset_intact(tmp_path):
    fd.write_feature_dataset(tmp_path, "toy", _examples(), META, feature_dim=8)
    bad = list(_examples(seed=1))
    bad[2]["flow"] = np.full((4, 8), np.nan)
    with pytest.raises(fd.DatasetError, match="vid2.*NaN"):
        fd.write_feature_dataset(tmp_path, "toy", bad, META, feature_dim=8)
    ds = fd.load_feature_dataset(tmp_path, "toy")
    np.testing.assert_allclose(ds.samples[0]["rgb"], next(_examples())["rgb"].astype(np.float32))
    assert sorted(os.listdir(tmp_path)) == ["toy"]  # no staging folders left behind


@pytest.mark.parametrize("mutate, message", [
    (lambda exs: exs.append(dict(exs[0])), "duplicate video_id"),
    (lambda exs: exs[0].update(rgb=np.zeros((3, 5))), r"expected \[num_segments, 8\]"),
    (lambda exs: exs[0].update(mask=np.zeros((9, 8))), "different segment counts"),
    (lambda exs: exs[0].pop("flow"), "modality 'flow' missing"),
])
def test_bad_examples_are_rejected(tmp_path, mutate, message):
    exs = list(_examples())
    mutate(exs)
    with pytest.raises(fd.DatasetError, match=message):
        fd.write_feature_dataset(tmp_path, "toy", exs, META, feature_dim=8)
    assert not os.path.exists(tmp_path / "toy")


def test_missing_dataset_names_the_prep_command(tmp_path):
    with pytest.raises(fd.DatasetError, match="data_prep.prepare"):
        fd.load_feature_dataset(tmp_path, "absent")


def test_corrupt_records_give_a_clear_error(tmp_path):
    path = fd.write_feature_dataset(tmp_path, "toy", _examples(), META, feature_dim=8)
    shard = [f for f in os.listdir(path) if ".tfrecord" in f][0]
    with open(os.path.join(path, shard), "r+b") as f:
        f.seek(20)
        f.write(b"\xff" * 64)
    with pytest.raises(fd.DatasetError, match="cannot be read.*re-run the prep stage"):
        fd.load_feature_dataset(tmp_path, "toy")
