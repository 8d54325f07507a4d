"""Checkpoints that survive faults: damaged steps fall back with one warning line, no
readable step stops with one message naming the fix, a full disk leaves the previous
step as the newest."""
import errno
import os

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from surgfusion_jax import errors, main
from surgfusion_jax.training import checkpoints, cross_validation, phase, train
from test_checkpoints import _equal, _state, _variables


def _truncate_state(step_dir):
    """Cuts every data file of a step's arrays in half (what an interrupted copy or a
    failing disk leaves)."""
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            if "ocdbt" in name or os.sep + "d" + os.sep in path:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)


def _remove_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _empty_meta(step_dir):
    open(os.path.join(step_dir, "meta", "metadata"), "w").close()


def _saved(directory, epochs=(1, 2)):
    ck = checkpoints.PhaseCheckpoints(directory)
    for epoch in epochs:
        ck.save_last(epoch, _state(steps=epoch), jax.random.PRNGKey(epoch),
                     {"history": [epoch], "best": {"epoch": epoch}})
    return ck


def _warnings(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    return lines


@pytest.mark.parametrize("damage", [_truncate_state, _remove_metadata, _empty_meta])
def test_a_damaged_last_step_falls_back_to_the_previous_with_one_warning(tmp_path, capfd,
                                                                         damage):
    ck = _saved(tmp_path)
    damage(str(tmp_path / "last" / "2"))
    restored, rng, meta = ck.restore_last(_state())
    assert meta["epoch"] == 1 and int(restored.step) == 1
    assert _equal(restored.params, _state(steps=1).params)
    np.testing.assert_array_equal(rng, jax.random.PRNGKey(1))
    assert sorted(os.listdir(tmp_path / "last")) == ["1"]  # the damaged step is gone
    ck.save_last(2, _state(steps=2), jax.random.PRNGKey(2), {"history": []})  # the replay
    ck.close()
    (line,) = _warnings(capfd.readouterr().err)
    assert line.startswith(f"warning: checkpoint {tmp_path / 'last' / '2'} is damaged (")
    assert line.endswith("using epoch 1 instead.")


def test_no_readable_step_stops_with_the_folder_the_cause_and_the_fix(tmp_path, capfd):
    ck = _saved(tmp_path)
    for step in ("1", "2"):
        _truncate_state(str(tmp_path / "last" / step))
    with pytest.raises(checkpoints.CheckpointError) as info:
        ck.restore_last(_state())
    message = str(info.value)
    assert f"cannot read the checkpoint {tmp_path / 'last' / '1'} (" in message
    assert "DATA_LOSS" in message or "OUT_OF_RANGE" in message  # the cause, shortened
    assert f"delete {tmp_path} and re-run" in message and "python -m surgfusion_jax.main" in message
    assert "\n" not in message and "tensorstore_spec" not in message
    assert isinstance(info.value, errors.UserError)
    ck.close()
    assert len(_warnings(capfd.readouterr().err)) == 1  # step 2 skipped, step 1 fatal


def test_a_damaged_best_step_is_reported_for_prediction(tmp_path, capfd):
    ck = _saved(tmp_path, epochs=(2,))
    ck.save_best(2, _state(steps=2), {"scc": 0.5})
    _truncate_state(str(tmp_path / "best" / "2"))
    with pytest.raises(checkpoints.CheckpointError, match=r"best.2 \(.*delete"):
        ck.restore_variables("best", _variables())
    variables, meta = ck.restore_variables("last", _variables())  # the other one still reads
    assert meta["epoch"] == 2 and _equal(variables["params"], _state(steps=2).params)
    ck.close()
    assert _warnings(capfd.readouterr().err) == []


def test_a_group_resumes_from_the_step_every_run_can_read(tmp_path, capfd):
    """Run b's newest step is damaged: both runs go back to epoch 1 (a group replays in
    lockstep), and run a's step 2 is discarded, to be written again by the replay."""
    members = [phase.Member(name, np.arange(2), {}, jax.random.PRNGKey(0),
                            _saved(tmp_path / name)) for name in ("a", "b")]
    _truncate_state(str(tmp_path / "b" / "last" / "2"))
    states, histories, bests, epoch = phase._resume(train.stack([_state(), _state()]), members)
    assert epoch == 1 and histories == [[1], [1]] and bests == [{"epoch": 1}] * 2
    assert _equal(train.unstack(states, 1).params, _state(steps=1).params)
    assert sorted(os.listdir(tmp_path / "a" / "last")) == ["1"]
    for m in members:
        m.checkpoints.close()
    assert len(_warnings(capfd.readouterr().err)) == 1


def _full_disk_on_meta(monkeypatch):
    async def full(self, x, directory):  # the meta file of a step: the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full)


def test_a_full_disk_keeps_the_previous_step_the_newest(tmp_path, monkeypatch):
    ck = _saved(tmp_path, epochs=(1,))
    _full_disk_on_meta(monkeypatch)
    with pytest.raises(errors.DiskFullError, match=f"disk is full.*{tmp_path / 'last'}"):
        ck.save_last(2, _state(steps=2), jax.random.PRNGKey(2), {"history": []})
    with pytest.raises(errors.DiskFullError, match=str(tmp_path / "best")):
        ck.save_best(2, _state(steps=2), {"scc": 0.5})
    monkeypatch.undo()
    assert os.listdir(tmp_path / "last") == ["1"] and os.listdir(tmp_path / "best") == []
    assert ck.last_epoch() == 1 and ck.restore_last(_state())[2]["epoch"] == 1
    ck.close()
    ck = checkpoints.PhaseCheckpoints(tmp_path)  # a new process sees the same
    assert ck.last_epoch() == 1
    ck.save_last(2, _state(steps=2), jax.random.PRNGKey(2), {"history": []})  # space freed
    assert ck.restore_last(_state())[2]["epoch"] == 2
    ck.close()


@pytest.mark.parametrize("error", [
    checkpoints.CheckpointError("/w/checkpoints/fold_2/fusion/last/40", ValueError(
        'OUT_OF_RANGE: Error reading "x" [tensorstore_spec=\'{"a":1}\']\nmore')),
    errors.DiskFullError("/w/checkpoints/fold_2/fusion/last",
                         OSError(errno.ENOSPC, "No space left on device"))])
def test_main_reports_a_checkpoint_or_disk_fault_in_one_line(error, monkeypatch, capsys,
                                                             tmp_path):
    config = cross_validation.config_lib.small(cross_validation.config_lib.get_config())
    config.workdir = str(tmp_path)

    def fail(config):
        raise error

    monkeypatch.setattr(cross_validation, "run_cross_validation", fail)
    monkeypatch.setattr("sys.argv", ["main.py", "--config=configs/rarp.py"])
    assert main.run(config) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "/w/checkpoints/fold_2/fusion" in line
    if isinstance(error, checkpoints.CheckpointError):
        assert "OUT_OF_RANGE" in line and "tensorstore_spec" not in line
        assert line.endswith("delete /w/checkpoints/fold_2/fusion and re-run "
                             "python -m surgfusion_jax.main --config=configs/rarp.py")
    else:
        assert "disk is full" in line and "re-run the same command" in line
