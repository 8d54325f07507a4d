"""Import features extracted elsewhere into a feature dataset (docs/design.md §1.6).

Many users hold per-segment features made by peers' code (one [segments, D] array per
video and modality, e.g. MAQA's Video Swin + I3D-flow features). This writes the same
TFDS feature dataset as the prep stage from them:

  python -m data_prep.import_features --features_dir=<dir> --labels=labels.csv \
      --layout=pamfn|core|gdlt|flat --name=<dataset> --data_dir=<dir> \
      [--modalities=rgb,flow,mask] [--backbones=rgb:swin3d_b,flow:i3d_flow,mask:swin3d_b] \
      --score_scale=gears|mgears|grs|MIN,MAX \
      [--squeeze=none|mean] [--align=error|trim] [--fps=10] [--segment_length=32]

Labels: a CSV with `video_id, score, surgeon_id` and optionally `task, phase,
source_video, supertrial, rater_*, item_*`, with the same rules and checks as the prep
manifest (`manifest.py`; no video_path needed): the scores must lie on `--score_scale`,
which is stored in the metadata as the prep stage stores it.

Layouts (`<m>` is the modality: rgb, flow or mask):
* `flat`: `<features_dir>/<video_id>_<m>.npy` (or `.npz` / `.pkl`).
* `pamfn` (MAQA/PAMFN, github qinghuannn/PAMFN): per modality either one packed file
  `<anything>_<m>_<anything>.npy` holding a pickled {video_id: array} dict, as PAMFN's
  `datasets.py` reads (`RG_rgb_VST.npy`, `RG_flow_I3D.npy`), or per-video files
  `<video_id>_<m>.npy` as its `tools/extract_features.py` writes them, where RGB is
  named `video` (`<video_id>_video.npy`); `rgb` is accepted too.
* `gdlt` (GDLT, github xuangch/CVPR22_GDLT): `<features_dir>/<m>/<video_id>.npy`, one
  folder per modality; with a single modality the files may sit in `<features_dir>`
  itself (GDLT's `--video-path` folder).
* `core` (CoRe, github yuxumin/CoRe): CoRe keeps per-sample data in pickled dicts keyed
  by sample (`info/*.pkl`) and ships no feature files, so this layout reads one pickled
  dict per modality, `<features_dir>/<m>.pkl` (or the one `*<m>*.pkl`), {key: array};
  tuple keys such as CoRe's `(video, clip)` become `"<video>_<clip>"`.

Reading is safe: arrays load with `allow_pickle=False`; pickles (`.pkl`, and object
`.npy` such as PAMFN's packed dicts) go through the restricted unpickler of
`data_prep.backbones.safe_pickle`, which builds only arrays, numbers, strings, lists and
dicts and refuses anything else without running it.

Checks, all reported together with the file they concern: a missing modality of a video,
arrays that are not [segments, D] (`--squeeze=mean` averages a [segments, crops, D]
array over crops), widths that differ between files, NaN or inf values, and modalities
of one video with different segment counts (`--align=trim` cuts them to the shortest
instead). Features in the labels but not on disk, or on disk but not in the labels, are
named too (the latter only as a warning).

`--backbones` records which backbone made each modality (names only, e.g.
`rgb:swin3d_b`); unrecorded modalities are marked unknown, and training then prints that
the features may not be the paper's (`feature_dataset.backbone_note`).
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import sys
import tempfile
from typing import Any, Optional, Sequence

import numpy as np

from data_prep.backbones import canonical_name
from data_prep.backbones.safe_pickle import load_npy, load_pickle
from data_prep.common import ALL_MODALITIES, FPS, SEGMENT_LENGTH, PrepError, parse_modalities
from data_prep.manifest import read_manifest
from surgfusion_jax import errors
from surgfusion_jax.data.feature_dataset import ScoreScale, parse_score_scale

LAYOUTS = ("pamfn", "core", "gdlt", "flat")
EXTENSIONS = (".npy", ".npz", ".pkl")
PAMFN_TOKENS = {"rgb": ("video", "rgb"), "flow": ("flow",), "mask": ("mask",)}
MAX_LISTED = 20


def read_labels(path: str, score_scale: Optional[ScoreScale] = None):
    """The label rows as SampleSpecs (manifest rules without video_path)."""
    if not os.path.isfile(path):
        raise PrepError(f"labels file {path!r} does not exist; fix: pass --labels=<csv> with "
                        f"columns video_id,score,surgeon_id.")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise PrepError(f"labels file {path!r} is empty; fix: add the header "
                        f"video_id,score,surgeon_id and one row per video.")
    header = [h.strip().lower() for h in rows[0]]
    if "video_path" not in header:
        vid = header.index("video_id") if "video_id" in header else None
        rows = [rows[0] + ["video_path"]] + [
            r + [(r[vid] if vid is not None and vid < len(r) else "") or "-"] if any(
                c.strip() for c in r) else r for r in rows[1:]]
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, os.path.basename(path))
        with open(copy, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)
        try:
            specs = read_manifest(copy, modalities=("rgb",), score_scale=score_scale)
        except PrepError as err:
            raise PrepError(str(err).replace(copy, path)) from None
    return specs


# -- reading one file -------------------------------------------------------------------

def load_any(path: str) -> Any:
    """An array or a dict of arrays from .npy / .npz / .pkl, read safely."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return load_npy(path)
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: np.asarray(z[k]) for k in z.files}
        except ValueError as err:
            raise PrepError(f"{path}: holds pickled objects, which are not read from .npz "
                            f"files ({err}); fix: save plain arrays (numpy.savez).") from err
    if ext == ".pkl":
        return load_pickle(path)
    raise PrepError(f"{path}: unsupported extension {ext!r}; fix: use .npy, .npz or .pkl.")


def _pick(obj: Any, modality: str, path: str) -> Any:
    """The one array a per-video file holds."""
    if isinstance(obj, dict):
        arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
        for key in (modality, "features", "feats", "feature", "arr_0"):
            if key in arrays:
                return arrays[key]
        if len(arrays) == 1:
            return next(iter(arrays.values()))
        raise PrepError(f"{path}: holds several arrays {sorted(map(str, obj))[:6]} and none "
                        f"is named {modality!r} or 'features'; fix: save one array per file.")
    return obj


def _key(k: Any) -> str:
    if isinstance(k, tuple):
        return "_".join(str(p) for p in k)
    if isinstance(k, bytes):
        return k.decode("utf-8", "replace")
    return str(k)


# -- layouts ----------------------------------------------------------------------------

class _Source:
    """Where the features of each (video, modality) come from."""

    def __init__(self, features_dir: str, layout: str, modalities: Sequence[str]):
        if layout not in LAYOUTS:
            raise PrepError(f"--layout={layout!r}: use one of {', '.join(LAYOUTS)}.")
        if not os.path.isdir(features_dir):
            raise PrepError(f"--features_dir={features_dir!r} is not a folder; fix: point it "
                            f"at the folder holding the feature files.")
        self.dir, self.layout, self.modalities = features_dir, layout, tuple(modalities)
        self.packed: dict[str, tuple[str, dict]] = {}
        if layout == "core":
            for m in self.modalities:
                self.packed[m] = self._load_packed(self._core_file(m), m)
        elif layout == "pamfn":
            for m in self.modalities:
                packed = self._pamfn_packed(m)
                if packed:
                    self.packed[m] = self._load_packed(packed, m)

    def _glob(self, pattern: str) -> list[str]:
        return sorted(glob.glob(os.path.join(glob.escape(self.dir), pattern)))

    def _core_file(self, m: str) -> str:
        exact = os.path.join(self.dir, f"{m}.pkl")
        if os.path.isfile(exact):
            return exact
        found = self._glob(f"*{m}*.pkl")
        if len(found) != 1:
            raise PrepError(f"--layout=core: expected {exact} (or exactly one *{m}*.pkl in "
                            f"{self.dir}), found {[os.path.basename(f) for f in found]}; fix: "
                            f"name the {m} feature pickle {m}.pkl.")
        return found[0]

    def _pamfn_packed(self, m: str) -> Optional[str]:
        found = [f for t in PAMFN_TOKENS[m] for f in self._glob(f"*_{t}_*.npy")]
        if len(found) > 1:
            raise PrepError(f"--layout=pamfn: several packed {m} files {found}; fix: keep one "
                            f"per modality in --features_dir.")
        return found[0] if found else None

    def _load_packed(self, path: str, m: str) -> tuple[str, dict]:
        obj = load_any(path)
        if not isinstance(obj, dict):
            raise PrepError(f"{path}: expected a dict {{video_id: array}} of {m} features, "
                            f"found {type(obj).__name__}; fix: use the per-video files of "
                            f"--layout=flat instead.")
        return path, {_key(k): v for k, v in obj.items()}

    def candidates(self, vid: str, m: str) -> list[str]:
        """Files that could hold (vid, m), in order of preference."""
        if self.layout == "flat":
            return [os.path.join(self.dir, f"{vid}_{m}{e}") for e in EXTENSIONS]
        if self.layout == "pamfn":
            return [os.path.join(self.dir, f"{vid}_{t}{e}") for t in PAMFN_TOKENS[m]
                    for e in EXTENSIONS]
        if self.layout == "gdlt":
            sub = os.path.join(self.dir, m)
            base = sub if os.path.isdir(sub) or len(self.modalities) > 1 else self.dir
            return [os.path.join(base, f"{vid}{e}") for e in EXTENSIONS]
        return []

    def get(self, vid: str, m: str) -> tuple[str, Any]:
        """(file label, raw array) or raises KeyError with the expected location."""
        if m in self.packed:
            path, table = self.packed[m]
            if vid not in table:
                raise KeyError(f"{path}: no entry {vid!r} among its {len(table)} videos")
            return f"{path}[{vid!r}]", table[vid]
        cands = self.candidates(vid, m)
        for c in cands:
            if os.path.isfile(c):
                return c, _pick(load_any(c), m, c)
        others = ", ".join(os.path.basename(c) for c in cands[1:])
        shown = f"{cands[0]} (or {others})" if others else cands[0]
        raise KeyError(f"missing file {shown}")

    def on_disk(self) -> set[str]:
        """Video ids the folder holds features for (to warn about unlabelled ones)."""
        ids: set[str] = set()
        for m in self.modalities:
            if m in self.packed:
                ids |= set(self.packed[m][1])
            elif self.layout in ("flat", "pamfn"):
                for t in ((m,) if self.layout == "flat" else PAMFN_TOKENS[m]):
                    for e in EXTENSIONS:
                        ids |= {os.path.basename(p)[: -len(f"_{t}{e}")]
                                for p in self._glob(f"*_{t}{e}")}
            elif self.layout == "gdlt":
                base = os.path.dirname(self.candidates("x", m)[0])
                for e in EXTENSIONS:
                    ids |= {os.path.splitext(os.path.basename(p))[0]
                            for p in glob.glob(os.path.join(glob.escape(base), f"*{e}"))}
        return ids


# -- checks -----------------------------------------------------------------------------

def _as_features(raw: Any, label: str, squeeze: str, problems: list[str]) -> Optional[np.ndarray]:
    try:
        arr = np.asarray(raw)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.dtype.kind not in "fiu":
        problems.append(f"{label}: not a numeric array ({type(raw).__name__}"
                        f"{'' if arr is None else ', dtype ' + str(arr.dtype)}); fix: save "
                        f"float arrays [segments, D].")
        return None
    if arr.ndim == 3 and squeeze == "mean":
        arr = arr.mean(axis=1)
    if arr.ndim == 1 and arr.size:
        problems.append(f"{label}: shape {arr.shape} is one vector, not [segments, D]; fix: "
                        f"save one row per segment (np.atleast_2d if the video has one).")
        return None
    if arr.ndim != 2 or 0 in arr.shape:
        hint = (" (e.g. [segments, crops, D]: pass --squeeze=mean to average the crops)"
                if arr.ndim == 3 else "")
        problems.append(f"{label}: shape {arr.shape}, expected [segments, D]{hint}.")
        return None
    arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = sorted(set(np.nonzero(bad)[0].tolist()))
        problems.append(f"{label}: {int(bad.sum())} NaN/inf value(s) in segment(s) "
                        f"{rows[:5]}{' ...' if len(rows) > 5 else ''}; fix: re-extract that "
                        f"video or drop it from the labels.")
        return None
    return arr


def import_features(features_dir: str, labels: str, layout: str, data_dir: str, name: str, *,
                    modalities: Sequence[str] | str = ALL_MODALITIES,
                    backbones: Any = None, squeeze: str = "none", align: str = "error",
                    fps: float = FPS, segment_length: int = SEGMENT_LENGTH,
                    score_scale: Any = None) -> str:
    """Writes `<data_dir>/<name>` from the features under `features_dir`; returns its path.

    `score_scale` ('gears' | 'mgears' | 'grs' | 'MIN,MAX' | a ScoreScale) is required.

    Raises PrepError listing every problem (nothing is written then).
    """
    from surgfusion_jax.data.feature_dataset import write_feature_dataset

    modalities = parse_modalities(modalities)
    if not name:
        raise PrepError("--name is required (the dataset name).")
    if squeeze not in ("none", "mean") or align not in ("error", "trim"):
        raise PrepError(f"--squeeze must be none|mean and --align error|trim, got {squeeze!r}, "
                        f"{align!r}.")
    scale = parse_score_scale(score_scale)
    declared = _declared_backbones(backbones, modalities)
    specs = read_labels(labels, scale)
    source = _Source(features_dir, layout, modalities)
    problems: list[str] = []
    examples, dims = [], {}
    for spec in specs:
        feats: dict[str, np.ndarray] = {}
        for m in modalities:
            try:
                label, raw = source.get(spec.video_id, m)
            except KeyError as err:
                problems.append(f"video {spec.video_id!r} ({spec.origin}): {m} features: "
                                f"{err.args[0]}; fix: add them, remove the video from the "
                                f"labels, or leave {m} out with --modalities.")
                continue
            arr = _as_features(raw, label, squeeze, problems)
            if arr is None:
                continue
            dims.setdefault(arr.shape[1], label)
            feats[m] = arr
        if len(feats) != len(modalities):
            continue
        lengths = {m: a.shape[0] for m, a in feats.items()}
        if len(set(lengths.values())) > 1:
            if align == "trim":
                n = min(lengths.values())
                feats = {m: a[:n] for m, a in feats.items()}
            else:
                problems.append(f"video {spec.video_id!r}: modalities have different segment "
                                f"counts {lengths}; fix: re-extract them on one segment grid, "
                                f"or pass --align=trim to cut all to the shortest.")
                continue
        examples.append(dict(spec.label_fields(), **feats))
    if len(dims) > 1:
        shown = "; ".join(f"{d} in {label}" for d, label in list(dims.items())[:3])
        problems.append(f"features of different widths ({shown}); one dataset holds one "
                        f"width (docs/design.md §1.6); fix: import the modalities of one "
                        f"width, or re-extract.")
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        extra = len(problems) - MAX_LISTED
        more = f"\n  ... and {extra} more" if extra > 0 else ""
        raise PrepError(f"cannot import {features_dir!r} ({len(problems)} problem(s); nothing "
                        f"written):\n  {listed}{more}")
    unlabelled = sorted(source.on_disk() - {s.video_id for s in specs})
    if unlabelled:
        logging.warning("%d video(s) in %s have features but no label and are left out: %s",
                        len(unlabelled), features_dir, unlabelled[:10])
    metadata = dict(
        backbone=",".join(f"{m}:{declared[m]['name']}" for m in modalities),
        backbones=declared, fps=float(fps), segment_length=int(segment_length),
        modalities=list(modalities), source="imported", layout=layout,
        features_dir=os.path.abspath(features_dir), labels=os.path.abspath(labels),
        squeeze=squeeze, align=align, **scale.metadata(), failed=[])
    return write_feature_dataset(data_dir, name, examples, metadata, feature_dim=next(iter(dims)))


def _declared_backbones(value: Any, modalities: Sequence[str]) -> dict[str, dict]:
    """--backbones=rgb:swin3d_b,flow:i3d_flow (names only) -> per-modality records."""
    out = {m: {"name": "unknown", "imported": True} for m in modalities}
    if not value:
        return out
    for part in (p.strip() for p in str(value).split(",") if p.strip()):
        if ":" not in part:
            raise PrepError(f"--backbones: {part!r} lacks the modality; fix: write "
                            f"<modality>:<backbone>, e.g. rgb:swin3d_b.")
        m, name = (s.strip() for s in part.split(":", 1))
        if m not in modalities:
            raise PrepError(f"--backbones: {m!r} is not among the imported modalities "
                            f"{list(modalities)}.")
        out[m] = {"name": canonical_name(name.split("=")[0]), "imported": True}
    return out


def _define_flags(flags) -> None:
    flags.DEFINE_string("features_dir", None, "folder holding the feature files")
    flags.DEFINE_string("labels", None, "CSV with video_id,score,surgeon_id[,task,phase,...]")
    flags.DEFINE_enum("layout", None, list(LAYOUTS), "how the files are named (see --help)")
    flags.DEFINE_string("data_dir", None, "where the feature dataset is written")
    flags.DEFINE_string("name", None, "dataset name")
    flags.DEFINE_string("modalities", ",".join(ALL_MODALITIES), "subset of rgb,flow,mask")
    flags.DEFINE_string("backbones", None, "which backbone made each modality, e.g. "
                        "rgb:swin3d_b,flow:i3d_flow,mask:swin3d_b (recorded in the metadata)")
    flags.DEFINE_enum("squeeze", "none", ["none", "mean"],
                      "mean: average [T, crops, D] over crops")
    flags.DEFINE_enum("align", "error", ["error", "trim"], "unequal segment counts: error or trim")
    flags.DEFINE_float("fps", FPS, "frame rate the features were extracted at")
    flags.DEFINE_integer("segment_length", SEGMENT_LENGTH, "frames per feature vector")
    flags.DEFINE_string("score_scale", None, "scale of the labels' scores (required): gears, "
                        "mgears or grs (6-30), or MIN,MAX")


def main(argv) -> None:
    from absl import flags
    f = flags.FLAGS
    try:
        if len(argv) > 1:
            raise PrepError(f"unexpected arguments {argv[1:]}; flags look like --name=value.")
        missing = [n for n in ("features_dir", "labels", "layout", "data_dir", "name",
                               "score_scale") if not getattr(f, n)]
        if missing:
            raise PrepError(f"missing flag(s) {', '.join('--' + n for n in missing)}; see "
                            f"`python -m data_prep.import_features --help`.")
        path = import_features(f.features_dir, f.labels, f.layout, f.data_dir, f.name,
                               modalities=f.modalities, backbones=f.backbones,
                               squeeze=f.squeeze, align=f.align, fps=f.fps,
                               segment_length=f.segment_length, score_scale=f.score_scale)
    except errors.UserError as e:
        sys.exit(errors.report(e))
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}; fix: check the paths and that "
              f"--data_dir is writable.", file=sys.stderr)
        sys.exit(2)
    import json

    from surgfusion_jax.data.feature_dataset import backbone_note
    with open(os.path.join(path, "surgfusion_metadata.json")) as fh:
        meta = json.load(fh)
    print(f"imported dataset {f.name!r} to {path}")
    note = backbone_note(meta, f.name)
    if note:
        print(note)


if __name__ == "__main__":
    from absl import app, flags as absl_flags
    _define_flags(absl_flags)
    app.run(main)
