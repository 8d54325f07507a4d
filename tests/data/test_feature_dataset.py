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


# -- score scale and non-finite values (issue 14, item 4) ---------------------------------

SCALED = dict(META, **fd.parse_score_scale("gears").metadata())


def _unchecked_write(monkeypatch, tmp_path, examples, meta=SCALED):
    """A dataset written by code that skips the writer's checks (another tool, old prep)."""
    with monkeypatch.context() as m:
        m.setattr(fd, "_check_score", lambda *a: None)
        m.setattr(fd, "_check_finite", lambda *a: None)
        fd.write_feature_dataset(tmp_path, "toy", examples, meta, feature_dim=8)


def test_scale_is_stored_and_read_back(tmp_path):
    fd.write_feature_dataset(tmp_path, "toy", _examples(), SCALED, feature_dim=8)
    ds = fd.load_feature_dataset(tmp_path, "toy")
    assert fd.score_scale(ds.metadata) == fd.ScoreScale("gears", 6.0, 30.0)
    assert (ds.metadata["score_min"], ds.metadata["score_max"]) == (6.0, 30.0)
    assert fd.resolve_score_max(ds, 0) == 30.0 and fd.resolve_score_max(ds, 30.0) == 30.0
    custom = dict(META, **fd.parse_score_scale("10,12").metadata())
    fd.write_feature_dataset(tmp_path, "custom", _examples(), custom, feature_dim=8)
    assert fd.resolve_score_max(fd.load_feature_dataset(tmp_path, "custom"), 0.0) == 12.0


def test_config_score_max_that_disagrees_with_the_scale_is_an_error(tmp_path):
    fd.write_feature_dataset(tmp_path, "toy", _examples(),
                             dict(META, **fd.parse_score_scale("0,25").metadata()), feature_dim=8)
    ds = fd.load_feature_dataset(tmp_path, "toy")
    with pytest.raises(fd.ScoreScaleError, match=r"config.data.score_max=30 disagrees with the "
                       r"score scale of dataset 'toy' \(custom 0-25, score_max 25.*"
                       r"--config.data.score_max=0"):
        fd.resolve_score_max(ds, 30.0)


@pytest.mark.parametrize("score, message", [
    (31.0, r"'vid1': score 31 cannot be written: it is outside the dataset's score scale gears "
           r"6-30; fix:.*--score_scale="),
    (99.0, "score 99 cannot be written: it is outside"),
    (5.0, "score 5 cannot be written: it is outside"),
    (float("nan"), r"'vid1': score nan cannot be written: it is not a number"),
    (float("inf"), "'vid1': score inf cannot be written: it is not a number"),
])
def test_scores_off_the_scale_or_nan_are_refused_at_write(tmp_path, score, message):
    exs = list(_examples())
    exs[1]["score"] = score
    with pytest.raises(fd.DatasetError, match=message):
        fd.write_feature_dataset(tmp_path, "toy", exs, SCALED, feature_dim=8)
    assert not os.path.exists(tmp_path / "toy")


def test_nan_scores_are_refused_without_a_scale_too(tmp_path):
    exs = list(_examples())
    exs[0]["score"] = float("nan")
    with pytest.raises(fd.DatasetError, match="'vid0': score nan cannot be written"):
        fd.write_feature_dataset(tmp_path, "toy", exs, META, feature_dim=8)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused_at_write_naming_video_and_modality(tmp_path, value):
    exs = list(_examples())
    exs[2]["mask"][3, 1] = value
    with pytest.raises(fd.DatasetError, match=r"sample 'vid2': mask features cannot be written: "
                       r"1 NaN/inf value\(s\) in segment\(s\) \[3\]; fix: re-extract"):
        fd.write_feature_dataset(tmp_path, "toy", exs, SCALED, feature_dim=8)


def test_malformed_scale_metadata_is_refused_at_write(tmp_path):
    with pytest.raises(fd.ScoreScaleError, match="0 <= MIN < MAX"):
        fd.write_feature_dataset(tmp_path, "toy", _examples(),
                                 dict(META, score_scale="custom", score_min=30, score_max=6),
                                 feature_dim=8)
    with pytest.raises(fd.DatasetError, match="score_min/score_max are missing"):
        fd.write_feature_dataset(tmp_path, "toy", _examples(), dict(META, score_scale="gears"),
                                 feature_dim=8)


def test_non_finite_features_are_refused_at_load(tmp_path, monkeypatch):
    exs = list(_examples())
    exs[1]["flow"][0, :] = np.nan
    _unchecked_write(monkeypatch, tmp_path, exs)
    with pytest.raises(fd.DatasetError, match=r"sample 'vid1': flow features cannot be used "
                       r"\(dataset .*toy.*\): 8 NaN/inf value\(s\) in segment\(s\) \[0\]"):
        fd.load_feature_dataset(tmp_path, "toy")


@pytest.mark.parametrize("score, message", [
    (99.0, r"sample 'vid0': score 99 cannot be used .*outside the dataset's score scale gears 6-30"),
    (float("nan"), r"sample 'vid0': score nan cannot be used .*not a number"),
])
def test_scores_off_the_scale_are_refused_at_load(tmp_path, monkeypatch, score, message):
    exs = list(_examples())
    exs[0]["score"] = score
    _unchecked_write(monkeypatch, tmp_path, exs)
    with pytest.raises(fd.DatasetError, match=message):
        fd.load_feature_dataset(tmp_path, "toy")


def test_dataset_without_a_scale_loads_with_the_documented_default(tmp_path, caplog):
    fd.write_feature_dataset(tmp_path, "toy", _examples(), META, feature_dim=8)  # no scale
    ds = fd.load_feature_dataset(tmp_path, "toy")
    assert fd.score_scale(ds.metadata) is None
    with caplog.at_level("WARNING"):
        assert fd.resolve_score_max(ds, 0.0) == fd.LEGACY_SCORE_MAX == 30.0
    assert "records no score scale" in caplog.text and "--score_scale" in caplog.text
    assert fd.resolve_score_max(ds, 12.0) == 12.0  # scores 10-12: targets within range
    with pytest.raises(fd.DatasetError, match=r"video\(s\) \['vid1', 'vid2'\] have scores "
                       r"outside \[0, 10.5\].*targets outside"):
        fd.resolve_score_max(ds, 10.5)
