"""The prep stage with per-modality backbones (`--backbones`) on a SynthSkill video, the
metadata it records, and the checks built on it (`feature_dataset.backbone_note`,
`check_same_features`)."""
import json
import os

import numpy as np
import pytest

from data_prep import synthskill
from data_prep.common import PrepError
from data_prep.prepare import prepare_manifest
from surgfusion_jax.data import feature_dataset as fd

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "fixtures", "backbones")
SPEC = (f"rgb:swin3d={FIXTURES}/swin_official.pth,flow:i3d_flow={FIXTURES}/i3d_flow_pytorch.pt,"
        f"mask:swin3d={FIXTURES}/swin_torchvision.pth")


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    root = tmp_path_factory.mktemp("bb")
    manifest = synthskill.generate_synthskill(str(root / "synth"), num_surgeons=1,
                                              trials_per_surgeon=2, image_size=64,
                                              min_seconds=3.3, max_seconds=3.5)
    res = prepare_manifest(manifest, str(root / "data"), "bb", backbones=SPEC, batch_size=1,
                           score_scale="gears", progress=False)
    return root, manifest, res


def test_prep_with_fixture_backbones(prepped):
    root, _, res = prepped
    assert res.ok and res.num_samples == 2, res.summary()
    ds = fd.load_feature_dataset(str(root / "data"), "bb")
    meta = ds.metadata
    assert meta["image_size"] == 256 and meta["feature_dim"] == 48
    assert meta["backbone"] == "rgb:swin3d,flow:i3d_flow,mask:swin3d"
    rec = meta["backbones"]
    assert rec["rgb"]["format"] == "video-swin-official" and rec["mask"]["format"] == "torchvision"
    assert rec["flow"]["format"] == "pytorch-i3d" and rec["flow"]["flow_input"] == "two_channel"
    assert rec["flow"]["preprocessing"]["normalise"] == "flow"
    assert rec["rgb"]["preprocessing"]["crop"] == 224 and len(rec["rgb"]["checkpoint_sha256"]) == 64
    for s in ds.samples:
        assert s["num_segments"] == 1
        for m in ("rgb", "flow", "mask"):
            assert s[m].shape == (1, 48) and np.all(np.isfinite(s[m])) and np.abs(s[m]).max() > 0
    assert not np.allclose(ds.samples[0]["rgb"], ds.samples[1]["rgb"])
    # the paper's networks (any checkpoint of them): no note
    assert fd.backbone_note(meta) is None and "note:" not in res.summary()


def test_rgb_features_equal_the_backbone_on_the_same_frames(prepped):
    """The prep path (decode 256, centre crop, normalise, jitted batch) gives what
    `preprocess` + `module.apply` give on the decoded frames of the first segment."""
    import jax

    from data_prep import backbones as bb
    from data_prep.video import VideoStream

    root, manifest, _ = prepped
    ds = fd.load_feature_dataset(str(root / "data"), "bb")
    first = ds.samples[0]
    video = os.path.join(os.path.dirname(manifest), "videos", f"{first['video_id']}.avi")
    frames = np.stack([f for _, f in VideoStream(video, size=256)][:32])[None]
    module, variables = bb.load_backbone("swin3d", f"{FIXTURES}/swin_official.pth")
    want = jax.jit(module.apply)(variables, bb.preprocess("swin3d", frames))["features"]
    np.testing.assert_allclose(first["rgb"], np.asarray(want), atol=1e-4, rtol=1e-4)


def test_missing_backbone_and_mixed_widths_are_refused(prepped, tmp_path):
    _, manifest, _ = prepped
    with pytest.raises(PrepError, match="no backbone for mask"):
        prepare_manifest(manifest, str(tmp_path), "x", backbones=SPEC.rsplit(",", 1)[0],
                         progress=False, score_scale="gears")
    with pytest.raises(PrepError, match="different widths"):
        prepare_manifest(manifest, str(tmp_path), "x", modalities="rgb,flow", progress=False,
                         backbones=f"rgb:i3d_rgb,flow:i3d_flow={FIXTURES}/i3d_flow_pytorch.pt", score_scale="gears")


def test_backbone_note_and_mixing_check():
    stand_in = {"backbone": "i3d_kinetics400", "flow_mode": "colour", "image_size": 224,
                "modalities": ["rgb", "flow", "mask"]}
    note = fd.backbone_note(stand_in, "demo")
    assert note.startswith("note:") and "\n" not in note
    assert "I3D-RGB stand-in" in note and "--backbones=rgb:swin3d_b=" in note
    paper = {"modalities": ["rgb", "flow"], "image_size": 256,
             "backbones": {"rgb": {"name": "swin3d_b", "checkpoint_sha256": "a"},
                           "flow": {"name": "i3d_flow", "checkpoint_sha256": "b"}}}
    assert fd.backbone_note(paper) is None
    imported = {"modalities": ["rgb"], "backbones": {"rgb": {"name": "unknown"}}}
    assert "rgb: unknown" in fd.backbone_note(imported)
    fd.check_same_features({"a": paper, "b": json.loads(json.dumps(paper))})
    other = json.loads(json.dumps(paper))
    other["backbones"]["flow"]["checkpoint_sha256"] = "c"
    with pytest.raises(fd.DatasetError, match=r"'a' and 'b'.*flow.checkpoint_sha256"):
        fd.check_same_features({"a": paper, "b": other})
    with pytest.raises(fd.DatasetError, match="flow.name: 'i3d_flow' vs 'i3d_rgb'"):
        fd.check_same_features({"a": paper, "old": dict(stand_in, image_size=256)})
