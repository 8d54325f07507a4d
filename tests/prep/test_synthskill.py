"""Tests for data_prep/synthskill.py: files, round trips, labels, determinism, and that skill
evidence really is in the pixels of each modality (hand-made statistics, no learning)."""
import csv
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from scipy.stats import spearmanr

from data_prep import synthskill

TINY = dict(num_surgeons=3, trials_per_surgeon=2, image_size=64, min_seconds=3, max_seconds=5)
# long enough (at 10 fps) that tremor is not swamped by fast, time-compressed movements
MODERATE = dict(num_surgeons=8, trials_per_surgeon=3, image_size=64, min_seconds=15,
                max_seconds=25)


def _make(root, name, **kw):
    return synthskill.generate_synthskill(str(root / name), **kw)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthskill")
    return dict(a=_make(root, "a", seed=0, **TINY), b=_make(root, "b", seed=0, **TINY),
                c=_make(root, "c", seed=1, **TINY), root=root)


@pytest.fixture(scope="module")
def moderate(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("synthskill_mod"), "m", seed=0, **MODERATE)


def _rows(manifest):
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def _meta(manifest):
    with open(os.path.join(os.path.dirname(manifest), "synthskill_meta.json")) as fh:
        return json.load(fh)


def _read(path):
    cap = cv2.VideoCapture(path)
    assert cap.isOpened(), path
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return np.stack(frames), fps


def _path(manifest, rel):
    assert not os.path.isabs(rel), rel  # documented: relative to the manifest's folder
    return os.path.join(os.path.dirname(manifest), rel)


def test_manifest_layout(datasets):
    man = datasets["a"]
    with open(man, newline="") as fh:
        assert next(csv.reader(fh)) == list(synthskill.MANIFEST_COLUMNS)
    rows = _rows(man)
    assert [r["video_id"] for r in rows] == [
        f"SynthSkill_{s}{t:03d}" for s in "BCD" for t in (1, 2)]
    for r in rows:
        assert re.fullmatch(r"SynthSkill_[B-D]00[12]", r["video_id"])
        assert r["surgeon_id"] == r["video_id"][11]
        assert int(r["supertrial"]) == int(r["video_id"][-3:])
        assert r["source_video"] == r["video_id"] and r["task"] == "Suturing"
        assert r["video_path"] == f"videos/{r['video_id']}.avi"
        assert r["mask_path"] == f"masks/{r['video_id']}.avi"
        for c in ("video_path", "mask_path"):
            assert os.path.isfile(_path(man, r[c]))
    meta = _meta(man)
    assert meta["settings"]["image_size"] == 64 and meta["seed"] == 0
    assert [v["video_id"] for v in meta["videos"]] == [r["video_id"] for r in rows]
    assert not [p for p in os.listdir(datasets["root"]) if ".tmp-" in p]  # no staging left


def test_videos_and_masks_round_trip(datasets):
    man, meta = datasets["a"], _meta(datasets["a"])
    for r, v in zip(_rows(man), meta["videos"]):
        frames, fps = _read(_path(man, r["video_path"]))
        masks, mfps = _read(_path(man, r["mask_path"]))
        n = v["num_frames"]
        assert frames.shape == (n, 64, 64, 3) and masks.shape == (n, 64, 64, 3)
        assert fps == pytest.approx(10) and mfps == pytest.approx(10)
        assert 3 * 10 - 1 <= n <= 5 * 10 + 1
        m = masks[..., 0]
        assert np.mean((m > 40) & (m < 215)) < 0.01  # near-binary after MJPG
        tool = m > 127
        assert tool.any(axis=(1, 2)).mean() > 0.8
        # alignment: masked pixels are the grey instruments, unmasked pixels pink tissue
        sat = cv2.cvtColor(frames.reshape(-1, 64, 3), cv2.COLOR_BGR2HSV)[..., 1].reshape(m.shape)
        ok = [sat[i][tool[i]].mean() < 0.6 * sat[i][~tool[i]].mean()
              for i in range(n) if tool[i].sum() > 20]
        assert np.mean(ok) > 0.9
        # a mask shifted by a few frames aligns worse than the true one
        assert np.mean(sat[tool]) < np.mean(sat[np.roll(tool, 5, axis=0) & ~tool])


def test_scores_and_items(datasets):
    for r in _rows(datasets["a"]) + _rows(datasets["c"]):
        items = [int(r[f"item_{i}"]) for i in range(1, 7)]
        assert all(1 <= x <= 5 for x in items)
        assert int(r["score"]) == sum(items) and 6 <= int(r["score"]) <= 30


def test_deterministic_and_seed_dependent(datasets):
    a, b, c = datasets["a"], datasets["b"], datasets["c"]
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    assert _meta(a)["videos"] == _meta(b)["videos"]
    for rel in ("videos/SynthSkill_B001.avi", "masks/SynthSkill_C002.avi"):
        np.testing.assert_array_equal(_read(_path(a, rel))[0], _read(_path(b, rel))[0])
    assert _meta(a)["videos"] != _meta(c)["videos"]
    fa, fc = _read(_path(a, "videos/SynthSkill_B001.avi"))[0], _read(
        _path(c, "videos/SynthSkill_B001.avi"))[0]
    assert not np.array_equal(fa[0], fc[0])


def test_surgeon_skill_persists_across_trials(moderate):
    videos = _meta(moderate)["videos"]
    by_surgeon = {}
    for v in videos:
        by_surgeon.setdefault(v["surgeon_id"], []).append(v)
    assert len(by_surgeon) == 8
    bases = []
    for vs in by_surgeon.values():
        assert len({json.dumps(v["surgeon_latent"], sort_keys=True) for v in vs}) == 1
        base = np.array([vs[0]["surgeon_latent"][f] for f in synthskill.FACTORS])
        trials = np.array([[v["latent"][f] for f in synthskill.FACTORS] for v in vs])
        assert np.abs(trials - base).max() < 0.25
        bases.append(base)
    assert np.std(bases, axis=0).min() > 0.1  # surgeons really differ
    # between-surgeon variance dominates within-surgeon variance of the total score
    scores = {s: [v["score"] for v in vs] for s, vs in by_surgeon.items()}
    within = np.mean([np.var(x) for x in scores.values()])
    assert np.var([np.mean(x) for x in scores.values()]) > 2 * within


def test_total_needs_all_factors(moderate):
    """Items lean on different factors, so no single latent factor gives the total away."""
    videos = _meta(moderate)["videos"]
    score = [v["score"] for v in videos]
    lat = {f: np.array([v["latent"][f] for v in videos]) for f in synthskill.FACTORS}
    joint = spearmanr(score, sum(lat.values()))[0]
    for f in synthskill.FACTORS:
        assert spearmanr(score, lat[f])[0] < joint - 0.05, f
    items = np.array([v["items"] for v in videos])
    assert items.std(axis=0).min() > 0.4 and min(score) <= 14 and max(score) >= 22


def _stats(manifest):
    """One hand-made statistic per modality and video."""
    out = {"mask": [], "rgb": [], "flow": []}
    for r in _rows(manifest):
        frames = _read(_path(manifest, r["video_path"]))[0]
        tool = _read(_path(manifest, r["mask_path"]))[0][..., 0] > 127
        h = tool.shape[1]
        # mask: fraction of frames without the left instrument (its shaft always crosses the
        # left border or the left half of the bottom border while it is in view)
        out["mask"].append(np.mean(~(tool[:, :, 0].any(1) | tool[:, -1, : h // 2].any(1))))
        # RGB: growth of dark-red area (blood, tears, open wound) from start to end
        f = frames.astype(np.float32)
        red = (f[..., 2] > 1.8 * f[..., 1]) & (f[..., 2] > 70)
        k = max(1, len(frames) // 10)
        out["rgb"].append(red[-k:].mean() - red[:k].mean())
        # flow: Farneback; frame-to-frame unpredictability (tremor, jerk) on instrument pixels
        grey = [cv2.cvtColor(x, cv2.COLOR_BGR2GRAY) for x in frames]
        flow = np.stack([cv2.calcOpticalFlowFarneback(grey[i], grey[i + 1], None, 0.5, 3, 15, 3,
                                                      5, 1.2, 0) for i in range(len(grey) - 1)])
        resid = np.linalg.norm(flow[1:-1] - 0.5 * (flow[:-2] + flow[2:]), axis=-1)
        out["flow"].append(resid[tool[1:-2]].mean())
    return out


def test_skill_evidence_is_in_the_pixels(moderate):
    rows = _rows(moderate)
    item = lambda i: [int(r[f"item_{i}"]) for r in rows]
    stats = _stats(moderate)
    rho = {"mask": spearmanr(stats["mask"], item(2))[0],  # suture/needle handling
           "rgb": spearmanr(stats["rgb"], item(1))[0],  # respect for tissue
           "flow": spearmanr(stats["flow"], item(3))[0]}  # time and motion
    print("per-modality Spearman with their item:", rho)
    for m, r in rho.items():
        assert r < -0.5, (m, r)
    # each statistic mostly tracks its own factor
    videos = _meta(moderate)["videos"]
    lat = {f: [v["latent"][f] for v in videos] for f in synthskill.FACTORS}
    for m, f in (("mask", "handling"), ("rgb", "tissue"), ("flow", "motion")):
        own = -spearmanr(stats[m], lat[f])[0]
        assert own > 0.6 and all(own > -spearmanr(stats[m], lat[g])[0] for g in lat if g != f)


def test_reuse_replace_and_refuse(tmp_path):
    kw = dict(num_surgeons=1, trials_per_surgeon=1, image_size=32, min_seconds=1, max_seconds=1)
    man = _make(tmp_path, "d", **kw)
    stamp = os.stat(man).st_mtime_ns
    assert _make(tmp_path, "d", **kw) == man and os.stat(man).st_mtime_ns == stamp  # reused
    man2 = _make(tmp_path, "d", **{**kw, "seed": 3})  # other settings: replaced in place
    assert man2 == man and _meta(man)["seed"] == 3
    assert sorted(os.listdir(tmp_path)) == ["d"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        _make(tmp_path, "other", **kw)
    assert (tmp_path / "other" / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="num_surgeons"):
        _make(tmp_path, "e", **{**kw, "num_surgeons": 0})
    with pytest.raises(ValueError, match="min_seconds"):
        _make(tmp_path, "e", **{**kw, "min_seconds": 2})


def test_cli(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "-m", "data_prep.synthskill", f"--out_dir={out}", "--num_surgeons=1",
         "--trials=2", "--image_size=32", "--min_seconds=1", "--max_seconds=1", "--seed=5"],
        capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(out / "manifest.csv")
    assert len(_rows(str(out / "manifest.csv"))) == 2 and _meta(str(out / "manifest.csv"))["seed"] == 5
