"""Files the library writes: atomic replacement and plain JSON.

Every results, config, split and table file goes through `atomic_write`: the bytes go to a
temporary file in the same folder, are flushed to disk, then renamed over the target, so a
reader (or a run killed half-way) sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Mapping

import numpy as np

from surgfusion_jax import errors


def atomic_write(path: str, data: bytes | str) -> str:
    """Writes `data` to `path` atomically (creating its folder); returns the path.

    A full disk raises `errors.DiskFullError` (naming the folder) with the old file intact
    and no temporary left behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if errors.is_disk_full(e) and not isinstance(e, errors.DiskFullError):
            raise errors.DiskFullError(folder, e) from e
        raise
    _fsync_folder(folder)
    return path


def _fsync_folder(folder: str) -> None:
    """Makes a rename durable (a power cut after it keeps the new file); best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON copy: numpy scalars/arrays to Python, NaN/inf to None, tuples to lists."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        return to_jsonable(obj.to_dict())
    return obj


def write_json(path: str, obj: Any, *, sort_keys: bool = False) -> str:
    """`obj` as indented plain JSON (`to_jsonable`), written atomically."""
    text = json.dumps(to_jsonable(obj), indent=1, sort_keys=sort_keys, allow_nan=False)
    return atomic_write(path, text + "\n")


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
