"""SynthSkill: a procedurally rendered multimodal suturing dataset with known skill.

It lets a user run the whole pipeline (prep -> features -> SurgFusion-Net) without clinical
data. Each video shows a bench-top suturing scene drawn with OpenCV: noise-textured tissue
with an incision, two instruments (shaft, wrist, opening jaws), a curved needle and thread.
Four stitches are placed per video.

Skill model. Surgeon s has persistent latent factors in [0, 1] (1 = expert), drawn as
`z = 0.45 g_s + 0.55 u` (g_s: general skill, stratified over surgeons; u: per factor), so the
factors correlate mildly but are not one number. Trial j (1..T) adds a mild learning effect
`+0.06 (j-1)/(T-1) (1-z)` and trial noise N(0, 0.05). The factors and where they show:
  * motion (mostly optical flow): tool-tip tremor (0.4% to 5% of the frame size), corrective
    sub-movements with constant-velocity (jerky) instead of minimum-jerk profiles, idle pauses.
  * handling (mostly tool masks): how far the idle left tool is parked back along its shaft
    (poor handling: out of view, longer), dithering near targets, extra open/close regrasps
    of the needle, placement error of the bites (irregular stitches).
  * tissue (mostly RGB): bleeding marks at punctures, tears when the thread is pulled,
    tissue deformation around bites and pulls, how well each stitch closes the wound gap.
Six GRS-like items (JIGSAWS order, `ITEM_NAMES`) are `clip(round(1 + 4 q_i + e), 1, 5)`,
`q_i = clip(0.5 + 1.6 (w_i . z - 0.5), 0, 1)` (spread over the scale), rater noise
e ~ N(0, 0.3), item weights `ITEM_WEIGHTS` (each item leans on a different factor); the total
score (6-30) is their sum, so no single modality gives it away.
The scene itself is drawn by `synthskill_render.render_video`.
Nuisances independent of skill (own random stream): camera pans and zooms, lighting drift and
steps, vignetting, tissue tint and texture, occasional tool withdrawals out of view. Video
length maps the script's natural duration (longer for the less skilled) linearly from
`synthskill_render.NATURAL_RANGE` into [min_seconds, max_seconds] (the script is time-scaled
to fit).

Output (paths in the manifest are relative to the manifest's folder):
  <out_dir>/videos/<video_id>.avi   RGB video, MJPG, `fps` frames/s, image_size^2
  <out_dir>/masks/<video_id>.avi    instrument masks (needle not included) as 0/255
                                    grayscale stored in 3-channel MJPG frames; read channel 0 and
                                    threshold at 127 (MJPG ringing stays far from 127, so the
                                    binary mask survives; PNG folders were not needed)
  <out_dir>/manifest.csv            video_id, video_path, score, surgeon_id, mask_path,
                                    source_video, supertrial, task, item_1..item_6
  <out_dir>/synthskill_meta.json    version, seed, settings, per-video latents, frame counts,
                                    nuisance draws and ground-truth event counts
Video ids are `SynthSkill_<surgeon letter B..><trial 001..>` (JIGSAWS style); `supertrial`
is the trial number (LOSO) and `surgeon_id` the letter (LOUO). Same seed and settings give a
byte-identical manifest and identical frames. The dataset is rendered into a hidden sibling
folder and renamed into place; an existing complete dataset with the same settings is reused.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from data_prep.synthskill_render import render_video

VERSION = "1.0"
TASK = "Suturing"
LETTERS = "BCDEFGHIJKLMNOPQRSTUVWXYZ"
FACTORS = ("motion", "handling", "tissue")
ITEM_NAMES = ("respect_for_tissue", "suture_needle_handling", "time_and_motion",
              "flow_of_operation", "overall_performance", "quality_of_final_product")
ITEM_WEIGHTS = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.8, 0.2, 0.0],
                         [0.7, 0.3, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.2, 0.8]])
MANIFEST_COLUMNS = ("video_id", "video_path", "score", "surgeon_id", "mask_path",
                    "source_video", "supertrial", "task") + tuple(f"item_{i}" for i in range(1, 7))


def video_id(surgeon: int, trial: int) -> str:
    return f"SynthSkill_{LETTERS[surgeon]}{trial + 1:03d}"


def sample_latents(seed: int, num_surgeons: int, trials: int) -> list[dict]:
    """Per-video latents: persistent surgeon factors + learning effect + trial noise; items."""
    rng = np.random.default_rng([seed, 0])
    general = (rng.permutation(num_surgeons) + rng.uniform(0.1, 0.9, num_surgeons)) / num_surgeons
    base = np.clip(0.45 * general[:, None] + 0.55 * rng.uniform(size=(num_surgeons, 3)), 0, 1)
    out = []
    for s in range(num_surgeons):
        for j in range(trials):
            learn = 0.06 * (j / max(trials - 1, 1)) * (1 - base[s])
            z = np.clip(base[s] + learn + rng.normal(0, 0.05, 3), 0, 1)
            quality = np.clip(0.5 + 1.6 * (ITEM_WEIGHTS @ z - 0.5), 0, 1)  # spread the scale
            items = np.clip(np.rint(1 + 4 * quality + rng.normal(0, 0.3, 6)), 1, 5)
            out.append(dict(video_id=video_id(s, j), surgeon=s, trial=j + 1,
                            surgeon_latent=dict(zip(FACTORS, base[s].round(6).tolist())),
                            latent=dict(zip(FACTORS, z.round(6).tolist())),
                            items=items.astype(int).tolist()))
    return out


def _settings(**kw) -> dict:
    return dict(version=VERSION, **kw)


def _is_complete(out_dir: str, settings: dict) -> bool:
    try:
        with open(os.path.join(out_dir, "synthskill_meta.json")) as fh:
            meta = json.load(fh)
        with open(os.path.join(out_dir, "manifest.csv"), newline="") as fh:
            rows = list(csv.DictReader(fh))
        files = [os.path.join(out_dir, r[c]) for r in rows for c in ("video_path", "mask_path")]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (meta.get("settings") == settings and len(rows) == len(meta.get("videos", []))
            and all(os.path.isfile(f) for f in files))


def generate_synthskill(out_dir: str, *, num_surgeons: int = 8, trials_per_surgeon: int = 5,
                        image_size: int = 128, fps: float = 10, min_seconds: float = 20,
                        max_seconds: float = 40, seed: int = 0) -> str:
    """Render SynthSkill into `out_dir` (see module docstring); returns the manifest path.

    Reuses a complete dataset with the same settings; replaces a SynthSkill dataset with other
    settings; refuses to touch a non-empty folder that is not a SynthSkill dataset.
    """
    if not 1 <= num_surgeons <= len(LETTERS):
        raise ValueError(f"num_surgeons={num_surgeons}: must be 1..{len(LETTERS)}")
    if not 1 <= trials_per_surgeon <= 999:
        raise ValueError(f"trials_per_surgeon={trials_per_surgeon}: must be 1..999")
    if image_size < 32 or fps <= 0 or not 0 < min_seconds <= max_seconds:
        raise ValueError(f"need image_size >= 32 (got {image_size}), fps > 0 (got {fps}) and "
                         f"0 < min_seconds <= max_seconds (got {min_seconds}, {max_seconds})")
    settings = _settings(num_surgeons=int(num_surgeons), trials_per_surgeon=int(trials_per_surgeon),
                         image_size=int(image_size), fps=float(fps), min_seconds=float(min_seconds),
                         max_seconds=float(max_seconds), seed=int(seed))
    out_dir = os.path.abspath(out_dir)
    manifest = os.path.join(out_dir, "manifest.csv")
    if _is_complete(out_dir, settings):
        logging.info("SynthSkill with these settings already in %s; reusing it", out_dir)
        return manifest
    ours = os.path.isfile(os.path.join(out_dir, "synthskill_meta.json"))
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not ours:
        raise FileExistsError(f"{out_dir} is not empty and holds no SynthSkill dataset "
                              "(synthskill_meta.json); pass an empty or new --out_dir")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        for sub in ("videos", "masks"):
            os.mkdir(os.path.join(tmp, sub))
        videos, rows = [], []
        for item in tqdm(sample_latents(seed, num_surgeons, trials_per_surgeon), desc="SynthSkill"):
            vid = item["video_id"]
            rel = {c: f"{c}/{vid}.avi" for c in ("videos", "masks")}
            info = render_video(item, seed, image_size, fps, min_seconds, max_seconds,
                                os.path.join(tmp, rel["videos"]), os.path.join(tmp, rel["masks"]))
            score = int(sum(item["items"]))
            videos.append(dict(video_id=vid, surgeon_id=LETTERS[item["surgeon"]],
                               trial=item["trial"], score=score, items=item["items"],
                               latent=item["latent"], surgeon_latent=item["surgeon_latent"],
                               **info))
            rows.append([vid, rel["videos"], score, LETTERS[item["surgeon"]], rel["masks"], vid,
                         item["trial"], TASK, *item["items"]])
        with open(os.path.join(tmp, "manifest.csv"), "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(MANIFEST_COLUMNS)
            w.writerows(rows)
        meta = dict(version=VERSION, seed=int(seed), settings=settings, task=TASK,
                    factors=FACTORS, item_names=ITEM_NAMES, item_weights=ITEM_WEIGHTS.tolist(),
                    score_min=6, score_max=30, mask_format="mjpg_avi_0_255_threshold_127",
                    paths_relative_to="manifest.csv folder", videos=videos)
        with open(os.path.join(tmp, "synthskill_meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1, sort_keys=True)
        if os.path.exists(out_dir):  # an empty folder or an older SynthSkill dataset
            old = tmp + ".old"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (only when run as a program: importing this module, as
    `synthskill_setup` does, adds nothing to another program's flags)."""
    flags.DEFINE_string("out_dir", None, "Folder to write SynthSkill into.")
    flags.DEFINE_integer("num_surgeons", 8, "Surgeons (letters B, C, ...).")
    flags.DEFINE_integer("trials", 5, "Trials per surgeon.")
    flags.DEFINE_integer("image_size", 128, "Frame height and width in pixels.")
    flags.DEFINE_float("fps", 10.0, "Frame rate.")
    flags.DEFINE_float("min_seconds", 20.0, "Shortest video (best surgeon).")
    flags.DEFINE_float("max_seconds", 40.0, "Longest video (worst surgeon).")
    flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv):
    del argv
    path = generate_synthskill(FLAGS.out_dir, num_surgeons=FLAGS.num_surgeons,
                               trials_per_surgeon=FLAGS.trials, image_size=FLAGS.image_size,
                               fps=FLAGS.fps, min_seconds=FLAGS.min_seconds,
                               max_seconds=FLAGS.max_seconds, seed=FLAGS.seed)
    print(path)


if __name__ == "__main__":
    define_flags()
    flags.mark_flag_as_required("out_dir")
    app.run(main)
