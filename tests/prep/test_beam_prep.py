"""Prep on Apache Beam (`--runner=beam`): with the DirectRunner in multi-processing mode
the dataset is byte for byte the local runner's (TFRecord shard and metadata files), and
a truncated video is reported by id and cause while the others are written.

apache-beam is in the `test` extra (and the optional extra `[beam]`), so `make test` runs
these tests; the locks hold protobuf and pyarrow at the versions apache-beam accepts.
"""
import os

import pytest

from data_prep import beam_prep
from data_prep.common import PrepError
from data_prep.prepare import prepare_manifest
from prep_testutil import StandInExtractor, write_png_masks, write_video

S = 32
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("beam_inputs")
    write_video(d / "videos/a.avi", 360, seed=0)
    write_png_masks(d / "masks/a", 360, seed=0)
    write_video(d / "videos/b.avi", 405, seed=1)
    write_video(d / "masks/b.avi", 405, seed=1, mask=True)
    write_video(d / "videos/c.avi", 330, seed=2)
    write_png_masks(d / "masks/c", 330, seed=2)
    # truncated: the container announces 300 frames, the file ends half way
    write_video(d / "videos/bad.avi", 300, seed=3)
    data = (d / "videos/bad.avi").read_bytes()
    (d / "videos/bad.avi").write_bytes(data[: len(data) // 2])
    write_png_masks(d / "masks/bad", 300, seed=3)
    rows = ["video_id,video_path,score,surgeon_id,mask_path",
            "a,videos/a.avi,20,S1,masks/a", "b,videos/b.avi,26.5,S2,masks/b.avi",
            "bad,videos/bad.avi,12,S3,masks/bad", "c,videos/c.avi,9,S3,masks/c"]
    (d / "m.csv").write_text("\n".join(rows) + "\n")
    return str(d / "m.csv")


def _files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            path = os.path.join(folder, n)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def _prep(manifest, data_dir, **kw):
    return prepare_manifest(manifest, str(data_dir), "tiny", image_size=S, score_scale="grs",
                            extractor=StandInExtractor(image_size=S, batch_size=4),
                            progress=False, **kw)


def test_beam_writes_the_local_runners_bytes_and_isolates_the_bad_video(manifest, tmp_path,
                                                                         monkeypatch):
    # The worker processes unpickle the stand-in extractor from the tests' folder.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    local = _prep(manifest, tmp_path / "local")
    beam = _prep(manifest, tmp_path / "beam", runner="beam", use_cache=False,
                 beam_options="--runner=DirectRunner --direct_running_mode=multi_processing "
                              "--direct_num_workers=2")
    for res in (local, beam):
        assert [f.video_id for f in res.failures] == ["bad"]
        assert "truncated" in res.failures[0].reason or "corrupt" in res.failures[0].reason
        assert res.num_samples == 3
    assert sorted(beam.computed) == ["a", "b", "c"] and beam.cached == []
    assert beam.times.frames == local.times.frames > 0
    a, b = _files(tmp_path / "local" / "tiny"), _files(tmp_path / "beam" / "tiny")
    assert sorted(a) == sorted(b)
    assert any(n.endswith(".tfrecord-00000-of-00001") for n in a)
    assert any(n.endswith("dataset_info.json") for n in a)
    for name in a:
        assert a[name] == b[name], name
    # the staging folder of the outcomes is gone
    cache = tmp_path / "beam" / ".cache" / "tiny"
    assert not [n for n in os.listdir(cache) if n.startswith("beam-")] if cache.exists() else True


def test_beam_reuses_the_cache_and_rejects_bad_options(manifest, tmp_path):
    first = _prep(manifest, tmp_path, runner="beam")
    again = _prep(manifest, tmp_path, runner="beam")
    assert sorted(first.computed) == sorted(again.cached) == ["a", "b", "c"]
    with pytest.raises(PrepError, match="--beam_options"):
        _prep(manifest, tmp_path, beam_options="--runner=DirectRunner")
    with pytest.raises(PrepError, match="--runner"):
        _prep(manifest, tmp_path, runner="spark")


def test_missing_beam_names_the_extra(monkeypatch, manifest, tmp_path):
    monkeypatch.setattr(beam_prep, "beam", None)
    with pytest.raises(PrepError, match=r"\[beam\]"):
        _prep(manifest, tmp_path, runner="beam")
