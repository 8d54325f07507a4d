"""The prep stage's per-video work on Apache Beam (`python -m data_prep.prepare --runner=beam`).

Each sample's work (decode -> 10 FPS -> flow -> masks -> backbone features, with the
per-video cache) is `prepare.run_sample`, the function the local runner calls; Beam only
spreads it over workers:

  Create(samples) -> Reshuffle -> ParDo(run_sample on the worker's extractor)
                  -> one outcome file per sample in a staging folder

The launcher then reads the outcomes back in manifest order and writes the dataset with
the same `feature_dataset.write_feature_dataset` and the same metadata as the local
runner, so both runners give the same bytes (tests/prep/test_beam_prep.py). A bad video
is an outcome like any other (its id and cause), so the rest are written.

Outcome files go through Beam's `FileSystems` (local paths, gs://, s3://, hdfs://), under
the pipeline's `--temp_location` when given (distributed runners need one the launcher
and the workers share), else under the dataset's cache folder; they are deleted once
read. Workers build their extractor once (`DoFn.setup`) from a picklable factory, so JAX
and the backbone weights load on the worker (GPU workers for the paper's backbones), and
they read the videos and masks at the manifest's paths (a shared mount for remote
workers).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shlex
import uuid
from typing import Any, Callable, Optional, Sequence

import numpy as np

from data_prep.common import PrepError, SampleSpec

try:  # an optional extra: the local runner works without it
    import apache_beam as beam
except ImportError:
    beam = None

BEAM_HINT = "fix: install the optional extra: pip install -e '.[beam]' (apache-beam)"


@dataclasses.dataclass(frozen=True)
class Given:
    """An extractor factory returning an extractor built by the caller (it is pickled to
    the workers, so it must be picklable: tests pass a numpy stand-in)."""

    extractor: Any

    def __call__(self) -> Any:
        return self.extractor


def _encode(arrays: Optional[dict], status: Any, times: Any) -> bytes:
    """An outcome as .npz bytes: the arrays and a JSON record of status and stage times."""
    from data_prep.prepare import Failure
    record = dict(times=dataclasses.asdict(times))
    if isinstance(status, Failure):
        record["failure"] = dataclasses.asdict(status)
    else:
        record["status"] = status
    buf = io.BytesIO()
    np.savez(buf, outcome=np.asarray(json.dumps(record)), **(arrays or {}))
    return buf.getvalue()


def _decode(data: bytes) -> tuple[Optional[dict], Any, Any]:
    from data_prep.pipeline import StageTimes
    from data_prep.prepare import Failure
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: np.asarray(z[k]) for k in z.files if k != "outcome"}
        record = json.loads(str(z["outcome"]))
    times = StageTimes(**record["times"])
    if "failure" in record:
        return None, Failure(**record["failure"]), times
    return arrays, record["status"], times


class _RunSample(beam.DoFn if beam is not None else object):
    """DoFn: (index, sample) -> its outcome file under `staging` (retries overwrite it)."""

    def __init__(self, factory: Callable[[], Any], work: Any, staging: str):
        super().__init__()
        self._factory, self._work, self._staging = factory, work, staging
        self._extractor = None

    def setup(self):
        self._extractor = self._factory()

    def process(self, item):
        from apache_beam.io.filesystems import FileSystems

        from data_prep.pipeline import StageTimes
        from data_prep.prepare import run_sample
        index, spec = item
        times = StageTimes()
        arrays, status = run_sample(spec, self._extractor, self._work, times)
        path = FileSystems.join(self._staging, f"{index:08d}.npz")
        tmp = FileSystems.join(self._staging, f".tmp-{index:08d}-{uuid.uuid4().hex}")
        with FileSystems.create(tmp) as f:
            f.write(_encode(arrays, status, times))
        FileSystems.rename([tmp], [path])
        yield index


def _staging_root(options: Any, cache_dir: str) -> str:
    temp = options.get_all_options().get("temp_location")
    return temp or cache_dir


def run_samples(specs: Sequence[SampleSpec], factory: Callable[[], Any], work: Any, *,
                beam_options: Optional[str] = None, name: str = "dataset"
                ) -> list[tuple[Optional[dict], Any, Any]]:
    """Runs `prepare.run_sample` for every spec on Beam; returns per spec, in order,
    (arrays or None, 'computed' | 'cached' | Failure, StageTimes).

    `beam_options`: pipeline options as on a command line ('--runner=DataflowRunner
    --project=... --temp_location=gs://...'); default: the DirectRunner.
    """
    if beam is None:
        raise PrepError(f"--runner=beam needs Apache Beam, which is not installed; "
                        f"{BEAM_HINT}.")
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from data_prep.prepare import Failure

    try:
        options = PipelineOptions(shlex.split(beam_options or ""))
    except Exception as e:  # noqa: BLE001 - Beam raises several types for bad options
        raise PrepError(f"--beam_options={beam_options!r} cannot be parsed ({e}); fix: give "
                        f"Beam pipeline options, e.g. --beam_options='--runner=DirectRunner "
                        f"--direct_running_mode=multi_processing'.") from None
    root = _staging_root(options, work.cache_dir)
    staging = FileSystems.join(root, f"beam-{name}-{uuid.uuid4().hex[:12]}")
    FileSystems.mkdirs(staging)
    try:
        with beam.Pipeline(options=options) as p:
            _ = (p
                 | "Samples" >> beam.Create(list(enumerate(specs)))
                 | "Spread" >> beam.Reshuffle()
                 | "Featurize" >> beam.ParDo(_RunSample(factory, work, staging)))
        outcomes = []
        for index, spec in enumerate(specs):
            path = FileSystems.join(staging, f"{index:08d}.npz")
            if not FileSystems.exists(path):
                outcomes.append((None, Failure(spec.video_id, spec.video_path,
                                               "no result from the Beam workers"), None))
                continue
            with FileSystems.open(path) as f:
                outcomes.append(_decode(f.read()))
        return outcomes
    finally:
        try:
            FileSystems.delete([staging])
        except Exception:  # noqa: BLE001 - best effort: a leftover folder is harmless
            logging.warning("could not delete the Beam staging folder %s", staging)
