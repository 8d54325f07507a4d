r"""Table III: fusion blocks and modality subsets (single branches, CSFB only, CSFB + DFB).

  python -m experiments.table3 --data_dir=data/features --workdir=runs/experiments \
      [--variants=single,csfb:rgb+flow,...,csfb+dfb:rgb+flow+mask] \
      [--datasets=kt,np,su,rah,rarp] [--dataset=synthskill] [--from_checkpoints] \
      [--config.unimodal.num_epochs=300 ...]

Dataset columns: JIGSAWS KT / NP / SU under LOUO, RAH-skill and RARP-skill under random
4-fold. Per column one run per block and modality subset (`config.model.use_dfb`: False
= "CSFB only", the DFB output replaced by zeros; `config.data.modalities`): 8 runs. The
'single' rows are the unimodal branches (RGB, flow, mask) of the CSFB + DFB run with all
three modalities (its unimodal phase trains them; variant 'single'). With
--dataset=synthskill the JIGSAWS columns map onto SynthSkill LOUO and the clinical ones
onto SynthSkill 4-fold.
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

from absl import app

from experiments import cli, runner, spec

NAME = "table3"
TITLE = "Table III: fusion blocks and modality subsets"
DATASETS = ("kt", "np", "su", "rah", "rarp")
SUBSETS = (("rgb", "flow"), ("rgb", "mask"), ("flow", "mask"), ("rgb", "flow", "mask"))
BLOCKS = {"csfb": "CSFB", "csfb+dfb": "CSFB + DFB"}
NAMES = {"rgb": "RGB", "flow": "Flow", "mask": "Mask"}
VARIANTS = ("single",) + tuple(f"{b}:{'+'.join(m)}" for b in BLOCKS for m in SUBSETS)


def build_rows(options: spec.Options) -> list[spec.Row]:
    variants = spec.select("variants", options.variants, VARIANTS)
    rows = []
    for target, scheme, labels in spec.ablation_targets(options, DATASETS):
        query = dict(dataset=target.dataset, task=target.task, scheme=scheme)
        data = options.data_key(target)
        if "single" in variants:
            full = spec.Run(data, scheme)
            for m in spec.ALL_MODALITIES:
                paper = spec.paper_numbers("III", block="single", modalities=m, **query)
                rows.append(spec.Row({**labels, "block": "single branch",
                                        "modalities": NAMES[m]}, paper, full, model=m))
        for variant in variants[1:] if "single" in variants else variants:
            block, mods = variant.split(":")
            mods = tuple(mods.split("+"))
            paper = spec.paper_numbers("III", block=block, modalities=mods, **query)
            run = spec.Run(data, scheme, modalities=mods, use_dfb=block == "csfb+dfb")
            rows.append(spec.Row({**labels, "block": BLOCKS[block],
                                    "modalities": "+".join(NAMES[m] for m in mods)},
                                   paper, run))
    return rows


def run(options: spec.Options) -> dict[str, str]:
    extra = ["Single-branch rows: the unimodal branches trained in the CSFB + DFB run "
             "with all three modalities."]
    return runner.run_table(NAME, TITLE, build_rows, options, extra_notes=extra)


if __name__ == "__main__":
    cli.define_flags()
    app.run(cli.main_for(run))
