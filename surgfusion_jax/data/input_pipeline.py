"""Device-resident feature datasets, training windows and bucketed evaluation (docs/design.md §4).

A feature dataset (`feature_dataset.load_feature_dataset`) is moved to the accelerator
once: every video's features are zero-padded to one length `T_pad` and stacked into
`DeviceData.features[m]` of shape [N, T_pad, F] beside the true lengths [N] and the
training targets [N] (target_max * score / score_max, docs/design.md §1). Nothing is copied from the host
during training afterwards.

Training (paper §III-B.4: "we sample fixed-length consecutive segments ... with
zero-padding when segments are shorter"): each epoch draws, inside jax,
  * a random order of the fold's training videos (`epoch_batches`), the last batch
    filled up with repeats carrying weight 0 (so the loss equals the mean over the real
    samples; BatchNorm statistics do see the repeats, which are real videos), and
  * per video a random window of `window` consecutive segments starting uniformly in
    [0, max(len - window, 0)] (`sample_windows`); positions past the end are zeros with
    valid=False.

Evaluation uses every segment of each video. To avoid one compilation per distinct
length, videos are grouped into length buckets (`bucket_length`: powers of two, at
least `min_bucket`) and evaluated in batches of fixed size padded with valid=False
(`make_eval_plan`); the model's `valid` masking makes the padded result equal to the
unpadded one, so eval compiles at most once per bucket. Runs trained together score
only their own evaluation videos, side by side (`make_runs_eval_plan`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from surgfusion_jax.evaluation import metrics

Array = jax.Array


@flax.struct.dataclass
class DeviceData:
    """A whole feature dataset on the device.

    features: modality -> float [N, T_pad, F], zero beyond each video's length.
    lengths: int32 [N] number of real segments per video.
    targets: float32 [N] training targets target_max * score / score_max.
    """

    features: dict[str, Array]
    lengths: Array
    targets: Array

    @property
    def num_videos(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def padded_length(self) -> int:
        return int(next(iter(self.features.values())).shape[1])


def bucket_length(length: int, min_bucket: int = 8) -> int:
    """Smallest power of two >= max(length, min_bucket): the padded eval length."""
    n = max(int(length), int(min_bucket), 1)
    return 1 << (n - 1).bit_length()


def make_device_data(samples: Sequence[dict[str, Any]], modalities: Sequence[str],
                     score_max: float, *, window: int = 1, min_bucket: int = 8,
                     target_max: float = 0.5, dtype: Any = jnp.float32) -> DeviceData:
    """Pads all videos to one length (>= the largest bucket and >= window) and moves them."""
    if not samples:
        raise ValueError("make_device_data needs at least one sample")
    lengths = np.array([int(s["num_segments"]) for s in samples], np.int32)
    t_pad = max(bucket_length(int(lengths.max()), min_bucket), int(window))
    features = {}
    for m in modalities:
        dim = samples[0][m].shape[-1]
        arr = np.zeros((len(samples), t_pad, dim), np.float32)
        for i, s in enumerate(samples):
            arr[i, :lengths[i]] = s[m]
        features[m] = jnp.asarray(arr, dtype)
    targets = metrics.to_target([float(s["score"]) for s in samples], score_max,
                                target_max).astype(np.float32)
    return DeviceData(features=features, lengths=jnp.asarray(lengths),
                      targets=jnp.asarray(targets))


def sample_windows(rng: Array, data: DeviceData, idx: Array, window: int
                   ) -> tuple[dict[str, Array], Array]:
    """Random windows of `window` consecutive segments for the videos `idx` [B].

    Returns (inputs: modality -> [B, window, F], valid: bool [B, window]). The start is
    uniform over [0, max(len - window, 0)]; a video shorter than the window starts at 0
    and its tail is zero with valid=False.
    """
    lengths = data.lengths[idx]
    max_start = jnp.maximum(lengths - window, 0)
    start = jax.random.randint(rng, idx.shape, 0, max_start + 1)
    offsets = jnp.arange(window, dtype=jnp.int32)
    positions = start[:, None] + offsets[None, :]  # < max(len, window) <= T_pad
    valid = offsets[None, :] < (lengths - start)[:, None]
    inputs = {m: jnp.where(valid[..., None], f[idx[:, None], positions], 0)
              for m, f in data.features.items()}
    return inputs, valid


def epoch_batches(rng: Array, train_idx: Array, num_train: Array, batch_size: int,
                  steps: int) -> tuple[Array, Array]:
    """A shuffled epoch of `steps` batches from the first `num_train` entries of `train_idx`.

    `train_idx` may be padded (fixed shape across folds so that one compiled epoch
    serves every fold); `num_train` may be traced. Returns (idx int32 [steps, B],
    weight float32 [steps, B]); slots past the epoch's `num_train` samples repeat
    earlier samples with weight 0.
    """
    n_pad = train_idx.shape[0]
    keys = jax.random.uniform(rng, (n_pad,))
    keys = jnp.where(jnp.arange(n_pad) < num_train, keys, 2.0)  # padding sorts last
    order = jnp.argsort(keys)
    pos = jnp.arange(steps * batch_size, dtype=jnp.int32)
    idx = train_idx[order[pos % num_train]]
    weight = (pos < num_train).astype(jnp.float32)
    return idx.reshape(steps, batch_size), weight.reshape(steps, batch_size)


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Batches per epoch: every training video once, the last batch topped up."""
    return max(1, -(-int(num_train) // int(batch_size)))


def pad_indices(indices: Sequence[int], size: int) -> np.ndarray:
    """`indices` as int32 padded (with its first entry) to `size`; shape fixed across folds."""
    indices = np.asarray(indices, np.int32)
    if len(indices) == 0 or len(indices) > size:
        raise ValueError(f"cannot pad {len(indices)} indices to {size}")
    return np.concatenate([indices, np.full(size - len(indices), indices[0], np.int32)])


def gather_eval_batch(data: DeviceData, idx: Array, length: int
                      ) -> tuple[dict[str, Array], Array]:
    """Videos `idx` [E] cut to `length` (static) segments with their validity mask."""
    valid = jnp.arange(length)[None, :] < data.lengths[idx][:, None]
    return {m: f[idx, :length] for m, f in data.features.items()}, valid


@dataclasses.dataclass(frozen=True)
class EvalBatch:
    """One evaluation batch: `length` static, `idx` int32 [E] (padded), `count` real rows."""

    length: int
    idx: np.ndarray
    count: int


def make_eval_plan(lengths: Sequence[int], indices: Sequence[int], batch_size: int,
                   min_bucket: int = 8) -> list[EvalBatch]:
    """Groups the videos `indices` by length bucket into fixed-size batches.

    Concatenating the real rows of the batches, in order, lists `indices` sorted by
    (bucket, original position); `evaluate` in train.py undoes the ordering.
    """
    by_bucket: dict[int, list[int]] = {}
    for i in indices:
        by_bucket.setdefault(bucket_length(lengths[i], min_bucket), []).append(int(i))
    plan = []
    for length in sorted(by_bucket):
        vids = by_bucket[length]
        for k in range(0, len(vids), batch_size):
            chunk = vids[k:k + batch_size]
            plan.append(EvalBatch(length=length, idx=pad_indices(chunk, batch_size),
                                  count=len(chunk)))
    return plan


@dataclasses.dataclass(frozen=True)
class RunsEvalBatch:
    """One evaluation batch of R runs side by side, each on its own videos: `length`
    static, `idx` int32 [R, E] (row r: run r's videos, padded), `count` int [R] real rows
    per run (0: run r has nothing in this batch; its row only repeats a video)."""

    length: int
    idx: np.ndarray
    count: np.ndarray


def make_runs_eval_plan(lengths: Sequence[int], run_indices: Sequence[Sequence[int]],
                        batch_size: int, min_bucket: int = 8) -> list[RunsEvalBatch]:
    """The `make_eval_plan` of every run's own videos `run_indices[r]`, batch by batch.

    Run r's rows, in order, are the batches of `make_eval_plan(lengths, run_indices[r],
    ...)`, so a run is scored on the same batches in a group as alone, and a group of
    k-fold runs scores each run's test fold instead of the union of all folds (k times
    fewer rows). A bucket gets as many batches as its fullest run needs; the other runs
    fill those rows with a video of the bucket, at count 0.
    """
    plans = [make_eval_plan(lengths, indices, batch_size, min_bucket) for indices in run_indices]
    buckets = sorted({b.length for plan in plans for b in plan})
    out = []
    for length in buckets:
        own = [[b for b in plan if b.length == length] for plan in plans]
        filler = next(b.idx for batches in own for b in batches)
        for k in range(max(len(batches) for batches in own)):
            rows = [batches[k] if k < len(batches) else None for batches in own]
            out.append(RunsEvalBatch(
                length=length,
                idx=np.stack([filler if b is None else b.idx for b in rows]),
                count=np.asarray([0 if b is None else b.count for b in rows], np.int64)))
    return out
