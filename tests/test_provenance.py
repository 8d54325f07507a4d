"""surgfusion_jax.provenance: what every results.json and experiment provenance records
(package versions, Python, platform, XLA_FLAGS, git commit + dirty flag)."""
import json
import os
import platform
import subprocess
from importlib import metadata

from surgfusion_jax import provenance
from surgfusion_jax.evaluation import summary

FOLDS = [{"name": "fold_1", "models": {"fused": {"history": [
    {"epoch": 1, "scc": 0.5, "mae": 2.0}, {"epoch": 2, "scc": 0.6, "mae": 1.5}]}}}]


def _git(cwd, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_record_holds_versions_python_platform_and_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    rec = provenance.record()
    assert set(rec["packages"]) == {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                                    "tensorflow", "tensorflow-datasets"}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                 "tensorflow-datasets"):
        assert rec["packages"][name] == metadata.version(name)
    assert rec["packages"]["tensorflow"]  # installed as tensorflow-cpu
    assert rec["python"] == platform.python_version() and rec["platform"] == platform.platform()
    assert rec["xla_flags"] == "--xla_cpu_enable_fast_math=false"
    monkeypatch.delenv("XLA_FLAGS")
    assert provenance.record()["xla_flags"] is None
    assert json.loads(json.dumps(rec)) == rec  # plain JSON, no time stamp: reruns write the same
    assert provenance.record() == dict(rec, xla_flags=None)


def test_missing_package_is_none(monkeypatch):
    monkeypatch.setattr(provenance, "PACKAGES", ("surely-not-installed-pkg", "numpy"))
    assert provenance.package_versions() == {"surely-not-installed-pkg": None,
                                             "numpy": metadata.version("numpy")}


def test_git_commit_and_dirty_flag(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("1")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert provenance.git_state(str(repo)) == {"commit": head, "dirty": False}
    (repo / "untracked.txt").write_text("x")  # untracked files do not change results
    assert provenance.git_state(str(repo))["dirty"] is False
    (repo / "a.txt").write_text("2")
    assert provenance.git_state(str(repo)) == {"commit": head, "dirty": True}
    assert provenance.record(str(repo))["git"] == {"commit": head, "dirty": True}
    # A package installed inside some other repository is not that repository's checkout.
    (repo / "site").mkdir()
    assert provenance.git_state(str(repo / "site")) == {"commit": None, "dirty": None}


def test_no_git_gives_null(tmp_path, monkeypatch):
    assert provenance.git_state(str(tmp_path)) == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    assert provenance.git_state(provenance.REPO_ROOT) == {"commit": None, "dirty": None}


def test_results_json_records_provenance(tmp_path):
    written = summary.write_results(str(tmp_path), {"folds": FOLDS})
    with open(written["json"]) as f:
        saved = json.load(f)
    assert saved["provenance"] == provenance.record()
    # Rewriting a results file keeps the environment that produced it.
    old = dict(saved, provenance={"packages": {"jax": "0.0.1"}})
    summary.write_results(str(tmp_path), old)
    assert summary.load_results(str(tmp_path))["provenance"] == {"packages": {"jax": "0.0.1"}}


def test_experiment_provenance_records_the_environment(tmp_path):
    from experiments import outputs, spec
    options = spec.Options(workdir=str(tmp_path), base_config=None, argv=("table1",))
    paths = outputs.write_outputs("t", "T", [{"a": 1}], [{"a": 1}], [], options, {})
    with open(paths["provenance"]) as f:
        record = json.load(f)
    assert record["environment"] == provenance.record(spec.REPO_ROOT)
    git = record["environment"]["git"]
    assert record["git_commit"] == (
        git["commit"] + ("+dirty" if git["dirty"] else "") if git["commit"] else "unknown")

