"""data_prep/extractor.py: preprocessing against direct OpenCV/colorsys, batching, no recompiles."""
import colorsys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_prep import extractor as ex

SIZE, T = 32, 32


@pytest.fixture(scope="module")
def colour():
    return ex.I3DFeatureExtractor(image_size=SIZE, batch_size=2)


@pytest.fixture(scope="module")
def two_channel():
    return ex.I3DFeatureExtractor(image_size=SIZE, batch_size=2, flow_mode="two_channel")


def _uint8(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_resize_clip_shorter_side_then_centre_crop():
    clip = _uint8((3, 48, 80, 3), 0)
    out = ex.resize_clip(clip, SIZE)
    assert out.shape == (3, SIZE, SIZE, 3) and out.dtype == np.uint8
    # 48x80 -> 32x53 (shorter side 32), crop columns 10..41.
    want = cv2.resize(clip[1], (53, 32), interpolation=cv2.INTER_AREA)[:, 10:42]
    np.testing.assert_array_equal(out[1], want)
    tall = ex.resize_clip(_uint8((2, 100, 20, 2), 1), 40)  # upscaling, 2 channels
    assert tall.shape == (2, 40, 40, 2)
    same = _uint8((2, SIZE, SIZE), 2)
    np.testing.assert_array_equal(ex.resize_clip(same, SIZE), same)


def test_unit_range():
    np.testing.assert_allclose(ex.to_unit_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])


def test_flow_colour_matches_colorsys():
    flow = _uint8((50, 2), 3)
    rgb = ex.flow_to_colour(flow)
    for (x, y), got in zip(flow, rgb):
        u, v = x / 127.5 - 1, y / 127.5 - 1
        hue = (np.arctan2(v, u) / (2 * np.pi)) % 1.0
        want = colorsys.hsv_to_rgb(hue, 1.0, min(1.0, np.hypot(u, v)))
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_mask_palette_is_fixed_and_distinct():
    palette = ex.mask_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(palette[0], [0, 0, 0])
    np.testing.assert_array_equal(palette[1], [255, 255, 255])
    np.testing.assert_array_equal(palette[255], [255, 255, 255])
    assert len({tuple(c) for c in palette[:255]}) > 200
    np.testing.assert_array_equal(palette, ex.mask_palette())


def test_rgb_batch_equals_single_clips_without_recompiling(colour):
    clips = _uint8((3, T, 40, 48, 3), 4)
    batch = colour.rgb(clips)  # batches of 2 + 1 padded
    traces = colour.trace_count
    assert batch.shape == (3, 1024) and batch.dtype == np.float32
    assert np.all(np.isfinite(batch))
    singles = np.concatenate([colour.rgb(clips[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(batch, singles, atol=1e-5, rtol=1e-5)
    colour.rgb(clips[:2])
    colour.rgb(np.concatenate([clips, clips]))
    assert colour.trace_count == traces  # N = 1, 2, 3, 6: one compiled shape
    assert not np.allclose(batch[0], batch[1], atol=1e-3)


def test_rgb_equals_network_on_manual_preprocessing(colour):
    from data_prep import i3d
    clip = _uint8((1, T, 32, 64, 3), 5)
    crop = np.stack([cv2.resize(f, (64, 32), interpolation=cv2.INTER_AREA)[:, 16:48]
                     for f in clip[0]])  # already 32 high: a plain centre crop
    module, variables = i3d.load_pretrained()
    _, want = jax.jit(module.apply)(variables, jnp.asarray(crop[None] / 127.5 - 1, jnp.float32))
    np.testing.assert_allclose(colour.rgb(clip), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["colour", "two_channel"])
def test_flow_modes(mode, colour, two_channel):
    ext = colour if mode == "colour" else two_channel
    flow = _uint8((3, T, 36, 36, 2), 6)
    feats = ext.flow(flow)
    assert feats.shape == (3, 1024) and feats.dtype == np.float32
    assert np.all(np.isfinite(feats))
    swapped = ext.flow(flow[..., ::-1])
    if mode == "two_channel":  # documented limitation: the replicated kernel sees x + y only
        np.testing.assert_allclose(swapped, feats, atol=1e-4, rtol=1e-4)
    else:
        assert not np.allclose(swapped, feats, atol=1e-3)


def test_default_flow_mode_is_colour(colour):
    assert ex.DEFAULT_FLOW_MODE == "colour" and colour.flow_mode == "colour"
    assert colour.metadata() == {"backbone": "i3d_kinetics400", "image_size": SIZE,
                                 "flow_mode": "colour", "feature_dtype": "float32"}


def test_mask_labels_and_rendered_agree(colour):
    labels = np.random.default_rng(7).integers(0, 4, (3, T, SIZE, SIZE)).astype(np.uint8)
    feats = colour.mask(labels)
    assert feats.shape == (3, 1024) and np.all(np.isfinite(feats))
    rendered = ex.mask_palette()[labels]
    np.testing.assert_allclose(colour.mask(rendered), feats, atol=1e-5, rtol=1e-5)
    binary = labels > 0
    np.testing.assert_allclose(colour.mask(binary), colour.mask(binary.astype(np.uint8) * 255),
                               atol=1e-5)
    big = np.kron(labels[:1], np.ones((1, 1, 2, 3), np.uint8))  # nearest resize keeps labels
    assert set(np.unique(ex.resize_clip(big[0], SIZE, cv2.INTER_NEAREST))) <= {0, 1, 2, 3}
    assert colour.mask(big).shape == (1, 1024)


def test_extract_dispatch_and_errors(colour):
    clip = _uint8((1, T, SIZE, SIZE, 3), 8)
    np.testing.assert_array_equal(colour.extract("rgb", clip), colour.rgb(clip))
    with pytest.raises(TypeError, match="uint8"):
        colour.rgb(clip.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[N, T, H, W, 2\]"):
        colour.flow(clip)
    with pytest.raises(ValueError, match="modality"):
        colour.extract("depth", clip)
    with pytest.raises(ValueError, match="flow_mode"):
        ex.I3DFeatureExtractor(flow_mode="hsv")
