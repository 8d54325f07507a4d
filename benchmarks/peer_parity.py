r"""Learning parity with PAMFN: both implementations trained side by side, same data, same folds.

  # complementary-cues features (data_prep/complementary.py), generated on the fly:
  python benchmarks/peer_parity.py --dataset=complementary --seeds=10 \
      --pamfn_dir=/path/to/PAMFN --torch_python=/path/to/python-with-torch \
      --out=parity_complementary.json --markdown=parity_complementary.md
  # an existing feature dataset, e.g. the SynthSkill demo features (`make demo` or
  # `python -m data_prep.synthskill_setup --config=configs/demo.py` makes them), on the
  # demo's own folds:
  python benchmarks/peer_parity.py --data_dir=demo/features --name=synthskill \
      --splits=demo/run/splits.json --seeds=10 --pamfn_dir=... --torch_python=...
  # only our side (no PyTorch anywhere):
  python benchmarks/peer_parity.py --dataset=complementary --skip_pamfn --seeds=2

What it does, for `--seeds` seeds (first_seed, first_seed + 1, ...):
  1. loads the feature dataset (`feature_dataset.load_feature_dataset`) and makes the folds
     once (`splits.make_splits`, k-fold, `--num_folds`, `--cv_seed`) or reads
     `--splits`; the folds are saved as `splits.json` into every run of ours (the
     library reuses a run's saved folds) and exported with the features to
     `<workdir>/pamfn_input.npz`, so both sides train and test on the same videos;
  2. PAMFN's side: `pamfn_parity_torch.py` under `--torch_python`, which imports PAMFN's
     `BaseModel` / `PAMFN` and its config (`--pamfn_config`, default RG_feats1: SGD
     branches, AdamW fusion) from `--pamfn_dir` and follows its pipeline.py (three branch
     runs, then the fusion run on the saved branches; labels score / score_max in [0, 1],
     MSE; variable lengths cropped / zero padded to `--window` in training, whole videos
     at test time: see that file's docstring). It returns the test predictions of every
     epoch, scored here with the project's metrics;
  3. ours: `cross_validation.run_cross_validation` for each preset of `--presets`
     (`config.preset`, resolved by the library: `config_lib.PRESETS`), all seeds x folds
     as one program (`config.num_seeds`), at the same widths, epochs, batch size and
     window;
  4. per model ('pamfn', 'ours-<preset>') and head (rgb, flow, mask, fused), the readings
     of `evaluation.summary` ('final' = last epoch, unbiased; 'paper' = per fold the best
     test epoch; 'best-mean' = the one epoch with the best fold-mean test SCC), each
     taken per seed as the mean over folds, then mean ± 95% CI over seeds
     (`metrics.mean_ci95`); the paired difference ours-<preset> − pamfn per head and
     reading (seeds paired); ridge regression on mean-pooled features per modality and
     on all of them (`evaluation.baselines.ridge_cv`, seed-free, once per fold); step
     times per phase for both; versions and the exact command.
Output: JSON (`--out`, else stdout) and a Markdown table (`--markdown`, else stderr).

Widths default to d = 64, K = 4, one attention head (PAMFN's ms_heads = cm_heads = 1)
and a branch embedding of 512 (fixed in PAMFN's BaseModel); epochs 80 + 80; batch 8;
`--window` defaults to the longest video, so no training sample is cropped on either side.
These are set on both sides and override a preset's own value (`model.num_heads` is a
preset switch: `--heads=0` leaves it to each preset, and PAMFN to its config file).

Step times. PAMFN: the median wall time of one training step (forward, backward, clip,
optimiser), per branch run and per fusion run. Ours: all runs (seeds x folds) train in
lockstep; `ms_per_program_step` is the median epoch time of the scanned training epoch
(`train.train_epochs`, timed here by wrapping it, with a device sync after each epoch;
the first epoch, which compiles, is left out) divided by the steps per epoch, and
`ms_per_run_step` that divided by the number of runs. Wall times include evaluation.
Both sides run under the same glibc allocator tunables (this script re-executes with
them, `surgfusion_jax/runtime.py`, and PAMFN's process inherits its environment;
SURGFUSION_MALLOC_TUNING=0 runs both with glibc's defaults).
Both sides share the machine's cores; run nothing else beside a measurement (on a
loaded 2-core machine PyTorch's default threads made one PAMFN fold take 467 s instead of
~8 s; `--torch_threads=1` limits the damage).

Shared initial draws. A variant with `model.init_weights=pamfn` (e.g.
`--variant=pamfn-shared=pamfn:model.init_weights=pamfn`) starts every run of seed s from
the very weights PAMFN's runs of seed s start from: `pamfn_parity_torch.py --init_out`
draws them as PAMFN's runs do, `models/pamfn_weights.from_pamfn` maps them into ours
(`<workdir>/ours-<label>/initial_weights/seed<s>.npz`, the library's
`model.init_weights`). Paired by seed, the two sides then differ only in their training
streams (batch order, dropout, Gumbel noise), not in their initial draws: a like-for-like
comparison of the training loops with less seed noise. Only preset `pamfn` and its
variants have PAMFN's parameters; it needs `--pamfn_dir` and `--torch_python`.

Shared unimodal phase. A variant whose switches act only in the fusion phase
(FUSION_PHASE_FIELDS: `fusion.*`, `model.gumbel_at_test`, `model.broadcast_dropout`)
trains the very unimodal phase of its preset's run; when that run (`ours-<preset>`) is
finished in the same workdir, its unimodal checkpoints are copied into the variant's
folder and the variant resumes at its fusion phase (`--noshare_unimodal` retrains them).
Its branch readings then equal the preset's by construction (variants retrained from
scratch reproduced them byte for byte, docs/parity.md), and its unimodal step time is
not measured.

`--workdir` keeps the generated data, the export, PAMFN's raw output
(`pamfn_output.json`) and our runs (`ours-<preset>/`, with results.json); a second call
with the same workdir resumes our runs; PAMFN's side retrains unless `--reuse_pamfn` (then
its output there is reused when made with the same settings and data).
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

import ast
import contextlib
import copy
import functools
import glob
import hashlib
import json
import os
import runpy
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import traverse_util  # noqa: E402

from data_prep import complementary  # noqa: E402
from surgfusion_jax import config_lib, provenance  # noqa: E402
from surgfusion_jax.data import feature_dataset, splits  # noqa: E402
from surgfusion_jax.evaluation import baselines, metrics, summary  # noqa: E402
from surgfusion_jax.io import read_json, to_jsonable, write_json  # noqa: E402
from surgfusion_jax.models import pamfn_weights  # noqa: E402
from surgfusion_jax.training import cross_validation, initial_weights, phase, train  # noqa: E402

HEADS = ("rgb", "flow", "mask", "fused")
# Late fusion, no training: the mean of the three branches' final-epoch test predictions.
# The fused model must beat it to earn its parameters (final reading only).
BRANCH_MEAN = "branch-mean"
READINGS = ("final", "paper", "best-mean")  # summary's protocols, unbiased first
READING_NOTES = {"final": "last epoch (unbiased)",
                 "paper": "per fold, the best test epoch (optimistic)",
                 "best-mean": "one epoch per seed, the best fold-mean test SCC (optimistic)"}
PAMFN = "pamfn"
# Config fields that act only in the fusion phase: neither the unimodal phase's training
# and evaluation nor the model's parameters and their initial draws depend on them.
# (`model.broadcast_dropout` is the CSFB/DFB attention dropout's mask shape.)
FUSION_PHASE_FIELDS = ("fusion", "model.gumbel_at_test", "model.broadcast_dropout")

_DATASET = flags.DEFINE_enum("dataset", None, ["complementary"],
                             "Generate a dataset (else --data_dir/--name).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Feature dataset folder (with --name).")
_NAME = flags.DEFINE_string("name", None, "Feature dataset name under --data_dir.")
_SPLITS = flags.DEFINE_string("splits", None, "A saved splits.json to use (else k-fold).")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 64, "complementary: videos.")
_FEATURE_DIM = flags.DEFINE_integer("feature_dim", 64, "complementary: feature width.")
_MIN_SEGMENTS = flags.DEFINE_integer("min_segments", 16, "complementary: shortest video.")
_MAX_SEGMENTS = flags.DEFINE_integer("max_segments", 32, "complementary: longest video.")
_SIGNAL = flags.DEFINE_float("signal", complementary.DEFAULTS["signal"],
                             "complementary: signal strength.")
_DATA_SEED = flags.DEFINE_integer("data_seed", 0, "complementary: generator seed.")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Training seeds per model.")
_FIRST_SEED = flags.DEFINE_integer("first_seed", 0, "The first seed.")
_PRESETS = flags.DEFINE_list("presets", ["paper", "pamfn", "recommended"], "Our presets.")
_VARIANTS = flags.DEFINE_multi_string(
    "variant", [], "One more model of ours, LABEL=PRESET:FIELD=VALUE[,FIELD=VALUE...], e.g. "
    "'pamfn+flax_init=pamfn:model.init=\'flax\'' (a preset with switches changed; values "
    "are Python literals, bare words are strings). Reported as ours-LABEL. "
    "'model.init_weights=pamfn' starts it from PAMFN's own initial weights (see above).")
_NUM_FOLDS = flags.DEFINE_integer("num_folds", 4, "k-fold folds (without --splits).")
_CV_SEED = flags.DEFINE_integer("cv_seed", 0, "k-fold seed (without --splits).")
_FOLDS = flags.DEFINE_list("folds", [], "Fold names to run (default: all).")
_UNI_EPOCHS = flags.DEFINE_integer("unimodal_epochs", 80, "Branch epochs.")
_FUSION_EPOCHS = flags.DEFINE_integer("fusion_epochs", 80, "Fusion epochs.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size (both phases, both sides).")
_WINDOW = flags.DEFINE_integer("window", 0, "Training segments (0: the longest video).")
_FEATURES = flags.DEFINE_integer("features", 64, "d.")
_EMBED = flags.DEFINE_integer("embed_features", 512, "Branch embedding (PAMFN: 512 fixed).")
_CANDIDATES = flags.DEFINE_integer("candidates", 4, "K.")
_HEADS = flags.DEFINE_integer("heads", 1, "Attention heads (PAMFN ms_heads = cm_heads); 0: "
                              "ours per preset, PAMFN per its config file.")
_MAX_RUNS = flags.DEFINE_integer(
    "max_runs_per_program", 0, "Ours: train the seeds x folds in groups of at most this many "
    "runs per program (config.max_runs_per_program; memory), 0: all as one program.")
_SKIP_PAMFN = flags.DEFINE_bool("skip_pamfn", False, "Run only our side.")
_PAMFN_DIR = flags.DEFINE_string("pamfn_dir", None, "Checkout of github.com/qinghuannn/PAMFN.")
_TORCH_PYTHON = flags.DEFINE_string("torch_python", None, "A Python with torch, einops, scipy.")
_PAMFN_CONFIG = flags.DEFINE_string("pamfn_config", "configs/RG_feats1.py",
                                    "PAMFN config file, relative to --pamfn_dir.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch threads (0: default).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Keep data, runs and the export here (else "
                               "a temporary folder, deleted at the end). An existing run "
                               "of ours there is resumed, not retrained.")
_OUT = flags.DEFINE_string("out", None, "JSON output (else stdout).")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Markdown output (else stderr).")
_BASELINE = flags.DEFINE_string(
    "baseline", None, "Also pair every other model with this one of ours (a preset or "
    "--variant label): the per-switch table (a variant against its preset).")
_REUSE_PAMFN = flags.DEFINE_bool(
    "reuse_pamfn", False, "Reuse PAMFN's output in --workdir when it was made with the same "
    "settings and data (else an error); its timings are then those of that earlier run.")
_HISTORIES = flags.DEFINE_bool("histories", False, "Include every fold's per-epoch history.")
_SHARE_UNIMODAL = flags.DEFINE_bool(
    "share_unimodal", True, "A variant that differs from its preset only in fusion-phase "
    "fields (FUSION_PHASE_FIELDS) starts from a copy of the preset's finished unimodal "
    "checkpoints in --workdir instead of retraining them (the same computation, so the same "
    "numbers; ~40% of a variant's time).")


class ParityError(Exception):
    """A setting or input of the benchmark is wrong; the message names the flag."""


# --------------------------------------------------------------------------- data

def load_dataset(workdir: str) -> feature_dataset.FeatureDataset:
    if _DATASET.value == "complementary":
        if _DATA_DIR.value or _NAME.value:
            raise ParityError("--dataset=complementary generates its data; drop --data_dir/--name.")
        data_dir = os.path.join(workdir, "data")
        complementary.write_complementary(
            data_dir, "complementary", num_videos=_NUM_VIDEOS.value,
            feature_dim=_FEATURE_DIM.value, min_segments=_MIN_SEGMENTS.value,
            max_segments=_MAX_SEGMENTS.value, signal=_SIGNAL.value, seed=_DATA_SEED.value)
        return feature_dataset.load_feature_dataset(data_dir, "complementary")
    if not (_DATA_DIR.value and _NAME.value):
        raise ParityError("name the data: --dataset=complementary, or --data_dir=<dir> "
                          "--name=<dataset> (e.g. --data_dir=demo/features --name=synthskill).")
    return feature_dataset.load_feature_dataset(_DATA_DIR.value, _NAME.value)


def score_max_of(dataset: feature_dataset.FeatureDataset) -> float:
    """The top of the dataset's score scale (PAMFN's label divisor, our config.data.score_max)."""
    value = dataset.metadata.get("score_max")
    if value is None:
        raise ParityError(f"dataset {dataset.path!r} records no score scale (score_max); "
                          "re-run its prep stage with --score_scale.")
    return float(value)


def make_folds(dataset: feature_dataset.FeatureDataset) -> list[splits.Fold]:
    if _SPLITS.value:
        folds = splits.load_splits(_SPLITS.value)
    else:
        folds = splits.make_splits(dataset.samples, "kfold", _NUM_FOLDS.value, seed=_CV_SEED.value)
    for fold in folds:
        fold.indices(dataset.samples)  # SplitError when a fold names unknown videos
    if _FOLDS.value:
        unknown = set(_FOLDS.value) - {f.name for f in folds}
        if unknown:
            raise ParityError(f"--folds: {sorted(unknown)} are not among {[f.name for f in folds]}.")
    return folds


def export_for_pamfn(path: str, dataset: feature_dataset.FeatureDataset,
                     folds: Sequence[splits.Fold], score_max: float) -> None:
    """Features (zero padded, with lengths), scores and folds as dataset indices."""
    samples = dataset.samples
    lengths = np.array([int(s["num_segments"]) for s in samples])
    arrays: dict[str, Any] = {"lengths": lengths, "score_max": np.float64(score_max),
                              "scores": np.array([float(s["score"]) for s in samples]),
                              "video_ids": np.array([s["video_id"] for s in samples]),
                              "fold_names": np.array([f.name for f in folds])}
    for m in feature_dataset.MODALITIES:
        if m not in dataset.modalities:
            raise ParityError(f"dataset {dataset.path!r} lacks modality {m!r}; PAMFN needs all "
                              "three (rgb, flow, mask).")
        feats = np.zeros((len(samples), lengths.max(), samples[0][m].shape[-1]), np.float32)
        for i, s in enumerate(samples):
            feats[i, :lengths[i]] = s[m]
        arrays[f"features_{m}"] = feats
    for k, fold in enumerate(folds):
        arrays[f"fold_{k}_train"], arrays[f"fold_{k}_test"] = fold.indices(samples)
    np.savez(path, **arrays)


# --------------------------------------------------------------------------- PAMFN

def pamfn_command(npz: str, out: str, window: int) -> list[str]:
    """The command line of `pamfn_parity_torch.py` for this call's settings."""
    if not (_PAMFN_DIR.value and _TORCH_PYTHON.value):
        raise ParityError("PAMFN's side (and model.init_weights=pamfn) needs "
                          "--pamfn_dir=<PAMFN checkout> and --torch_python=<python with "
                          "torch>; or pass --skip_pamfn.")
    if _EMBED.value != 512:
        raise ParityError("--embed_features: PAMFN's BaseModel fixes the embedding at 512; "
                          "other widths compare only with --skip_pamfn.")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pamfn_parity_torch.py")
    seeds = ",".join(str(_FIRST_SEED.value + i) for i in range(_SEEDS.value))
    return [_TORCH_PYTHON.value, script, f"--pamfn_dir={_PAMFN_DIR.value}", f"--data={npz}",
            f"--out={out}", f"--seeds={seeds}", f"--unimodal_epochs={_UNI_EPOCHS.value}",
            f"--fusion_epochs={_FUSION_EPOCHS.value}", f"--batch_size={_BATCH.value}",
            f"--segments={window}", f"--features={_FEATURES.value}",
            f"--candidates={_CANDIDATES.value}", f"--heads={_HEADS.value}",
            f"--pamfn_config={_PAMFN_CONFIG.value}", f"--threads={_TORCH_THREADS.value}",
            f"--folds={','.join(_FOLDS.value)}"]


def run_pamfn(npz: str, out: str, window: int) -> dict[str, Any]:
    cmd = pamfn_command(npz, out, window)
    # What the output depends on: the arguments and the exported input's contents (not
    # the threads, nor where the input and output files lie: a copied workdir reuses).
    digest = hashlib.sha256()
    with np.load(npz) as arrays:  # the contents: the zip's own bytes carry timestamps
        for name in sorted(arrays.files):
            digest.update(name.encode() + np.ascontiguousarray(arrays[name]).tobytes())
    key = {"args": [a for a in cmd[2:]
                    if not a.startswith(("--threads=", "--data=", "--out="))],
           "input_sha256": digest.hexdigest()}
    key_file = out + ".key.json"
    if _REUSE_PAMFN.value and os.path.exists(out):
        saved = read_json(key_file) if os.path.exists(key_file) else None
        if saved != key:
            raise ParityError(f"--reuse_pamfn: {out} was made with other settings or data "
                              f"than this call's; drop --reuse_pamfn to retrain PAMFN.")
        with open(out) as f:
            report = json.load(f)
        report["reused"] = True  # its timings are from the run that wrote it
        return report
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=False)  # its progress goes to our stderr
    if done.returncode:
        raise RuntimeError(f"PAMFN's side failed (exit {done.returncode}): {shlex.join(cmd)}")
    with open(out) as f:
        report = json.load(f)
    report["command"] = shlex.join(cmd)
    report["process_wall_s"] = time.perf_counter() - t0
    with open(out, "w") as f:  # keeps the command and wall time for a reuse
        json.dump(report, f)
    write_json(key_file, key)
    return report


def pamfn_records(report: Mapping[str, Any], dataset: feature_dataset.FeatureDataset,
                  folds: Sequence[splits.Fold], score_max: float) -> list[dict[str, Any]]:
    """PAMFN's per-epoch test predictions (labels score / score_max) as fold records of
    `evaluation.summary`, scored with the project's metrics."""
    by_name = {f.name: f for f in folds}
    out = []
    for rec in report["folds"]:
        _, test = by_name[rec["name"]].indices(dataset.samples)
        true = np.array([float(dataset.samples[i]["score"]) for i in test])
        runs = dict(rec["branches"], fused=rec["fused"])
        models = {}
        for head, run in runs.items():
            last = run["history"][-1]
            models[head] = {"history": [
                {"epoch": h["epoch"], "loss": h["loss"],
                 "scc": metrics.spearman(h["test_pred"], true),
                 "mae": metrics.mae(np.asarray(h["test_pred"]) * score_max, true)}
                for h in run["history"]],
                "predictions": {"final": {"epoch": last["epoch"], "true": true.tolist(),
                                          "pred": (np.asarray(last["test_pred"])
                                                   * score_max).tolist()}}}
        out.append({"name": rec["name"], "seed": rec["seed"], "models": models})
    return out


def pamfn_timing(report: Mapping[str, Any]) -> dict[str, Any]:
    phases: dict[str, list[dict]] = {}
    for rec in report["folds"]:
        for key, t in rec["timing"].items():
            phases.setdefault(key, []).append(t)
    out = {}
    for key, ts in phases.items():
        ms = [t["median_ms_per_step"] for t in ts if t["median_ms_per_step"] is not None]
        out[key] = {"ms_per_step": statistics.median(ms) if ms else None,
                    "wall_s": sum(t["wall_s"] for t in ts), "runs": len(ts),
                    "skipped_singleton_batches": sum(t["skipped_singleton_batches"] for t in ts)}
    uni = [out[k]["ms_per_step"] for k in out if k.startswith("unimodal_")]
    if uni and all(v is not None for v in uni):
        out["unimodal_three_branches"] = {"ms_per_step": sum(uni),
                                          "wall_s": sum(out[k]["wall_s"] for k in out
                                                        if k.startswith("unimodal_"))}
    out["total_wall_s"] = report.get("wall_s")
    return out


# --------------------------------------------------------------------------- ours

class _LibraryTimer:
    """Times our phases by wrapping `phase.run_phase` (wall per phase) and
    `train.train_epochs` (one scanned training epoch, synced) in this process."""

    def __init__(self):
        self.phases: dict[str, dict[str, Any]] = {}
        self._current = None

    @contextlib.contextmanager
    def installed(self):
        run_phase, train_epochs = phase.run_phase, train.train_epochs

        def timed_run_phase(states, data, members, **kw):
            name = str(kw.get("desc", "")).split()[-1] if kw.get("desc") else "phase"
            entry = self.phases.setdefault(name, {"epoch_s": [], "wall_s": 0.0, "runs": 0,
                                                  "steps": None})
            entry["runs"] = max(entry["runs"], len(members))
            self._current, t0 = entry, time.perf_counter()
            try:
                return run_phase(states, data, members, **kw)
            finally:
                entry["wall_s"] += time.perf_counter() - t0

        def timed_train_epochs(*args, **kw):
            t0 = time.perf_counter()
            result = jax.block_until_ready(train_epochs(*args, **kw))
            if self._current is not None:
                self._current["epoch_s"].append(time.perf_counter() - t0)
                self._current["steps"] = kw.get("steps")
            return result

        phase.run_phase, train.train_epochs = timed_run_phase, timed_train_epochs
        try:
            yield self
        finally:
            phase.run_phase, train.train_epochs = run_phase, train_epochs

    def report(self) -> dict[str, Any]:
        out = {}
        for name, e in self.phases.items():
            timed = e["epoch_s"][1:]  # the first epoch compiles
            per_step = (1e3 * statistics.median(timed) / e["steps"]
                        if timed and e["steps"] else None)
            out[name] = {"ms_per_program_step": per_step, "runs_per_program": e["runs"],
                         "ms_per_run_step": per_step / e["runs"] if per_step else None,
                         "steps_per_epoch": e["steps"], "first_epoch_s": (e["epoch_s"] or [None])[0],
                         "wall_s": e["wall_s"]}
        return out


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets: "a=1,b=('x', 'y')" -> two items."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]]


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """'LABEL=PRESET:FIELD=VALUE,...' -> (label, preset, {field: value})."""
    label, sep, rest = text.partition("=")
    preset, _, assignments = rest.partition(":")
    if not sep or not label or preset not in config_lib.PRESETS:
        raise ParityError(f"--variant={text!r}: expected LABEL=PRESET:FIELD=VALUE,... with "
                          f"PRESET one of {sorted(config_lib.PRESETS)}.")
    overrides = {}
    for item in filter(None, _split_top_level(assignments)):
        field, eq, value = item.partition("=")
        if not eq:
            raise ParityError(f"--variant={text!r}: {item!r} is not FIELD=VALUE.")
        try:
            overrides[field.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[field.strip()] = value.strip()
    return label, preset, overrides


@functools.lru_cache(maxsize=None)  # read once per process, not once per preset
def pamfn_learning_rates() -> dict[str, float]:
    """The learning rates of the PAMFN config file (`--pamfn_config`), which ours then use
    too, so that no preset differs from PAMFN in them (they are per dataset, not a switch);
    {} without --pamfn_dir (ours keep the library's)."""
    if not _PAMFN_DIR.value:
        return {}
    conf = runpy.run_path(os.path.join(_PAMFN_DIR.value, _PAMFN_CONFIG.value))
    return {"unimodal": float(conf["single_modality"]["lr"]),
            "fusion": float(conf["multi_modality"]["lr"])}


def our_config(preset: str, dataset: feature_dataset.FeatureDataset, score_max: float,
               window: int, workdir: str, overrides: Mapping[str, Any] | None = None):
    config = config_lib.get_config()
    if "preset" in config:  # the library resolves the preset's switches
        config.preset = preset
    config.workdir = workdir
    config.seed, config.num_seeds = _FIRST_SEED.value, _SEEDS.value
    config.data.data_dir = os.path.dirname(os.path.dirname(dataset.path))
    config.data.name = dataset.name
    config.data.score_max = score_max
    config.data.window = window
    config.data.modalities = feature_dataset.MODALITIES
    config.model.features, config.model.embed_features = _FEATURES.value, _EMBED.value
    config.model.num_candidates = _CANDIDATES.value
    if _HEADS.value:  # a set value overrides the preset's switch (matched widths)
        config.model.num_heads = _HEADS.value
    for cfg, epochs in ((config.unimodal, _UNI_EPOCHS.value), (config.fusion, _FUSION_EPOCHS.value)):
        cfg.num_epochs, cfg.batch_size = epochs, _BATCH.value
    config.cv.scheme, config.cv.num_folds, config.cv.seed = "kfold", _NUM_FOLDS.value, _CV_SEED.value
    config.progress_bar = False
    config.max_runs_per_program = _MAX_RUNS.value
    config.checkpoint_every_epochs = max(_UNI_EPOCHS.value, _FUSION_EPOCHS.value)
    config.eval_batch_size = 16
    if "csfb_plots" in config:
        config.csfb_plots = 0
    for phase_name, lr in pamfn_learning_rates().items():
        config[phase_name].learning_rate = lr
    for field, value in (overrides or {}).items():
        section, _, name = field.rpartition(".")
        target = config
        for part in filter(None, section.split(".")):
            target = target[part]
        if name not in target:
            raise ParityError(f"--variant: config has no field {field!r}.")
        target[name] = value
    return config


def our_template(config, feature_dim: int) -> Any:
    """Shapes and dtypes of the variables of our model of `config` (traced, not run)."""
    model = train.build_model(config_lib.resolve(config).model, feature_dataset.MODALITIES)
    return train.abstract_variables(model, feature_dim)


def initial_weights_from_pamfn(state: Mapping[str, np.ndarray], template: Any,
                               preset: str) -> dict[str, Any]:
    """A PAMFN model's state dict as our variables of `template` (our model's variables or
    their shapes: preset 'pamfn' or a variant of it, at PAMFN's widths), every entry of
    ours covered; `preset` names the model in the error."""
    refuse = (f"model.init_weights=pamfn: PAMFN's weights do not fit this model (preset "
              f"{preset!r}; only 'pamfn' and its variants have PAMFN's parameters)")
    try:
        variables = pamfn_weights.from_pamfn(state, template)
    except pamfn_weights.PamfnWeightsError as e:
        raise ParityError(f"{refuse}: {e}") from None
    have = traverse_util.flatten_dict(variables)
    missing = [k for k in traverse_util.flatten_dict(template) if k not in have]
    if missing:
        raise ParityError(f"{refuse}: PAMFN has no weights for {'/'.join(missing[0])} "
                          f"(and {len(missing) - 1} more).")
    return variables


def pamfn_initial_weights(config, workdir: str, npz: str, window: int) -> str:
    """`model.init_weights=pamfn`: writes, per seed, the initial weights PAMFN's own runs
    of that seed start from (`pamfn_parity_torch.py --init_out`: every PAMFN run reseeds
    before drawing, so they depend on the seed only) in our layout under
    `<workdir>/initial_weights/`, and returns the `{seed}` file pattern for the config."""
    folder = os.path.join(workdir, "initial_weights")
    pattern = os.path.join(folder, "seed{seed}.npz")
    seeds = [_FIRST_SEED.value + i for i in range(_SEEDS.value)]
    if all(os.path.exists(initial_weights.path_for_seed(pattern, s)) for s in seeds):
        return pattern
    os.makedirs(folder, exist_ok=True)
    raw = os.path.join(folder, "pamfn_state_dicts.npz")
    cmd = pamfn_command(npz, os.devnull, window) + [f"--init_out={raw}"]
    done = subprocess.run(cmd, check=False)
    if done.returncode:
        raise RuntimeError(f"PAMFN's initial weights failed (exit {done.returncode}): "
                           f"{shlex.join(cmd)}")
    template = None
    with np.load(raw) as arrays:
        for seed in seeds:
            prefix = f"seed{seed}/"
            state = {k[len(prefix):]: arrays[k] for k in arrays.files if k.startswith(prefix)}
            if template is None:  # one trace for all seeds; input width from PAMFN's layer
                template = our_template(config, state["model_r.embedding.0.weight"].shape[1])
            initial_weights.save(initial_weights.path_for_seed(pattern, seed),
                                 initial_weights_from_pamfn(state, template, config.get("preset")))
    return pattern


def _unimodal_phase_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's saved config (`config.json`) without the fields of FUSION_PHASE_FIELDS."""
    kept = copy.deepcopy(dict(config))
    for field in FUSION_PHASE_FIELDS:
        section, _, name = field.rpartition(".")
        (kept.get(section, {}) if section else kept).pop(name, None)
    return kept


def share_unimodal_phase(source: str, target: str, config) -> int:
    """Copies the finished unimodal checkpoints (and their tensorboard logs) of the run in
    `source` into `target` when `config` (the target's) trains the same unimodal phase:
    its config.json equal to the source's outside FUSION_PHASE_FIELDS, and every run of
    it (seed x fold) at its last unimodal epoch in `source`. The target then resumes at
    its fusion phase (`phase.run_phase` scores restored final states). Returns the number
    of runs copied (0: nothing shared, e.g. another unimodal setup or an unfinished source;
    a run the target already has is left as it is)."""
    saved = os.path.join(source, "config.json")
    if not os.path.exists(saved):
        return 0
    current = cross_validation.run_config_dict(config_lib.resolve(config))
    if _unimodal_phase_config(read_json(saved)) != _unimodal_phase_config(to_jsonable(current)):
        return 0
    # one folder per run: checkpoints/<run name>/unimodal (`RunData.checkpoint_dir`)
    runs = sorted(glob.glob(os.path.join(source, "checkpoints", "**", train.PHASES[0]),
                            recursive=True))
    last = str(config.unimodal.num_epochs)
    finished = [d for d in runs if os.path.isdir(os.path.join(d, "last", last))]
    if not finished or len(finished) != len(runs):
        return 0
    copied = 0
    for phase_dir in finished:
        member = os.path.relpath(os.path.dirname(phase_dir), os.path.join(source, "checkpoints"))
        for sub in ("checkpoints", "tensorboard"):
            src = os.path.join(source, sub, member, train.PHASES[0])
            dst = os.path.join(target, sub, member, train.PHASES[0])
            if os.path.isdir(src) and not os.path.exists(dst):
                tmp = dst + ".copying"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                os.replace(tmp, dst)  # a stopped copy leaves no half phase behind
                copied += sub == "checkpoints"
    return copied


def run_ours(label: str, preset: str, overrides: Mapping[str, Any], dataset, folds,
             score_max: float, window: int, root: str
             ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    workdir = os.path.join(root, f"ours-{label}")
    config = our_config(preset, dataset, score_max, window, workdir, overrides)
    if config.model.get("init_weights") == PAMFN:
        npz = os.path.join(root, "pamfn_input.npz")
        if not os.path.exists(npz):  # --skip_pamfn: PAMFN's side did not export it
            export_for_pamfn(npz, dataset, folds, score_max)
        config.model.init_weights = pamfn_initial_weights(config, workdir, npz, window)
    if _FOLDS.value:
        names = [f.name for f in folds]
        config.cv.folds = tuple(names.index(n) + 1 for n in _FOLDS.value)
    os.makedirs(workdir, exist_ok=True)
    splits_file = os.path.join(workdir, "splits.json")
    if not os.path.exists(splits_file):  # the library trains on a run's saved folds
        splits.save_splits(folds, splits_file, {"source": "benchmarks/peer_parity.py"})
    elif [f.to_dict() for f in splits.load_splits(splits_file)] != [f.to_dict() for f in folds]:
        raise ParityError(f"{splits_file} holds other folds than this benchmark's; use a new "
                          "--workdir.")
    shared = 0
    if _SHARE_UNIMODAL.value and label != preset:  # it compares the configs itself
        shared = share_unimodal_phase(os.path.join(root, f"ours-{preset}"), workdir, config)
        if shared:
            print(f"peer_parity: ours-{label}: the unimodal phase of {shared} runs copied from "
                  f"ours-{preset} (same unimodal setup; --noshare_unimodal retrains it).",
                  file=sys.stderr, flush=True)
    timer = _LibraryTimer()
    t0 = time.perf_counter()
    with timer.installed():
        results, _ = cross_validation.run_cross_validation(config, workdir)
    info = {"timing": dict(timer.report(), total_wall_s=time.perf_counter() - t0),
            "preset_applied": "preset" in config, "workdir": workdir,
            "unimodal_runs_shared_from_preset": shared,
            "config": results.get("config")}
    return results["folds"], info


# --------------------------------------------------------------------------- readings

def per_seed_readings(records: Sequence[Mapping[str, Any]]
                      ) -> dict[str, dict[str, dict[int, tuple[float, float, Any]]]]:
    """{head: {reading: {seed: (fold-mean SCC, fold-mean MAE, epochs)}}}, each seed's
    records summarised by `summary.summarise`."""
    out: dict[str, dict[str, dict[int, tuple]]] = {}
    for seed in sorted({r["seed"] for r in records}):
        one = summary.summarise([r for r in records if r["seed"] == seed])
        for head, by_reading in one.items():
            for reading in READINGS:
                e = by_reading.get(reading)
                if e is not None:
                    out.setdefault(head, {}).setdefault(reading, {})[seed] = (
                        e["scc_mean"], e["mae_mean"], [p["epoch"] for p in e["per_fold"]])
    late = branch_mean_readings(records)
    if late:
        out[BRANCH_MEAN] = {"final": late}
    return out


def branch_mean_readings(records: Sequence[Mapping[str, Any]]
                         ) -> dict[int, tuple[float, float, Any]]:
    """{seed: (fold-mean SCC, fold-mean MAE, epochs)} of `BRANCH_MEAN`: per fold, the mean
    of the branches' final-epoch test predictions (score units); {} when a fold lacks them."""
    per_seed: dict[int, list[tuple[float, float, int]]] = {}
    for r in records:
        finals = [r["models"].get(m, {}).get("predictions", {}).get("final")
                  for m in feature_dataset.MODALITIES]
        if any(f is None for f in finals):
            return {}
        if any(f.get("video_ids") != finals[0].get("video_ids") for f in finals):
            raise ParityError(f"fold {r['name']}: the branches' test predictions are of "
                              "different videos.")
        pred = np.mean([np.asarray(f["pred"], float) for f in finals], axis=0)
        true = np.asarray(finals[0]["true"], float)
        per_seed.setdefault(r["seed"], []).append(
            (metrics.spearman(pred, true), metrics.mae(pred, true), finals[0]["epoch"]))
    return {seed: (float(np.mean([x[0] for x in rows])), float(np.mean([x[1] for x in rows])),
                   [x[2] for x in rows]) for seed, rows in per_seed.items()}


def aggregate(readings) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for head, by_reading in readings.items():
        for reading, by_seed in by_reading.items():
            seeds = sorted(by_seed)
            scc = metrics.mean_ci95([by_seed[s][0] for s in seeds])
            mae = metrics.mean_ci95([by_seed[s][1] for s in seeds])
            out.setdefault(head, {})[reading] = {
                "scc_mean": scc[0], "scc_ci95": scc[1], "mae_mean": mae[0], "mae_ci95": mae[1],
                "n_seeds": len(seeds),
                "per_seed": [{"seed": s, "scc": by_seed[s][0], "mae": by_seed[s][1],
                              "epochs": by_seed[s][2]} for s in seeds]}
    return out


def differences(ours, reference) -> dict[str, dict[str, dict[str, Any]]]:
    """ours − reference per head and reading, paired over the seeds both have."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for head, by_reading in ours.items():
        for reading, by_seed in by_reading.items():
            ref = reference.get(head, {}).get(reading, {})
            common = sorted(set(by_seed) & set(ref))
            if not common:
                continue
            scc = metrics.mean_ci95([by_seed[s][0] - ref[s][0] for s in common])
            mae = metrics.mean_ci95([by_seed[s][1] - ref[s][1] for s in common])
            out.setdefault(head, {})[reading] = {"scc_diff": scc[0], "scc_diff_ci95": scc[1],
                                                 "mae_diff": mae[0], "mae_diff_ci95": mae[1],
                                                 "n_seeds": len(common)}
    return out


def fusion_gain(readings: Mapping[str, Mapping[str, Mapping[int, tuple]]]) -> dict[str, Any]:
    """Within one model, final reading, seeds paired: the fused SCC minus each branch's, the
    best branch's (the highest mean SCC) and `BRANCH_MEAN`'s; {} without a fused head."""
    fused = readings.get("fused", {}).get("final")
    if not fused:
        return {}
    finals = {h: readings[h]["final"] for h in feature_dataset.MODALITIES + (BRANCH_MEAN,)
              if "final" in readings.get(h, {})}
    branches = [h for h in finals if h != BRANCH_MEAN]
    out: dict[str, Any] = {"best_branch": max(
        branches, key=lambda h: np.mean([v[0] for v in finals[h].values()]))} if branches else {}
    for head, by_seed in finals.items():
        common = sorted(set(fused) & set(by_seed))
        diff = metrics.mean_ci95([fused[s][0] - by_seed[s][0] for s in common])
        out[f"fused - {head}"] = {"scc_diff": diff[0], "scc_diff_ci95": diff[1],
                                  "n_seeds": len(common)}
    return out


def mean_curves(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    """Per head, test SCC and MAE per epoch, averaged over folds and seeds."""
    out = {}
    for head in HEADS:
        rows = [r["models"][head]["history"] for r in records if head in r.get("models", {})]
        if not rows:
            continue
        n = min(len(h) for h in rows)
        out[head] = {k: np.nanmean([[h[i][k] if h[i][k] is not None else np.nan
                                     for i in range(n)] for h in rows], axis=0).tolist()
                     for k in ("scc", "mae")}
    return out


def ridge_baselines(dataset, folds, score_max: float) -> dict[str, Any]:
    """Ridge on mean-pooled features per modality and on all (`evaluation.baselines`)."""
    samples = dataset.samples
    scale = feature_dataset.score_scale(dataset.metadata)
    low = scale.min if scale is not None else float(dataset.metadata.get("score_min", 0.0))
    result = baselines.ridge_cv(
        {m: [s[m] for s in samples] for m in feature_dataset.MODALITIES},
        [float(s["score"]) for s in samples], [f.indices(samples) for f in folds],
        [s.get("source_video") or s["video_id"] for s in samples],
        score_range=(low, score_max), fold_names=[f.name for f in folds])
    return {k: {f: v[f] for f in ("scc_mean", "scc_ci95", "mae_mean", "mae_ci95", "n_folds")}
            | {"alphas": [p["alpha"] for p in v["per_fold"]]} for k, v in result.items()}


# --------------------------------------------------------------------------- output

def _fmt(mean, half) -> str:
    return metrics.format_mean_std(mean, None if half is None or not np.isfinite(half) else half,
                                   digits=3)


def _reading_rows(table: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    """One Markdown row per (name, head): SCC and MAE (value ± CI, `keys` = scc, its CI,
    mae, its CI) under every reading."""
    rows = []
    for name, by_head in table.items():
        for h in (h for h in HEADS + (BRANCH_MEAN,) if h in by_head):
            cells = []
            for r in READINGS:
                e = by_head[h].get(r)
                cells += ([_fmt(e[keys[0]], e[keys[1]]), _fmt(e[keys[2]], e[keys[3]])]
                          if e else ["—", "—"])
            rows.append(f"| {name} | {h} | " + " | ".join(cells) + " |")
    return rows


def markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# Learning parity with PAMFN: {report['dataset']['name']}", "",
             f"{report['n_seeds']} seeds x {len(report['folds'])} folds; "
             f"{report['settings']['unimodal_epochs']} + {report['settings']['fusion_epochs']} "
             f"epochs; mean over folds per seed, then mean ± 95% CI over seeds. Readings: "
             + "; ".join(f"**{r}** = {READING_NOTES[r]}" for r in READINGS) + ".", ""]
    head = "| model | head | " + " | ".join(f"SCC {r} | MAE {r}" for r in READINGS) + " |"
    lines += [head, "|" + " --- |" * (2 + 2 * len(READINGS))]
    lines += _reading_rows(report["models"], ("scc_mean", "scc_ci95", "mae_mean", "mae_ci95"))
    for name, entry in (report.get("baselines") or {}).items():
        if isinstance(entry, dict) and "scc_mean" in entry:
            lines.append(f"| {name} | — | {_fmt(entry['scc_mean'], entry['scc_ci95'])} | "
                         f"{_fmt(entry['mae_mean'], entry['mae_ci95'])} |"
                         + " — |" * (2 * len(READINGS) - 2))
    if report.get("differences"):
        lines += ["", "Paired differences (seeds paired; SCC, MAE):", "",
                  "| comparison | head | " + " | ".join(f"ΔSCC {r} | ΔMAE {r}" for r in READINGS)
                  + " |", "|" + " --- |" * (2 + 2 * len(READINGS))]
        lines += _reading_rows(report["differences"],
                               ("scc_diff", "scc_diff_ci95", "mae_diff", "mae_diff_ci95"))
    gains = {m: g for m, g in (report.get("fusion_gain") or {}).items() if g}
    if gains:
        lines += ["", f"Fusion gain, final reading (ΔSCC, seeds paired): the fused model "
                  f"minus its best branch and minus {BRANCH_MEAN} (the mean of its three "
                  "branches' predictions, no training):", "",
                  f"| model | best branch | fused − best branch | fused − {BRANCH_MEAN} |",
                  "| --- | --- | --- | --- |"]
        for model, g in gains.items():
            best, late = g.get(f"fused - {g.get('best_branch')}"), g.get(f"fused - {BRANCH_MEAN}")
            cells = [_fmt(e["scc_diff"], e["scc_diff_ci95"]) if e else "—" for e in (best, late)]
            lines.append(f"| {model} | {g.get('best_branch', '—')} | {cells[0]} | {cells[1]} |")
    if report.get("baselines"):
        lines += ["", "Ridge rows: ridge regression on mean-pooled features, one fit per fold "
                  "(no seed), penalty by inner CV on the training fold; ± is the 95% CI over "
                  "folds, shown under 'final'."]
    lines += ["", "Step time (ms per step; ours: all runs in lockstep, per program step and "
              "per run) and wall time per phase:", "",
              "| model | phase | ms/step | ms/run-step | wall s |", "| --- | --- | --- | --- | --- |"]
    for model, timing in report["timing"].items():
        for ph, t in timing.items():
            if not isinstance(t, dict):
                continue
            step = t.get("ms_per_step", t.get("ms_per_program_step"))
            run = t.get("ms_per_run_step", step)
            cell = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
            lines.append(f"| {model} | {ph} | {cell(step)} | {cell(run)} | {cell(t.get('wall_s'))} |")
    rates = report["settings"].get("learning_rates") or {}
    lines += ["", "Learning rates (ours, both phases): " + (
        f"unimodal {rates['unimodal']:g}, fusion {rates['fusion']:g}, from PAMFN's config file."
        if rates else "the library's defaults (no --pamfn_dir: PAMFN's config file was not "
        "read, so they may differ from PAMFN's).")]
    if report.get("reused_pamfn"):
        lines.append("PAMFN's side was reused from an earlier run in the workdir "
                     "(--reuse_pamfn): its timings are that run's.")
    v = report["versions"]
    lines += ["", f"Versions: jax {v.get('jax')}, flax {v.get('flax')}, torch {v.get('torch')}.",
              f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def run(workdir: str) -> dict[str, Any]:
    t_start = time.perf_counter()
    if _SEEDS.value < 1:
        raise ParityError(f"--seeds must be >= 1, got {_SEEDS.value}.")
    dataset = load_dataset(workdir)
    score_max = score_max_of(dataset)
    folds = make_folds(dataset)
    longest = max(int(s["num_segments"]) for s in dataset.samples)
    window = _WINDOW.value or longest
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable] + sys.argv),
        "dataset": {"name": dataset.name, "path": dataset.path, "videos": len(dataset),
                    "feature_dim": int(dataset.samples[0]["rgb"].shape[-1]),
                    "longest": longest, "score_max": score_max,
                    "generator": dataset.metadata.get("generator")},
        "folds": [f.name for f in folds if not _FOLDS.value or f.name in _FOLDS.value],
        "n_seeds": _SEEDS.value,
        "seeds": [_FIRST_SEED.value + i for i in range(_SEEDS.value)],
        "settings": {"unimodal_epochs": _UNI_EPOCHS.value, "fusion_epochs": _FUSION_EPOCHS.value,
                     "batch_size": _BATCH.value, "window": window, "features": _FEATURES.value,
                     "embed_features": _EMBED.value, "candidates": _CANDIDATES.value,
                     "heads": _HEADS.value, "presets": list(_PRESETS.value),
                     "variants": list(_VARIANTS.value), "learning_rates": pamfn_learning_rates()},
        "readings": READING_NOTES,
        "versions": provenance.package_versions(),
        "provenance": provenance.record(),
        "models": {}, "differences": {}, "timing": {}, "runs": {}}
    records: dict[str, list] = {}
    if not pamfn_learning_rates():  # only with --skip_pamfn (else PAMFN's side needs it)
        print("peer_parity: WARNING: no --pamfn_dir, so ours train at the library's learning "
              "rates, not those of PAMFN's config file; pass --pamfn_dir to compare with a "
              "PAMFN run.", file=sys.stderr, flush=True)
    if not _SKIP_PAMFN.value:
        npz = os.path.join(workdir, "pamfn_input.npz")
        export_for_pamfn(npz, dataset, folds, score_max)
        torch_report = run_pamfn(npz, os.path.join(workdir, "pamfn_output.json"), window)
        records[PAMFN] = pamfn_records(torch_report, dataset, folds, score_max)
        report["timing"][PAMFN] = pamfn_timing(torch_report)
        report["reused_pamfn"] = bool(torch_report.get("reused"))
        report["versions"]["torch"] = torch_report["versions"]["torch"]
        report["runs"][PAMFN] = {
            "command": torch_report["command"], "pamfn_config": torch_report["pamfn_config"],
            "threads": torch_report["threads"],
            "branch_checkpoints": [{"seed": r["seed"], "fold": r["name"],
                                    **{m: b["branch_checkpoint"] for m, b in r["branches"].items()}}
                                   for r in torch_report["folds"]]}
    ours = [(p, p, {}) for p in _PRESETS.value] + [parse_variant(v) for v in _VARIANTS.value]
    for label, preset, overrides in ours:
        model = f"ours-{label}"
        records[model], info = run_ours(label, preset, overrides, dataset, folds, score_max,
                                        window, workdir)
        info["overrides"] = overrides
        report["timing"][model] = info.pop("timing")
        report["runs"][model] = info
    readings = {model: per_seed_readings(recs) for model, recs in records.items()}
    for model, r in readings.items():
        report["models"][model] = aggregate(r)
        report.setdefault("curves", {})[model] = mean_curves(records[model])
        report.setdefault("fusion_gain", {})[model] = fusion_gain(r)
        if model != PAMFN and PAMFN in readings:
            report["differences"][f"{model} - {PAMFN}"] = differences(r, readings[PAMFN])
    if _BASELINE.value:
        base = f"ours-{_BASELINE.value}"
        if base not in readings:
            raise ParityError(f"--baseline={_BASELINE.value}: not among this run's models "
                              f"{sorted(readings)}; add it to --presets or --variant.")
        for model, r in readings.items():
            if model not in (base, PAMFN):
                report["differences"][f"{model} - {base}"] = differences(r, readings[base])
    report["baselines"] = ridge_baselines(dataset, [f for f in folds if f.name in report["folds"]],
                                          score_max)
    if _HISTORIES.value:
        report["records"] = records
    report["wall_s"] = time.perf_counter() - t_start
    return report


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    try:
        if _WORKDIR.value:
            os.makedirs(_WORKDIR.value, exist_ok=True)
            report = run(_WORKDIR.value)
        else:
            with tempfile.TemporaryDirectory(prefix="peer_parity_") as tmp:
                report = run(tmp)
    except (ParityError, feature_dataset.DatasetError, splits.SplitError) as e:
        sys.exit(f"error: {e}")
    text = json.dumps(to_jsonable(report), indent=1)
    table = markdown(report)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if _MARKDOWN.value:
        with open(_MARKDOWN.value, "w") as f:
            f.write(table)
    else:
        print(table, file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
