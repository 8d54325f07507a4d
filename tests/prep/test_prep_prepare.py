"""data_prep.prepare CLI: user errors as one clear message, and the end-to-end run with the
real I3D backbone (tiny input size) including a failing video and the exit status."""
import os
import subprocess
import sys

import numpy as np
import pytest

from prep_testutil import dataset_contents, write_png_masks, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_inputs")
    write_video(d / "videos/a.avi", 360, seed=0)
    write_png_masks(d / "masks/a", 360, seed=0)
    write_video(d / "videos/b.avi", 405, seed=1)
    write_video(d / "masks/b.avi", 405, seed=1, mask=True)
    return d


def _cli(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "data_prep.prepare", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_user_errors_are_one_clear_message(tmp_path):
    csv = tmp_path / "cols.csv"
    csv.write_text("video_id,video_path,surgeon_id\na,a.avi,S\n")
    for args, pattern in [
        ([f"--manifest={csv}", f"--data_dir={tmp_path}", "--name=x", "--score_scale=gears"],
         "cols.csv line 1: missing column"),
        ([f"--data_dir={tmp_path}"], "exactly one of --manifest"),
        ([f"--jigsaws_root={tmp_path}", f"--data_dir={tmp_path}"], "--task is required"),
    ]:
        p = _cli(*args)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert pattern in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_cli_end_to_end_with_real_i3d(inputs, tmp_path):
    """The real I3D backbone at a tiny input size through the CLI, with one too-short video."""
    write_video(tmp_path / "short.avi", 60, seed=9)
    write_png_masks(tmp_path / "short_m", 60, seed=9)
    csv = tmp_path / "real.csv"
    csv.write_text("video_id,video_path,score,surgeon_id,mask_path\n"
                   f"a,{inputs}/videos/a.avi,20,S1,{inputs}/masks/a\n"
                   f"b,{inputs}/videos/b.avi,26,S2,{inputs}/masks/b.avi\n"
                   f"short,short.avi,12,S3,short_m\n")
    p = _cli(f"--manifest={csv}", f"--data_dir={tmp_path / 'out'}", "--name=real",
             "--image_size=32", "--batch_size=4", "--score_scale=gears",
             "--noprogress")
    assert p.returncode == 1, p.stderr[-3000:]          # one failure -> non-zero exit
    assert "FAILED (1)" in p.stdout and "short" in p.stdout and "frames/s" in p.stdout
    assert "Traceback" not in p.stderr
    meta, samples = dataset_contents(tmp_path / "out", "real")
    assert meta["backbone"] == "i3d_kinetics400" and meta["image_size"] == 32
    assert meta["failed"] == ["short"] and sorted(samples) == ["a", "b"]
    for vid, n in (("a", 3), ("b", 4)):
        s = samples[vid]
        assert s["num_segments"] == n
        for m in ("rgb", "flow", "mask"):
            assert s[m].shape == (n, 1024) and np.all(np.isfinite(s[m]))
            assert np.std(s[m]) > 0
        assert not np.allclose(s["rgb"], s["flow"]) and not np.allclose(s["rgb"], s["mask"])
    assert not np.allclose(samples["a"]["rgb"][0], samples["b"]["rgb"][0])
