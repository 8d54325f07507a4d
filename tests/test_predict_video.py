"""One command from video to score (`predict --video`): featurize a SynthSkill video with
the run's prep settings, score it with the fold ensemble, write the HTML report.

The run is assembled as in test_predict.py (config, splits, per-fold fusion checkpoints
with random weights, no training) around a dataset prepared from SynthSkill videos by the
prep stage with the stand-in extractor of the prep tests, so the whole path runs in
seconds. References are independent: the features the prep stage stored for the same
video, and the model applied to them directly.
"""
import csv
import functools
import json
import os
import subprocess
import sys
from html.parser import HTMLParser

import jax
import numpy as np
import pytest

from data_prep import single_video, synthskill
from data_prep.common import PrepError
from data_prep.prepare import prepare_manifest
from prep_testutil import StandInExtractor
from surgfusion_jax import config_lib as default
from surgfusion_jax import predict
from surgfusion_jax.data import feature_dataset as fd, splits
from surgfusion_jax.training import runs
import run_testutil
from test_predict import DIM

S = 32  # decoded frame side


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_video")
    manifest = synthskill.generate_synthskill(
        str(root / "synth"), num_surgeons=2, trials_per_surgeon=2, image_size=64,
        min_seconds=20, max_seconds=26, seed=0)
    data_dir, workdir = str(root / "features"), str(root / "run")
    res = prepare_manifest(manifest, data_dir, "synth", image_size=S, progress=False,
                           score_scale="grs",
                           extractor=StandInExtractor(image_size=S, feature_dim=DIM))
    assert res.ok
    dataset = fd.load_feature_dataset(data_dir, "synth")
    config = default.resolve(default.small(default.get_config()))  # as a run saves it
    config.data.data_dir, config.data.name, config.data.score_max = data_dir, "synth", 30.0
    config.min_bucket, config.eval_batch_size = 16, 4
    model, folds, variables = run_testutil.write_fake_run(workdir, config, dataset.samples, DIM)
    runs.check_or_write_features(workdir, dataset)  # dataset_metadata.json, as training does
    apply = jax.jit(lambda v, x: model.apply(v, x, None, train=False, phase="fusion")["fused"])

    def reference(sample):  # {fold: score units}, unpadded
        x = {m: np.asarray(sample[m])[None] for m in fd.MODALITIES}
        scale = config.data.score_max / config.data.target_max
        return {f: float(apply(v, x)[0]) * scale for f, v in variables.items()}

    with open(manifest) as f:
        rows = {r["video_id"]: r for r in csv.DictReader(f)}
    folder = os.path.dirname(manifest)
    videos = {v: (os.path.join(folder, r["video_path"]), os.path.join(folder, r["mask_path"]))
              for v, r in rows.items()}
    featurizer = functools.partial(single_video.featurize,
                                   extractor=StandInExtractor(image_size=S, feature_dim=DIM))
    return dict(workdir=workdir, dataset=dataset, reference=reference, videos=videos,
                featurizer=featurizer, root=root)


class _Report(HTMLParser):
    """Collects the <img> sources, the text of #score and the cells of table.folds."""

    def __init__(self):
        super().__init__()
        self.images, self.score, self.fold_rows = [], "", []
        self._in_score = self._in_folds = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append((a.get("alt", ""), a.get("src", "")))
        if a.get("id") == "score":
            self._in_score = True
        if tag == "table" and a.get("class") == "folds":
            self._in_folds = True
        if self._in_folds and tag == "tr":
            self.fold_rows.append([])

    def handle_endtag(self, tag):
        if tag == "div":
            self._in_score = False
        if tag == "table":
            self._in_folds = False

    def handle_data(self, data):
        if self._in_score:
            self.score += data
        if self._in_folds and self.fold_rows and data.strip():
            self.fold_rows[-1].append(data.strip())


def test_featurizer_is_the_registered_entry_point():
    assert predict.load_featurizer() is single_video.featurize


def test_video_features_equal_the_prep_stage_features(run):
    vid = "SynthSkill_C001"
    video, masks = run["videos"][vid]
    meta = run["dataset"].metadata
    out = run["featurizer"](video, metadata=meta, masks=masks)
    stored = next(s for s in run["dataset"].samples if s["video_id"] == vid)
    assert out["num_segments"] == stored["num_segments"] >= 5  # >= 2 stage-2 steps
    for m in fd.MODALITIES:
        np.testing.assert_array_equal(out["features"][m], stored[m], err_msg=m)
    # one thumbnail per stage-2 step (4 segments), every modality, as the network saw it
    assert [t for t, _ in out["thumbnails"]] == list(range(-(-stored["num_segments"] // 4)))
    for _, images in out["thumbnails"]:
        assert sorted(images) == sorted(fd.MODALITIES)
        assert images["rgb"].shape == (S, S, 3) and images["rgb"].dtype == np.uint8
    # a time range gives the features of that range (2 segments from 6.4 s; the stand-in's
    # matmul over a different batch moves the last bit)
    part = run["featurizer"](video, metadata=meta, masks=masks, start_s=6.4, end_s=12.8)
    np.testing.assert_allclose(part["features"]["rgb"], stored["rgb"][2:4], rtol=1e-6, atol=1e-7)


def test_predict_video_scores_with_the_fold_ensemble_and_writes_the_report(run, tmp_path):
    vid = "SynthSkill_B002"
    video, masks = run["videos"][vid]
    report = str(tmp_path / "case.html")
    out = predict.predict_video(run["workdir"], video, masks=masks, report=report,
                                featurizer=run["featurizer"])
    stored = next(s for s in run["dataset"].samples if s["video_id"] == vid)
    ref = run["reference"](stored)
    assert {f["fold"]: f["prediction"] for f in out["folds"]} == pytest.approx(ref, abs=1e-4)
    assert out["score"] == pytest.approx(np.mean(list(ref.values())), abs=1e-4)
    assert out["spread"] == pytest.approx(np.std(list(ref.values())), abs=1e-4)
    assert out["weights"].shape == (-(-stored["num_segments"] // 4), 3)
    np.testing.assert_allclose(out["weights"].sum(-1), 1.0, atol=1e-5)

    page = _Report()
    page.feed(open(report, encoding="utf-8").read())
    assert f"{out['score']:.2f}" in page.score
    lo, hi = run["dataset"].metadata["score_min"], run["dataset"].metadata["score_max"]
    assert f"on the {lo:g}–{hi:g} scale" in page.score
    thumbs = [(alt, src) for alt, src in page.images if alt.split()[0] in fd.MODALITIES]
    steps = len(out["weights"])
    assert len(thumbs) == 3 * min(4, steps)  # rgb, flow, mask per marked step
    assert all(src.startswith("data:image/png;base64,") for _, src in page.images)
    assert any(alt == "CSFB modality weights" for alt, _ in page.images)
    assert not any(src.startswith(("http", "file")) for _, src in page.images)
    assert page.fold_rows[0] == ["fold", "prediction", "seeds"]
    table = {r[0]: float(r[1]) for r in page.fold_rows[1:]}
    assert table == pytest.approx(ref, abs=0.006)  # printed with 2 decimals


def test_masks_required_and_missing(run):
    video, _ = run["videos"]["SynthSkill_B001"]
    with pytest.raises(predict.PredictError, match="--masks="):
        predict.predict_video(run["workdir"], video, featurizer=run["featurizer"])
    with pytest.raises(PrepError, match="does not exist"):
        predict.predict_video(run["workdir"], video, masks=str(run["root"] / "nowhere"),
                              featurizer=run["featurizer"])


def test_missing_featurizer_names_the_fix(monkeypatch):
    from importlib import metadata as importlib_metadata
    monkeypatch.setattr(importlib_metadata, "entry_points", lambda group=None: [])
    with pytest.raises(predict.PredictError, match="pip install -e"):
        predict.load_featurizer()


def _backbone_metadata(checkpoint):
    record = dict(name="swin3d_b", checkpoint=checkpoint, checkpoint_sha256="ab" * 32)
    return dict(fps=10.0, segment_length=32, image_size=256, flow_bound=20.0, prep_version="1",
                modalities=list(fd.MODALITIES), backbones={m: record for m in fd.MODALITIES},
                extractor=dict(cls=single_video.BACKBONE_CLASS, backbone="rgb:swin3d_b"))


def test_missing_backbone_file_names_the_file_flag_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv(single_video.BACKBONES_ENV, raising=False)
    meta = _backbone_metadata("/weights/swin_base_k600.pth")
    with pytest.raises(PrepError) as e:
        single_video.extractor_for(meta)
    for part in ("swin_base_k600.pth", "--backbones=rgb:swin3d_b=", single_video.BACKBONES_ENV):
        assert part in str(e.value)
    # the folder of the environment variable is searched by file name
    monkeypatch.setenv(single_video.BACKBONES_ENV, str(tmp_path))
    (tmp_path / "swin_base_k600.pth").write_bytes(b"x")
    assert single_video._checkpoint("rgb", meta["backbones"]["rgb"], {}) == str(
        tmp_path / "swin_base_k600.pth")


def test_extractor_must_match_the_runs(run):
    meta = dict(run["dataset"].metadata, extractor=dict(run["dataset"].metadata["extractor"],
                                                         backbone="other"))
    video, masks = run["videos"]["SynthSkill_B001"]
    with pytest.raises(PrepError, match="differs from the run's"):
        run["featurizer"](video, metadata=meta, masks=masks)


def test_i3d_runs_rebuild_their_extractor():
    from data_prep.extractor import I3DFeatureExtractor
    from data_prep.prepare import extractor_identity
    ident = extractor_identity(I3DFeatureExtractor(image_size=S))
    meta = dict(image_size=S, flow_bound=20.0, flow_mode="colour", extractor=ident)
    ext = single_video.extractor_for(meta)
    single_video.check_identity(ext, meta)  # same identity: nothing raised
    assert ext.image_size == S and ext.flow_mode == "colour"


def test_cli_error_is_one_line(run, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    for name in ("config.json", "splits.json"):
        (workdir / name).write_text(open(os.path.join(run["workdir"], name)).read())
    (workdir / runs.FEATURES_FILE).write_text(json.dumps(_backbone_metadata("/w/swin.pth")))
    video, masks = run["videos"]["SynthSkill_B001"]
    proc = subprocess.run([sys.executable, "-m", "surgfusion_jax.predict", f"--workdir={workdir}",
                           f"--video={video}", f"--masks={masks}"], capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "swin.pth" in proc.stderr and "--backbones=" in proc.stderr
