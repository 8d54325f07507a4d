"""Makes sure the SynthSkill feature dataset a config asks for exists (the demo's first steps).

A config with a `synthskill` block (see `configs/demo.py`) is trained on SynthSkill: when
the feature dataset `config.data.name` is missing under `config.data.data_dir`, the videos
are rendered (`data_prep.synthskill`, skipped when already there) and run through exactly
the prep code real data goes through (`data_prep.prepare.prepare_manifest`). Both steps
reuse what earlier runs left (rendered videos, per-video feature cache), so an interrupted
demo resumes.
"""

from __future__ import annotations

import os
import time

import ml_collections

from surgfusion_jax import feature_dataset


class SetupError(RuntimeError):
    """SynthSkill could not be rendered or prepared; the message says what failed."""


def ensure_features(config: ml_collections.ConfigDict, *, progress: bool = True) -> str:
    """Returns the dataset path, generating and preparing SynthSkill when missing."""
    synth = config.synthskill
    path = feature_dataset.dataset_path(config.data.data_dir, config.data.name)
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        return path
    # Imported here: the prep stage (TensorFlow writer, I3D) is only needed on first use.
    from data_prep import prepare, synthskill

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
        modalities=tuple(config.data.modalities), image_size=synth.prep_image_size,
        score_min=6.0, score_max=config.data.score_max, batch_size=synth.prep_batch_size,
        progress=progress, source="synthskill")
    if not result.ok:
        raise SetupError(f"SynthSkill prep failed for some videos:\n{result.summary()}")
    print(f"[synthskill] features ready at {result.dataset_path} "
          f"({time.time() - start:.0f} s in all)", flush=True)
    return result.dataset_path
