r"""Skill scores of a trained run, and its CSFB modality weights per time step (Fig. 4).

  python -m surgfusion_jax.predict --workdir=runs/rarp --data_dir=data/features \
      [--name=rarp_skill] [--fold=fold_1] [--checkpoint=last|best] [--stage=2] \
      [--output_dir=<workdir>/predictions] [--max_plots=N]

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

import functools
import os
import re
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from surgfusion_jax import errors  # noqa: E402
from surgfusion_jax.data import input_pipeline  # noqa: E402
from surgfusion_jax.evaluation import metrics, plots as plots_lib, tables  # noqa: E402
from surgfusion_jax.io import atomic_write  # noqa: E402
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
            layers.stage_valids(valid)[1:])


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
    score_max = run.config.data.score_max

    # fold name -> the [N] scores and the per-video [T_i, M] weights of each of its seeds
    scores: dict[str, list] = {f.name: [] for f in chosen}
    weights: dict[str, list] = {f.name: [] for f in chosen}
    variables = [runs.restore(run, m.name, "fusion", checkpoint)[0] for m in members]
    preds = runs.evaluate(run, members, variables, "fusion", plan=plan)
    for m, v, pred in zip(members, variables, preds):
        scores[m.fold.name].append(metrics.to_score_units(pred["fused"], score_max))
        per_video: dict[int, np.ndarray] = {}
        for batch in plan:
            inputs, valid = input_pipeline.gather_eval_batch(run.data, batch.idx, batch.length)
            w, vs = jax.device_get(_csfb_weights(run.model, v, inputs, valid))
            for row in range(batch.count):
                keep = np.asarray(vs[stage - 1][row], bool)
                per_video[int(batch.idx[row])] = np.asarray(w[stage - 1][row])[keep]
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save/restore at INFO
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (a run of surgfusion_jax.main)")

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
    app.run(main)
