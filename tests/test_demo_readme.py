"""The README's demo table comes from a run (scripts/readme_demo_table.py), and a fresh
`make demo` prints it to the last digit (slow)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from surgfusion_jax.evaluation import summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "readme_demo_table.py")
BEGIN, END = "<!-- demo-table:begin -->", "<!-- demo-table:end -->"


def _script(*args, repo=REPO):
    return subprocess.run([sys.executable, os.path.join(repo, "scripts", "readme_demo_table.py"),
                           *args], cwd=repo, capture_output=True, text=True, timeout=120)


def _block(readme_text):
    return readme_text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def _tiny_run(run_dir, shift=0.0):
    """A finished run's results.json: 2 seeds x 2 folds, 3 epochs, every head."""
    folds = []
    for seed in (0, 1):
        for k in (1, 2):
            models = {m: {"history": [{"epoch": e, "scc": 0.1 * e + 0.01 * i + 0.003 * k + shift,
                                       "mae": 5.0 - e + 0.1 * i + 0.07 * seed}
                                      for e in (1, 2, 3)]}
                      for i, m in enumerate(("rgb", "flow", "mask", "fused"))}
            folds.append({"name": f"fold_{k}", "seed": seed, "models": models})
    summary.write_results(str(run_dir), {"folds": folds, "seeds": [0, 1]})
    return summary.load_results(str(run_dir))


def _table_lines(stdout):
    """The Markdown table `python -m surgfusion_jax.main` prints (the first one)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end])


def test_script_rewrites_the_block_and_check_finds_a_one_digit_change(tmp_path):
    results = _tiny_run(tmp_path / "run")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Demo\n\ntext before\n\n{BEGIN}\n| typed | table |\n{END}\n\nafter\n")
    args = (f"--run_dir={tmp_path / 'run'}", f"--readme={readme}")
    p = _script(*args, "--check")
    assert p.returncode == 1 and "differs" in p.stderr and "+| fused |" in p.stderr, p.stderr
    assert _script(*args).returncode == 0
    text = readme.read_text()
    assert text.startswith("# Demo\n\ntext before\n\n") and text.endswith(f"{END}\n\nafter\n")
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import readme_demo_table
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    table = readme_demo_table.demo_table(results).rstrip("\n")
    assert _block(text) == table and table.count("\n") == 5  # header, rule, 4 models
    assert re.search(r"\| fused \| \d\.\d{4} ± \d\.\d{4} \|", table)
    p = _script(*args, "--check")
    assert p.returncode == 0 and "up to date" in p.stdout
    assert _script(*args).returncode == 0 and readme.read_text() == text  # idempotent
    # One digit off in the README is a difference.
    block = _block(text)
    i = max(j for j, c in enumerate(block) if c.isdigit())
    readme.write_text(text.replace(block, block[:i] + str((int(block[i]) + 1) % 10) + block[i + 1:]))
    assert _script(*args, "--check").returncode == 1
    # So is a run whose numbers moved.
    _tiny_run(tmp_path / "run", shift=1e-4)
    readme.write_text(text)
    assert _script(*args, "--check").returncode == 1


def test_script_errors_name_the_fix(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    p = _script(f"--run_dir={tmp_path / 'none'}", f"--readme={readme}")
    assert p.returncode == 2 and "holds no finished demo run; fix: run `make demo`" in p.stderr
    assert "Traceback" not in p.stderr
    _tiny_run(tmp_path / "run")
    p = _script(f"--run_dir={tmp_path / 'run'}", f"--readme={readme}")
    assert p.returncode == 2 and f"{BEGIN} and {END} once each" in p.stderr
    assert readme.read_text() == "no markers\n"


def test_readme_has_one_demo_table_block():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        block = _block(f.read()).splitlines()
    assert block[0].startswith("| model |")
    models = ["rgb", "flow", "mask", "fused"]  # then the ridge probes, all modalities last
    expected = models + [f"ridge ({m})" for m in models[:3] + ["all"]]
    assert [row.split(" | ")[0] for row in block[2:]] == [f"| {m}" for m in expected]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fresh_make_demo_prints_the_readme_table(tmp_path):
    """A clean clone's `make demo` (the committed tree) prints the README's table exactly.

    The clone uses this test's venv (`make test-slow` installed it with the lock file, as
    `make demo` would) instead of installing a second one."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", REPO, str(clone)], check=True, timeout=300)
    venv = sys.prefix
    assert os.path.exists(os.path.join(venv, "bin", "python")), "run inside a venv (make test-slow)"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    p = subprocess.run(["make", "demo", f"VENV={venv}", "-o", f"{venv}/.installed"], cwd=clone,
                       env=env, capture_output=True, text=True, timeout=3500)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = _table_lines(p.stdout)
    with open(clone / "README.md", encoding="utf-8") as f:
        assert printed == _block(f.read()), p.stdout[-3000:]
    check = _script("--check", f"--run_dir={clone / 'demo' / 'run'}",
                    f"--readme={clone / 'README.md'}", repo=str(clone))
    assert check.returncode == 0, check.stderr
    shutil.rmtree(clone, ignore_errors=True)
