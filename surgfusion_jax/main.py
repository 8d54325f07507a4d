r"""Trains and evaluates SurgFusion-Net under cross-validation (both phases).

  python -m surgfusion_jax.main --config=configs/rarp.py \
      --config.fusion.num_epochs=5 --config.workdir=/tmp/run

`--config=configs/rarp.py:small` is a quick check with a tiny model. Re-running the same
command resumes a killed run from its checkpoints. Results: `<workdir>/results.json`
and `results.md`; TensorBoard scalars under `<workdir>/tensorboard`.

Exit status (`errors`): 0 done, 2 missing/broken dataset, bad flag, config or splits,
unreadable checkpoint or full disk (one line that names the fix), 3 stopped early by `--config.debug.stop_after_epochs` (re-run to
resume). A config with a `synthskill` block (configs/demo.py) trains on features made by
`python -m data_prep.synthskill_setup` first (`make demo` runs both).
"""

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow only reads the datasets here; this also silences its oneDNN banner on stderr.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import shlex  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from surgfusion_jax import errors  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/rarp.py (configs/<name>.py:small "
    "for a quick check).", lock_config=True)


def run(config) -> int:
    """Runs the cross-validation of `config`; returns the process exit status."""
    # Imported here, not at the top: a flag mistake is answered before JAX and TF load.
    import jax
    from surgfusion_jax import predict
    from surgfusion_jax.data import feature_dataset
    from surgfusion_jax.evaluation import plots as plots_lib, tables
    from surgfusion_jax.training import checkpoints, cross_validation

    workdir = cross_validation.resolve_workdir(config)
    if config.get("compilation_cache_dir"):
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    try:
        results, run_data = cross_validation.run_cross_validation(config)
        plots = plots_lib.plot_run(workdir, results)
        if "fused" in results["summary"]:  # Fig. 4-style CSFB weights of every video
            predict.predict(run=run_data, output_dir=os.path.join(workdir, "plots", "csfb"),
                            max_plots=config.csfb_plots or None)
    except feature_dataset.DatasetError as e:
        hint = ""
        if "synthskill" in config:  # e.g. configs/demo.py: the prep step comes first
            hint = ("make the SynthSkill features first: python -m data_prep.synthskill_setup "
                    "--config=<this config file> (`make demo` runs both steps)")
        return errors.report(e, hint=hint)
    except checkpoints.CheckpointError as e:
        e.command = shlex.join(["python", "-m", "surgfusion_jax.main", *sys.argv[1:]])
        return errors.report(e)
    except errors.UserError as e:
        return errors.report(e)
    print(tables.run_table(results))
    print(f"\nresults table : {os.path.join(workdir, 'results.md')} (and results.json)")
    print(f"plots         : {', '.join(plots)}")
    if "fused" in results["summary"]:
        print(f"modality curves: {os.path.join(workdir, 'plots', 'csfb')}/csfb_<video>.png "
              "(Fig. 4 style, videos across the score range) and predictions.csv")
    member = "seed_<s>/<fold>" if config.num_seeds > 1 else "<fold>"
    print(f"checkpoints   : {os.path.join(workdir, 'checkpoints')}/{member}/<phase>/(best|last)")
    note = feature_dataset.backbone_note(run_data.dataset.metadata, config.data.name)
    if note:
        print(note)
    return errors.EXIT_OK


def main(argv):
    if len(argv) > 1:
        return errors.report(errors.FlagError(
            f"unexpected arguments {argv[1:]}; every setting is a flag, e.g. "
            "--config.workdir=runs/x"))
    logging.set_verbosity(logging.WARNING)  # orbax logs every save/restore at INFO
    if FLAGS.config is None:
        return errors.report(errors.FlagError(
            "--config is required, e.g. --config=configs/rarp.py"))
    return run(FLAGS.config)


if __name__ == "__main__":
    app.run(main, flags_parser=errors.parse_flags)
