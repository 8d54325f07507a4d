"""A tiny version of `make demo`: render SynthSkill -> real prep (I3D) -> both phases -> outputs."""
import json
import os

import pytest

from data_prep import synthskill_setup
from surgfusion_jax import config_lib, main

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "demo.py")


@pytest.mark.slow  # ~65 s; `make test-slow` also runs a fresh-clone `make demo` (test_demo_readme)
def test_demo_path_end_to_end(tmp_path, capsys):
    config = config_lib.load_config_file(DEMO, "small")
    config.workdir = str(tmp_path / "run")
    config.data.data_dir = str(tmp_path / "features")
    config.compilation_cache_dir = ""
    config.progress_bar = False
    synth = config.synthskill
    synth.out_dir = str(tmp_path / "synthskill")
    synth.num_surgeons, synth.trials_per_surgeon = 4, 2
    synth.image_size, synth.prep_image_size = 64, 32
    synth.min_seconds, synth.max_seconds = 3.5, 4.5  # one 32-frame segment at 10 FPS
    config.data.window = 4
    config.cv.num_folds = 2
    config.num_seeds = 2  # the shipped demo trains 5: seeds x folds in one program
    for phase in (config.unimodal, config.fusion):
        phase.num_epochs = 2

    # Without its features, the training entry point names the prep command (exit 2).
    assert main.run(config) == 2
    assert "python -m data_prep.synthskill_setup" in capsys.readouterr().err
    synthskill_setup.ensure_features(config, progress=False)  # `make demo`'s first step
    assert main.run(config) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    for line in ("results table", "plots", "modality curves", "checkpoints"):
        assert line in out
    results = json.loads((run / "results.json").read_text())
    assert set(results["summary"]) == {"rgb", "flow", "mask", "fused"}
    assert [(f["seed"], f["name"]) for f in results["folds"]] == [
        (0, "fold_1"), (0, "fold_2"), (1, "fold_1"), (1, "fold_2")]
    assert "fused - rgb" in results["comparisons"]  # paired over the two seeds
    md = (run / "results.md").read_text()
    assert "fused" in md and "SCC" in md
    for model in ("rgb", "flow", "mask", "fused"):
        assert os.path.getsize(run / "plots" / f"predictions_{model}.png") > 1000
    curves = [f for f in os.listdir(run / "plots" / "csfb") if f.startswith("csfb_")]
    assert len(curves) == 8  # one Fig. 4-style plot per video (mean over the seeds' models)
    meta = json.loads(open(tmp_path / "features" / "synthskill" / "1.0.0"
                           / "surgfusion_metadata.json").read())
    assert meta["source"] == "synthskill" and meta["image_size"] == 32

    # A second run reuses the rendered videos, the features and the finished checkpoints.
    synthskill_setup.ensure_features(config, progress=False)
    assert main.run(config) == 0
    assert json.loads((run / "results.json").read_text())["summary"] == results["summary"]


@pytest.mark.slow
def test_full_demo_learns_skill(tmp_path):
    """`make demo` as shipped (render, prep, 60 + 60 epochs, 4 folds, 5 seeds): the
    models must rank held-out surgeons' videos, and fusion must not fall far behind the
    best single modality (3 seeds measured: fused final SCC 0.68-0.79, best branch
    0.64-0.80)."""
    config = config_lib.load_config_file(DEMO)
    config.workdir = str(tmp_path / "run")
    config.data.data_dir = str(tmp_path / "features")
    config.synthskill.out_dir = str(tmp_path / "synthskill")
    config.compilation_cache_dir = ""
    config.progress_bar = False
    synthskill_setup.ensure_features(config, progress=False)
    assert main.run(config) == 0
    summary = json.loads((tmp_path / "run" / "results.json").read_text())["summary"]
    final = {m: summary[m]["final"]["scc_mean"] for m in summary}
    assert final["fused"] > 0.55, final
    assert final["fused"] > max(final[m] for m in ("rgb", "flow", "mask")) - 0.15, final
    assert summary["fused"]["paper"]["scc_mean"] > 0.7, summary["fused"]["paper"]
