"""Command-line flags shared by the experiment entry points (absl + ml_collections).

  --workdir            experiment folder: one sub-workdir per run, tables beside them
  --data_dir           feature datasets folder (default: the config's data.data_dir)
  --config             base config file (default configs/default.py); every field can be
                       overridden, e.g. --config.unimodal.num_epochs=50 (see
                       experiments.common for how runs combine it with their dataset)
  --dataset            'paper' (the paper's datasets) or 'synthskill' (every table on the
                       SynthSkill feature dataset, data.name 'synthskill' unless
                       --config.data.name says otherwise)
  --from_checkpoints   recompute every number from the saved checkpoints, no training
  --variants           only these variants of the table (names listed by the table)
  --datasets           only these paper datasets: kt, np, su, rah, rarp

Exit status: 0 done; 2 a missing dataset / run / checkpoint or a bad flag or config (the
message names the fix); 3 stopped by --config.debug.stop_after_epochs (re-run resumes).
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import spec
from surgfusion_jax import errors
from surgfusion_jax.data import feature_dataset


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 sys_argv: list[str] | None = None) -> None:
    """Defines the shared flags on `flag_values` (the global FLAGS by default).

    `sys_argv`: the command line whose --config.X overrides are to be accepted
    (ml_collections reads them at definition time; default sys.argv). On the command line
    itself (global FLAGS, sys.argv) the flags are parsed here once, so a mistake ends in
    one line naming the fix (`errors.parse_flags`), before absl's own parse.
    """
    command_line = flag_values is flags.FLAGS and sys_argv is None
    try:
        config_flags.DEFINE_config_file(
            "config", spec.DEFAULT_CONFIG, "Base training config of every run.",
            flag_values=flag_values, lock_config=True, sys_argv=sys_argv)
    except (AttributeError, KeyError):  # an override of no field of the default config
        if not command_line:
            raise
        alone = flags.FlagValues()  # the config flag alone: the override is "unknown"
        config_flags.DEFINE_config_file("config", spec.DEFAULT_CONFIG, "",
                                        flag_values=alone, sys_argv=["-"])
        errors.parse_flags([sys.argv[0]] + [a for a in sys.argv[1:] if a.startswith("--config")],
                           alone)
        raise
    flags.DEFINE_string("workdir", "runs/experiments", "Experiment folder.",
                        flag_values=flag_values)
    flags.DEFINE_string("data_dir", None, "Feature datasets folder (default: config's).",
                        flag_values=flag_values)
    flags.DEFINE_enum("dataset", "paper", ["paper", spec.SYNTHSKILL],
                      "Train on the paper's datasets or map every table onto SynthSkill.",
                      flag_values=flag_values)
    flags.DEFINE_bool("from_checkpoints", False, "Recompute the numbers from the saved "
                      "checkpoints instead of training.", flag_values=flag_values)
    flags.DEFINE_list("variants", [], "Only these variants of the table.",
                      flag_values=flag_values)
    flags.DEFINE_list("datasets", [], "Only these paper datasets (kt, np, su, rah, rarp).",
                      flag_values=flag_values)
    if command_line:
        app.define_help_flags()  # app.run defines them too; --help must not be "unknown"
        errors.parse_flags(sys.argv, flag_values)


def options_from_flags(flag_values: flags.FlagValues = flags.FLAGS,
                       argv: tuple[str, ...] = ()) -> spec.Options:
    """Options of the parsed flags; the --config.X overrides become `overrides`."""
    overrides = dict(config_flags.get_override_values(flag_values["config"]))
    config = flag_values.config
    return spec.Options(
        workdir=flag_values.workdir, base_config=config, overrides=overrides,
        data_dir=flag_values.data_dir, dataset=flag_values.dataset,
        from_checkpoints=flag_values.from_checkpoints,
        variants=tuple(v.strip() for v in flag_values.variants if v.strip()),
        datasets=tuple(d.strip().lower() for d in flag_values.datasets if d.strip()),
        argv=tuple(argv))


def run_cli(experiment: Callable[[spec.Options], dict[str, str]],
            flag_values: flags.FlagValues = flags.FLAGS, argv: tuple[str, ...] = ()) -> int:
    """Runs `experiment` with the parsed flags; prints the outputs; returns the exit status."""
    logging.set_verbosity(logging.WARNING)  # orbax logs every save/restore at INFO
    try:
        paths = experiment(options_from_flags(flag_values, argv))
    except feature_dataset.DatasetError as e:
        return errors.report(e, hint="(without the paper's datasets, run every table on "
                             "SynthSkill: --dataset=synthskill; or restrict the table with "
                             "--datasets)")
    except errors.UserError as e:  # config, splits, experiment, missing run; or a stop
        return errors.report(e)
    if "md" in paths:
        with open(paths["md"], encoding="utf-8") as f:
            print(f.read())
    print("wrote " + ", ".join(paths.values()))
    return 0


def main_for(experiment: Callable[[spec.Options], dict[str, str]]) -> Callable:
    """An absl `main` for `experiment` (define_flags must have run)."""
    def main(argv):
        if len(argv) > 1:
            raise flags.Error(f"unexpected arguments {argv[1:]}")
        return run_cli(experiment, flags.FLAGS, tuple(sys.argv))
    return main
