"""`runtime`: glibc's allocator tunables, merged into the environment and applied by
re-executing the command once; and their effect, page faults of large buffers."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from surgfusion_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT, runtime._DONE)}
    return {**env, **extra}


def test_tuned_environ_adds_only_what_the_user_has_not_set():
    env = runtime.tuned_environ({"PATH": "/bin"})
    assert runtime._parse(env["GLIBC_TUNABLES"]) == runtime.MALLOC_TUNABLES
    assert env["PATH"] == "/bin"
    mine = "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"
    env = runtime.tuned_environ({"GLIBC_TUNABLES": mine})
    got = runtime._parse(env["GLIBC_TUNABLES"])
    assert got["glibc.malloc.hugetlb"] == "0" and got["glibc.malloc.arena_max"] == "2"
    assert got["glibc.malloc.mmap_threshold"] == runtime.MALLOC_TUNABLES[
        "glibc.malloc.mmap_threshold"]
    assert env["GLIBC_TUNABLES"].startswith(mine + ":")
    everything = ":".join(f"{k}={v}" for k, v in runtime.MALLOC_TUNABLES.items())
    assert runtime.tuned_environ({"GLIBC_TUNABLES": everything}) is None
    assert runtime.tuned_environ({runtime.OPT_OUT: "0"}) is None
    assert runtime.tuned_environ({runtime._DONE: "1"}) is None


_SCRIPT = textwrap.dedent("""
    import json, os, sys
    with open(sys.argv[1], "a") as f:
        f.write("start\\n")
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()
    print(json.dumps({"argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES")}))
""")


@pytest.mark.skipif(not runtime.uses_glibc(), reason="re-executes on Linux with glibc only")
def test_reexec_runs_the_same_command_once_with_the_tunables(tmp_path):
    script, log = tmp_path / "entry.py", tmp_path / "starts.txt"
    script.write_text(_SCRIPT)
    cmd = [sys.executable, str(script), str(log), "--flag=x"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=120,
                         check=True)
    report = json.loads(out.stdout)
    assert report["argv"] == [str(log), "--flag=x"]
    assert runtime._parse(report["tunables"]) == runtime.MALLOC_TUNABLES
    assert log.read_text() == "start\n" * 2  # the original process and its one re-exec

    log.unlink()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True,
                         env=_clean_env(**{runtime.OPT_OUT: "0"}))
    assert json.loads(out.stdout)["tunables"] is None
    assert log.read_text() == "start\n"


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1:text.index("]")]


_FAULTS = textwrap.dedent("""
    import ctypes, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # 64 MiB from malloc, written and freed, as XLA's temporaries are
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not runtime.uses_glibc() or _thp_mode() not in ("madvise", "always"),
                    reason="needs glibc and transparent huge pages (madvise or always)")
def test_the_tunables_cut_the_page_faults_of_large_buffers():
    """20 blocks of 64 MiB from malloc, each written once: 16,384 faults of 4 KiB pages
    apiece with glibc's defaults (a fresh mmap each time); with the tunables, huge pages
    (measured: 327,700 faults against 10,880)."""
    def faults(env):
        out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True,
                             env=env, timeout=120, check=True)
        return int(out.stdout)

    default = faults(_clean_env(**{runtime.OPT_OUT: "0"}))
    tuned = faults(runtime.tuned_environ(_clean_env()))
    if _thp_mode() == "madvise":
        assert default > 20 * 16384 * 0.9, default
    assert tuned < default / 10, (tuned, default)


@pytest.mark.parametrize("entry", ["surgfusion_jax/main.py", "surgfusion_jax/predict.py",
                                   "data_prep/prepare.py", "data_prep/synthskill_setup.py",
                                   "benchmarks/train_step.py", "benchmarks/peer_parity.py",
                                   "benchmarks/protocol.py"])
def test_entry_points_reexec_before_importing_jax(entry):
    """Each command-line entry point applies the tunables before JAX (or anything that
    allocates much) is imported: glibc reads them only at start."""
    with open(os.path.join(REPO, entry)) as f:
        source = f.read()
    call = source.find("runtime.reexec_with_tuned_malloc()")
    assert call > 0, entry
    for heavy in ("\nimport jax", "\nfrom jax", "\nimport numpy", "\nimport tensorflow",
                  "\nfrom surgfusion_jax.training", "\nfrom surgfusion_jax import errors"):
        first = source.find(heavy)
        assert first == -1 or first > call, (entry, heavy)
