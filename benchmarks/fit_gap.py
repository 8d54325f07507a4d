r"""Train-fold vs test-fold SCC of every head of a finished run: how much each model memorises.

  python benchmarks/fit_gap.py --workdir=<a run's workdir> [--checkpoint=last] [--out=x.json]

For each member of the run (fold x seed) it restores the phase checkpoints (`runs.restore`:
'unimodal' for the branches, 'fusion' for the fused model; 'last' = the final epoch, the
unbiased protocol), predicts every video of the dataset in eval mode with the training
engine's own stacked evaluation (`runs.evaluate`), and scores the member's training videos
and its test videos separately (a phase without checkpoints is skipped). Prints JSON:
per head, the mean over members of the train and test SCC and their gap, and per member
the two values.

Why: a two-phase model trains its fusion branch on features of branches that have already
fitted the same training videos. When a branch's training-fold SCC is near 1 its features
carry the whole training score, not only its own modality's share, and the fusion branch
has nothing left to learn from combining them (docs/parity.md, "Fusion gain").
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from surgfusion_jax import provenance  # noqa: E402
from surgfusion_jax.data import input_pipeline  # noqa: E402
from surgfusion_jax.evaluation import metrics  # noqa: E402
from surgfusion_jax.io import to_jsonable  # noqa: E402
from surgfusion_jax.training import runs, train  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when run as a script, so importing `fit_gap` (the tests) adds none."""
    flags.DEFINE_string("workdir", None, "A finished run's workdir.", required=True)
    flags.DEFINE_enum("checkpoint", "last", ["last", "best"], "Which checkpoint.")
    flags.DEFINE_string("out", None, "JSON output (else stdout).")


def fit_gap(workdir: str, checkpoint: str = "last") -> dict:
    run = runs.load_run(workdir)
    everything = run.eval_set([s["video_id"] for s in run.samples])
    scores = np.asarray(run.scores, float)
    per_head: dict[str, list[dict]] = {}
    # every member scores every video: one shared plan, one gather for all members
    plan = input_pipeline.make_eval_plan(np.asarray(run.data.lengths), everything.indices,
                                         run.config.eval_batch_size, run.config.min_bucket)
    for group in run.groups():
        for phase in train.PHASES:
            try:
                variables = [runs.restore(run, m.name, phase, checkpoint)[0] for m in group]
            except runs.MissingRunError:  # a phase not trained (or not saved): skipped
                continue
            for member, preds in zip(group, runs.evaluate(run, group, variables, phase, plan)):
                train_idx = np.array([run.position[v] for v in member.train])
                test_idx = np.asarray(run.eval_sets(member)["test"].indices)
                for head, p in preds.items():
                    per_head.setdefault(head, []).append({
                        "member": member.name,
                        "train_scc": metrics.spearman(p[train_idx], scores[train_idx]),
                        "test_scc": metrics.spearman(p[test_idx], scores[test_idx])})
    heads = {}
    for head, rows in per_head.items():
        tr = float(np.mean([r["train_scc"] for r in rows]))
        te = float(np.mean([r["test_scc"] for r in rows]))
        heads[head] = {"train_scc": tr, "test_scc": te, "gap": tr - te, "members": rows}
    return {"workdir": workdir, "checkpoint": checkpoint, "command": " ".join(sys.argv),
            "heads": heads, "versions": provenance.package_versions()}


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        report = fit_gap(FLAGS.workdir, FLAGS.checkpoint)
    except runs.MissingRunError as e:
        sys.exit(f"error: {e}")
    text = json.dumps(to_jsonable(report), indent=1)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    for head, h in report["heads"].items():
        print(f"{head}: train SCC {h['train_scc']:.3f}, test SCC {h['test_scc']:.3f}",
              file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    app.run(main)
