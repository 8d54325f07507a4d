r"""Table IV: fusion strategies (AVG, CAT, vanilla CA, negative CA, DRA) in SurgFusion-Net.

  python -m experiments.table4 --data_dir=data/features --workdir=runs/experiments \
      [--variants=avg,cat,vanilla_ca,negative_ca,dra] [--datasets=su,rah,rarp] \
      [--dataset=synthskill] [--from_checkpoints] [--config.fusion.num_epochs=300 ...]

One run per dataset column and strategy (`config.model.fusion`; all three modalities,
CSFB + DFB, 2 heads): JIGSAWS Suturing LOUO, RAH-skill and RARP-skill 4-fold. With
--dataset=synthskill the JIGSAWS column maps onto SynthSkill LOUO and the clinical
columns onto SynthSkill 4-fold. The DRA run is the full model shared with Tables II,
III and V when they use the same --workdir.
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

from absl import app

from experiments import cli, runner, spec

NAME = "table4"
TITLE = "Table IV: fusion strategies"
DATASETS = ("su", "rah", "rarp")
FUSIONS = {"avg": "AVG", "cat": "CAT", "vanilla_ca": "Vanilla CA", "negative_ca": "Negative CA",
           "dra": "DRA (ours)"}


def build_rows(options: spec.Options) -> list[spec.Row]:
    fusions = spec.select("variants", options.variants, tuple(FUSIONS))
    rows = []
    for target, scheme, labels in spec.ablation_targets(options, DATASETS):
        for fusion in fusions:
            paper = spec.paper_numbers("IV", dataset=target.dataset, task=target.task,
                                         scheme=scheme, fusion=fusion)
            run = spec.Run(options.data_key(target), scheme, fusion=fusion)
            rows.append(spec.Row({**labels, "fusion": FUSIONS[fusion]}, paper, run))
    return rows


def run(options: spec.Options) -> dict[str, str]:
    return runner.run_table(NAME, TITLE, build_rows, options)


if __name__ == "__main__":
    cli.define_flags()
    app.run(cli.main_for(run))
