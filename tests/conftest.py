"""Test-wide settings: quiet TensorFlow, JAX on the CPU, cheap XLA compiles.

The suite is dominated by XLA:CPU compile time of small models, not by run time, so
  * the backend's optimisation level is lowered, LLVM's expensive passes are off and
    fused kernels go through XLA:CPU's older IR emitters instead of its MLIR fusion
    emitters (a third less compile time on the suite's tiny runs, docs/performance.md),
    for tests only (float results move by ~1e-7; references are compared within
    tolerances, and learning tests keep their margins);
  * compiled programs go to a persistent compilation cache shared by the session's
    workers (`make test` runs pytest-xdist), so a program that several test modules
    compile (the same small config, the same shapes) is compiled once. The cache starts
    empty in a clean clone (`build/` is not tracked); set SURGFUSION_TEST_JAX_CACHE to
    move it, or to an empty string to turn it off.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")
# glibc's allocator tunables (`runtime`), as the entry points set them: inherited by the
# pytest-xdist workers `make test` starts and by the tests' subprocesses.
from surgfusion_jax import runtime  # noqa: E402  (light: no JAX)

os.environ.update(runtime.tuned_environ(os.environ) or {})
_CACHE = os.environ.get("SURGFUSION_TEST_JAX_CACHE",
                        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "build", "jax-test-cache"))


import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

if _CACHE:
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. The suite compiles thousands
    of small XLA:CPU programs; kept for the whole session they grew the process past 8 GB
    and XLA's compiler crashed (SIGSEGV) near the end of the run."""
    yield
    jax.clear_caches()
