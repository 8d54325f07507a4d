"""CSV manifest for any clinical dataset (RARP-skill, RAH-skill, your own), docs/design.md §1.

One row per sample. Columns (header names are case-insensitive):

  required  video_id, video_path, score, surgeon_id
  optional  mask_path        folder of per-frame PNGs or a mask video (required, non-empty,
                             when the mask modality is prepared)
            start_s, end_s   time range in seconds (RAH: one row per phase, same video_path)
            phase, task, source_video, supertrial
            rater_1, rater_2, ...  per-rater scores; when any is given the score is their
                             mean (the score cell may then be empty; if filled it must equal
                             the mean)
            item_1, item_2, ...    per-item scores, stored as item_scores

Relative paths are relative to the manifest's folder. `source_video` (the grouping key of
the cross-validation splits, so the phases of one video never straddle train and test)
defaults to the file name of video_path without extension.

Everything here is checked before any video is touched; all problems are reported
together, each with its CSV line number, video id, column and fix (`PrepError`): a score
(or rater score) that is missing, not a number (NaN, inf, text) or off the score scale
(`score_scale`, a `feature_dataset.ScoreScale`; the prep stage requires one).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from typing import Optional, Sequence

from data_prep.common import ALL_MODALITIES, PrepError, SampleSpec
from surgfusion_jax.data.feature_dataset import SCALE_FLAG, ScoreScale

REQUIRED = ("video_id", "video_path", "score", "surgeon_id")
OPTIONAL = ("mask_path", "start_s", "end_s", "phase", "task", "source_video", "supertrial")
RATER_RE = re.compile(r"^rater_?\d+$")
ITEM_RE = re.compile(r"^item_?\d+$")
MAX_LISTED = 20


def _number(text: str) -> Optional[float]:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _column_index(name: str) -> int:
    return int(re.sub(r"\D", "", name))


def read_manifest(path: str, *, modalities: Sequence[str] = ALL_MODALITIES,
                  score_scale: Optional[ScoreScale] = None) -> list[SampleSpec]:
    """Parses and validates the manifest at `path`; returns one SampleSpec per row.

    Scores must lie on `score_scale` (None: any finite number, for readers that do not
    write a dataset)."""
    if not os.path.isfile(path):
        raise PrepError(f"manifest {path!r} does not exist; fix: pass --manifest=<csv file>.")
    base = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    problems: list[str] = []
    specs: list[SampleSpec] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise PrepError(f"manifest {path!r} is empty; fix: add the header line "
                            f"`{','.join(REQUIRED)}` and one row per video.")
        cols = [h.strip().lower() for h in header]
        raters = sorted((c for c in cols if RATER_RE.match(c)), key=_column_index)
        items = sorted((c for c in cols if ITEM_RE.match(c)), key=_column_index)
        missing = [c for c in REQUIRED if c not in cols and not (c == "score" and raters)]
        if "mask" in modalities and "mask_path" not in cols:
            missing.append("mask_path")
        if missing:
            raise PrepError(
                f"{name} line 1: missing column(s) {missing} (header: {cols}); fix: add them "
                f"(required: {', '.join(REQUIRED)}" +
                ("; masks need a mask_path column, or pass --modalities=rgb,flow to leave "
                 "the masks out" if "mask_path" in missing else "") + ").")
        dup_cols = sorted({c for c in cols if cols.count(c) > 1})
        if dup_cols:
            raise PrepError(f"{name} line 1: column(s) {dup_cols} appear more than once; fix: "
                            f"keep one of each.")
        unknown = [c for c in cols if c and c not in REQUIRED + OPTIONAL
                   and c not in raters and c not in items]
        if unknown:
            logging.warning("%s: ignoring unknown column(s) %s (known: %s, rater_N, item_N)",
                            name, unknown, ", ".join(REQUIRED + OPTIONAL))
        seen: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row) or row[0].strip().startswith("#"):
                continue
            if len(row) > len(cols):
                problems.append(f"line {line}: {len(row)} fields but the header has "
                                f"{len(cols)}; fix: quote cells that contain commas.")
                continue
            cell = {c: (row[i].strip() if i < len(row) else "") for i, c in enumerate(cols)}
            vid = cell.get("video_id", "")
            if vid and vid in seen:
                problems.append(f"line {line}, column 'video_id': {vid!r} already used on line "
                                f"{seen[vid]}; fix: give every row a unique video_id (e.g. "
                                f"<video>_<phase>).")
                continue
            if vid:
                seen[vid] = line
            spec = _parse_row(cell, line, base, raters, items, modalities, score_scale,
                              problems, name)
            if spec is None:
                continue
            specs.append(spec)
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise PrepError(f"manifest {path!r} has {len(problems)} problem(s):\n  {listed}{more}")
    if not specs:
        raise PrepError(f"manifest {path!r} has no rows; fix: add one row per video.")
    return specs


def _parse_row(cell, line, base, raters, items, modalities, scale, problems,
               name) -> Optional[SampleSpec]:
    n_before = len(problems)
    who = f" (video_id {cell['video_id']!r})" if cell.get("video_id") else ""

    def bad(col, msg):
        problems.append(f"line {line}{who}, column {col!r}: {msg}")

    for col in ("video_id", "video_path", "surgeon_id"):
        if not cell.get(col):
            bad(col, "empty; fix: fill it in.")
    def in_scale(col, v):
        if scale is not None and not scale.contains(v):
            bad(col, f"{v:g} is outside the score scale {scale}; fix: correct the score, or "
                     f"pass the scale it is on ({SCALE_FLAG}).")

    rater_vals = []
    for col in raters:
        if cell[col]:
            v = _number(cell[col])
            if v is None:
                bad(col, f"{cell[col]!r} is not a finite number; fix: write a number or leave "
                         f"it empty.")
            else:
                in_scale(col, v)
                rater_vals.append(v)
    score = None
    if cell.get("score"):
        score = _number(cell["score"])
        if score is None:
            bad("score", f"{cell['score']!r} is not a finite number; fix: write the total score "
                         f"(e.g. 21.5).")
        else:
            in_scale("score", score)
    if rater_vals:
        mean = sum(rater_vals) / len(rater_vals)
        if score is not None and abs(score - mean) > 1e-3:
            bad("score", f"{score:g} differs from the mean of the raters {mean:g}; fix: leave "
                         f"score empty (it is then the raters' mean) or correct it.")
        score = mean
    elif score is None and not cell.get("score"):
        bad("score", "empty and no rater_* scores given; fix: fill in the score.")
    item_vals = []
    for col in items:
        if cell[col]:
            v = _number(cell[col])
            if v is None:
                bad(col, f"{cell[col]!r} is not a number.")
            item_vals.append(v)
    times = {}
    for col in ("start_s", "end_s"):
        if cell.get(col):
            v = _number(cell[col])
            if v is None or v < 0:
                bad(col, f"{cell[col]!r} is not a non-negative number of seconds.")
            times[col] = v
    if times.get("start_s") is not None and times.get("end_s") is not None \
            and times["end_s"] <= times["start_s"]:
        bad("end_s", f"{times['end_s']:g} is not after start_s {times['start_s']:g}.")
    supertrial = 0
    if cell.get("supertrial"):
        st = _number(cell["supertrial"])
        if st is None or st != int(st) or st < 0:
            bad("supertrial", f"{cell['supertrial']!r} is not a non-negative integer.")
        else:
            supertrial = int(st)
    mask_path = None
    if "mask" in modalities:
        if not cell.get("mask_path"):
            bad("mask_path", "empty but masks are being prepared; fix: give the PNG folder or "
                             "mask video, or pass --modalities=rgb,flow to leave masks out.")
        else:
            mask_path = os.path.join(base, cell["mask_path"])
    if len(problems) > n_before:
        return None
    video_path = os.path.join(base, cell["video_path"])
    return SampleSpec(
        video_id=cell["video_id"], video_path=video_path, score=float(score),
        surgeon_id=cell["surgeon_id"], task=cell.get("task", ""), phase=cell.get("phase", ""),
        source_video=cell.get("source_video") or
        os.path.splitext(os.path.basename(cell["video_path"]))[0],
        supertrial=supertrial, item_scores=tuple(item_vals), mask_path=mask_path,
        start_s=times.get("start_s"), end_s=times.get("end_s"), origin=f"{name} line {line}")
