"""Cross-validation folds: schemes, grouping, official JIGSAWS setup parsing, persistence."""
import json
import os

import numpy as np
import pytest

from surgfusion_jax.data import splits


def jigsaws_samples(task="Suturing", users="BCDE", trials=5, skip=()):
    out = []
    for u in users:
        for t in range(1, trials + 1):
            vid = f"{task}_{u}{t:03d}"
            if vid in skip:
                continue
            out.append(dict(video_id=vid, surgeon_id=u, supertrial=t, source_video=vid, task=task))
    return out


def rah_samples(n_videos=10):
    """RAH-like: three phase scores per source video (one video with only two)."""
    out = []
    for v in range(n_videos):
        for ph in range(1 if v == 0 else 3):
            out.append(dict(video_id=f"rah{v:02d}_p{ph}", surgeon_id=f"s{v % 4}", supertrial=0,
                            source_video=f"rah{v:02d}", task="RAH"))
    return out


def check_partition(folds, samples):
    ids = {s["video_id"] for s in samples}
    tested = [v for f in folds for v in f.test]
    assert sorted(tested) == sorted(ids)  # every video tested exactly once
    for f in folds:
        assert set(f.train) | set(f.test) == ids and not set(f.train) & set(f.test)


def test_loso_and_louo():
    samples = jigsaws_samples()
    loso = splits.make_splits(samples, "loso")
    assert [f.name for f in loso] == [f"supertrial_{i}" for i in range(1, 6)]
    assert loso[1].test == ["Suturing_B002", "Suturing_C002", "Suturing_D002", "Suturing_E002"]
    check_partition(loso, samples)
    louo = splits.make_splits(samples, "louo")
    assert [f.name for f in louo] == ["user_B", "user_C", "user_D", "user_E"]
    assert louo[2].test == [f"Suturing_D00{t}" for t in range(1, 6)]
    check_partition(louo, samples)
    train_idx, test_idx = louo[0].indices(samples)
    assert [samples[i]["video_id"] for i in test_idx] == louo[0].test and len(train_idx) == 15


def test_kfold_grouped_seeded_balanced():
    samples = rah_samples(10)
    folds = splits.make_splits(samples, "kfold", num_folds=4, seed=3)
    assert [f.name for f in folds] == ["fold_1", "fold_2", "fold_3", "fold_4"]
    check_partition(folds, samples)
    src = {s["video_id"]: s["source_video"] for s in samples}
    for f in folds:  # no source video straddles train and test
        assert not {src[v] for v in f.train} & {src[v] for v in f.test}
    sizes = sorted(len(f.test) for f in folds)
    assert sizes[-1] - sizes[0] <= 3  # within one group
    again = splits.make_splits(samples, "kfold", num_folds=4, seed=3)
    assert [f.test for f in again] == [f.test for f in folds]
    other = splits.make_splits(samples, "kfold", num_folds=4, seed=4)
    assert [f.test for f in other] != [f.test for f in folds]
    assert len(splits.make_splits(samples, "kfold")) == 4  # paper default


def test_clear_errors():
    with pytest.raises(splits.SplitError, match="supertrial"):
        splits.make_splits(rah_samples(), "loso")
    with pytest.raises(splits.SplitError, match="at least 5 source videos"):
        splits.make_splits(rah_samples(4), "kfold", num_folds=5)
    with pytest.raises(splits.SplitError, match="unknown split scheme"):
        splits.make_splits(rah_samples(), "loocv")
    assert len(splits.make_splits(jigsaws_samples(), "loso", num_folds=4)) == 5  # ignored by loso/louo
    with pytest.raises(splits.SplitError, match="num_folds >= 2"):
        splits.make_splits(rah_samples(), "kfold", num_folds=1)
    with pytest.raises(splits.SplitError, match="at least 2 distinct"):
        splits.make_splits(jigsaws_samples(users="B"), "louo")
    bad = rah_samples(4)
    bad[1]["surgeon_id"] = "other"  # phases of one video with two surgeons
    with pytest.raises(splits.SplitError, match="different surgeon_id"):
        splits.make_splits(bad, "louo")
    dup = jigsaws_samples() + jigsaws_samples(users="B")
    with pytest.raises(splits.SplitError, match="duplicate"):
        splits.make_splits(dup, "louo")


def write_setup(root, task, scheme_dir, folds, balanced="unBalanced"):
    """folds: {folder: (train_trials, test_trials)} with lines in GestureClassification style."""
    for folder, (train, test) in folds.items():
        d = os.path.join(root, task, balanced, "GestureClassification", scheme_dir, folder, "itr_1")
        os.makedirs(d, exist_ok=True)
        for name, trials in (("Train.txt", train), ("Test.txt", test)):
            with open(os.path.join(d, name), "w") as f:
                for i, tr in enumerate(trials):  # several gesture lines per trial, odd spacing
                    f.write(f"{task}_{tr}_{i:06d}_{i + 90:06d}.txt           G{i % 3 + 1}\n")
                    f.write(f"  {task}_{tr}_{i + 100:06d}_{i + 190:06d}.txt\tG2\n")
                f.write("\n")


def test_jigsaws_setup_dir(tmp_path):
    samples = jigsaws_samples(users="BC", trials=3, skip=("Suturing_C003",))
    all_trials = [f"{u}00{t}" for u in "BC" for t in (1, 2, 3)]
    loso_folds = {f"{t}_Out": ([x for x in all_trials if not x.endswith(str(t))],
                               [x for x in all_trials if x.endswith(str(t))]) for t in (1, 2, 3)}
    write_setup(tmp_path, "Suturing", "SuperTrialOut", loso_folds)
    # a decoy from another task and a Balanced copy with a different (wrong) fold: must be ignored
    write_setup(tmp_path, "Knot_Tying", "SuperTrialOut", {"1_Out": (["B002"], ["B001"])})
    write_setup(tmp_path, "Suturing", "SuperTrialOut", {"1_Out": (["B001"], ["B002", "C002"])}, balanced="Balanced")
    write_setup(tmp_path, "Suturing", "UserOut", {"B_Out": (["C001"], ["B001", "B002", "B003"]),
                                                   "C_Out": (["B001", "B002", "B003"], ["C001", "C002"])})
    folds = splits.make_splits(samples, "loso", setup_dir=str(tmp_path))
    assert [f.name for f in folds] == ["supertrial_1", "supertrial_2", "supertrial_3"]
    assert folds[0].test == ["Suturing_B001", "Suturing_C001"]
    assert folds[2].test == ["Suturing_B003"]  # C003 absent from the dataset
    check_partition(folds, samples)
    assert folds == splits.make_splits(samples, "loso")  # same as the metadata-derived folds
    # setup_dir pointing straight at the scheme folder works too
    direct = os.path.join(tmp_path, "Suturing", "unBalanced", "GestureClassification", "SuperTrialOut")
    assert splits.make_splits(samples, "loso", setup_dir=direct) == folds
    with pytest.warns(UserWarning, match="neither Train.txt nor Test.txt"):
        louo = splits.make_splits(samples, "louo", setup_dir=str(tmp_path))  # C002 not in B_Out's lists
    assert [f.name for f in louo] == ["user_B", "user_C"]
    assert louo[0].train == ["Suturing_C001"]
    assert louo[1].test == ["Suturing_C001", "Suturing_C002"]


def test_jigsaws_setup_errors(tmp_path):
    samples = jigsaws_samples(users="B", trials=2)
    with pytest.raises(splits.SplitError, match="no LOUO folds"):
        splits.make_splits(samples, "louo", setup_dir=str(tmp_path))
    with pytest.raises(splits.SplitError, match="not a folder"):
        splits.make_splits(samples, "loso", setup_dir=str(tmp_path / "missing"))
    write_setup(tmp_path, "Suturing", "SuperTrialOut", {"1_Out": (["B002"], ["B001"])})
    bad = [dict(s, video_id=f"vid{i}", source_video=f"vid{i}") for i, s in enumerate(samples)]
    with pytest.raises(splits.SplitError, match="<Task>_<User><Trial>"):
        splits.make_splits(bad, "loso", setup_dir=str(tmp_path))


def test_trial_key():
    assert splits.trial_key("Knot_Tying_C003_000010_000200.txt G1") == "knot_tying_c003"
    assert splits.trial_key("Needle_Passing_H004") == "needle_passing_h004"
    assert splits.trial_key("Suturing_B0012") is None
    assert splits.trial_key("readme") is None


def test_inner_validation_split():
    samples = rah_samples(10)
    train_ids = [s["video_id"] for s in samples][:20]
    tr, va = splits.inner_validation_split(train_ids, samples, fraction=0.25, seed=1)
    assert sorted(tr + va) == sorted(train_ids) and va and tr
    src = {s["video_id"]: s["source_video"] for s in samples}
    assert not {src[v] for v in tr} & {src[v] for v in va}
    assert len({src[v] for v in va}) == 2  # round(0.25 * 7 groups)
    assert splits.inner_validation_split(train_ids, samples, 0.25, seed=1) == (tr, va)
    with pytest.raises(splits.SplitError, match=">= 2 source videos"):
        splits.inner_validation_split(["rah01_p0", "rah01_p1"], samples, 0.5)
    with pytest.raises(splits.SplitError, match="fraction"):
        splits.inner_validation_split(train_ids, samples, 1.5)


def test_save_load_roundtrip(tmp_path):
    folds = splits.make_splits(rah_samples(8), "kfold", seed=0)
    path = splits.save_splits(folds, str(tmp_path / "sub" / "splits.json"), metadata={"scheme": "kfold", "seed": 0})
    assert splits.load_splits(path) == folds
    assert json.load(open(path))["metadata"] == {"scheme": "kfold", "seed": 0}
    assert [p for p in os.listdir(tmp_path / "sub")] == ["splits.json"]  # no temp files left
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(splits.SplitError, match="not valid JSON"):
        splits.load_splits(str(tmp_path / "bad.json"))
    with pytest.raises(splits.SplitError, match="not found"):
        splits.load_splits(str(tmp_path / "none.json"))
    with pytest.raises(splits.SplitError, match="absent from the dataset"):
        folds[0].indices(rah_samples(2))
