"""Helpers for the prep-stage tests: tiny OpenCV-written videos, masks, a stand-in extractor."""
from __future__ import annotations

import collections
import os
import zlib

import cv2
import numpy as np

W, H = 64, 48


def frame_at(i: int, seed: int = 0, w: int = W, h: int = H) -> np.ndarray:
    """BGR frame: smooth textured background + a bright square moving 1 px/frame."""
    yy, xx = np.mgrid[0:h, 0:w]
    bg = (96 + 40 * np.sin(xx / 5.0 + seed) * np.cos(yy / 7.0 - seed)).astype(np.float32)
    img = np.stack([bg, bg * 0.8 + 20 * seed % 50, 255 - bg], -1)
    x0 = (5 + i + 7 * seed) % (w - 14)
    y0 = (4 + (i // 2) + 3 * seed) % (h - 12)
    img[y0:y0 + 10, x0:x0 + 10] = (240, 230, 40)
    return np.clip(img, 0, 255).astype(np.uint8)


def mask_at(i: int, seed: int = 0, w: int = W, h: int = H) -> np.ndarray:
    """Binary 0/255 mask of the moving square (same geometry as `frame_at`)."""
    m = np.zeros((h, w), np.uint8)
    x0 = (5 + i + 7 * seed) % (w - 14)
    y0 = (4 + (i // 2) + 3 * seed) % (h - 12)
    m[y0:y0 + 10, x0:x0 + 10] = 255
    return m


def write_video(path, n_frames, fps=30.0, seed=0, w=W, h=H, mask=False, step=1):
    """MJPG .avi of frames (or masks) 0, step, 2*step, ... (n_frames of them)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h), True)
    assert vw.isOpened(), path
    for i in range(0, n_frames * step, step):
        f = cv2.cvtColor(mask_at(i, seed, w, h), cv2.COLOR_GRAY2BGR) if mask else frame_at(i, seed, w, h)
        vw.write(f)
    vw.release()
    return str(path)


def write_png_masks(folder, n_frames, seed=0, step=1):
    """PNG per frame; with step=3 one PNG per 10-FPS frame of a 30-FPS video."""
    os.makedirs(folder, exist_ok=True)
    for j, i in enumerate(range(0, n_frames, step)):
        cv2.imwrite(os.path.join(str(folder), f"frame_{j}.png"), mask_at(i, seed))
    return str(folder)


class StandInExtractor:
    """Deterministic cheap extractor: per-clip channel statistics x fixed random matrix.

    Statistics per channel: mean, std, mean of the first / second half in time, and
    mean absolute temporal difference, so clips with different content differ.
    """

    backbone = "standin"
    flow_mode = "standin"

    def __init__(self, image_size=32, batch_size=4, feature_dim=1024, seed=0):
        self.image_size, self.batch_size, self.feature_dim = image_size, batch_size, feature_dim
        self._rng = np.random.default_rng(seed)
        self._proj = {}
        self.calls = collections.Counter()
        self.clips = collections.Counter()
        self.inputs = collections.defaultdict(list)

    def _feat(self, name, x):
        x = np.asarray(x)
        assert x.dtype == np.uint8, x.dtype
        assert x.shape[1] == 32 and x.shape[2] == x.shape[3] == self.image_size, x.shape
        self.calls[name] += 1
        self.clips[name] += x.shape[0]
        self.inputs[name].append(x.shape)
        x = x.astype(np.float32) / 255.0
        if x.ndim == 4:
            x = x[..., None]
        red = tuple(range(1, x.ndim - 1))
        half = x.shape[1] // 2
        stats = np.concatenate([
            x.mean(red), x.std(red), x[:, :half].mean(red), x[:, half:].mean(red),
            np.abs(np.diff(x, axis=1)).mean(red)], axis=-1)
        key = (name, stats.shape[-1])
        if key not in self._proj:
            self._proj[key] = np.random.default_rng(zlib.crc32(repr(key).encode())).standard_normal(
                (stats.shape[-1], self.feature_dim)).astype(np.float32)
        return np.tanh(stats @ self._proj[key]).astype(np.float32)

    def rgb(self, x):
        return self._feat("rgb", x)

    def flow(self, x):
        return self._feat("flow", x)

    def mask(self, x):
        return self._feat("mask", x)


def make_jigsaws(root, task="Suturing", trials=(("B", 1, 300), ("C", 2, 330), ("D", 1, 360)),
                 captures=(1, 2), extra_lines=()):
    """Writes a JIGSAWS-layout tree; trials = (user letter, trial number, frames at 30 FPS).

    The meta file uses tabs with empty columns in between, as distributed. GRS = sum of
    six items derived from the trial index.
    """
    vdir = os.path.join(str(root), task, "video")
    os.makedirs(vdir, exist_ok=True)
    lines = []
    for j, (user, trial, n) in enumerate(trials):
        name = f"{task}_{user}{trial:03d}"
        for c in captures:
            write_video(os.path.join(vdir, f"{name}_capture{c}.avi"), n, seed=j + 3 * c)
        items = [1 + (j + i) % 5 for i in range(6)]
        cols = [name, "NIE"[j % 3], str(sum(items))] + [str(v) for v in items]
        lines.append("\t\t".join(cols))
    lines += list(extra_lines)
    with open(os.path.join(str(root), task, f"meta_file_{task}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(root)


def dataset_contents(data_dir, name):
    """(metadata, {video_id: sample}) of a written feature dataset."""
    from surgfusion_jax.data.feature_dataset import load_feature_dataset
    ds = load_feature_dataset(str(data_dir), name)
    return ds.metadata, {s["video_id"]: s for s in ds.samples}


def assert_same_dataset(a, b):
    (ma, sa), (mb, sb) = a, b
    assert ma == mb
    assert sorted(sa) == sorted(sb)
    for vid in sa:
        assert sorted(sa[vid]) == sorted(sb[vid])
        for k in sa[vid]:
            np.testing.assert_array_equal(np.asarray(sa[vid][k]), np.asarray(sb[vid][k]), err_msg=f"{vid}.{k}")
