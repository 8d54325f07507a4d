"""The training CLI and the configs: paper settings, clear errors, exit codes."""
import os
import subprocess
import sys
import types

import ast

import pytest

from surgfusion_jax import config_lib as default
from surgfusion_jax import errors, main, predict
from surgfusion_jax.training import cross_validation as cv, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("rarp", "rah", "jigsaws_suturing", "jigsaws_knot_tying", "jigsaws_needle_passing")


def _config_path(name):
    return os.path.join(REPO, "configs", f"{name}.py")


def _load(name, arg=""):
    return default.load_config_file(_config_path(name), arg)


def _cli(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "surgfusion_jax.main", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_carry_the_paper_settings(name):
    assert _load(name).preset == "paper"
    c = default.resolve(_load(name))
    assert c.unimodal.num_epochs == c.fusion.num_epochs == 300
    assert c.unimodal.batch_size == c.fusion.batch_size == (32 if name == "rah" else 16)
    assert (c.model.features, c.model.num_candidates, c.model.num_heads) == (256, 10, 2)
    assert c.data.score_max == 30.0 and c.data.modalities == ("rgb", "flow", "mask")
    assert (c.unimodal.learning_rate, c.unimodal.end_learning_rate, c.unimodal.momentum) == (1e-2, 5e-6, 0.9)
    assert (c.fusion.learning_rate, c.fusion.end_learning_rate, c.fusion.head_lr_factor) == (1e-3, 5e-6, 0.1)
    assert c.unimodal.weight_decay == 1e-4  # §IV-B; AdamW's is PAMFN's (the paper is silent)
    assert c.fusion.weight_decay == 0.01 and c.data.target_max == 0.5 and c.loss_alpha == 0.5
    assert c.unimodal.grad_clip == c.fusion.grad_clip == 2.0
    assert (c.cv.scheme, c.cv.num_folds) == (("loso", 4) if name.startswith("jigsaws") else ("kfold", 4))
    with open(_config_path(name), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    assert f"configs/{name}.py" in doc  # the docstring shows the command
    cv.validate_config(c)
    small = _load(name, "small")
    assert small.model.features == 16 and small.unimodal.num_epochs == 3
    with pytest.raises(ValueError, match="small"):
        _load(name, "huge")


def test_default_config_validates_and_names_bad_fields():
    c = default.get_config()
    c.data.name = "x"
    cv.validate_config(c)
    for field, value, match in [("data.window", 0, "config.data.window"),
                                ("model.fusion", "sum", "config.model.fusion"),
                                ("model.num_heads", 3, "config.model.num_heads"),
                                ("data.modalities", ("rgb", "depth"), "config.data.modalities"),
                                ("fusion.end_learning_rate", 1.0, "config.fusion.end_learning_rate"),
                                ("cv.inner_val_fraction", 1.0, "config.cv.inner_val_fraction")]:
        bad = default.get_config()
        bad.data.name = "x"
        section, key = field.split(".")
        bad[section][key] = value
        with pytest.raises(cv.ConfigError, match=match):
            cv.validate_config(bad)


def test_cli_without_data_prints_the_prep_command_and_fails(tmp_path):
    result = _cli(f"--config={REPO}/configs/rarp.py", cwd=tmp_path)
    assert result.returncode == 2
    assert "No feature dataset 'rarp_skill'" in result.stderr
    assert "python -m data_prep.prepare" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert os.listdir(tmp_path) == []  # nothing written before the data check


def test_cli_bad_config_value_fails_with_the_field(tmp_path):
    result = _cli(f"--config={REPO}/configs/rah.py", "--config.cv.scheme=bootstrap", cwd=tmp_path)
    assert result.returncode == 2 and "config.cv.scheme" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_reports_results_or_stop(monkeypatch, capsys, tmp_path):
    c = _load("rarp", "small")
    c.workdir = str(tmp_path)
    summary = {"fused": {"paper": {"scc_mean": 0.9, "scc_std": 0.01, "mae_mean": 1.2, "mae_std": 0.1}}}
    trained = types.SimpleNamespace(dataset=types.SimpleNamespace(metadata={"backbone": "x"}))
    monkeypatch.setattr(cv, "run_cross_validation",
                        lambda config: ({"summary": summary, "folds": []}, trained))
    monkeypatch.setattr(predict, "predict", lambda **kwargs: [])  # Fig. 4 plots
    assert main.run(c) == 0
    out = capsys.readouterr().out
    assert "| fused | 0.9000 ± 0.0100 |" in out and str(tmp_path) in out

    def stop(config):
        raise train.StopRequested("stopped after epoch 2")

    monkeypatch.setattr(cv, "run_cross_validation", stop)
    assert main.run(c) == errors.EXIT_STOPPED
    assert "stopped after epoch 2" in capsys.readouterr().err
