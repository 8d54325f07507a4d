"""data_prep/backbones against independent implementations, on the committed fixtures.

The fixtures (tests/fixtures/backbones/) were written once by
tests/fixtures/make_backbone_fixtures.py where PyTorch is installed: reduced-width
networks with random weights, run by the official Video Swin code, torchvision's
SwinTransformer3d and the PyTorch I3D port's own building blocks, in float64. Nothing
here imports torch.
"""
import io
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

from data_prep import backbones as bb
from data_prep.backbones import safe_pickle
from data_prep.common import PrepError
from data_prep.extractor import parse_backbones

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "fixtures", "backbones")
SWIN_OFFICIAL = os.path.join(FIXTURES, "swin_official.pth")
SWIN_TV = os.path.join(FIXTURES, "swin_torchvision.pth")
I3D_PT = os.path.join(FIXTURES, "i3d_flow_pytorch.pt")
I3D_TF = os.path.join(FIXTURES, "i3d_flow_tf", "model.ckpt")


def _io(name):
    with np.load(os.path.join(FIXTURES, name)) as z:
        d = {k: z[k] for k in z.files}
    d["clip"] = d["clip_int8"].astype(np.float32) / d["scale"]
    return d


@pytest.mark.parametrize("path,io_name,fmt,window", [
    (SWIN_OFFICIAL, "swin_official_io.npz", "video-swin-official", [2, 3, 3]),
    (SWIN_TV, "swin_torchvision_io.npz", "torchvision", [8, 7, 7]),
])
def test_video_swin_matches_reference(path, io_name, fmt, window):
    loaded = bb.load("swin3d", path)
    assert loaded.format == fmt and loaded.architecture["window_size"] == window
    ref = _io(io_name)
    out = jax.jit(loaded.module.apply)(loaded.variables, ref["clip"])
    assert set(out) == {"logits", "features"}
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["features"], ref["features"], atol=1e-4, rtol=1e-4)
    assert np.abs(ref["logits"]).max() > 0.5 and ref["logits"].shape[0] == ref["clip"].shape[0]


@pytest.mark.parametrize("path,key,fmt", [(I3D_PT, "pytorch", "pytorch-i3d"),
                                          (I3D_TF, "tensorflow", "kinetics-i3d-tensorflow")])
def test_i3d_flow_matches_reference(path, key, fmt):
    module, variables = bb.load_backbone("i3d_flow", path)
    ref = _io("i3d_flow_io.npz")
    out = jax.jit(module.apply)(variables, ref["clip"])
    np.testing.assert_allclose(out["logits"], ref[f"logits_{key}"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["features"], ref[f"features_{key}"], atol=1e-4, rtol=1e-4)
    assert bb.load("i3d_flow", path).format == fmt
    # The PyTorch file has random BatchNorm scales, the TF one none: the two references
    # differ, so folding the scale into the conv is really tested.
    assert not np.allclose(ref["features_pytorch"], ref["features_tensorflow"], atol=1e-3)


def test_names_are_checked_against_the_checkpoint():
    with pytest.raises(PrepError, match=r"not swin3d_b.*swin3d \(any size\)"):
        bb.load("swin3d_b", SWIN_OFFICIAL)
    with pytest.raises(PrepError, match=r"2 input channels.*use i3d_flow"):
        bb.load("i3d_rgb", I3D_PT)
    with pytest.raises(PrepError, match="not an I3D state dict"):
        bb.load("i3d_flow", SWIN_TV)
    with pytest.raises(PrepError, match="does not exist"):
        bb.load("swin3d_b", os.path.join(FIXTURES, "nope.pth"))
    with pytest.raises(PrepError, match="needs a checkpoint file"):
        bb.load("i3d_flow")
    with pytest.raises(PrepError, match="unknown backbone"):
        bb.canonical_name("resnet50")
    assert bb.canonical_name("swin_b") == "swin3d_b"


def test_parse_backbones():
    got = parse_backbones("rgb:swin_b=/w/s.pth, flow:i3d_flow=/w/f.pt,mask:i3d_rgb")
    assert got == {"rgb": ("swin3d_b", "/w/s.pth"), "flow": ("i3d_flow", "/w/f.pt"),
                   "mask": ("i3d_rgb", None)}
    for bad, msg in [("swin3d_b=/x", "lacks the modality"),
                     ("audio:swin3d_b=/x", "unknown modality"),
                     ("rgb:swin3d_b=/a,rgb:swin3d_b=/b", "twice"), ("", "empty")]:
        with pytest.raises(PrepError, match=msg):
            parse_backbones(bad)


# -- the safe reader ---------------------------------------------------------------------

def test_torch_files_read_without_torch():
    obj = safe_pickle.load_torch_file(SWIN_OFFICIAL)           # zip format
    assert obj["meta"]["epoch"] == 30 and obj["optimizer"]["param_groups"][0]["lr"] == 1e-3
    sd = safe_pickle.find_state_dict(obj, SWIN_OFFICIAL)
    index = sd["backbone.layers.0.blocks.0.attn.relative_position_index"]
    assert index.dtype == "int64" and index.shape == (18, 18)
    np.testing.assert_array_equal(index.numpy(), __import__(
        "data_prep.backbones.swin3d", fromlist=["x"]).relative_position_index((2, 3, 3)))
    legacy = safe_pickle.find_state_dict(safe_pickle.load_torch_file(I3D_PT), I3D_PT)
    assert legacy["Conv3d_1a_7x7.conv3d.weight"].shape == (8, 2, 7, 7, 7)   # legacy format


def test_numpy_values_in_checkpoint_metadata_load(tmp_path):
    """mmcv-style metadata may hold NumPy numbers (e.g. a best score)."""
    meta = {"meta": {"hook_msgs": {"best_score": np.float64(0.75)}, "seed": np.int64(3),
                     "arr": np.arange(3)}}
    _zip_checkpoint(tmp_path / "meta.pth", pickle.dumps(meta, protocol=2))
    got = safe_pickle.load_torch_file(str(tmp_path / "meta.pth"))["meta"]
    assert got["hook_msgs"]["best_score"] == 0.75 and got["seed"] == 3
    np.testing.assert_array_equal(got["arr"], np.arange(3))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _zip_checkpoint(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")


def test_malicious_files_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"state_dict": {"w": _Evil(marker)}}, protocol=2)
    _zip_checkpoint(tmp_path / "evil.pth", payload)
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"evil\.pth.*'posix\.system'"):
        bb.load("swin3d_b", str(tmp_path / "evil.pth"))
    # legacy torch.save layout: magic number, protocol, sys info, then the payload
    legacy = b"".join(pickle.dumps(x, protocol=2) for x in
                      (0x1950a86a20f9469cfc6c, 1001, {"little_endian": True})) + payload
    (tmp_path / "evil.pt").write_bytes(legacy)
    with pytest.raises(safe_pickle.UnsafePickleError, match="posix.system"):
        safe_pickle.load_torch_file(str(tmp_path / "evil.pt"))
    # a feature pickle and an object .npy (PAMFN's packed layout)
    (tmp_path / "evil.pkl").write_bytes(payload)
    with pytest.raises(safe_pickle.UnsafePickleError, match="evil.pkl"):
        safe_pickle.load_pickle(str(tmp_path / "evil.pkl"))
    arr = np.empty((), dtype=object)
    arr[()] = {"v1": _Evil(marker)}
    np.save(tmp_path / "evil.npy", arr, allow_pickle=True)
    with pytest.raises(safe_pickle.UnsafePickleError, match="posix.system"):
        safe_pickle.load_npy(str(tmp_path / "evil.npy"))
    # a pickled model class (not a state dict) is refused as well
    class_payload = pickle.dumps(io.BytesIO, protocol=2)
    _zip_checkpoint(tmp_path / "model.pth", class_payload)
    with pytest.raises(safe_pickle.UnsafePickleError, match="_io.BytesIO"):
        safe_pickle.load_torch_file(str(tmp_path / "model.pth"))
    assert not marker.exists()


def test_plain_feature_pickles_load(tmp_path):
    data = {"a": np.arange(6, dtype=np.float32).reshape(3, 2), "b": [1, 2.5, "x"],
            ("v", 1): np.float64(3.0)}
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps(data, protocol=4))
    got = safe_pickle.load_pickle(str(tmp_path / "ok.pkl"))
    np.testing.assert_array_equal(got["a"], data["a"])
    assert got["b"] == [1, 2.5, "x"] and got[("v", 1)] == 3.0
    obj = np.empty((), dtype=object)
    obj[()] = {"v": np.ones((2, 4), np.float32)}
    np.save(tmp_path / "packed.npy", obj, allow_pickle=True)
    assert safe_pickle.load_npy(str(tmp_path / "packed.npy"))["v"].shape == (2, 4)
    with pytest.raises(safe_pickle.CheckpointFormatError, match="not a PyTorch checkpoint"):
        (tmp_path / "junk.pth").write_bytes(b"\x80\x02K\x05.")
        safe_pickle.load_torch_file(str(tmp_path / "junk.pth"))


# -- preprocessing -----------------------------------------------------------------------

def test_preprocess_swin_crop_and_imagenet_normalisation():
    frames = np.random.default_rng(0).integers(0, 256, (2, 3, 256, 300, 3), dtype=np.uint8)
    out = bb.preprocess("swin3d_b", frames)
    assert out.shape == (2, 3, 224, 224, 3) and out.dtype == np.float32
    crop = frames[:, :, 16:240, 38:262].astype(np.float32) / 255.0
    want = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(bb.preprocess("i3d_rgb", frames), crop * 2 - 1, atol=1e-5)


def test_preprocess_flow_scaling():
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (1, 2, 256, 256, 2), dtype=np.uint8)
    out = bb.preprocess("i3d_flow", u8, flow_bound=20.0)       # prep default bound
    np.testing.assert_allclose(out, u8[:, :, 16:240, 16:240] / 127.5 - 1.0, atol=1e-6)
    out40 = bb.preprocess("i3d_flow", u8, flow_bound=40.0)     # 40 px bound: clipped at 20 px
    np.testing.assert_allclose(out40, np.clip((u8[:, :, 16:240, 16:240] / 127.5 - 1) * 2, -1, 1),
                               atol=1e-6)
    px = np.zeros((1, 1, 224, 224, 2), np.float32)
    px[..., 0], px[..., 1] = 7.0, -50.0                       # pixels at 224 px
    out = bb.preprocess("i3d_flow", px)                       # resized to 256: x 256/224
    np.testing.assert_allclose(out[..., 0], 7.0 * 256 / 224 / 20, atol=1e-5)
    np.testing.assert_allclose(out[..., 1], -1.0)             # truncated at -20 px


@pytest.mark.parametrize("name,path,io_name,key", [
    ("swin3d", SWIN_OFFICIAL, "swin_official_io.npz", "features"),
    ("i3d_flow", I3D_PT, "i3d_flow_io.npz", "features_pytorch")])
def test_bfloat16_close_to_float32(name, path, io_name, key):
    import jax.numpy as jnp
    module, variables = bb.load_backbone(name, path, dtype=jnp.bfloat16)
    ref = _io(io_name)
    out = jax.jit(module.apply)(variables, ref["clip"])["features"]
    assert out.dtype == jnp.float32
    a, b = np.asarray(out).ravel(), ref[key].ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
