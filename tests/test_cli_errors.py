"""Command-line mistakes end in one line on stderr that names the fix, exit status 2, no
traceback (`errors.parse_flags`). The training CLI runs as a user runs it, in
subprocesses started together (each pays the JAX/TF import once)."""
import os
import subprocess
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

from surgfusion_jax import errors
from surgfusion_jax.data import feature_dataset as fd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RARP = os.path.join(REPO, "configs", "rarp.py")


def _start(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # the entry point must silence TF itself
    return subprocess.Popen([sys.executable, "-m", "surgfusion_jax.main", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_training_cli_mistakes_end_in_one_line_naming_the_fix(tmp_path):
    rng = np.random.default_rng(0)
    fd.write_feature_dataset(
        str(tmp_path / "features"), "d",
        [dict(video_id=f"v{i}", score=10.0 + i, **{m: rng.normal(size=(4, 8))
                                                  for m in fd.MODALITIES}) for i in range(4)],
        dict(backbone="test", fps=10, segment_length=32, modalities=list(fd.MODALITIES),
             **fd.parse_score_scale("grs").metadata()),
        feature_dim=8)
    workdir = tmp_path / "run"  # a run trained with another config
    workdir.mkdir()
    (workdir / "config.json").write_text('{"seed": 12345}\n')
    data = [f"--config.data.data_dir={tmp_path / 'features'}", "--config.data.name=d"]
    cases = {  # arguments -> what the one line must say
        ("--config=configs/rarpp.py",): ["no such config file 'configs/rarpp.py'",
                                         "--config=configs/rarp.py"],
        (f"--config={RARP}", "--config.data.nam=x"): [
            "unknown config field --config.data.nam; did you mean --config.data.name?"],
        (f"--config={RARP}", "--workdir=runs/x"): [
            "unknown flag --workdir; did you mean --config.workdir?"],
        (f"--config={RARP}:small", f"--config.workdir={workdir}", *data): [
            f"workdir {str(workdir)!r} holds a run with another config", "--config.workdir"],
    }
    procs = {args: _start(*args, cwd=tmp_path) for args in cases}
    for args, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        for text in cases[args]:
            assert text in lines[0], (args, lines[0])
        assert "Traceback" not in out


def _parse(argv):
    """errors.parse_flags on fresh flags, as the entry points define them: (rest, stderr
    line or None, exit status)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("workdir", "", "", flag_values=fv)
    try:
        return errors.parse_flags(argv, fv), None, 0
    except SystemExit as e:
        return None, e, e.code


def test_flag_mistakes_in_process(capsys):
    """The cases the subprocess test leaves out (absl and ml_collections errors)."""
    rest, _, code = _parse(["p", f"--config={RARP}", "--workdir=w", "extra"])
    assert code == 0 and rest == ["p", "extra"]
    for argv, text in [
            (["p", f"--config={RARP}:huge"], "unknown config argument 'huge'; use ':small'"),
            (["p", f"--config={RARP}", "--config.seed=abc"], "--config.seed=abc: invalid"),
            (["p", f"--config={RARP}", "--config.nosuch=1"],
             "--config.nosuch; surgfusion_jax/config_lib.py documents every field"),
            (["p", f"--config={RARP}", "--workdri=w"], "did you mean --workdir?"),
            (["p", "--config", "missing.py"], "no such config file 'missing.py'")]:
        _, _, code = _parse(argv)
        (line,) = capsys.readouterr().err.splitlines()
        assert code == 2 and line.startswith("error: ") and text in line, (argv, line)
