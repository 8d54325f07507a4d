r"""PAMFN's own PyTorch train step, timed for the side-by-side in `train_step.py`.

Runs where PyTorch is installed (never in the project's venv, never imported by the
package or the tests) against a checkout of github.com/qinghuannn/PAMFN:

  /path/to/torch/python benchmarks/pamfn_step.py --pamfn_dir=/path/to/PAMFN \
      --batch=16 --length=64 --features=256 --candidates=10 --heads=2 --threads=2

PAMFN's modules are imported from `--pamfn_dir` at run time (nothing of PAMFN is copied
here). The steps follow its `pipeline.py`: a unimodal step is one `BaseModel` forward,
MSE loss, backward and SGD step (momentum 0.9, weight decay 1e-4); the fusion step is one
`PAMFN` forward over the three frozen branches, MSE loss, backward, global-norm clip 2 and
AdamW step (the branches run in train mode, as PAMFN's `model.train()` leaves them).
Prints JSON: median/mean/min ms per step and samples/s per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types


def _import_pamfn(pamfn_dir: str):
    # models/pamfn.py imports torchvision without using it; a CPU torch wheel may not
    # have a matching torchvision, so an empty module stands in for the import.
    sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
    sys.path.insert(0, os.path.abspath(pamfn_dir))
    from models import pamfn  # noqa: E402  (PAMFN's own module)
    return pamfn


def _time(step, warmup: int, steps: int) -> dict:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"median_ms": 1e3 * median, "mean_ms": 1e3 * statistics.fmean(times),
            "min_ms": 1e3 * min(times)}


def _training_step(torch, model, opt, feats, label):
    """One step as PAMFN's `pipeline.train_epoch` takes it: forward, its MSE loss,
    backward, global-norm clip 2, optimizer step."""
    def step():
        pred, _ = model(feats)
        loss = model.call_loss(pred, label)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2)
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pamfn_dir", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--feature_dim", type=int, default=1024)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--phases", default="unimodal,fusion")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pamfn = _import_pamfn(args.pamfn_dir)
    b, t, f, d = args.batch, args.length, args.feature_dim, args.features
    keys = ("V", "F", "A")  # PAMFN's names for its three modality slots
    feats = {k: torch.randn(b, t, f) for k in keys}
    label = torch.rand(b) * 0.4 + 0.1
    branches = {k: pamfn.BaseModel(f, d, 0.5, modality=k) for k in keys}
    report = {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
              "config": vars(args), "phases": {}}

    if "unimodal" in args.phases:
        model = branches["V"]
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4)
        report["phases"]["unimodal_per_branch"] = _time(
            _training_step(torch, model, opt, feats, label), args.warmup, args.steps)

    if "fusion" in args.phases:
        with tempfile.TemporaryDirectory() as ckpt_dir:
            names = {"V": "rgb", "F": "flow", "A": "audio"}
            for k, model in branches.items():  # PAMFN loads its branches from files
                torch.save(model, os.path.join(ckpt_dir, f"bench_{names[k]}_x.pth"))
            load = torch.load

            def load_full(*a, **kw):  # PAMFN pickles whole modules (torch >= 2.6 default differs)
                kw.setdefault("weights_only", False)
                return load(*a, **kw)

            torch.load = load_full
            model = pamfn.PAMFN(model_dim=d, fc_drop=0.0, fc_r=2, feat_drop=0.5,  # its config
                                K=args.candidates, ms_heads=args.heads, cm_heads=args.heads,
                                ckpt_dir=ckpt_dir, rgb_ckpt_name="x", flow_ckpt_name="x",
                                audio_ckpt_name="x", dataset_name="bench")
            torch.load = load
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        report["phases"]["fusion"] = _time(
            _training_step(torch, model, opt, feats, label), args.warmup, args.steps)
    for phase in report["phases"].values():
        phase["samples_per_s"] = b / (phase["median_ms"] / 1e3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
