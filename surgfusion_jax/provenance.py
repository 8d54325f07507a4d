"""What produced a results file: package versions, Python, platform, XLA flags, git commit.

`record()` is stored in every `results.json` (`evaluation.summary.write_results`) and in
every experiment's `<name>_provenance.json` (`experiments/outputs.py`), so a number can be
traced to the software that made it (docs/design.md §9). It holds no time stamp: on one
machine and tree a rerun writes the same record, so results files stay comparable byte
for byte. Nothing here imports JAX or TensorFlow (versions come from the installed
distributions' metadata).
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any, Optional

# The packages whose versions move results. TensorFlow is installed as tensorflow-cpu
# (pyproject) or under another distribution name; the first one found is reported.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow",
            "tensorflow-datasets")
ALIASES = {"tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly")}
# The checkout this package runs from (None of it is a git repository when installed).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package_versions() -> dict[str, Optional[str]]:
    """{package: installed version, or None when it is not installed}."""
    out: dict[str, Optional[str]] = {}
    for name in PACKAGES:
        out[name] = None
        for dist in ALIASES.get(name, (name,)):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _git(root: str, *args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_state(root: str = REPO_ROOT) -> dict[str, Any]:
    """{'commit': HEAD of the checkout at `root`, 'dirty': tracked files changed}; both None
    when `root` is not the top of a git checkout (an installed package, no git)."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if not top or os.path.realpath(top) != os.path.realpath(root):
        return {"commit": None, "dirty": None}  # not a checkout, or inside someone else's repo
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit or None, "dirty": None if status is None else bool(status)}


def record(root: str = REPO_ROOT) -> dict[str, Any]:
    """Package versions, Python, platform, XLA_FLAGS, glibc's allocator tunables
    (`runtime`) and the git commit (+ dirty flag)."""
    return {
        "packages": package_versions(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "git": git_state(root),
    }
