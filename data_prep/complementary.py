r"""Complementary-cues feature dataset: each modality carries its own share of the skill.

  python -m data_prep.complementary --out_dir=<data_dir> --name=<dataset> \
      [--num_videos=64] [--feature_dim=64] [--min_segments=16] [--max_segments=32] \
      [--num_surgeons=8] [--signal=4.0] [--noise=1.0] [--nuisance=0.5] \
      [--score_scale=gears] [--seed=0]

writes a normal feature dataset (`surgfusion_jax.data.feature_dataset`, docs/design.md
§1.6) without any video, so `python -m surgfusion_jax.main --config.data.data_dir=<data_dir>
--config.data.name=<dataset>` trains on it. It exists to test
fusion: no single modality can predict the score well, all three together can.

The generative model (all draws from `numpy.random.default_rng(seed)`, so one seed gives
one dataset, bit for bit):
  * per video v and modality m a latent skill component
        u[v, m] = surgeon_share * U[surgeon(v), m] + (1 - surgeon_share) * E[v, m],
    U and E independent Uniform(-1, 1), so the three components are independent of
    each other (a surgeon's share is per modality too) and lie in [-1, 1]. The default
    `surgeon_share` is 0: with 8 surgeons, their 8 draws per modality correlate across
    modalities by chance (|r| ~ 0.35), which would leak one modality's share into
    another's features;
  * the score is the sum of the per-modality items
        item[v, m] = (score_min + score_max) / (2 M) + (score_max - score_min) / (2 M) * u[v, m],
    stored as the sample's `item_scores` (order: `metadata['item_names']`, the
    modalities); score = sum over m of item[v, m] lies in [score_min, score_max] of
    `score_scale` (default 'gears', 6-30) without clipping, and each modality holds an
    equal 1/M of its variance;
  * the features of modality m at segment t, a D-vector,
        x[v, m, t] = signal * u[v, m] * (1 + drift * g[v, m, t]) * w_m
                     + nuisance * n[v, m] + noise * e[v, m, t],
    where w_m is a fixed random unit direction of the modality, g and e are white noise
    smoothed along time with a Gaussian of `smoothness` segments and rescaled to unit
    variance (temporally smooth, as features of overlapping clips are), and n[v, m] a
    per-video offset that does not depend on skill. Modality m's features thus depend
    on u[., m] and on noise only: alone they predict their own component and nothing of
    the others'.
With the defaults (64 videos, 64-d, 4 folds) a ridge regression on time-pooled features
reaches SCC ~0.4 from one modality and ~0.8 from all three (seeds 0-3, best penalty).
Lengths are uniform in [min_segments, max_segments]; surgeons are assigned round robin
(`surgeon_id` S01, S02, ...; video ids S01_T01, ...), so LOUO folds work too.

The metadata records the generator, its options and the score scale (`score_scale`,
`score_min`, `score_max`: `feature_dataset.ScoreScale`).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from data_prep.common import PrepError
from surgfusion_jax import errors
from surgfusion_jax.data.feature_dataset import (MODALITIES, parse_score_scale,
                                                 write_feature_dataset)

GENERATOR_VERSION = 1
# Defaults in one place: the functions and the CLI read them from here.
DEFAULTS = dict(num_videos=64, feature_dim=64, min_segments=16, max_segments=32,
                num_surgeons=8, signal=4.0, noise=1.0, nuisance=0.5, drift=0.25,
                smoothness=2.0, surgeon_share=0.0, score_scale="gears",
                modalities=MODALITIES, seed=0)


def _check(options: dict[str, Any]) -> None:
    def need(ok: bool, field: str, message: str) -> None:
        if not ok:
            raise PrepError(f"--{field}: {message}.")

    o = options
    need(o["num_videos"] >= 2, "num_videos", f"needs >= 2 videos, got {o['num_videos']}")
    need(o["feature_dim"] >= 1, "feature_dim", f"must be >= 1, got {o['feature_dim']}")
    need(1 <= o["min_segments"] <= o["max_segments"], "min_segments",
         f"needs 1 <= min_segments <= max_segments, got {o['min_segments']} and "
         f"{o['max_segments']}")
    need(1 <= o["num_surgeons"] <= o["num_videos"], "num_surgeons",
         f"must lie in [1, num_videos={o['num_videos']}], got {o['num_surgeons']}")
    need(0.0 <= o["surgeon_share"] <= 1.0, "surgeon_share",
         f"must lie in [0, 1], got {o['surgeon_share']}")
    for field in ("signal", "noise", "nuisance", "drift", "smoothness"):
        need(o[field] >= 0, field, f"must be >= 0, got {o[field]}")
    mods = tuple(o["modalities"])
    need(bool(mods) and set(mods) <= set(MODALITIES) and len(set(mods)) == len(mods),
         "modalities", f"must be distinct names from {MODALITIES}, got {mods}")


def _smooth_unit(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White noise smoothed along axis 0 and rescaled to unit variance per channel."""
    x = rng.standard_normal(shape)
    if sigma > 0 and shape[0] > 1:
        x = ndimage.gaussian_filter1d(x, sigma, axis=0, mode="reflect")
        x /= x.std(axis=0, keepdims=True) + 1e-12
    return x


def generate(**options: Any) -> tuple[list[dict[str, Any]], dict[str, Any], np.ndarray]:
    """(samples, metadata, components) of a complementary-cues dataset (module docstring).

    `options` override `DEFAULTS`. `samples` are feature-dataset examples (features
    float32 [T, feature_dim] per modality, `item_scores` the per-modality items);
    `components` is u, float64 [num_videos, M] in the order of `samples` and of
    `metadata['modalities']`.
    """
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    o = dict(DEFAULTS, **options)
    _check(o)
    mods = tuple(o["modalities"])
    n, d, m_count, s_count = o["num_videos"], o["feature_dim"], len(mods), o["num_surgeons"]
    rng = np.random.default_rng(o["seed"])
    # Draw order is fixed so that a dataset depends on the seed and the options only.
    directions = rng.standard_normal((m_count, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    surgeon_part = rng.uniform(-1.0, 1.0, (s_count, m_count))
    video_part = rng.uniform(-1.0, 1.0, (n, m_count))
    surgeon_of = np.arange(n) % s_count
    u = o["surgeon_share"] * surgeon_part[surgeon_of] + (1 - o["surgeon_share"]) * video_part
    scale = parse_score_scale(o["score_scale"])
    lo, hi = scale.min, scale.max
    items = (lo + hi) / (2 * m_count) + (hi - lo) / (2 * m_count) * u
    lengths = rng.integers(o["min_segments"], o["max_segments"] + 1, size=n)
    trial = np.zeros(s_count, int)
    samples = []
    for v in range(n):
        s = int(surgeon_of[v])
        trial[s] += 1
        sample: dict[str, Any] = {
            "video_id": f"S{s + 1:02d}_T{trial[s]:02d}", "surgeon_id": f"S{s + 1:02d}",
            "task": "complementary",
            "score": float(np.clip(items[v].sum(), lo, hi)),  # guards float rounding only
            "item_scores": items[v].astype(np.float32)}
        t = int(lengths[v])
        for k, m in enumerate(mods):
            profile = 1.0 + o["drift"] * _smooth_unit(rng, (t, 1), o["smoothness"])
            x = (o["signal"] * u[v, k] * profile * directions[k]
                 + o["nuisance"] * rng.standard_normal(d)
                 + o["noise"] * _smooth_unit(rng, (t, d), o["smoothness"]))
            sample[m] = x.astype(np.float32)
        samples.append(sample)
    # The feature dataset's readers sort by video id; return samples (and u) that way.
    order = sorted(range(n), key=lambda i: samples[i]["video_id"])
    samples, u = [samples[i] for i in order], u[order]
    options_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in o.items()}
    metadata = dict(
        backbone="synthetic_complementary", fps=10.0, segment_length=32,
        modalities=list(mods), source="complementary",
        backbones={m: {"name": "synthetic_complementary"} for m in mods},
        **scale.metadata(), item_names=list(mods),
        generator={"module": "data_prep.complementary", "version": GENERATOR_VERSION,
                   "options": options_json},
        failed=[])
    return samples, metadata, u


def write_complementary(out_dir: str, name: str, **options: Any) -> str:
    """Generates the dataset (`generate(**options)`) and writes it as the feature dataset
    `<out_dir>/<name>`; returns its path."""
    samples, metadata, _ = generate(**options)
    feature_dim = int(dict(DEFAULTS, **options)["feature_dim"])
    return write_feature_dataset(out_dir, name, samples, metadata, feature_dim=feature_dim)


def _define_flags(flags) -> None:
    flags.DEFINE_string("out_dir", None, "data_dir the feature dataset is written under")
    flags.DEFINE_string("name", "complementary", "dataset name")
    ints = ("num_videos", "feature_dim", "min_segments", "max_segments", "num_surgeons", "seed")
    for field in ints:
        flags.DEFINE_integer(field, DEFAULTS[field], f"see the module docstring ({field})")
    for field in ("signal", "noise", "nuisance", "drift", "smoothness", "surgeon_share"):
        flags.DEFINE_float(field, DEFAULTS[field], f"see the module docstring ({field})")
    flags.DEFINE_string("score_scale", DEFAULTS["score_scale"],
                        "gears | mgears | grs | MIN,MAX (feature_dataset.parse_score_scale)")
    flags.DEFINE_list("modalities", list(DEFAULTS["modalities"]), "subset of rgb,flow,mask")


def main(argv: Sequence[str]) -> None:
    from absl import flags
    f = flags.FLAGS
    try:
        if len(argv) > 1:
            raise PrepError(f"unexpected arguments {argv[1:]}; flags look like --name=value.")
        if not f.out_dir:
            raise PrepError("missing flag --out_dir (the data_dir to write the dataset under).")
        options = {k: getattr(f, k) for k in DEFAULTS}
        options["modalities"] = tuple(options["modalities"])
        path = write_complementary(f.out_dir, f.name, **options)
    except errors.UserError as e:
        sys.exit(errors.report(e))
    print(path)


if __name__ == "__main__":
    from absl import app, flags as absl_flags
    _define_flags(absl_flags)
    app.run(main)
