"""Prep-stage throughput: frames/s for decoding, flow, features and the whole stage (JSON).

Generates its own synthetic video (and mask video) with OpenCV, then runs the real prep
pipeline (`data_prep.prepare.prepare_manifest`, cache off) on it:

  python benchmarks/prep.py [--width=640 --height=480 --seconds=30 --src_fps=30 \
      --image_size=224 --batch_size=8 --backbone=i3d|none] [--dtype=bfloat16]

Per backbone (the paper's, docs/design.md §1.5 and README 'Use the paper's backbones'):

  python benchmarks/prep.py --extract=swin3d_t,swin3d_b,i3d_rgb,i3d_flow \
      [--batch_size=8 --batches=3 --dtype=float32|bfloat16]

times the jitted, batched extraction alone (`BackboneExtractor`, random weights at the
standard sizes: speed does not depend on the weights) on `--batches` batches of
`--batch_size` 32-frame clips decoded at 256 x 256 (centre crop 224 inside the jitted
function), after one warm-up batch that compiles; it reports frames/s per backbone.

Frames are counted at 10 FPS (after resampling). decode = reading + resampling +
resizing the video and masks; flow = Farneback + uint8 scaling; features = the extractor
calls for all three modalities (after one warm-up batch, so jit compilation is reported
separately as compile_s); whole_stage = frames / wall time of prepare_manifest (all
stages and the dataset write, TensorFlow's import excluded). --backbone=none replaces I3D by a free stand-in to
measure decoding and flow alone.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import cv2
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.prepare import make_extractor, prepare_manifest  # noqa: E402

flags.DEFINE_integer("width", 640, "synthetic video width (JIGSAWS: 640)")
flags.DEFINE_integer("height", 480, "synthetic video height (JIGSAWS: 480)")
flags.DEFINE_float("seconds", 30.0, "synthetic video length in seconds")
flags.DEFINE_float("src_fps", 30.0, "synthetic video frame rate")
flags.DEFINE_integer("image_size", 224, "network input size")
flags.DEFINE_integer("batch_size", 8, "segments per extractor call")
flags.DEFINE_enum("backbone", "i3d", ["i3d", "none"], "feature extractor")
flags.DEFINE_list("extract", [], "time extraction alone for these backbones "
                  "(swin3d_t, swin3d_s, swin3d_b, i3d_rgb, i3d_flow)")
flags.DEFINE_integer("batches", 2, "--extract: timed batches per backbone")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "extractor computation dtype")
FLAGS = flags.FLAGS


class NullExtractor:
    """Zero-cost stand-in (constant features) to time decoding and flow alone."""

    backbone = "none"

    def __init__(self, image_size):
        self.image_size = image_size

    def _f(self, x):
        return np.zeros((len(x), 1024), np.float32)

    rgb = flow = mask = _f


def write_synthetic(path: str, mask_path: str, w: int, h: int, n: int, fps: float) -> None:
    """Textured background, drifting camera, two moving 'instruments' (and their mask)."""
    rng = np.random.default_rng(0)
    tex = cv2.GaussianBlur(rng.uniform(0, 255, (h + 64, w + 64, 3)).astype(np.float32), (0, 0), 4)
    tex = cv2.normalize(tex, None, 30, 220, cv2.NORM_MINMAX).astype(np.uint8)
    vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    mw = cv2.VideoWriter(mask_path, cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for i in range(n):
        dx, dy = int(16 + 16 * np.sin(i / 40)), int(16 + 16 * np.cos(i / 55))
        frame = tex[dy:dy + h, dx:dx + w].copy()
        mask = np.zeros((h, w, 3), np.uint8)
        for k, (a, b) in enumerate(((0.05, 0.3), (0.07, 0.7))):
            cx = int(w * (0.5 + 0.3 * np.sin(i * a + k)))
            cy = int(h * (0.5 + 0.3 * np.cos(i * a * 1.3 + k)))
            pts = (int(w * b), h), (cx, cy)
            for img, col in ((frame, (200, 200, 210)), (mask, (255, 255, 255))):
                cv2.line(img, pts[0], pts[1], col, max(4, w // 40))
                cv2.circle(img, (cx, cy), max(5, w // 30), col, -1)
        vw.write(frame)
        mw.write(mask)
    vw.release()
    mw.release()


def extract_only(names) -> dict:
    """frames/s of the jitted, batched extraction per backbone (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from data_prep.backbones import PREPROCESSING, canonical_name, random_backbone
    from data_prep.extractor import BackboneExtractor

    dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
    rng = np.random.default_rng(0)
    out = {}
    for raw in names:
        name = canonical_name(raw)
        modality = "flow" if PREPROCESSING[name].in_channels == 2 else "rgb"
        t0 = time.perf_counter()
        ext = BackboneExtractor({modality: (name, None)}, image_size=256,
                                batch_size=FLAGS.batch_size, dtype=dtype,
                                loader=random_backbone)
        build_s = time.perf_counter() - t0
        shape = (FLAGS.batch_size, 32, 256, 256, PREPROCESSING[name].in_channels)
        clips = rng.integers(0, 256, shape, dtype=np.uint8)
        run = getattr(ext, modality)
        t0 = time.perf_counter()
        run(clips)                      # compile
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(FLAGS.batches):
            feats = run(clips)
        seconds = time.perf_counter() - t0
        frames = FLAGS.batches * FLAGS.batch_size * 32
        out[name] = dict(frames_per_s=round(frames / seconds, 2), frames=frames,
                         seconds=round(seconds, 2), compile_s=round(compile_s, 2),
                         build_s=round(build_s, 2), feature_dim=int(feats.shape[1]))
    return dict(benchmark="prep_extract", device=str(jax.devices()[0].device_kind),
                platform=jax.devices()[0].platform, cpu_count=os.cpu_count(),
                batch_size=FLAGS.batch_size, dtype=FLAGS.dtype, clip="32 x 256 x 256, crop 224",
                backbones=out)


def main(argv):
    del argv
    if FLAGS.extract:
        print(json.dumps(extract_only(FLAGS.extract), indent=1))
        return
    n_src = int(round(FLAGS.seconds * FLAGS.src_fps))
    with tempfile.TemporaryDirectory() as tmp:
        video, mask = os.path.join(tmp, "v.avi"), os.path.join(tmp, "m.avi")
        t0 = time.perf_counter()
        write_synthetic(video, mask, FLAGS.width, FLAGS.height, n_src, FLAGS.src_fps)
        gen_s = time.perf_counter() - t0
        csv = os.path.join(tmp, "bench.csv")
        with open(csv, "w") as f:
            f.write("video_id,video_path,score,surgeon_id,mask_path\nbench,v.avi,20,A,m.avi\n")
        t0 = time.perf_counter()
        if FLAGS.backbone == "i3d":
            ext = make_extractor(FLAGS.image_size, FLAGS.batch_size, dtype=FLAGS.dtype)
        else:
            ext = NullExtractor(FLAGS.image_size)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = np.zeros((FLAGS.batch_size, 32, FLAGS.image_size, FLAGS.image_size, 3), np.uint8)
        ext.rgb(warm)          # jit compile (shared by rgb, colour flow and rendered masks)
        ext.flow(warm[..., :2])
        compile_s = time.perf_counter() - t0
        import tensorflow_datasets  # noqa: F401  (import cost of the writer kept out of timing)
        res = prepare_manifest(csv, os.path.join(tmp, "out"), "bench",
                               image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
                               extractor=ext, use_cache=False, progress=False, score_scale="gears")
    if not res.ok:
        raise SystemExit(res.summary())
    r = res.times.rates()
    try:
        import jax
        device = str(jax.devices()[0].device_kind) if FLAGS.backbone == "i3d" else "cpu-only"
    except Exception:  # noqa: BLE001
        device = "unknown"
    print(json.dumps(dict(
        benchmark="prep", backbone=FLAGS.backbone, device=device, cpu_count=os.cpu_count(),
        source=dict(width=FLAGS.width, height=FLAGS.height, fps=FLAGS.src_fps,
                    seconds=FLAGS.seconds, frames=n_src),
        image_size=FLAGS.image_size, batch_size=FLAGS.batch_size, frames_10fps=r["frames"],
        segments=int(res.times.frames // 32),
        decode_fps=r["decode_fps"], flow_fps=r["flow_fps"], features_fps=r["features_fps"],
        stages_fps=r["stages_fps"], whole_stage_fps=round(r["frames"] / res.wall_s, 2),
        whole_stage_s=round(res.wall_s, 2), extractor_build_s=round(build_s, 2),
        compile_s=round(compile_s, 2), synth_video_s=round(gen_s, 2)), indent=1))


if __name__ == "__main__":
    app.run(main)
