"""Per-video feature cache that lets an interrupted prep run resume.

Layout: `<data_dir>/.cache/<dataset name>/<safe video_id>--<key>.npz`, one file per
sample, holding one float32 [num_segments, feature_dim] array per modality plus
`num_frames`. `key` is a SHA-1 (16 hex digits) of everything the features depend on:
the video id, prep version, frame rate, segment length, image size, flow bound and
Farneback settings, modalities, the extractor's identity (with `--backbones`: each
modality's backbone, checkpoint SHA-256, preprocessing and dtype, so changing a weights
file recomputes), the time range, and the path,
size and mtime of the video and of the mask (a PNG folder: number, names, total size and
newest mtime of its PNGs). Labels are not part of the key: fixing a score re-uses the
features.

Files are written to a temporary name in the same folder and moved into place with
`os.replace`, so a killed run leaves either a complete entry or none. A damaged entry is
ignored (recomputed). Writing a new entry removes older entries of the same video id.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import uuid
from typing import Any, Mapping, Optional

import numpy as np

from data_prep.common import SampleSpec
from surgfusion_jax import errors


def cache_dir(data_dir: str, name: str) -> str:
    return os.path.join(os.fspath(data_dir), ".cache", name)


def safe_id(video_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", video_id)[:100]


def file_fingerprint(path: Optional[str]) -> Any:
    """Size/mtime of a file, or a summary of the PNGs of a folder; None when absent."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isdir(path):
        entries = sorted((e for e in os.scandir(path) if e.name.lower().endswith(".png")),
                         key=lambda e: e.name)
        stats = [e.stat() for e in entries]
        names = hashlib.sha1("\n".join(e.name for e in entries).encode()).hexdigest()
        return dict(path=os.path.abspath(path), pngs=len(entries), names=names,
                    bytes=sum(s.st_size for s in stats),
                    mtime_ns=max((s.st_mtime_ns for s in stats), default=0))
    st = os.stat(path)
    return dict(path=os.path.abspath(path), bytes=st.st_size, mtime_ns=st.st_mtime_ns)


def cache_key(spec: SampleSpec, settings: Mapping[str, Any]) -> str:
    blob = dict(settings=dict(settings), video_id=spec.video_id,
                video=file_fingerprint(spec.video_path),
                mask=file_fingerprint(spec.mask_path) if "mask" in settings["modalities"] else None,
                start_s=spec.start_s, end_s=spec.end_s)
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def entry_path(directory: str, video_id: str, key: str) -> str:
    return os.path.join(directory, f"{safe_id(video_id)}--{key}.npz")


def load(directory: str, video_id: str, key: str,
         modalities) -> Optional[dict[str, np.ndarray]]:
    """The cached arrays of `video_id` under `key`, or None (absent or damaged)."""
    path = entry_path(directory, video_id, key)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if str(out.get("video_id", "")) != video_id or any(m not in out for m in modalities):
        return None
    return out


def save(directory: str, video_id: str, key: str, arrays: Mapping[str, np.ndarray]) -> str:
    """Atomically writes the entry (tmp file + os.replace); drops stale entries of the id."""
    os.makedirs(directory, exist_ok=True)
    path = entry_path(directory, video_id, key)
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}.npz")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, video_id=np.asarray(video_id), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk is not a bad video: it names the folder to free
        if errors.is_disk_full(e) and not isinstance(e, errors.DiskFullError):
            raise errors.DiskFullError(directory, e) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for old in glob.glob(os.path.join(glob.escape(directory), f"{glob.escape(safe_id(video_id))}--*.npz")):
        if old != path:
            try:
                os.remove(old)
            except OSError:
                pass
    return path


def remove_temporaries(directory: str) -> None:
    """Deletes temporary files that a killed run left behind."""
    for tmp in glob.glob(os.path.join(glob.escape(directory), ".tmp-*.npz")):
        try:
            os.remove(tmp)
        except OSError:
            pass
