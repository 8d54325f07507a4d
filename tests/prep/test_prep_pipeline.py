"""data_prep.pipeline/cache (through prepare_manifest): end to end from tiny OpenCV videos
(manifest form: PNG-folder masks, mask video, RAH-style phase time ranges), checked against
an independent re-computation with direct OpenCV calls; resume after an interrupted run;
cache invalidation; bad inputs; no torch. CLI and real-I3D tests: test_prep_prepare.py."""
import glob
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_prep.common import PrepError
from data_prep.prepare import prepare_manifest
from surgfusion_jax.data.feature_dataset import ScoreScaleError
from prep_testutil import (StandInExtractor, assert_same_dataset, dataset_contents,
                           write_png_masks, write_video)

S = 32
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)
HEADER = ("video_id,video_path,score,surgeon_id,mask_path,start_s,end_s,phase,source_video,"
          "rater_1,rater_2")
ROWS = [  # a: PNG folder (source rate); b: mask video; r_*: RAH-style phases, 10-FPS PNGs
    "a,videos/a.avi,20,S1,masks/a,,,,,,",
    "b,videos/b.avi,26.5,S2,masks/b.avi,,,,,,",
    "r_p1,videos/r.avi,,S3,masks/r,0,4.0,right,r,20,23",
    "r_p2,videos/r.avi,,S3,masks/r,4.0,8.5,middle,r,18,18",
    "r_p3,videos/r.avi,,S3,masks/r,8.5,15,left,r,25,26",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    write_video(d / "videos/a.avi", 360, seed=0)
    write_png_masks(d / "masks/a", 360, seed=0)
    write_video(d / "videos/b.avi", 405, seed=1)
    write_video(d / "masks/b.avi", 405, seed=1, mask=True)
    write_video(d / "videos/r.avi", 450, seed=2)
    write_png_masks(d / "masks/r", 450, seed=2, step=3)
    (d / "m.csv").write_text("\n".join([HEADER] + ROWS) + "\n")
    return d


@pytest.fixture(scope="module")
def full_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    ext = StandInExtractor(image_size=S, batch_size=8)
    res = prepare_manifest(str(inputs / "m.csv"), str(out), "tiny", image_size=S,
                           score_scale="gears", extractor=ext, progress=False)
    return res, out, ext


def _read_all(path, color=True):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    return frames


def _reference(inputs, video, mask, start=None, end=None):
    """Independent recomputation: direct cv2 reads, every 3rd frame (30 -> 10 FPS),
    resize, Farneback via cv2, np.interp scaling, 32-frame split, stand-in features."""
    frames = _read_all(inputs / video)[::3]
    keep = [k for k in range(len(frames))
            if (start is None or k / 10 >= start) and (end is None or k / 10 < end)]
    rgb = np.stack([cv2.cvtColor(cv2.resize(frames[k], (S, S), interpolation=cv2.INTER_AREA),
                                 cv2.COLOR_BGR2RGB) for k in keep])
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb]
    flow = [None] + [cv2.calcOpticalFlowFarneback(gray[t - 1], gray[t], None, *FARNEBACK)
                     for t in range(1, len(gray))]
    flow[0] = flow[1]
    flow = np.rint(np.interp(np.stack(flow).astype(np.float64), [-20, 20], [0, 255])).astype(np.uint8)
    mpath = inputs / mask
    if mpath.is_dir():
        files = sorted(os.listdir(mpath), key=lambda n: int(n.split("_")[1].split(".")[0]))
        step = 3 if len(files) == 3 * len(frames) else 1
        masks = np.stack([cv2.resize(cv2.imread(str(mpath / files[k * step]), cv2.IMREAD_UNCHANGED),
                                     (S, S), interpolation=cv2.INTER_NEAREST) for k in keep])
    else:
        mf = _read_all(mpath)[::3]
        masks = np.stack([cv2.cvtColor(cv2.resize(mf[k], (S, S), interpolation=cv2.INTER_NEAREST),
                                       cv2.COLOR_BGR2RGB) for k in keep])
    n = len(keep) // 32
    seg = lambda x: x[: n * 32].reshape((n, 32) + x.shape[1:])
    ext = StandInExtractor(image_size=S)
    return n, dict(rgb=ext.rgb(seg(rgb)), flow=ext.flow(seg(flow)), mask=ext.mask(seg(masks)))


def test_end_to_end_manifest_matches_independent_reference(inputs, full_run):
    res, out, ext = full_run
    assert res.ok and res.failures == [] and sorted(res.computed) == sorted(r.split(",")[0] for r in ROWS)
    meta, samples = dataset_contents(out, "tiny")
    for key, want in dict(backbone="standin", fps=10.0, flow_bound=20.0, segment_length=32,
                          image_size=S, prep_version="1", modalities=["rgb", "flow", "mask"],
                          score_scale="gears", score_min=6.0, score_max=30.0, source="manifest",
                          failed=[]).items():
        assert meta[key] == want, key
    cases = {"a": ("videos/a.avi", "masks/a", None, None, 12),      # 120 frames -> 3 segments
             "b": ("videos/b.avi", "masks/b.avi", None, None, 135),  # 135 -> 4 (tail 7 dropped)
             "r_p1": ("videos/r.avi", "masks/r", 0, 4.0, 40),
             "r_p2": ("videos/r.avi", "masks/r", 4.0, 8.5, 45),
             "r_p3": ("videos/r.avi", "masks/r", 8.5, 15, 65)}
    for vid, (video, mask, start, end, _) in cases.items():
        n, feats = _reference(inputs, video, mask, start, end)
        s = samples[vid]
        assert s["num_segments"] == n >= 1, vid
        for m in ("rgb", "flow", "mask"):
            np.testing.assert_allclose(s[m], feats[m], rtol=1e-5, atol=1e-6, err_msg=f"{vid}.{m}")
    assert [samples[v]["num_segments"] for v in ("a", "b", "r_p1", "r_p2", "r_p3")] == [3, 4, 1, 1, 2]
    assert samples["r_p1"]["score"] == 21.5 and samples["r_p2"]["score"] == 18.0
    assert samples["r_p3"]["phase"] == "left" and samples["r_p3"]["source_video"] == "r"
    assert samples["a"]["source_video"] == "a" and samples["b"]["surgeon_id"] == "S2"
    # streaming: the extractor never gets more than batch_size segments at once
    assert all(shape[0] <= 8 for shape in ext.inputs["rgb"])


def test_interrupted_run_resumes_without_recomputing(inputs, full_run, tmp_path):
    first = StandInExtractor(image_size=S)     # same class: the cache key must match later
    plain_rgb = first.rgb

    def interrupting_rgb(x):   # one rgb call per video (<= 8 segments): "kill" on the 2nd
        if first.calls["rgb"] >= 1:
            raise KeyboardInterrupt
        return plain_rgb(x)

    first.rgb = interrupting_rgb
    data = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        prepare_manifest(str(inputs / "m.csv"), str(data), "tiny", image_size=S, score_scale="gears",
                         extractor=first, progress=False)
    assert not (data / "tiny").exists() and not glob.glob(str(data / ".tiny*"))
    cached = glob.glob(str(data / ".cache/tiny/*"))
    assert len(cached) == 1 and os.path.basename(cached[0]).startswith("a--")
    ext = StandInExtractor(image_size=S)
    res = prepare_manifest(str(inputs / "m.csv"), str(data), "tiny", image_size=S, score_scale="gears",
                           extractor=ext, progress=False)
    assert res.ok and res.cached == ["a"] and "a" not in res.computed and len(res.computed) == 4
    assert ext.clips["rgb"] == 4 + 1 + 1 + 2          # b, r_p1, r_p2, r_p3: "a" not redone
    assert_same_dataset(dataset_contents(data, "tiny"), dataset_contents(full_run[1], "tiny"))
    again = prepare_manifest(str(inputs / "m.csv"), str(data), "tiny", image_size=S,
                             score_scale="gears", extractor=StandInExtractor(image_size=S),
                             progress=False)
    assert len(again.cached) == 5 and again.computed == []


def test_cache_key_follows_inputs_and_settings_but_not_labels(inputs, tmp_path):
    write_video(tmp_path / "v.avi", 330, seed=5)
    csv = tmp_path / "one.csv"
    csv.write_text("video_id,video_path,score,surgeon_id\nv,v.avi,10,A\n")
    run = lambda **kw: prepare_manifest(str(csv), str(tmp_path / "d"), "one", image_size=S,
                                        modalities="rgb,flow", progress=False,
                                        extractor=StandInExtractor(image_size=S),
                                        score_scale="gears", **kw)
    assert run().computed == ["v"]
    assert run().cached == ["v"]
    csv.write_text("video_id,video_path,score,surgeon_id\nv,v.avi,12,A\n")   # label only
    assert run().cached == ["v"]
    assert dataset_contents(tmp_path / "d", "one")[1]["v"]["score"] == 12.0
    assert run(flow_bound=10.0).computed == ["v"]                            # setting
    st = os.stat(tmp_path / "v.avi")
    os.utime(tmp_path / "v.avi", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # input touched
    assert run(flow_bound=10.0).computed == ["v"]
    assert len(glob.glob(str(tmp_path / "d/.cache/one/*"))) == 1             # stale entries gone


def test_bad_inputs_are_reported_and_the_rest_is_processed(tmp_path):
    d = tmp_path
    write_video(d / "good.avi", 330, seed=1)
    write_png_masks(d / "good_m", 330, seed=1)
    (d / "corrupt.avi").write_bytes(np.random.default_rng(0).integers(0, 255, 9000, np.uint8).tobytes())
    write_png_masks(d / "corrupt_m", 10)
    write_video(d / "short.avi", 90, seed=2)                    # 3 s -> 30 frames < 32
    write_png_masks(d / "short_m", 90, seed=2)
    write_video(d / "mism.avi", 330, seed=3)
    write_png_masks(d / "mism_m", 300, seed=3)                  # 300 PNGs for 330 frames
    write_video(d / "trunc_src.avi", 330, seed=4)
    data = open(d / "trunc_src.avi", "rb").read()
    (d / "trunc.avi").write_bytes(data[: len(data) // 2])
    write_png_masks(d / "trunc_m", 330, seed=4)
    write_video(d / "range.avi", 330, seed=5)
    write_png_masks(d / "range_m", 330, seed=5)
    (d / "bad.csv").write_text(
        "video_id,video_path,score,surgeon_id,mask_path,start_s,end_s\n"
        "good,good.avi,20,A,good_m,,\ncorrupt,corrupt.avi,20,A,corrupt_m,,\n"
        "missing,missing.avi,20,A,good_m,,\nshort,short.avi,20,A,short_m,,\n"
        "mism,mism.avi,20,A,mism_m,,\nnomask,good.avi,20,A,no_such_masks,,\n"
        "trunc,trunc.avi,20,A,trunc_m,,\nrange,range.avi,20,A,range_m,5,30\n")
    res = prepare_manifest(str(d / "bad.csv"), str(d / "out"), "bad", image_size=S,
                           extractor=StandInExtractor(image_size=S), progress=False, score_scale="gears")
    reasons = {f.video_id: (os.path.basename(f.file), f.reason) for f in res.failures}
    assert set(reasons) == {"corrupt", "missing", "mism", "nomask", "range", "short", "trunc"}
    expect = {"corrupt": "cannot be opened", "missing": "does not exist",
              "short": "only 30 frames at 10 FPS", "mism": "has 300 PNGs but video",
              "nomask": "mask path", "trunc": "truncated", "range": "end_s=30"}
    for vid, text in expect.items():
        assert text in reasons[vid][1], (vid, reasons[vid])
        assert "fix:" in reasons[vid][1]
    assert reasons["mism"][0] == "mism.avi"
    assert res.computed == ["good"] and not res.ok
    meta, samples = dataset_contents(d / "out", "bad")
    assert sorted(samples) == ["good"] and sorted(meta["failed"]) == sorted(reasons)
    summary = res.summary()
    assert all(v in summary for v in reasons) and "FAILED (7)" in summary


def test_left_out_modality_and_setting_errors(inputs, tmp_path):
    csv = tmp_path / "nomask.csv"
    csv.write_text(f"video_id,video_path,score,surgeon_id\na,{inputs}/videos/a.avi,20,S\n")
    with pytest.raises(PrepError, match="mask_path.*--modalities=rgb,flow"):
        prepare_manifest(str(csv), str(tmp_path / "o"), "x", extractor=StandInExtractor(S), score_scale="gears")
    res = prepare_manifest(str(csv), str(tmp_path / "o"), "x", modalities="rgb,flow",
                           image_size=S, extractor=StandInExtractor(image_size=S), progress=False, score_scale="gears")
    meta, samples = dataset_contents(tmp_path / "o", "x")
    assert res.ok and meta["modalities"] == ["rgb", "flow"] and "mask" not in samples["a"]
    assert (meta["score_scale"], meta["score_min"], meta["score_max"]) == ("gears", 6.0, 30.0)
    with pytest.raises(PrepError, match="unknown or empty modality"):
        prepare_manifest(str(csv), str(tmp_path / "o"), "x", modalities="rgb,depth", score_scale="gears")
    with pytest.raises(ScoreScaleError, match="'30,6'.*0 <= MIN < MAX"):
        prepare_manifest(str(csv), str(tmp_path / "o"), "x", score_scale="30,6")
    with pytest.raises(PrepError, match="extractor was built for image_size=64"):
        prepare_manifest(str(csv), str(tmp_path / "o"), "x", modalities="rgb", image_size=S,
                         extractor=StandInExtractor(image_size=64), score_scale="gears")


def test_no_data_prep_module_imports_torch():
    code = r"""
import importlib, importlib.abc, importlib.machinery, pkgutil, sys, types
class FakeTorch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # would make `import torch` succeed (and land in sys.modules) even without torch
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        return types.ModuleType(spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, FakeTorch())
import data_prep
names = sorted(m.name for m in pkgutil.iter_modules(data_prep.__path__))
for n in names:
    importlib.import_module("data_prep." + n)
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("MODULES", names)
assert not bad, bad
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for needed in ("video", "flow", "masks", "segments", "manifest", "jigsaws", "prepare", "cache"):
        assert f"'{needed}'" in p.stdout
