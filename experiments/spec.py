"""What an experiment is: its dataset columns, runs, rows and options (Tables I-V, Fig. 4;
docs/design.md §5-6). Training and output live in `experiments.runner` / `outputs`.

An experiment is a list of table rows, each naming one *run*: a config variant trained by
`cross_validation.run_cross_validation` in its own sub-workdir `<workdir>/<run name>/`.
Run names are canonical (dataset, scheme, modalities, block, fusion, heads), so tables
that share a run (e.g. the full model in Tables II-V) train it once when they share a
`--workdir`. A finished run (its `results.json` holds the same config) is read back, an
unfinished one resumes from its checkpoints; a run dir trained with another config is
refused by `run_cross_validation` (choose another --workdir).

Config of a run, lowest to highest precedence:
  1. the `--config` file (default `configs/default.py`);
  2. the dataset's fields: the diff of `configs/<dataset>.py` against `configs/default.py`
     (data.name, score_max, batch sizes, paper_*), or for SynthSkill no paper dataset and,
     when the --config file names no dataset, data.name 'synthskill' with score_max 30
     (`--config=configs/demo.py --dataset=synthskill` runs the tables on the demo's data;
     a config with a `synthskill` block renders and preps SynthSkill when it is missing,
     `data_prep.synthskill_setup`);
  3. explicit `--config.X=...` flags (e.g. epochs, seeds; they apply to every run);
  4. the fields that define the run (cv.scheme, data.modalities, model.use_dfb /
     fusion / num_heads): a clashing flag is ignored with a warning.

Numbers ("ours"), per run, model and fold, under every reading (`PROTOCOLS`):
  'paper'        the best test-fold epoch, i.e. the phase's 'best' checkpoint (one reading
                 of the paper's "the best SCC and its corresponding MAE"; optimistic). For
                 the unimodal heads this is the epoch of the best mean SCC over the
                 branches (the unimodal phase checkpoints one best state for all
                 branches); for the fused model it is the epoch
                 `evaluation.summary.summarise` calls 'paper' (both take the earliest of
                 tied epochs; they differ only if every epoch's SCC is NaN).
  'best-mean'    the other reading: one epoch for all folds, the best fold-mean test SCC
                 (from the per-epoch history; optimistic).
  'final'        the last epoch (the 'last' checkpoint): no selection, unbiased.
  'val-selected' per fold, the best inner-validation epoch (history; unbiased; only
                 with cv.inner_val_fraction > 0, else its columns are left out).
'paper' and 'final' come from the test predictions of the two checkpoints, the others from
the history saved with the run (and in its 'last' checkpoints). Beside every run's rows,
its ridge baselines (`evaluation.baselines`, 'ridge (<modality>)' / 'ridge (all)').
SCC is Spearman per fold, MAE in score units; mean and population SD over folds.
`--from_checkpoints` re-evaluates both states of every fold (`experiments.recompute`)
instead of training, and gives the same numbers bit for bit (both are summarised by
`evaluation.summary.summarise(source='predictions')`). Training: `experiments.runner`;
output files: `experiments.outputs`; flags: `experiments.cli`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Sequence

from absl import logging

from surgfusion_jax import config_lib, errors
from surgfusion_jax.data.feature_dataset import MODALITIES as ALL_MODALITIES
from surgfusion_jax.evaluation import paper_results

# Reading (`evaluation.summary.PROTOCOLS`) -> its column label; the labels name the
# unbiased ones (`evaluation.tables.UNBIASED`).
PROTOCOLS = {"paper": "best epoch per fold", "best-mean": "best mean epoch",
             "final": "final epoch, unbiased", "val-selected": "val-selected epoch, unbiased"}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "default.py")
SYNTHSKILL = "synthskill"
# SynthSkill runs: no paper dataset; the dataset 'synthskill' (GRS-like scores 6-30) unless
# the --config file names one (e.g. configs/demo.py); other fields from the --config file.
SYNTHSKILL_FIELDS = {"data.paper_dataset": "", "data.paper_task": ""}
SYNTHSKILL_DEFAULTS = {"data.name": "synthskill", "data.score_max": 30.0}
VARIANT_FIELDS = ("cv.scheme", "data.modalities", "model.use_dfb", "model.fusion",
                  "model.num_heads")


@dataclasses.dataclass(frozen=True)
class Target:
    """A dataset column of the paper: where the paper numbers come from."""

    key: str  # kt | np | su | rah | rarp (the --datasets names)
    dataset: str  # paper_results name
    task: str | None
    config_file: str  # configs/<...>.py holding our dataset's fields (repository-relative)


TARGETS = {t.key: t for t in (
    Target("kt", "JIGSAWS", "KT", "configs/jigsaws_knot_tying.py"),
    Target("np", "JIGSAWS", "NP", "configs/jigsaws_needle_passing.py"),
    Target("su", "JIGSAWS", "SU", "configs/jigsaws_suturing.py"),
    Target("rah", "RAH-skill", None, "configs/rah.py"),
    Target("rarp", "RARP-skill", None, "configs/rarp.py"))}
SCHEME_LABELS = {"loso": "LOSO", "louo": "LOUO", "kfold": "4-Fold"}
# The schemes of the ablation tables (III-V): JIGSAWS LOUO, the clinical sets 4-fold.
ABLATION_SCHEMES = {"kt": "louo", "np": "louo", "su": "louo", "rah": "kfold", "rarp": "kfold"}


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained config variant (a sub-workdir)."""

    data: str  # a TARGETS key, or SYNTHSKILL
    scheme: str  # loso | louo | kfold
    modalities: tuple[str, ...] = ALL_MODALITIES
    use_dfb: bool = True
    fusion: str = "dra"
    num_heads: int = 2

    @property
    def name(self) -> str:
        block = "csfb+dfb" if self.use_dfb else "csfb"
        return "_".join([self.data, self.scheme, "+".join(self.modalities), block, self.fusion,
                         f"h{self.num_heads}"])

    def fields(self) -> dict[str, Any]:
        return {"cv.scheme": self.scheme, "data.modalities": tuple(self.modalities),
                "model.use_dfb": self.use_dfb, "model.fusion": self.fusion,
                "model.num_heads": self.num_heads}


@dataclasses.dataclass
class Row:
    """One table row: labels, the paper's numbers and the run/model giving ours."""

    labels: dict[str, Any]
    paper: dict[str, float | None]  # SCC, MAE and optionally SCC_std, MAE_std
    run: Run | None
    model: str = "fused"


@dataclasses.dataclass
class Options:
    """Everything an experiment needs (built from the CLI flags or by tests)."""

    workdir: str
    base_config: Any  # ml_collections.ConfigDict
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_dir: str | None = None
    dataset: str = "paper"  # paper | synthskill
    from_checkpoints: bool = False
    variants: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    argv: tuple[str, ...] = ()

    def __post_init__(self):
        if self.dataset not in ("paper", SYNTHSKILL):
            raise ExperimentError(f"--dataset={self.dataset!r}: use 'paper' or '{SYNTHSKILL}'.")

    @property
    def synthetic(self) -> bool:
        return self.dataset == SYNTHSKILL

    def data_key(self, target: Target) -> str:
        return SYNTHSKILL if self.synthetic else target.key


class ExperimentError(errors.UserError, ValueError):
    """A bad experiment request; the message names the flag/file and the fix."""


def select(name: str, wanted: Sequence[str], known: Sequence[str]) -> list[str]:
    """`known` filtered by `wanted` (all when empty); unknown names raise."""
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ExperimentError(f"--{name}={','.join(wanted)}: unknown {unknown}; choose from "
                              f"{', '.join(known)}.")
    return [k for k in known if not wanted or k in wanted]


def paper_numbers(table: str, **query: Any) -> dict[str, float | None]:
    """SCC, MAE and (where printed) SCC_std, MAE_std of one paper-table entry."""
    out = {}
    for metric in ("SCC", "MAE", "SCC_std", "MAE_std"):
        try:
            out[metric] = paper_results.lookup(table, metric=metric, **query)
        except paper_results.PaperLookupError:
            if metric in ("SCC", "MAE"):
                raise
    return out


def ablation_targets(options: "Options", keys: Sequence[str]
                     ) -> list[tuple[Target, str, dict[str, str]]]:
    """(target, scheme, row labels) of the ablation tables' dataset columns `keys`."""
    out = []
    for key in select("datasets", options.datasets, keys):
        target, scheme = TARGETS[key], ABLATION_SCHEMES[key]
        name = f"{target.dataset} {target.task}" if target.task else target.dataset
        out.append((target, scheme, {"dataset": name, "scheme": SCHEME_LABELS[scheme]}))
    return out


# ----------------------------------------------------------------------------- configs

def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def _set(config: Any, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        config = config[p]
    config[leaf] = value


def dataset_fields(data_key: str, base_config: Any = None) -> dict[str, Any]:
    """The fields of our dataset config that differ from configs/default.py."""
    if data_key == SYNTHSKILL:
        named = base_config is not None and base_config.data.name
        return dict(SYNTHSKILL_FIELDS, **({} if named else SYNTHSKILL_DEFAULTS))
    base = flatten(config_lib.get_config())
    ours = flatten(config_lib.load_config_file(os.path.join(REPO_ROOT,
                                                            TARGETS[data_key].config_file)))
    return {k: v for k, v in ours.items() if base.get(k) != v and k not in VARIANT_FIELDS}


def run_config(run: Run, options: Options) -> Any:
    """The config of `run` (precedence in the module docstring)."""
    config = copy.deepcopy(options.base_config)
    config.unlock()
    for path, value in dataset_fields(run.data, options.base_config).items():
        if path not in options.overrides:
            _set(config, path, value)
    for path, value in options.overrides.items():
        _set(config, path, value)
    for path, value in run.fields().items():
        if path in options.overrides and options.overrides[path] != value:
            logging.warning("--config.%s=%r ignored for run %s: the experiment sets it to %r",
                            path, options.overrides[path], run.name, value)
        _set(config, path, value)
    if options.data_dir:
        config.data.data_dir = options.data_dir
    config.workdir = os.path.join(options.workdir, run.name)
    return config
