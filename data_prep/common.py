"""Shared types and constants of the prep stage (paper Sec. III-A.3, docs/design.md §1).

`PrepError` is the one exception the prep stage raises for a user mistake or a bad
input; its message names the file, the field and the fix, and the CLI prints it without
a traceback. `SampleSpec` is one sample to prepare (one video, or one time range of a
video such as an RAH phase), produced by `manifest.py` and `jigsaws.py` and consumed by
`pipeline.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from surgfusion_jax import errors
from surgfusion_jax.data.feature_dataset import MODALITIES

# Bumped whenever a change alters the features of an unchanged input; part of every
# cache key and recorded in the dataset metadata.
PREP_VERSION = "1"
FPS = 10.0             # frames are resampled to 10 FPS (paper Sec. III-A.3 / IV-A)
SEGMENT_LENGTH = 32    # non-overlapping 32-frame segments, one feature vector each
DEFAULT_IMAGE_SIZE = 224
ALL_MODALITIES = MODALITIES  # the feature dataset's, in its order


class PrepError(errors.UserError, ValueError):
    """A bad input or setting; the message says which file/field and how to fix it."""


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """One sample to prepare.

    `start_s`/`end_s` cut a time range out of `video_path` (None = from the start /
    to the end); `mask_path` is a folder of per-frame PNGs or a mask video (None when
    the mask modality is left out). `origin` says where the sample was declared
    (e.g. "rah.csv line 4") for error messages.
    """

    video_id: str
    video_path: str
    score: float
    surgeon_id: str
    task: str = ""
    phase: str = ""
    source_video: str = ""
    supertrial: int = 0
    item_scores: tuple[float, ...] = ()
    mask_path: Optional[str] = None
    start_s: Optional[float] = None
    end_s: Optional[float] = None
    origin: str = ""

    def label_fields(self) -> dict:
        """The per-sample fields of the feature record other than the features."""
        return dict(video_id=self.video_id, surgeon_id=self.surgeon_id, task=self.task,
                    phase=self.phase, source_video=self.source_video or self.video_id,
                    score=float(self.score), item_scores=list(self.item_scores),
                    supertrial=int(self.supertrial))


def parse_modalities(value) -> tuple[str, ...]:
    """'rgb,flow' or a sequence -> a tuple in canonical order; PrepError when unknown."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(m).strip().lower() for m in items if str(m).strip()]
    unknown = sorted(set(items) - set(ALL_MODALITIES))
    if unknown or not items:
        raise PrepError(f"--modalities={value!r}: unknown or empty modality list {unknown}; "
                        f"fix: use a comma-separated subset of {','.join(ALL_MODALITIES)}, "
                        f"e.g. --modalities=rgb,flow to leave the masks out.")
    return tuple(m for m in ALL_MODALITIES if m in items)
