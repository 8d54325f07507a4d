r"""Table V: number of DRA heads (1, 2, 4, 8) in SurgFusion-Net.

  python -m experiments.table5 --data_dir=data/features --workdir=runs/experiments \
      [--variants=1,2,4,8] [--datasets=su,rah,rarp] [--dataset=synthskill] \
      [--from_checkpoints] [--config.fusion.num_epochs=300 ...]

One run per dataset column and head count (`config.model.num_heads`; all three
modalities, CSFB + DFB, DRA): JIGSAWS Suturing LOUO, RAH-skill and RARP-skill 4-fold.
With --dataset=synthskill the JIGSAWS column maps onto SynthSkill LOUO and the clinical
columns onto SynthSkill 4-fold. `model.features` must be divisible by every head count.
The 2-head run is the full model shared with Tables II-IV under the same --workdir.
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

from absl import app

from experiments import cli, runner, spec

NAME = "table5"
TITLE = "Table V: number of DRA heads"
DATASETS = ("su", "rah", "rarp")
HEADS = ("1", "2", "4", "8")


def build_rows(options: spec.Options) -> list[spec.Row]:
    heads = spec.select("variants", options.variants, HEADS)
    rows = []
    for target, scheme, labels in spec.ablation_targets(options, DATASETS):
        for h in heads:
            paper = spec.paper_numbers("V", dataset=target.dataset, task=target.task,
                                         scheme=scheme, heads=int(h))
            run = spec.Run(options.data_key(target), scheme, num_heads=int(h))
            rows.append(spec.Row({**labels, "heads": int(h)}, paper, run))
    return rows


def run(options: spec.Options) -> dict[str, str]:
    return runner.run_table(NAME, TITLE, build_rows, options)


if __name__ == "__main__":
    cli.define_flags()
    app.run(cli.main_for(run))
