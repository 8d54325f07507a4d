"""data_prep/import_features.py: peers' per-video features into a feature dataset."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from data_prep import import_features as imp
from data_prep.backbones.safe_pickle import UnsafePickleError
from data_prep.common import PrepError
from surgfusion_jax.data.feature_dataset import backbone_note, load_feature_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VIDEOS = {"Suturing_B001": (4, 13.0, "B"), "Suturing_C002": (6, 21.5, "C"),
          "Suturing_D003": (5, 28.0, "D")}
D = 16


def _features(seed):
    rng = np.random.default_rng(seed)
    return {m: {v: rng.normal(size=(t, D)).astype(np.float32) for v, (t, _, _) in VIDEOS.items()}
            for m in ("rgb", "flow", "mask")}


def _labels(path):
    with open(path, "w") as f:
        f.write("video_id,score,surgeon_id,task,item_1,item_2\n")
        for v, (_, score, surgeon) in VIDEOS.items():
            f.write(f"{v},{score},{surgeon},Suturing,3,4\n")
    return str(path)


def _packed(path, table):
    arr = np.empty((), dtype=object)
    arr[()] = table
    np.save(path, arr, allow_pickle=True)


def _pamfn_folder(root, feats):
    """MAQA/PAMFN: packed dict files for rgb and flow, per-video extraction output for masks."""
    root.mkdir()
    _packed(root / "JIGSAWS_rgb_VST.npy", feats["rgb"])
    _packed(root / "JIGSAWS_flow_I3D.npy", feats["flow"])
    for v, a in feats["mask"].items():
        np.save(root / f"{v}_mask.npy", a)
    return str(root)


def _check_round_trip(data_dir, name, feats):
    ds = load_feature_dataset(str(data_dir), name)
    assert [s["video_id"] for s in ds.samples] == sorted(VIDEOS)
    for s in ds.samples:
        t, score, surgeon = VIDEOS[s["video_id"]]
        assert s["num_segments"] == t and s["score"] == score and s["surgeon_id"] == surgeon
        assert list(s["item_scores"]) == [3.0, 4.0] and s["task"] == "Suturing"
        for m in ds.modalities:
            np.testing.assert_array_equal(s[m], feats[m][s["video_id"]])
    return ds


def test_pamfn_layout_round_trips(tmp_path):
    feats = _features(0)
    folder = _pamfn_folder(tmp_path / "pamfn", feats)
    imp.import_features(folder, _labels(tmp_path / "labels.csv"), "pamfn", str(tmp_path / "data"),
                        "imported", backbones="rgb:swin3d_b,flow:i3d_flow,mask:swin3d_b", score_scale="gears")
    ds = _check_round_trip(tmp_path / "data", "imported", feats)
    meta = ds.metadata
    assert meta["source"] == "imported" and meta["layout"] == "pamfn" and meta["feature_dim"] == D
    assert meta["backbones"]["flow"]["name"] == "i3d_flow" and backbone_note(meta) is None


@pytest.mark.parametrize("layout", ["flat", "gdlt", "core"])
def test_other_layouts(tmp_path, layout):
    feats = _features(1)
    folder = tmp_path / layout
    folder.mkdir()
    for m, table in feats.items():
        if layout == "flat":
            for v, a in table.items():
                np.save(folder / f"{v}_{m}.npy", a)
        elif layout == "gdlt":
            (folder / m).mkdir()
            for v, a in table.items():
                np.save(folder / m / f"{v}.npy", a)
        else:   # CoRe-style pickled dict per modality, here with (surgeon, trial) tuple keys
            keyed = {tuple(v.rsplit("_", 1)): a for v, a in table.items()}
            (folder / f"{m}.pkl").write_bytes(pickle.dumps(keyed, protocol=4))
    imp.import_features(str(folder), _labels(tmp_path / "labels.csv"), layout,
                        str(tmp_path / "data"), "x", score_scale="gears")
    ds = _check_round_trip(tmp_path / "data", "x", feats)
    assert "unknown" in backbone_note(ds.metadata)


def test_problems_are_listed_with_their_files(tmp_path):
    feats = _features(2)
    feats["rgb"]["Suturing_C002"][1, 3] = np.nan
    feats["flow"]["Suturing_D003"] = feats["flow"]["Suturing_D003"][None]      # [1, T, D]
    folder = _pamfn_folder(tmp_path / "pamfn", feats)
    os.remove(os.path.join(folder, "Suturing_B001_mask.npy"))
    with pytest.raises(PrepError) as err:
        imp.import_features(folder, _labels(tmp_path / "labels.csv"), "pamfn",
                            str(tmp_path / "data"), "bad", score_scale="gears")
    msg = str(err.value)
    assert "3 problem(s); nothing written" in msg
    assert "JIGSAWS_rgb_VST.npy['Suturing_C002']: 1 NaN/inf value(s) in segment(s) [1]" in msg
    assert "JIGSAWS_flow_I3D.npy['Suturing_D003']: shape (1, 5, 16)" in msg
    assert "Suturing_B001_mask.npy" in msg and "missing file" in msg
    assert not (tmp_path / "data" / "bad").exists()
    # unequal segment counts: an error, or trimmed on request
    feats = _features(3)
    feats["flow"]["Suturing_B001"] = feats["flow"]["Suturing_B001"][:3]
    folder = _pamfn_folder(tmp_path / "pamfn2", feats)
    with pytest.raises(PrepError, match=r"different segment counts.*--align=trim"):
        imp.import_features(folder, _labels(tmp_path / "labels.csv"), "pamfn",
                            str(tmp_path / "data"), "t", score_scale="gears")
    imp.import_features(folder, _labels(tmp_path / "labels.csv"), "pamfn",
                        str(tmp_path / "data"), "t", align="trim", score_scale="gears")
    assert load_feature_dataset(str(tmp_path / "data"), "t").samples[0]["num_segments"] == 3


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    folder = tmp_path / "core"
    folder.mkdir()
    (folder / "rgb.pkl").write_bytes(pickle.dumps({"Suturing_B001": _Evil()}))
    with pytest.raises(UnsafePickleError, match=r"rgb\.pkl.*posix\.system"):
        imp.import_features(str(folder), _labels(tmp_path / "labels.csv"), "core",
                            str(tmp_path / "data"), "x", modalities="rgb", score_scale="gears")


def test_cli_reports_one_line(tmp_path):
    labels = _labels(tmp_path / "labels.csv")
    (tmp_path / "empty").mkdir()
    out = subprocess.run([sys.executable, "-m", "data_prep.import_features",
                          f"--features_dir={tmp_path / 'empty'}", f"--labels={labels}",
                          "--layout=flat", f"--data_dir={tmp_path / 'data'}", "--name=x",
                          "--modalities=rgb", "--score_scale=gears"], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "error: cannot import" in out.stderr and "Suturing_B001_rgb.npy" in out.stderr


def test_the_score_scale_is_required_checked_and_stored(tmp_path):
    from surgfusion_jax.data.feature_dataset import ScoreScaleError
    folder = _pamfn_folder(tmp_path / "pamfn", _features(0))
    labels = _labels(tmp_path / "labels.csv")
    with pytest.raises(ScoreScaleError, match="score scale is required"):
        imp.import_features(folder, labels, "pamfn", str(tmp_path / "data"), "x")
    with pytest.raises(PrepError, match=r"line 4 \(video_id 'Suturing_D003'\), column 'score': "
                                        r"28 is outside the score scale custom 10-25"):
        imp.import_features(folder, labels, "pamfn", str(tmp_path / "data"), "x",
                            score_scale="10,25")
    imp.import_features(folder, labels, "pamfn", str(tmp_path / "data"), "x",
                        score_scale="mgears")
    meta = load_feature_dataset(str(tmp_path / "data"), "x").metadata
    assert (meta["score_scale"], meta["score_min"], meta["score_max"]) == ("mgears", 6.0, 30.0)
