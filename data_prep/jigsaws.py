"""JIGSAWS as distributed (paper Sec. IV-A; docs/design.md §1).

Layout read here:

  <root>/<Task>/video/<Task>_<User><Trial>_capture{1,2}.avi
  <root>/<Task>/meta_file_<Task>.txt

The meta file has one line per trial, tab-separated with empty columns in between:
name, self-proclaimed skill (N/I/E), GRS total (6-30), then the six GRS item scores
(respect for tissue, suture/needle handling, time and motion, flow of operation, overall
performance, quality of final product). Splitting on runs of whitespace reads it.

Per trial: video_id = source_video = `<Task>_<User><Trial>` (e.g. Suturing_B001);
surgeon_id = the user letter (B-I); supertrial = the trial number (001 -> 1); score = GRS
total; item_scores = the six items; task = <Task>. The capture (1 = left, 2 = right
endoscope view) is chosen by `capture`.

Masks (not part of JIGSAWS; the paper made them with SAM 2) are looked up per trial under
`mask_root` (default `<root>/<Task>/masks`) as a PNG folder or a mask video named
`<Task>_<User><Trial>_capture<k>` or `<Task>_<User><Trial>` (+ .avi/.mp4/.mkv/.mov).
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Optional, Sequence

from data_prep.common import ALL_MODALITIES, PrepError, SampleSpec
from surgfusion_jax.data.feature_dataset import ScoreScale, parse_score_scale

TASKS = ("Suturing", "Needle_Passing", "Knot_Tying")
GRS = parse_score_scale("grs")  # JIGSAWS scores are GRS totals, 6-30, always
MASK_VIDEO_EXTS = (".avi", ".mp4", ".mkv", ".mov")
SKILLS = ("N", "I", "E")


def trial_name_re(task: str):
    return re.compile(rf"^{re.escape(task)}_(?P<user>[A-Z])(?P<trial>\d{{3}})$")


def video_path(root: str, task: str, name: str, capture: int) -> str:
    return os.path.join(root, task, "video", f"{name}_capture{capture}.avi")


def read_meta_file(path: str, task: str, *, scale: ScoreScale = GRS) -> list[dict]:
    """Parses `meta_file_<Task>.txt` -> list of dicts (name, user, trial, skill, grs, items).

    All problems are collected and raised together as one PrepError with line numbers.
    """
    if not os.path.isfile(path):
        raise PrepError(f"JIGSAWS meta file {path!r} does not exist; fix: point --jigsaws_root "
                        f"at the folder holding <Task>/meta_file_<Task>.txt (tasks: "
                        f"{', '.join(TASKS)}).")
    name_re = trial_name_re(task)
    rows, problems, seen = [], [], {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            where = f"{os.path.basename(path)} line {line_no}"
            if len(tokens) != 9:
                problems.append(f"{where}: {len(tokens)} fields, expected 9 (name, skill, GRS, "
                                f"six items)")
                continue
            name, skill, *nums = tokens
            m = name_re.match(name)
            if not m:
                problems.append(f"{where}: name {name!r} is not <Task>_<User><Trial> for task "
                                f"{task!r} (e.g. {task}_B001)")
                continue
            try:
                values = [float(v) for v in nums]
            except ValueError:
                problems.append(f"{where}: non-numeric score in {nums} ({name}); fix: correct "
                                f"the meta file")
                continue
            if not all(math.isfinite(v) for v in values):
                problems.append(f"{where}: NaN or infinite score in {nums} ({name}); fix: "
                                f"correct the meta file")
                continue
            grs, items = values[0], tuple(values[1:])
            if not scale.contains(grs):
                problems.append(f"{where}: GRS {grs:g} outside the {scale} scale ({name}); "
                                f"fix: correct the meta file")
                continue
            if name in seen:
                problems.append(f"{where}: {name} already listed on line {seen[name]}")
                continue
            seen[name] = line_no
            if skill.upper() not in SKILLS:
                logging.warning("%s: self-proclaimed skill %r is not N/I/E", where, skill)
            if abs(sum(items) - grs) > 1e-6:
                logging.warning("%s: GRS %g != sum of the six items %g (kept as given)",
                                where, grs, sum(items))
            rows.append(dict(name=name, user=m["user"], trial=int(m["trial"]),
                             skill=skill.upper(), grs=grs, items=items, line=line_no))
    if problems:
        raise PrepError(f"JIGSAWS meta file {path!r} has {len(problems)} problem(s):\n  " +
                        "\n  ".join(problems[:20]))
    if not rows:
        raise PrepError(f"JIGSAWS meta file {path!r} lists no trials.")
    return rows


def find_mask(mask_root: str, name: str, capture: int) -> Optional[str]:
    for stem in (f"{name}_capture{capture}", name):
        base = os.path.join(mask_root, stem)
        if os.path.isdir(base):
            return base
        for ext in MASK_VIDEO_EXTS:
            if os.path.isfile(base + ext):
                return base + ext
    return None


def jigsaws_samples(root: str, task: str, *, capture: int = 1,
                    modalities: Sequence[str] = ALL_MODALITIES,
                    mask_root: Optional[str] = None) -> list[SampleSpec]:
    """One SampleSpec per trial of the meta file (missing videos fail later, per video)."""
    if task not in TASKS:
        logging.warning("task %r is not one of the JIGSAWS tasks %s", task, TASKS)
    if capture not in (1, 2):
        raise PrepError(f"--capture={capture}: JIGSAWS has capture 1 or 2.")
    meta = os.path.join(root, task, f"meta_file_{task}.txt")
    rows = read_meta_file(meta, task)
    video_dir = os.path.join(root, task, "video")
    listed = {r["name"] for r in rows}
    if os.path.isdir(video_dir):
        name_re = re.compile(rf"^(?P<name>{re.escape(task)}_[A-Z]\d{{3}})_capture{capture}\.avi$")
        unlabelled = sorted(m["name"] for m in map(name_re.match, os.listdir(video_dir))
                            if m and m["name"] not in listed)
        if unlabelled:
            logging.warning("JIGSAWS %s: %d video(s) without a meta-file entry are skipped: %s",
                            task, len(unlabelled), ", ".join(unlabelled))
    mask_root = mask_root or os.path.join(root, task, "masks")
    specs, no_mask = [], []
    for r in rows:
        mask = None
        if "mask" in modalities:
            mask = find_mask(mask_root, r["name"], capture)
            if mask is None:
                no_mask.append(r["name"])
        specs.append(SampleSpec(
            video_id=r["name"], video_path=video_path(root, task, r["name"], capture),
            score=r["grs"], surgeon_id=r["user"], task=task, source_video=r["name"],
            supertrial=r["trial"], item_scores=r["items"], mask_path=mask,
            origin=f"meta_file_{task}.txt line {r['line']}"))
    if no_mask:
        raise PrepError(
            f"no masks found for {len(no_mask)} JIGSAWS trial(s) under {mask_root!r} "
            f"(e.g. {no_mask[0]}_capture{capture}/ with PNGs, or {no_mask[0]}_capture{capture}"
            f".avi); fix: pass --mask_root=<folder with the masks>, or leave the masks out "
            f"with --modalities=rgb,flow. Missing: {', '.join(no_mask[:10])}"
            + (" ..." if len(no_mask) > 10 else ""))
    return specs
