"""Test-wide settings: quiet TensorFlow, JAX on the CPU, cheap XLA compiles.

The suite is dominated by XLA:CPU compile time of small models, not by run time, so the
backend's optimisation level is lowered for tests only (float results move by ~1e-7;
references are compared within tolerances, and learning tests keep their margins).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. The suite compiles thousands
    of small XLA:CPU programs; kept for the whole session they grew the process past 8 GB
    and XLA's compiler crashed (SIGSEGV) near the end of the run."""
    yield
    jax.clear_caches()
