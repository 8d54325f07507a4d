r"""Makes the SynthSkill feature dataset a config asks for (the demo's first step).

  python -m data_prep.synthskill_setup --config=configs/demo.py

A config with a `synthskill` block (see `configs/demo.py`) trains on SynthSkill: when the
feature dataset `config.data.name` is missing under `config.data.data_dir`, the videos
are rendered (`data_prep.synthskill`, skipped when already there) and run through exactly
the prep code real data goes through (`data_prep.prepare.prepare_manifest`). Both steps
reuse what earlier runs left (rendered videos, per-video feature cache), so an
interrupted demo resumes. `make demo` runs this, then `python -m surgfusion_jax.main`
with the same config: the training library never calls the prep stage.

Exit status 0 when the dataset is ready, 2 when rendering or prep failed (the message
says which videos and why).
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything loads: glibc reads its tunables at start
    from surgfusion_jax import runtime
    runtime.reexec_with_tuned_malloc()

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data_prep import prepare, synthskill  # noqa: E402
from surgfusion_jax import errors  # noqa: E402
from surgfusion_jax.data import feature_dataset  # noqa: E402


# SynthSkill scores are sums of six GRS-like items scored 1-5 (data_prep.synthskill).
SCORE_SCALE = "grs"


class SetupError(errors.UserError):
    """SynthSkill could not be rendered or prepared; the message says what failed."""


def ensure_features(config: ml_collections.ConfigDict, *, progress: bool = True,
                    modalities: tuple[str, ...] | None = None) -> str:
    """Returns the dataset path, generating and preparing SynthSkill when missing.

    `modalities`: the ones to prepare (default: `config.data.modalities`)."""
    if "synthskill" not in config:
        raise SetupError("the config has no `synthskill` block (see configs/demo.py); "
                         "prepare real data with `python -m data_prep.prepare`.")
    synth = config.synthskill
    path = feature_dataset.dataset_path(config.data.data_dir, config.data.name)
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        return path
    start = time.time()
    print(f"[synthskill] rendering {synth.num_surgeons} x {synth.trials_per_surgeon} videos "
          f"into {synth.out_dir} ...", flush=True)
    manifest = synthskill.generate_synthskill(
        synth.out_dir, num_surgeons=synth.num_surgeons,
        trials_per_surgeon=synth.trials_per_surgeon, image_size=synth.image_size,
        min_seconds=synth.min_seconds, max_seconds=synth.max_seconds, seed=synth.seed)
    print(f"[synthskill] videos ready ({time.time() - start:.0f} s); extracting I3D features "
          f"at {synth.prep_image_size} px ...", flush=True)
    result = prepare.prepare_manifest(
        manifest, config.data.data_dir, config.data.name,
        modalities=tuple(modalities or config.data.modalities),
        image_size=synth.prep_image_size, score_scale=SCORE_SCALE,
        batch_size=synth.prep_batch_size, progress=progress, source="synthskill")
    if not result.ok:
        raise SetupError(f"SynthSkill prep failed for some videos:\n{result.summary()}")
    print(f"[synthskill] features ready at {result.dataset_path} "
          f"({time.time() - start:.0f} s in all)", flush=True)
    return result.dataset_path


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if flags.FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
    logging.set_verbosity(logging.WARNING)
    config = flags.FLAGS.config
    try:
        ensure_features(config, progress=config.get("progress_bar", True))
    except errors.UserError as e:
        return errors.report(e)
    return errors.EXIT_OK


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Config with a `synthskill` block, e.g. "
                                    "configs/demo.py.", lock_config=True)
    app.run(main)
