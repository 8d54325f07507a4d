r"""PAMFN's side of the learning-parity benchmark (`peer_parity.py`), trained with PyTorch.

Runs where PyTorch is installed (never in the project's venv; it needs only numpy, scipy,
torch and einops) against a checkout of github.com/qinghuannn/PAMFN:

  /path/to/torch/python benchmarks/pamfn_parity_torch.py --pamfn_dir=/path/to/PAMFN \
      --data=<export.npz> --out=<pamfn.json> [--seeds=0,1] [--unimodal_epochs=80] \
      [--fusion_epochs=80] [--batch_size=8] [--segments=32] [--features=64] \
      [--candidates=4] [--heads=1] [--pamfn_config=configs/RG_feats1.py] [--threads=0]

`peer_parity.py` writes the input (features, scores and the folds, as dataset indices)
and reads the output; nothing here imports the project. PAMFN's modules (`BaseModel`,
`PAMFN` of models/pamfn.py) and its hyperparameters (the `single_modality` and
`multi_modality` dicts of the `--pamfn_config` file) are imported at run time from
`--pamfn_dir`; nothing of PAMFN is copied here. The loop follows PAMFN's `pipeline.py`
(`go`, `train_loop`, `train_epoch`, `test_epoch`), which itself needs CUDA and timm, so it
is written again here in our words:

  * per fold and seed, three branch runs (PAMFN's modality slots V, F, A hold our rgb,
    flow, mask), each a `BaseModel` trained with the config's optimiser (RG_feats1: SGD,
    momentum 0.9, weight decay 1e-4, lr 1e-2, cosine schedule to 5e-6 stepped per epoch
    as timm's CosineLRScheduler with no warm-up, global-norm clip 2, MSE); then the
    fusion run, a `PAMFN` that loads the three branches from files saved by the
    branch runs (`torch.save` of the whole module, as `save_base_model` does), trained
    with the config's fusion optimiser (RG_feats1: AdamW, lr 5e-4, head (`fc`) at
    lr x 0.1 when `reduce_fc_lr`, PyTorch's default weight decay 0.01 because
    `build_optimizer` passes none, cosine, clip 2, MSE). Each run starts with
    `setup_seed(seed)` (numpy and torch), as `go` does;
  * the branch file the fusion run loads is PAMFN's `save_moniter='avg_coef'`: the
    state at the last epoch where the mean test SCC of the last 10 epochs reached a new
    maximum above 0 (it selects on the test fold, as PAMFN does). When that never
    happens PAMFN would fail to find the file; we then save the final epoch and say so
    (`branch_checkpoint` = 'final (avg_coef never > 0)'). `--branch_checkpoint=final`
    always uses the last epoch;
  * labels are score / score_max in [0, 1], as PAMFN's datasets.py gives them (score
    / 25 for RG, / 45 for FIS-V: the top of the scale); the sigmoid heads predict them;
  * variable lengths as PAMFN's `AQADataset` + default collate handle them: a training
    sample longer than `--segments` is cropped at a start drawn by
    `np.random.randint(len - segments)`, a shorter one is zero padded at the end (the
    zeros enter the convolutions, BatchNorm and the average pooling: no mask); testing
    uses batch size 1 and the whole video, unpadded. `peer_parity.py` sets `segments`
    to our `config.data.window`;
  * batches: a shuffled order per epoch (`torch.randperm`, like DataLoader's
    shuffle=True), the last batch smaller; in the fusion run a last batch of exactly one
    sample is skipped, because PAMFN's fusion head (BatchNorm on [B, C, 1]) raises for
    one sample in train mode (`skipped_singleton_batches` counts them);
  * every epoch: train, then predict the test fold in eval mode (PAMFN's Gumbel noise
    stays on at test time, as in its `gen_fusion_kind`); the predictions (label units)
    are written out, and `peer_parity.py` scores them with the project's metrics.
Note that PAMFN's fusion model detaches the features of its V and F branches but not of
A (`self.drop(_)` without `.detach()`), so the branch in slot A (our mask) keeps training
during the fusion run; and its branches run in train mode there (BatchNorm statistics and
dropout as in training).

`--init_out=<npz>` trains nothing: it writes, per seed, the state dict of the `PAMFN`
model that seed's runs start from (keys `seed<s>/<name>`): the three branches as the
branch runs draw them and the fusion parameters as the fusion run draws them. Every run
reseeds right before it draws (`go`), so the draws depend on the seed only, not on the
fold, and all three branches of a seed start from the same draws. `peer_parity.py`
loads them into ours for `model.init_weights=pamfn`.

Output JSON: versions, the resolved settings, and per seed and fold the per-epoch history
of each branch run and of the fusion run (loss, lr, test predictions) plus timings
(median ms per training step, wall seconds per run).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import types

import numpy as np

SLOTS = (("V", "rgb"), ("F", "flow"), ("A", "mask"))  # PAMFN's modality slot -> ours
FILE_NAMES = {"V": "rgb", "F": "flow", "A": "audio"}  # how PAMFN names branch files
DATASET = "parity"  # PAMFN's `dataset_name`, used only in its branch file names


def import_pamfn(pamfn_dir: str):
    # models/pamfn.py imports torchvision without using it; a CPU torch wheel may not
    # have a matching torchvision, so an empty module stands in for the import.
    sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
    sys.path.insert(0, os.path.abspath(pamfn_dir))
    from models import pamfn  # noqa: E402  (PAMFN's own module)
    return pamfn


def load_pamfn_config(pamfn_dir: str, path: str) -> tuple[dict, dict]:
    """(single_modality, multi_modality) of one of PAMFN's config files."""
    full = path if os.path.isabs(path) else os.path.join(pamfn_dir, path)
    if not os.path.isfile(full):
        raise SystemExit(f"error: --pamfn_config {full!r} not found; name one of PAMFN's "
                         "configs/*.py (e.g. configs/RG_feats1.py).")
    spec = importlib.util.spec_from_file_location("pamfn_parity_config", full)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.single_modality), dict(module.multi_modality)


def setup_seed(torch, seed: int) -> None:
    """As PAMFN's pipeline.setup_seed (the CUDA calls are no-ops on the CPU)."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


class Schedule:
    """Per-epoch learning rates of each parameter group, as PAMFN's `build_scheduler`
    gives them: 'cosine' is timm's CosineLRScheduler (t_initial = epochs, no warm-up),
    'none' keeps the rate; stepped after every epoch with `step(epoch + 1)`."""

    def __init__(self, optimizer, kind: str, epochs: int, lr_min: float):
        if kind not in ("cosine", "none", None):
            raise SystemExit(f"error: PAMFN config lr_scheduler {kind!r} is not supported "
                             "here (cosine or none); choose another --pamfn_config.")
        self.optimizer, self.kind, self.epochs, self.lr_min = optimizer, kind, epochs, lr_min
        self.base = [g["lr"] for g in optimizer.param_groups]

    def step(self, t: int) -> None:
        if self.kind != "cosine":
            return
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = (self.lr_min if t >= self.epochs else self.lr_min + 0.5 * (
                base - self.lr_min) * (1 + math.cos(math.pi * t / self.epochs)))


def build_optimizer(torch, model, conf: dict, fusion: bool):
    """As PAMFN's pipeline.build_optimizer: the fusion head at lr x 0.1 when
    `reduce_fc_lr`; AdamW and Adam get no weight decay argument (PyTorch defaults)."""
    lr = conf["lr"]
    if conf.get("reduce_fc_lr") and fusion:
        head = {id(p) for p in model.fc.parameters()}
        groups = [{"params": list(model.fc.parameters()), "lr": lr * 0.1},
                  {"params": [p for p in model.parameters() if id(p) not in head]}]
    else:
        groups = model.parameters()
    if conf["optim"] == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=conf["weight_decay"])
    if conf["optim"] == "AdamW":
        return torch.optim.AdamW(groups, lr=lr)
    if conf["optim"] == "Adam":
        return torch.optim.Adam(groups, lr=lr)
    raise SystemExit(f"error: PAMFN config optim {conf['optim']!r} unknown.")


class Data:
    """The exported dataset: features per PAMFN slot, lengths, labels in [0, 1]."""

    def __init__(self, torch, path: str):
        z = np.load(path, allow_pickle=False)
        self.lengths = z["lengths"].astype(int)
        self.labels = (z["scores"] / float(z["score_max"])).astype(np.float32)
        self.features = {slot: z[f"features_{ours}"] for slot, ours in SLOTS}
        self.folds = [(str(name), z[f"fold_{k}_train"].astype(int), z[f"fold_{k}_test"].astype(int))
                      for k, name in enumerate(z["fold_names"])]
        self.feature_dim = int(self.features["V"].shape[-1])
        self.torch = torch

    def train_sample(self, i: int, segments: int) -> dict:
        """AQADataset.__getitem__ with is_train=True: random crop or zero padding."""
        n = self.lengths[i]
        out = {}
        start = np.random.randint(n - segments) if n > segments else 0  # one draw per sample
        for slot, feats in self.features.items():
            x = feats[i, :n]
            if n > segments:
                x = x[start:start + segments]
            elif n < segments:
                x = np.concatenate([x, np.zeros((segments - n, x.shape[1]), x.dtype)])
            out[slot] = x
        return out

    def batches(self, indices: np.ndarray, batch_size: int, segments: int, skip_single: bool):
        torch = self.torch
        order = indices[torch.randperm(len(indices)).numpy()]
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            if skip_single and len(idx) == 1:
                yield None
                continue
            samples = [self.train_sample(i, segments) for i in idx]
            feats = {slot: torch.from_numpy(np.stack([s[slot] for s in samples]))
                     for slot, _ in SLOTS}
            yield feats, torch.from_numpy(self.labels[idx])

    def test_sample(self, i: int) -> dict:
        return {slot: self.torch.from_numpy(f[i:i + 1, :self.lengths[i]])
                for slot, f in self.features.items()}


def spearman100(pred, true) -> float:
    """Test SCC x 100 as PAMFN's test_epoch computes it (for its checkpoint monitor)."""
    from scipy.stats import spearmanr
    return float(spearmanr(pred, true)[0]) * 100


def train_run(torch, model, data: Data, train_idx, test_idx, conf: dict, epochs: int,
              batch_size: int, segments: int, fusion: bool, monitor: str | None):
    """One PAMFN run (pipeline.train_loop): per epoch train, then predict the test fold.
    Returns (history, snapshot of the monitored state or None, its epoch, timings)."""
    optimizer = build_optimizer(torch, model, conf, fusion)
    schedule = Schedule(optimizer, conf.get("lr_scheduler"), epochs, conf.get("lr_min", 0.0))
    history, coefs, best_avg, snapshot, snapshot_epoch = [], [], 0.0, None, None
    step_times, skipped, t_run = [], 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        lr, losses = optimizer.param_groups[-1]["lr"], []
        for batch in data.batches(train_idx, batch_size, segments, skip_single=fusion):
            if batch is None:
                skipped += 1
                continue
            feats, label = batch
            t0 = time.perf_counter()
            preds, info = model(feats)
            loss = model.call_loss(preds, label, **info)
            optimizer.zero_grad()
            loss.backward()
            if conf.get("clip_grad"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 2)
            optimizer.step()
            step_times.append(time.perf_counter() - t0)
            losses.append((float(loss.item()), len(label)))
        schedule.step(epoch + 1)
        model.eval()
        with torch.no_grad():
            test_pred = [float(model(data.test_sample(i))[0].reshape(-1)[0]) for i in test_idx]
        history.append({"epoch": epoch + 1, "lr": lr,
                        "loss": sum(l * n for l, n in losses) / max(sum(n for _, n in losses), 1),
                        "test_pred": test_pred})
        if monitor == "avg_coef":
            coefs.append(spearman100(test_pred, data.labels[test_idx]))
            avg = float(np.mean(coefs[-10:]))
            if avg > best_avg:  # NaN never counts, as in PAMFN
                snapshot, snapshot_epoch = copy.deepcopy(model.state_dict()), epoch + 1
            best_avg = max(best_avg, avg)
    timing = {"median_ms_per_step": 1e3 * statistics.median(step_times) if step_times else None,
              "mean_ms_per_step": 1e3 * statistics.fmean(step_times) if step_times else None,
              "steps": len(step_times), "wall_s": time.perf_counter() - t_run,
              "skipped_singleton_batches": skipped}
    return history, snapshot, snapshot_epoch, timing


def new_branch(torch, pamfn, feature_dim: int, slot: str, seed: int, args, single: dict):
    """A freshly initialised `BaseModel` for PAMFN modality slot `slot`, drawn as `go`
    draws it: right after `setup_seed(seed)`, so every run of a seed starts alike."""
    setup_seed(torch, seed)
    return pamfn.BaseModel(feature_dim, args.features, single["drop_rate"], modality=slot)


def new_fusion(torch, pamfn, ckpt_dir: str, seed: int, args, multi: dict):
    """A `PAMFN` fusion model on the branch files in `ckpt_dir`, its own parameters drawn
    right after `setup_seed(seed)` (the branch files do not touch the generator)."""
    setup_seed(torch, seed)
    load = torch.load

    def load_module(*a, **kw):  # PAMFN pickles whole modules (torch >= 2.6 default differs)
        kw.setdefault("weights_only", False)
        return load(*a, **kw)

    torch.load = load_module
    try:
        return pamfn.PAMFN(model_dim=args.features, fc_drop=multi["fc_drop"],
                           fc_r=multi["fc_r"], feat_drop=multi["feat_drop"],
                           K=args.candidates, ms_heads=args.heads or multi["ms_heads"],
                           cm_heads=args.heads or multi["cm_heads"],
                           ckpt_dir=ckpt_dir, rgb_ckpt_name="x", flow_ckpt_name="x",
                           audio_ckpt_name="x", dataset_name=DATASET)
    finally:
        torch.load = load


def initial_weights(torch, pamfn, feature_dim: int, seed: int, args, single: dict,
                    multi: dict) -> dict[str, np.ndarray]:
    """The state dict of the `PAMFN` model every run of `seed` starts from: its three
    branches as each branch run draws them (`new_branch`) and its fusion parameters as the
    fusion run draws them (`new_fusion`). A run's initial draws depend on the seed only
    (every run reseeds), so this is also the start of every fold's runs."""
    with tempfile.TemporaryDirectory() as ckpt_dir:
        for slot, _ in SLOTS:
            branch = new_branch(torch, pamfn, feature_dim, slot, seed, args, single)
            torch.save(branch, os.path.join(ckpt_dir, f"{DATASET}_{FILE_NAMES[slot]}_x.pth"))
        model = new_fusion(torch, pamfn, ckpt_dir, seed, args, multi)
    # copies: state_dict tensors share storage with the module's parameters and buffers
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def run_fold(torch, pamfn, data: Data, fold, seed: int, args, single: dict, multi: dict) -> dict:
    name, train_idx, test_idx = fold
    record = {"name": name, "seed": seed, "branches": {}, "timing": {}}
    with tempfile.TemporaryDirectory() as ckpt_dir:
        for slot, ours in SLOTS:
            model = new_branch(torch, pamfn, data.feature_dim, slot, seed, args, single)
            monitor = "avg_coef" if args.branch_checkpoint == "avg_coef" else None
            history, snapshot, epoch, timing = train_run(
                torch, model, data, train_idx, test_idx, single, args.unimodal_epochs,
                args.batch_size, args.segments, fusion=False, monitor=monitor)
            if snapshot is not None:
                model.load_state_dict(snapshot)
                which = f"avg_coef (epoch {epoch})"
            else:
                which = ("final" if monitor is None else "final (avg_coef never > 0)")
                epoch = args.unimodal_epochs
            torch.save(model, os.path.join(ckpt_dir, f"{DATASET}_{FILE_NAMES[slot]}_x.pth"))
            record["branches"][ours] = {"history": history, "branch_checkpoint": which,
                                        "branch_checkpoint_epoch": epoch}
            record["timing"][f"unimodal_{ours}"] = timing
        model = new_fusion(torch, pamfn, ckpt_dir, seed, args, multi)
    history, _, _, timing = train_run(torch, model, data, train_idx, test_idx, multi,
                                      args.fusion_epochs, args.batch_size, args.segments,
                                      fusion=True, monitor=None)
    record["fused"] = {"history": history}
    record["timing"]["fusion"] = timing
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pamfn_dir", required=True)
    parser.add_argument("--data", required=True, help="the .npz written by peer_parity.py")
    parser.add_argument("--out", required=True, help="JSON output path")
    parser.add_argument("--pamfn_config", default="configs/RG_feats1.py",
                        help="PAMFN config file (relative to --pamfn_dir) for optimisers, "
                             "schedules, dropouts, clipping")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--unimodal_epochs", type=int, default=80)
    parser.add_argument("--fusion_epochs", type=int, default=80)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--segments", type=int, required=True, help="training crop length")
    parser.add_argument("--features", type=int, default=64, help="PAMFN model_dim (d)")
    parser.add_argument("--candidates", type=int, default=4, help="PAMFN K")
    parser.add_argument("--heads", type=int, default=1,
                        help="PAMFN ms_heads = cm_heads (0: the config file's)")
    parser.add_argument("--branch_checkpoint", choices=("avg_coef", "final"), default="avg_coef")
    parser.add_argument("--folds", default="", help="comma-separated fold names (default all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--init_out", default="",
                        help="write the initial weights of every seed's runs (npz, keys "
                             "seed<s>/<state dict name>) here instead of training")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    pamfn = import_pamfn(args.pamfn_dir)
    single, multi = load_pamfn_config(args.pamfn_dir, args.pamfn_config)
    if args.branch_checkpoint == "avg_coef" and single.get("save_moniter") != "avg_coef":
        raise SystemExit(f"error: {args.pamfn_config} saves branches by "
                         f"{single.get('save_moniter')!r}, which this script does not "
                         "reproduce; pass --branch_checkpoint=final or use RG_feats1 / "
                         "FISV_feats1.")
    data = Data(torch, args.data)
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    if args.init_out:
        weights = {f"seed{seed}/{name}": value for seed in seeds for name, value in
                   initial_weights(torch, pamfn, data.feature_dim, seed, args, single,
                                   multi).items()}
        tmp = args.init_out + ".tmp.npz"
        np.savez_compressed(tmp, **weights)
        os.replace(tmp, args.init_out)
        return
    folds = [f for f in data.folds if not args.folds or f[0] in args.folds.split(",")]
    t0 = time.perf_counter()
    records = []
    for seed in seeds:
        for fold in folds:
            records.append(run_fold(torch, pamfn, data, fold, seed, args, single, multi))
            print(f"[pamfn] seed {seed} {fold[0]} done ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    report = {"versions": {"torch": torch.__version__, "numpy": np.__version__,
                           "python": platform.python_version()},
              "threads": torch.get_num_threads(), "args": vars(args),
              "pamfn_config": {"single_modality": single, "multi_modality": multi},
              "label_scale": "score / score_max", "wall_s": time.perf_counter() - t0,
              "folds": records}
    with open(args.out, "w") as f:
        json.dump(report, f, default=str)


if __name__ == "__main__":
    main()
