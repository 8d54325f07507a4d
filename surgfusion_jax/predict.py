r"""Skill scores of a trained run, and its CSFB modality weights per time step (Fig. 4).

  python -m surgfusion_jax.predict --workdir=runs/rarp --data_dir=data/features \
      [--name=rarp_skill] [--fold=fold_1] [--checkpoint=last|best] [--stage=2] \
      [--output_dir=<workdir>/predictions] [--max_plots=N]
  python -m surgfusion_jax.predict --workdir=runs/rarp --video=case.mp4 \
      [--masks=<PNG folder or mask video>] [--start_s=.. --end_s=..] [--report=case.html] \
      [--backbones=rgb:swin3d_b=<path>,...]

From a video (`--video`): the installed video featurizer (entry point group
`surgfusion_jax.video_featurizers`, `load_featurizer`; the prep stage registers it, so
this library never imports `data_prep`) prepares the file with the run's own prep
settings (`<workdir>/dataset_metadata.json`), every fold's model scores it, and a
self-contained HTML report shows the ensemble score on the dataset's scale, the per-fold
predictions and the CSFB modality weights over time with RGB / flow / mask thumbnails
(`evaluation.report_html`).

Which model predicts a video:
  * a video in a test fold of the run (its video_id is in `<workdir>/splits.json`) is
    predicted by that fold's model: the out-of-fold prediction of the evaluation;
  * any other video (new data) by the mean of all folds' models: their scores, and
    their CSFB weights, are averaged;
  * `--fold=<name or 1-based number>` uses that one fold's model for every video.
A run trained with several seeds (`config.num_seeds`) averages each fold's seeds too.
`--checkpoint` picks the fusion phase's 'last' epoch (default, the unbiased protocol) or
its 'best' test-fold epoch (the paper protocol).

Prints one line per video (predicted score in score units, the dataset's score, the
models used) and writes `predictions.csv` and one `csfb_<video_id>.png` per video: the
per-time-step CSFB attention over modalities of fusion stage `--stage` (Fig. 4 shows
stage 2; one step there spans 4 segments). Exit status 2 on a missing dataset, run or
checkpoint (the message names the fix).
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

import functools
import os
import re
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from surgfusion_jax import errors  # noqa: E402
from surgfusion_jax.data import feature_dataset, input_pipeline, splits  # noqa: E402
from surgfusion_jax.evaluation import metrics, plots as plots_lib, report_html, tables  # noqa: E402
from surgfusion_jax.io import atomic_write, read_json  # noqa: E402
from surgfusion_jax.models import layers, surgfusion  # noqa: E402
from surgfusion_jax.training import runs  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this
    module, as `main` does, adds nothing to another program's flags)."""
    flags.DEFINE_string("workdir", None, "Workdir of a finished `surgfusion_jax.main` run.")
    flags.DEFINE_string("data_dir", None, "Feature datasets folder (default: the run's).")
    flags.DEFINE_string("name", None, "Feature dataset name (default: the run's).")
    flags.DEFINE_string("fold", None, "Use only this fold's model (name or 1-based number).")
    flags.DEFINE_enum("checkpoint", "last", ["last", "best"], "Fusion checkpoint to use.")
    flags.DEFINE_integer("stage", 2, "Fusion stage (1-3) whose CSFB weights are plotted.")
    flags.DEFINE_string("output_dir", None, "Output folder (default: <workdir>/predictions).")
    flags.DEFINE_bool("plots", True, "Write the CSFB weight plots.")
    flags.DEFINE_integer("max_plots", None, "Plot at most this many videos, spread over the "
                         "score range (default: every video).")
    flags.DEFINE_string("video", None, "Score this video file instead of a feature dataset "
                        "(prepared with the run's own prep settings; writes an HTML report).")
    flags.DEFINE_string("masks", None, "With --video: its tool masks (PNG folder or mask video).")
    flags.DEFINE_float("start_s", None, "With --video: start of the time range (s).")
    flags.DEFINE_float("end_s", None, "With --video: end of the time range (s).")
    flags.DEFINE_string("backbones", None, "With --video: where the run's backbone files are "
                        "on this machine, e.g. rgb:swin3d_b=/w/swin.pth (or $"
                        "SURGFUSION_BACKBONES_DIR).")
    flags.DEFINE_string("report", None, "With --video: HTML report path (default: "
                        "<output_dir>/<video name>_report.html).")


class PredictError(errors.UserError, ValueError):
    """The run or the request cannot be served; the message names the fix."""


def _pick_fold(folds: Sequence[Any], fold: str) -> Any:
    for k, f in enumerate(folds):
        if fold in (f.name, str(k + 1)):
            return f
    raise PredictError(f"--fold={fold!r} is not a fold of this run; choose one of "
                       f"{[f.name for f in folds]} or 1..{len(folds)}.")


def _videos_to_plot(scores: Sequence[float], max_plots: int | None) -> set[int]:
    """Indices of all videos, or of `max_plots` evenly spaced in score order."""
    if max_plots is None or max_plots >= len(scores):
        return set(range(len(scores)))
    order = np.argsort(np.asarray(scores), kind="stable")
    picks = np.linspace(0, len(order) - 1, max(int(max_plots), 0)).round().astype(int)
    return {int(order[k]) for k in picks}


@functools.partial(jax.jit, static_argnums=0)
def _csfb_weights(model, variables, inputs, valid):
    """CSFB weights per fusion stage ([B, T_i, M]) and the stage validity masks."""
    return (surgfusion.csfb_modality_weights(model, variables, inputs, valid),
            layers.stage_valids(valid, model.pool_odd_step)[1:])


def _score_members(run: runs.RunData, members: Sequence[runs.MemberSpec],
                   plan: Sequence[input_pipeline.EvalBatch], checkpoint: str, stage: int):
    """Per member: (member, [N] scores in score units, {video index: [T_i, M] stage
    `stage` CSFB weights}) of the videos of `plan`, from its fusion `checkpoint`."""
    score_max = run.config.data.score_max
    target_max = run.config.data.get("target_max", 0.5)
    variables = [runs.restore(run, m.name, "fusion", checkpoint)[0] for m in members]
    preds = runs.evaluate(run, members, variables, "fusion", plan=plan)
    for m, v, pred in zip(members, variables, preds):
        per_video: dict[int, np.ndarray] = {}
        for batch in plan:
            inputs, valid = input_pipeline.gather_eval_batch(run.data, batch.idx, batch.length)
            w, vs = jax.device_get(_csfb_weights(run.model, v, inputs, valid))
            for row in range(batch.count):
                keep = np.asarray(vs[stage - 1][row], bool)
                per_video[int(batch.idx[row])] = np.asarray(w[stage - 1][row])[keep]
        yield m, metrics.to_score_units(pred["fused"], score_max, target_max), per_video


def predict(workdir: str | None = None, data_dir: str | None = None, name: str | None = None,
            fold: str | None = None, checkpoint: str = "last", stage: int = 2,
            output_dir: str | None = None, plots: bool = True,
            max_plots: int | None = None, run: runs.RunData | None = None
            ) -> list[dict[str, Any]]:
    """Predicts every video of the dataset; returns one row per video (see module doc).

    `run`: the run's data already in memory (as `main` holds it after training); else
    it is loaded from `workdir` (`data_dir` / `name`: a moved or another feature dataset).
    With `plots`, writes the CSFB weight plot of every video, or of `max_plots` videos
    spread evenly over the dataset's score range (lowest and highest included)."""
    if stage not in (1, 2, 3):
        raise PredictError(f"--stage must be 1, 2 or 3, got {stage}.")
    if checkpoint not in ("last", "best"):
        raise PredictError(f"--checkpoint must be 'last' or 'best', got {checkpoint!r}.")
    if run is None:
        if not workdir:
            raise PredictError("--workdir is required (a run of surgfusion_jax.main).")
        run = runs.load_run(workdir, data_dir, name)
    samples, modalities = run.samples, list(run.modalities)
    chosen = [_pick_fold(run.folds, fold)] if fold else list(run.folds)
    members = [m for m in run.members() if m.fold.name in {f.name for f in chosen}]
    test_fold = {v: f.name for f in run.folds for v in f.test}
    indices = np.arange(len(samples))
    lengths = [int(s["num_segments"]) for s in samples]
    plan = input_pipeline.make_eval_plan(lengths, indices, run.config.eval_batch_size,
                                         run.config.min_bucket)
    # fold name -> the [N] scores and the per-video [T_i, M] weights of each of its seeds
    scores: dict[str, list] = {f.name: [] for f in chosen}
    weights: dict[str, list] = {f.name: [] for f in chosen}
    for m, score, per_video in _score_members(run, members, plan, checkpoint, stage):
        scores[m.fold.name].append(score)
        weights[m.fold.name].append([per_video[i] for i in indices])

    rows = []
    metadata = run.dataset.metadata
    seconds = (float(metadata["segment_length"]) / float(metadata["fps"]) * 2 ** stage)
    output_dir = output_dir or os.path.join(run.workdir, "predictions")
    plotted = _videos_to_plot([float(s["score"]) for s in samples], max_plots) if plots else set()
    for i, s in enumerate(samples):
        vid = s["video_id"]
        used = [test_fold[vid]] if not fold and vid in test_fold else [f.name for f in chosen]
        row = {"video_id": vid, "predicted_score": float(np.mean(
                   [seed_scores[i] for u in used for seed_scores in scores[u]])),
               "dataset_score": float(s["score"]),
               "models": used[0] if len(used) == 1 else f"mean of {len(used)} folds"}
        rows.append(row)
        if i in plotted:
            w = np.mean([seed_weights[i] for u in used for seed_weights in weights[u]], axis=0)
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", vid)
            plots_lib.plot_modality_weights(
                w, modalities, os.path.join(output_dir, f"csfb_{safe}.png"),
                seconds_per_step=seconds,
                title=f"{vid}: CSFB stage {stage} weights (predicted {row['predicted_score']:.2f})")
    atomic_write(os.path.join(output_dir, "predictions.csv"), tables.csv_table(rows))
    return rows


FEATURIZERS = "surgfusion_jax.video_featurizers"


def load_featurizer(name: str = "default") -> Any:
    """The video featurizer registered under entry point `name` of group `FEATURIZERS`
    (the prep stage registers `data_prep.single_video:featurize`, docs/design.md §1.9)."""
    from importlib import metadata as importlib_metadata

    found = [ep for ep in importlib_metadata.entry_points(group=FEATURIZERS) if ep.name == name]
    fix = ("fix: install the prep stage with the library (`pip install -e .` in the "
           "surgfusion-jax checkout), which registers data_prep.single_video:featurize")
    if not found:
        raise PredictError(f"no video featurizer {name!r} is installed (entry point group "
                           f"{FEATURIZERS!r}); {fix}.")
    try:
        return found[0].load()
    except ImportError as e:
        raise PredictError(f"the video featurizer {found[0].value!r} cannot be imported "
                           f"({e}); {fix}.") from None


def _run_metadata(workdir: str, config: Any) -> dict[str, Any]:
    """The prep settings of the run's features: `<workdir>/dataset_metadata.json`, or for
    runs older than that file, the metadata of the run's dataset."""
    path = os.path.join(workdir, runs.FEATURES_FILE)
    if os.path.exists(path):
        return read_json(path)
    return feature_dataset.load_feature_dataset(config.data.data_dir,
                                                config.data.name).metadata


def _pick_steps(available: Sequence[int], num_steps: int, count: int) -> list[int]:
    """`count` evenly spaced time steps (the middles of `count` equal parts, as in
    experiments/fig4.pick_steps; every step when there are fewer) that have images."""
    count = min(count, num_steps)
    wanted = {int((i + 0.5) * num_steps / count) for i in range(count)}
    return sorted(wanted & set(available))


def predict_video(workdir: str, video: str, *, masks: str | None = None,
                  start_s: float | None = None, end_s: float | None = None,
                  checkpoint: str = "last", stage: int = 2, backbones: str | None = None,
                  report: str | None = None, output_dir: str | None = None,
                  num_thumbnails: int = 4, featurizer: Any = None) -> dict[str, Any]:
    """Scores one video file with the fold ensemble of the run in `workdir`.

    The video is prepared with the run's own prep settings by the installed featurizer
    (`load_featurizer`; `featurizer` overrides it), every fold's fusion `checkpoint`
    scores it (a fold's seeds are averaged; the score is the mean over folds), and an HTML
    report is written (`report_html.write_report`). Returns {'score', 'folds', 'spread',
    'weights', 'num_segments', 'report'}.
    """
    if stage not in (1, 2, 3):
        raise PredictError(f"--stage must be 1, 2 or 3, got {stage}.")
    if checkpoint not in ("last", "best"):
        raise PredictError(f"--checkpoint must be 'last' or 'best', got {checkpoint!r}.")
    config = runs.load_config(workdir)
    # Member names do not depend on the inner validation split, which would need the
    # training samples; this run scores the one video only.
    config.cv.inner_val_fraction = 0.0
    metadata = _run_metadata(workdir, config)
    modalities = list(config.data.modalities)
    if "mask" in modalities and not masks:
        raise PredictError(f"the run in {workdir} uses tool masks (modalities {modalities}); "
                           f"fix: pass --masks=<folder of per-frame PNGs or a mask video> for "
                           f"{video}.")
    featurize = featurizer or load_featurizer()
    prepared = featurize(video, metadata=metadata, modalities=modalities, masks=masks,
                         start_s=start_s, end_s=end_s, backbones=backbones,
                         thumbnail_stride=2 ** stage)
    video_id = os.path.basename(video)
    sample = dict(video_id=video_id, score=0.0, num_segments=prepared["num_segments"],
                  **prepared["features"])
    # The run's dataset, holding the one video (its metadata: the run's prep settings).
    dataset = feature_dataset.FeatureDataset(config.data.name, os.path.join(
        workdir, runs.FEATURES_FILE), [sample], dict(metadata))
    config.data.score_max = feature_dataset.resolve_score_max(dataset, config.data.score_max)
    folds = splits.load_splits(os.path.join(workdir, "splits.json"))
    run = runs.prepare(config, workdir, dataset, folds)
    plan = input_pipeline.make_eval_plan([sample["num_segments"]], np.arange(1),
                                         config.eval_batch_size, config.min_bucket)
    by_fold: dict[str, list] = {}
    weights = []
    for m, score, per_video in _score_members(run, run.members(), plan, checkpoint, stage):
        by_fold.setdefault(m.fold.name, []).append(float(score[0]))
        weights.append(per_video[0])
    folds_out = [{"fold": f, "prediction": float(np.mean(v)), "seeds": len(v)}
                 for f, v in by_fold.items()]
    fold_preds = np.asarray([f["prediction"] for f in folds_out])
    weights = np.mean(weights, axis=0)
    seconds = float(metadata["segment_length"]) / float(metadata["fps"]) * 2 ** stage
    thumbs = dict(prepared["thumbnails"])
    steps = _pick_steps(list(thumbs), len(weights), num_thumbnails)
    output_dir = output_dir or os.path.join(workdir, "predictions")
    report = report or os.path.join(output_dir, f"{os.path.splitext(video_id)[0]}_report.html")
    records = feature_dataset.modality_backbones(metadata)
    span = (f"{start_s or 0:g}–{end_s:g} s" if end_s is not None else
            f"from {start_s:g} s" if start_s else "whole video")
    details = {"video": video, "time range": span, "masks": masks or "none",
               "segments (3.2 s each)": prepared["num_segments"],
               "frames at 10 FPS": prepared["num_frames"],
               "run": workdir, "checkpoint": f"fusion '{checkpoint}' of every fold",
               "modalities": ", ".join(modalities),
               "prep": f"{float(metadata['fps']):g} FPS, {metadata.get('image_size')} px, "
                       f"flow bound {metadata.get('flow_bound')} px",
               **{f"{m} backbone": r.get("name") for m, r in records.items() if m in modalities}}
    lo, hi = metadata.get("score_min", 0.0), metadata.get("score_max", config.data.score_max)
    report_html.write_report(
        report, title=f"Skill score: {video_id}", score=float(fold_preds.mean()),
        score_range=(float(lo), float(hi)), folds=folds_out, weights=weights,
        modalities=modalities, seconds_per_step=seconds, stage=stage,
        thumbnails=[(t, thumbs[t]) for t in steps], details=details,
        note=feature_dataset.backbone_note(metadata))
    return {"score": float(fold_preds.mean()), "spread": float(fold_preds.std()),
            "folds": folds_out, "weights": weights, "num_segments": prepared["num_segments"],
            "report": report}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save/restore at INFO
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (a run of surgfusion_jax.main)")

    if FLAGS.video:
        try:
            out = predict_video(FLAGS.workdir, FLAGS.video, masks=FLAGS.masks,
                                start_s=FLAGS.start_s, end_s=FLAGS.end_s,
                                checkpoint=FLAGS.checkpoint, stage=FLAGS.stage,
                                backbones=FLAGS.backbones, report=FLAGS.report,
                                output_dir=FLAGS.output_dir)
        except errors.UserError as e:
            return errors.report(e)
        print(f"{os.path.basename(FLAGS.video)}\t{out['score']:.3f}\t(mean of "
              f"{len(out['folds'])} folds, std {out['spread']:.3f}: "
              + ", ".join(f"{f['fold']} {f['prediction']:.2f}" for f in out["folds"]) + ")")
        print(f"wrote {out['report']}")
        return 0
    try:
        rows = predict(FLAGS.workdir, FLAGS.data_dir, FLAGS.name, FLAGS.fold, FLAGS.checkpoint,
                       FLAGS.stage, FLAGS.output_dir, FLAGS.plots, FLAGS.max_plots)
    except errors.UserError as e:
        return errors.report(e)
    for r in rows:
        print(f"{r['video_id']}\t{r['predicted_score']:.3f}\t(dataset score "
              f"{r['dataset_score']:.2f}; {r['models']})")
    out = FLAGS.output_dir or os.path.join(FLAGS.workdir, "predictions")
    print(f"wrote {os.path.join(out, 'predictions.csv')}"
          + (" and csfb_<video_id>.png plots" if FLAGS.plots else ""))
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=errors.parse_flags)
