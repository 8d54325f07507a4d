r"""Table II: SurgFusion-Net on RAH-skill and RARP-skill, random 4-fold CV.

  python -m experiments.table2 --data_dir=data/features --workdir=runs/experiments \
      [--datasets=rah,rarp] [--dataset=synthskill] [--from_checkpoints] \
      [--config.unimodal.num_epochs=300 ...]

One run per dataset (all three modalities, CSFB + DFB, DRA with 2 heads), 4-fold CV
(`configs/rah.py`, `configs/rarp.py`). With --dataset=synthskill both rows are one
SynthSkill 4-fold run. Writes `<workdir>/table2.{md,tex,csv}`, `table2_folds.csv`
and `table2_provenance.json` (see experiments.common for the protocols and columns).
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

from absl import app

from experiments import cli, runner, spec

NAME = "table2"
TITLE = "Table II: RAH-skill and RARP-skill, random 4-fold"
DATASETS = ("rah", "rarp")


def build_rows(options: spec.Options) -> list[spec.Row]:
    spec.select("variants", options.variants, ())
    rows = []
    for key in spec.select("datasets", options.datasets, DATASETS):
        target = spec.TARGETS[key]
        run = spec.Run(options.data_key(target), "kfold")
        paper = spec.paper_numbers("II", dataset=target.dataset, method="SurgFusion-Net")
        rows.append(spec.Row({"dataset": target.dataset, "scheme": "4-Fold"}, paper, run))
    return rows


def run(options: spec.Options) -> dict[str, str]:
    return runner.run_table(NAME, TITLE, build_rows, options)


if __name__ == "__main__":
    cli.define_flags()
    app.run(cli.main_for(run))
