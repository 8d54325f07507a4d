r"""Table I: SurgFusion-Net on JIGSAWS, SU / KT / NP x LOSO / LOUO / 4-fold, and across tasks.

  python -m experiments.table1 --data_dir=data/features --workdir=runs/experiments \
      [--datasets=kt,np,su] [--variants=loso,louo,kfold] [--dataset=synthskill] \
      [--from_checkpoints] [--config.unimodal.num_epochs=300 ...]

One run per task and scheme (all three modalities, CSFB + DFB, DRA with 2 heads), with
the task's config (`configs/jigsaws_<task>.py`): LOSO (5 folds by supertrial), LOUO
(8 folds by surgeon; the official JIGSAWS folds with --config.cv.setup_dir), random
4-fold. "Across Tasks" rows (per scheme, when all three tasks ran) combine the task
means like the paper (`evaluation.summary.across_tasks`): SCC by the Fisher z mean, MAE by the
arithmetic mean, and each SD as the root mean square of the task SDs (the paper's
Across-Tasks SDs follow from its task SDs this way, e.g. LOSO SCC 0.076, 0.092, 0.032 ->
0.071; tested in tests/test_experiments.py, the SCC/MAE means in tests/test_paper_results.py).

--dataset=synthskill: SynthSkill is one suturing "task", so the table has the SU rows
only: LOSO (by supertrial = trial number), LOUO (by surgeon) and 4-fold on SynthSkill,
beside the paper's SU numbers; no Across-Tasks rows.
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

from typing import Any, Mapping, Sequence

from absl import app

from experiments import cli, outputs, runner, spec
from surgfusion_jax.evaluation import summary

NAME = "table1"
TITLE = "Table I: JIGSAWS (SurgFusion-Net)"
TASKS = ("kt", "np", "su")
SCHEMES = ("loso", "louo", "kfold")
ACROSS = "Across Tasks"


def build_rows(options: spec.Options) -> list[spec.Row]:
    schemes = spec.select("variants", options.variants, SCHEMES)
    tasks = spec.select("datasets", options.datasets, TASKS)
    if options.synthetic:
        tasks = ["su"]  # SynthSkill: one suturing task
    rows = []
    for key in tasks:
        target = spec.TARGETS[key]
        for scheme in schemes:
            paper = spec.paper_numbers("I", task=target.task, scheme=scheme,
                                         method="SurgFusion-Net")
            rows.append(spec.Row({"task": target.task, "scheme": spec.SCHEME_LABELS[scheme]},
                                   paper, spec.Run(options.data_key(target), scheme)))
    return rows


def across_rows(rows: Sequence[spec.Row], summaries: Mapping[str, Any],
                options: spec.Options) -> list[dict[str, Any]]:
    """One 'Across Tasks' row per scheme whose three tasks all ran."""
    out = []
    for scheme in SCHEMES:
        label = spec.SCHEME_LABELS[scheme]
        task_rows = [r for r in rows if r.labels["scheme"] == label]
        if sorted(r.labels["task"] for r in task_rows) != ["KT", "NP", "SU"]:
            continue
        ours = {}
        for protocol in spec.PROTOCOLS:
            per_task = [summaries[r.run.name]["fused"].get(protocol) for r in task_rows]
            if all(per_task):
                ours[protocol] = summary.across_tasks(per_task)
        paper = spec.paper_numbers("I", task=ACROSS, scheme=scheme, method="SurgFusion-Net")
        out.append(outputs.cells({"task": ACROSS, "scheme": label},
                                 f"JIGSAWS KT+NP+SU {label}", paper, ours, model="fused"))
    return out


def run(options: spec.Options) -> dict[str, str]:
    extra = ["Across Tasks: SCC = Fisher z mean of the task SCCs, MAE = mean of the task "
             "MAEs, SD = root mean square of the task SDs (folds: total over tasks)."]
    if options.synthetic:
        extra = ["SynthSkill has one suturing task: its LOSO (trial number), LOUO (surgeon) "
                 "and 4-fold runs are shown beside the paper's JIGSAWS Suturing (SU) numbers."]
    return runner.run_table(NAME, TITLE, build_rows, options, extra_rows=across_rows,
                            extra_notes=extra)


if __name__ == "__main__":
    cli.define_flags()
    app.run(cli.main_for(run))
