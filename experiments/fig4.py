r"""Fig. 4: CSFB attention over modalities along one video, with RGB / flow / mask thumbnails.

  python -m experiments.fig4 --data_dir=data/features --workdir=runs/experiments \
      [--datasets=rah] [--video_id=<id>] [--stage=2] [--checkpoint=last|best] \
      [--times=10,60,120,200] [--num_thumbnails=4] \
      [--manifest=<prep CSV> | --jigsaws_root=<dir> [--mask_root=<dir>]] \
      [--dataset=synthskill] [--from_checkpoints] [--config.fusion.num_epochs=300 ...]

The full model (three modalities, CSFB + DFB, DRA, 2 heads) of one dataset column
(default RAH-skill 4-fold, as in the paper; `--datasets=<one of kt,np,su,rah,rarp>`,
JIGSAWS under LOUO; SynthSkill 4-fold with --dataset=synthskill) is trained (or reused:
it is the run of Tables II-V under the same --workdir; --from_checkpoints only reads
it). The video (default: the longest test video of the first fold) is scored by the fold
model that has it in its test set, from that fold's fusion checkpoint (`--checkpoint`:
'last' = final epoch, default; 'best' = the paper's test-selected epoch). The curves are
the CSFB weights of fusion stage `--stage` (`surgfusion.csfb_modality_weights`; one step
of stage s spans 2^s feature segments). Thumbnails (RGB frame, Farneback flow, mask; see
experiments.thumbnails) are drawn at `--times` (seconds; default `--num_thumbnails`
evenly spaced steps) when the source files are reachable through --manifest /
--jigsaws_root (a config with a `synthskill` block, e.g. configs/demo.py, points to its
rendered SynthSkill manifest by itself); otherwise the figure has the curves only and the
output says so.

Writes `<workdir>/fig4.png`, `fig4.csv` (step, time, weight per modality, thumbnail
label) and `fig4_provenance.json` (run, fold, checkpoint epoch, thumbnail source or why
there is none, git commit, config).
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

import functools
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import cli, outputs, runner, spec, thumbnails
from surgfusion_jax.evaluation import plots, tables
from surgfusion_jax.io import atomic_write, write_json
from surgfusion_jax.models import layers, surgfusion
from surgfusion_jax.training import cross_validation, runs

NAME = "fig4"


def pick_steps(num_steps: int, seconds_per_step: float, times: Sequence[float] = (),
               count: int = 4) -> list[int]:
    """Time steps for thumbnails: those holding `times` (s), else `count` evenly spaced."""
    if times:
        steps = [min(max(int(t // seconds_per_step), 0), num_steps - 1) for t in times]
    else:
        steps = [int((i + 0.5) * num_steps / count) for i in range(min(count, num_steps))]
    return sorted(set(steps))


@functools.lru_cache(maxsize=8)
def _weights_fn(model: Any):
    """Jitted CSFB weights of `model` (one compile per model and input length)."""
    return jax.jit(functools.partial(surgfusion.csfb_modality_weights, model))


def stage_weights(model: Any, variables: Any, sample: dict, stage: int) -> np.ndarray:
    """CSFB weights [T_stage, M] of one (unpadded) video at fusion stage `stage`."""
    inputs = {m: jnp.asarray(sample[m][None], jnp.float32) for m in model.modalities}
    valid = jnp.ones((1, int(sample["num_segments"])), bool)
    weights = np.asarray(_weights_fn(model)(variables, inputs, valid)[stage - 1][0])
    keep = np.asarray(layers.stage_valids(valid, model.pool_odd_step)[stage][0], bool)
    return weights[keep]


def run(options: spec.Options, *, video_id: str | None = None, stage: int = 2,
        checkpoint: str = "last", times: Sequence[float] = (), num_thumbnails: int = 4,
        manifest: str | None = None, jigsaws_root: str | None = None,
        mask_root: str | None = None) -> dict[str, str]:
    if stage not in (1, 2, 3) or checkpoint not in ("last", "best"):
        raise spec.ExperimentError(f"--stage must be 1-3 (got {stage}) and --checkpoint "
                                     f"'last' or 'best' (got {checkpoint!r}).")
    spec.select("variants", options.variants, ())
    keys = spec.select("datasets", options.datasets, tuple(spec.TARGETS))
    if len(options.datasets) > 1:
        raise spec.ExperimentError(f"--datasets: fig4 shows one dataset, got {keys}.")
    target = spec.TARGETS[keys[0] if options.datasets else "rah"]
    run_spec = spec.Run(options.data_key(target), spec.ABLATION_SCHEMES[target.key])
    workdir = os.path.join(options.workdir, run_spec.name)
    if not options.from_checkpoints:  # train the run, or reuse it when finished
        runner.fold_records(run_spec, options)
    try:
        run_data = runs.load_run(workdir, options.data_dir)
    except runs.MissingRunError as e:
        raise runs.MissingRunError(f"{e} (run fig4 without --from_checkpoints)") from None
    config, dataset = run_data.config, run_data.dataset
    folds = [f for _, f in run_data.selected_folds()]
    provenance = {run_spec.name: outputs.run_provenance(
        workdir, cross_validation.run_config_dict(config), [f.name for f in folds])}
    by_id = {s["video_id"]: s for s in dataset.samples}
    if video_id is None:
        video_id = max(sorted(folds[0].test), key=lambda v: int(by_id[v]["num_segments"]))
    fold = next((f for f in folds if video_id in f.test), None)
    if fold is None:
        raise spec.ExperimentError(f"--video_id={video_id!r} is in no test fold of run "
                                     f"{run_spec.name}; choose one of {sorted(by_id)[:8]}...")
    try:
        member = next(m for m in run_data.members() if m.fold.name == fold.name)  # 1st seed
        variables, meta = runs.restore(run_data, member.name, "fusion", checkpoint)
    except runs.MissingRunError as e:
        raise runs.MissingRunError(f"{e} (run fig4 without --from_checkpoints)") from None
    sample = by_id[video_id]
    weights = stage_weights(run_data.model, variables, sample, stage)
    md = dataset.metadata
    seconds = float(md["segment_length"]) / float(md["fps"]) * 2 ** stage
    steps = pick_steps(len(weights), seconds, times, num_thumbnails)
    if manifest is None and "synthskill" in config:  # e.g. configs/demo.py
        guess = os.path.join(config.synthskill.out_dir, "manifest.csv")
        manifest = guess if os.path.exists(guess) else None
    try:
        specs = thumbnails.find_specs(md, manifest=manifest, jigsaws_root=jigsaws_root,
                                      jigsaws_task=str(sample.get("task") or "") or None,
                                      mask_root=mask_root)
        if video_id not in specs:
            raise thumbnails.ThumbnailError(f"{video_id} is not in the prep inputs")
        thumbs = thumbnails.thumbnails(specs[video_id], steps, stage, md,
                                       int(sample["num_segments"]))
        source, reason = specs[video_id].video_path, None
    except thumbnails.ThumbnailError as e:
        thumbs, source, reason = None, None, f"no thumbnails: {e}"
        print(f"fig4: {reason}; plotting the curves only.", file=sys.stderr)
    title = (f"{video_id} (score {float(sample['score']):g}): CSFB stage {stage} weights, "
             f"{fold.name} {checkpoint} checkpoint (epoch {meta['epoch']})")
    modalities = list(config.data.modalities)
    paths = {"png": os.path.join(options.workdir, f"{NAME}.png"),
             "csv": os.path.join(options.workdir, f"{NAME}.csv"),
             "provenance": os.path.join(options.workdir, f"{NAME}_provenance.json")}
    plots.plot_modality_weights(weights, modalities, paths["png"], seconds_per_step=seconds,
                                    title=title if thumbs else f"{title}\n(curves only: source "
                                    "video not found, see fig4_provenance.json)",
                                    thumbnails=thumbs or None)
    label = {t: f"T{i + 1}" for i, t in enumerate(steps)} if thumbs else {}
    rows = [{"step": t, "time_s": t * seconds, **dict(zip(modalities, map(float, w))),
             "thumbnail": label.get(t, "")} for t, w in enumerate(weights)]
    atomic_write(paths["csv"], tables.csv_table(rows))
    record = {"experiment": NAME, "git_commit": outputs.git_commit(),
              "argv": list(options.argv) or sys.argv, "dataset": options.dataset,
              "from_checkpoints": options.from_checkpoints, "video_id": video_id,
              "fold": fold.name, "checkpoint": checkpoint, "epoch": meta["epoch"],
              "stage": stage, "seconds_per_step": seconds, "thumbnail_steps": steps,
              "thumbnail_source": source, "thumbnail_note": reason, "runs": provenance}
    write_json(paths["provenance"], record, sort_keys=True)
    return paths


if __name__ == "__main__":
    cli.define_flags()
    flags.DEFINE_string("video_id", None, "Video to show (default: longest of fold 1's test).")
    flags.DEFINE_integer("stage", 2, "Fusion stage (1-3) whose CSFB weights are drawn.")
    flags.DEFINE_enum("checkpoint", "last", ["last", "best"], "Fusion checkpoint to use.")
    flags.DEFINE_list("times", [], "Thumbnail times in seconds (default: evenly spaced).")
    flags.DEFINE_integer("num_thumbnails", 4, "Thumbnails when --times is not given.")
    flags.DEFINE_string("manifest", None, "CSV manifest the features were prepared from.")
    flags.DEFINE_string("jigsaws_root", None, "JIGSAWS root the features were prepared from.")
    flags.DEFINE_string("mask_root", None, "JIGSAWS mask folder (default <root>/<Task>/masks).")
    F = flags.FLAGS
    app.run(cli.main_for(lambda options: run(
        options, video_id=F.video_id, stage=F.stage, checkpoint=F.checkpoint,
        times=[float(t) for t in F.times], num_thumbnails=F.num_thumbnails,
        manifest=F.manifest, jigsaws_root=F.jigsaws_root, mask_root=F.mask_root)))
