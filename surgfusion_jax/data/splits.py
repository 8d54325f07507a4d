"""Cross-validation folds (He et al., Sec. IV-A; docs/design.md §5).

Schemes (`make_splits`):
  * 'loso'  Leave-One-Supertrial-Out (JIGSAWS): one fold per supertrial value (1-5),
            named 'supertrial_<n>'.
  * 'louo'  Leave-One-User-Out: one fold per surgeon, named 'user_<id>'.
  * 'kfold' random k folds (paper: 4), named 'fold_<i>' (1-based), seeded.

Every scheme is grouped by `source_video`: all samples of one source video (RAH's three
phase scores of one video) land on the same side of every fold. For 'kfold' the groups
are shuffled with `numpy.random.default_rng(seed)`, sorted by size (largest first, the
shuffle breaking ties) and dealt greedily to the fold with the fewest samples so far
(lowest index on ties), which keeps fold sizes within one group of each other.

`setup_dir` reads LOSO/LOUO folds from the official JIGSAWS `Experimental_setup` tree
(`<Task>/<unBalanced|Balanced>/<GestureClassification|...>/<SuperTrialOut|UserOut|LOSO|
LOUO>/<N_Out>/<itr_1>/Train.txt|Test.txt`, lines such as
`Suturing_B001_000042_000134.txt  G1`). Parsing is tolerant: `setup_dir` may be the
Experimental_setup root, a task folder or the scheme folder; 'unBalanced' is preferred
over 'Balanced', the first `itr_*` folder is used, and each line is reduced to its
`<Task>_<User><Trial>` prefix and matched to dataset videos by the same prefix of their
`video_id` (case-insensitive). A dataset video listed in neither Train.txt nor Test.txt
of a fold is left out of that fold with a warning.

Fold membership is stored as video ids (`Fold.train`, `Fold.test`); `Fold.indices(samples)`
gives positions. `save_splits` / `load_splits` write/read JSON atomically.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from surgfusion_jax import errors
from surgfusion_jax.io import atomic_write

SCHEMES = ("loso", "louo", "kfold")
DEFAULT_KFOLD = 4
SPLITS_FORMAT_VERSION = 1
_SCHEME_DIRS = {
    "loso": ("supertrialout", "loso", "leaveonesupertrialout"),
    "louo": ("userout", "louo", "leaveoneuserout"),
}
_JIGSAWS_TASKS = ("Suturing", "Knot_Tying", "Needle_Passing")
# <Task>_<User><Trial>, e.g. Suturing_B001, Knot_Tying_C003, Needle_Passing_H004.
_TRIAL_RE = re.compile(r"^\s*(?P<task>[A-Za-z]+(?:_[A-Za-z]+)*)_(?P<user>[A-Za-z])(?P<trial>\d{3})(?!\d)")


class SplitError(errors.UserError, ValueError):
    """Folds cannot be made from the given samples / setup; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Fold:
    """One cross-validation fold: video ids for training and for testing."""

    name: str
    train: list[str]
    test: list[str]

    def indices(self, samples: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """(train_idx, test_idx) positions of this fold's videos in `samples`."""
        pos = {s["video_id"]: i for i, s in enumerate(samples)}
        missing = [v for v in (*self.train, *self.test) if v not in pos]
        if missing:
            raise SplitError(f"fold {self.name!r} names videos absent from the dataset: {missing[:5]} "
                             "(were the splits saved for another dataset? delete the splits file to remake them).")
        return (np.array([pos[v] for v in self.train], dtype=np.int64),
                np.array([pos[v] for v in self.test], dtype=np.int64))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "train": list(self.train), "test": list(self.test)}


def _group_field(samples, field: str) -> dict[str, list[str]]:
    """Group video ids by `field`, checking each source video maps to one value."""
    by_source: dict[str, Any] = {}
    groups: dict[Any, list[str]] = collections.defaultdict(list)
    for s in samples:
        value = s.get(field)
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        src = _source(s)
        if src in by_source and by_source[src] != value:
            raise SplitError(f"source video {src!r} has samples with different {field} values "
                             f"({by_source[src]!r} and {value!r}); fix the sample field `{field}` or `source_video`.")
        by_source[src] = value
        groups[value].append(s["video_id"])
    return groups


def _source(sample) -> str:
    src = sample.get("source_video") or sample["video_id"]
    return src.decode() if isinstance(src, bytes) else str(src)


# The sample field each scheme's folds group by (kfold: the source video).
GROUP_FIELDS = {"loso": "supertrial", "louo": "surgeon_id", "kfold": "source_video"}


def group_keys(samples: Sequence[Mapping[str, Any]], scheme: str) -> list[Any]:
    """Per sample, the value `scheme`'s folds group by (`GROUP_FIELDS`); every value keeps
    a source video whole, so an inner split grouped by it leaks no video either."""
    if scheme == "kfold":
        return [_source(s) for s in samples]
    by_id = {v: key for key, ids in _group_field(samples, GROUP_FIELDS[scheme]).items()
             for v in ids}
    return [by_id[s["video_id"]] for s in samples]


def _check_samples(samples) -> None:
    if not samples:
        raise SplitError("no samples to split (the feature dataset is empty).")
    ids = [s["video_id"] for s in samples]
    dup = [v for v, n in collections.Counter(ids).items() if n > 1]
    if dup:
        raise SplitError(f"duplicate video_id values {dup[:5]}; every sample needs a unique `video_id`.")


def _folds_from_groups(groups: Mapping[Any, list[str]], all_ids: list[str], prefix: str) -> list[Fold]:
    folds = []
    for key in sorted(groups, key=lambda k: (str(type(k)), k)):
        test = sorted(groups[key])
        test_set = set(test)
        folds.append(Fold(f"{prefix}_{key}", sorted(v for v in all_ids if v not in test_set), test))
    return folds


def _kfold(samples, num_folds: int, seed: int) -> list[Fold]:
    by_source: dict[str, list[str]] = collections.defaultdict(list)
    for s in samples:
        by_source[_source(s)].append(s["video_id"])
    sources = sorted(by_source)
    if len(sources) < num_folds:
        raise SplitError(f"kfold with num_folds={num_folds} needs at least {num_folds} source videos, "
                         f"found {len(sources)}; lower `num_folds`.")
    order = np.random.default_rng(seed).permutation(len(sources))
    shuffled = [sources[i] for i in order]
    shuffled.sort(key=lambda src: -len(by_source[src]))  # stable: shuffle breaks ties
    members: list[list[str]] = [[] for _ in range(num_folds)]
    for src in shuffled:
        k = min(range(num_folds), key=lambda i: (len(members[i]), i))
        members[k].extend(by_source[src])
    all_ids = [s["video_id"] for s in samples]
    return _folds_from_groups({i + 1: m for i, m in enumerate(members)}, all_ids, "fold")


def make_splits(samples: Sequence[Mapping[str, Any]], scheme: str, num_folds: int | None = None,
                seed: int = 0, setup_dir: str | None = None) -> list[Fold]:
    """Folds of `samples` (dicts with video_id, surgeon_id, supertrial, source_video).

    `num_folds`: for 'kfold' the number of folds (default 4); ignored by 'loso'/'louo',
    whose fold count is the number of supertrials / surgeons (or setup folders).
    `setup_dir`: official JIGSAWS Experimental_setup folder to read 'loso'/'louo' from.
    """
    scheme = str(scheme).lower()
    if scheme not in SCHEMES:
        raise SplitError(f"unknown split scheme {scheme!r}; choose one of {SCHEMES} (config field `scheme`).")
    samples = list(samples)
    _check_samples(samples)
    if scheme == "kfold":
        if setup_dir:
            raise SplitError("setup_dir only applies to 'loso' and 'louo' (the official JIGSAWS folds).")
        k = DEFAULT_KFOLD if num_folds is None else int(num_folds)
        if k < 2:
            raise SplitError(f"kfold needs num_folds >= 2, got {k}.")
        return _kfold(samples, k, seed)
    if setup_dir:
        folds = read_jigsaws_setup(setup_dir, samples, scheme)
    else:
        field, prefix = GROUP_FIELDS[scheme], ("supertrial" if scheme == "loso" else "user")
        bad = [s["video_id"] for s in samples if s.get(field) in (None, "", b"", 0)]
        if bad:
            raise SplitError(f"scheme {scheme!r} needs the sample field `{field}` "
                             f"({'JIGSAWS trial number 1-5' if field == 'supertrial' else 'surgeon id'}), "
                             f"missing/zero for {len(bad)} samples, e.g. {bad[:3]}; use scheme 'kfold' "
                             "for data without it or fix the prep manifest.")
        groups = _group_field(samples, field)
        if len(groups) < 2:
            raise SplitError(f"scheme {scheme!r} needs at least 2 distinct `{field}` values, found {sorted(groups)}.")
        folds = _folds_from_groups(groups, [s["video_id"] for s in samples], prefix)
    return folds


# --------------------------------------------------------------------------- JIGSAWS setup

def trial_key(name: str) -> str | None:
    """'Suturing_B001_000042_000134.txt' -> 'suturing_b001' (None when no such prefix)."""
    m = _TRIAL_RE.match(os.path.basename(str(name)))
    if not m:
        return None
    return f"{m['task']}_{m['user']}{m['trial']}".lower()


def _read_keys(path: str) -> set[str]:
    keys = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            token = line.strip().split()[0] if line.strip() else ""
            key = trial_key(token)
            if key:
                keys.add(key)
    return keys


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _find_setup_folds(setup_dir: str, scheme: str, tasks: set[str]) -> dict[str, dict[str, list[str]]]:
    """{fold folder name: {'test': [paths], 'train': [paths]}} (one pair per task) for `scheme`."""
    aliases = _SCHEME_DIRS[scheme]
    jigsaws_tasks = {_norm(t) for t in _JIGSAWS_TASKS}
    wanted = {_norm(t) for t in tasks}
    best: dict[tuple[str, str], tuple[tuple, str, str]] = {}
    top = os.path.basename(os.path.normpath(setup_dir))
    for root, _dirs, files in os.walk(setup_dir):
        lower = {f.lower(): f for f in files}
        if "test.txt" not in lower:
            continue
        rel = os.path.relpath(root, setup_dir)
        parts = [top] + ([] if rel == "." else rel.split(os.sep))  # setup_dir may be the scheme folder
        normed = [_norm(p) for p in parts]
        hits = [i for i, p in enumerate(normed) if p in aliases]
        if not hits or hits[-1] + 1 >= len(parts):
            continue
        i = hits[-1]
        task_parts = [p for p in normed[:i] if p in jigsaws_tasks]
        if task_parts and wanted and not set(task_parts) & wanted:
            continue  # another task's folder
        rank = (0 if "unbalanced" in normed[:i] else 1, 0 if "gestureclassification" in normed[:i] else 1,
                "/".join(normed[i + 2:]))  # then the lowest itr_* folder
        train = os.path.join(root, lower["train.txt"]) if "train.txt" in lower else ""
        key = (parts[i + 1], task_parts[-1] if task_parts else "")
        cand = (rank, os.path.join(root, lower["test.txt"]), train)
        if key not in best or cand < best[key]:
            best[key] = cand
    result: dict[str, dict[str, list[str]]] = {}
    for (fold, _task), (_rank, test, train) in sorted(best.items()):
        entry = result.setdefault(fold, {"test": [], "train": []})
        entry["test"].append(test)
        entry["train"].append(train)
    return result


def _fold_label(folder: str, scheme: str) -> str:
    key = re.sub(r"(?i)_?out$", "", folder)
    return f"{'supertrial' if scheme == 'loso' else 'user'}_{key}"


def read_jigsaws_setup(setup_dir: str, samples: Sequence[Mapping[str, Any]], scheme: str) -> list[Fold]:
    """LOSO/LOUO folds from the official JIGSAWS Experimental_setup tree (see module doc)."""
    if scheme not in _SCHEME_DIRS:
        raise SplitError(f"setup_dir gives only 'loso' or 'louo' folds, not {scheme!r}.")
    if not os.path.isdir(setup_dir):
        raise SplitError(f"JIGSAWS setup_dir {setup_dir!r} is not a folder; point it at "
                         "<JIGSAWS>/Experimental_setup (config field `setup_dir`).")
    key_of = {}
    for s in samples:
        key = trial_key(s["video_id"]) or trial_key(_source(s))
        if key is None:
            raise SplitError(f"video_id {s['video_id']!r} does not start with <Task>_<User><Trial> "
                             "(e.g. 'Suturing_B001'), so it cannot be matched to the JIGSAWS setup files.")
        key_of[s["video_id"]] = key
    tasks = {k.rsplit("_", 1)[0] for k in key_of.values()}
    folders = _find_setup_folds(setup_dir, scheme, tasks)
    if not folders:
        raise SplitError(f"no {scheme.upper()} folds under {setup_dir!r}: expected "
                         f"<Task>/unBalanced/GestureClassification/<{'SuperTrialOut' if scheme == 'loso' else 'UserOut'}>"
                         "/<N_Out>/itr_1/Test.txt.")
    folds = []
    for folder in sorted(folders):
        test_keys = set().union(*(_read_keys(p) for p in folders[folder]["test"]))
        train_keys = set().union(*(_read_keys(p) for p in folders[folder]["train"] if p))
        test = sorted(v for v, k in key_of.items() if k in test_keys)
        train = sorted(v for v, k in key_of.items() if k in train_keys and k not in test_keys)
        both = sorted(v for v, k in key_of.items() if k in test_keys and k in train_keys)
        if both:
            warnings.warn(f"JIGSAWS setup fold {folder}: {both[:5]} listed in both Train.txt and Test.txt; kept in test.")
        left = sorted(set(key_of) - set(test) - set(train))
        if left:
            warnings.warn(f"JIGSAWS setup fold {folder}: {len(left)} dataset videos are in neither Train.txt nor "
                          f"Test.txt and are left out of this fold, e.g. {left[:5]}.")
        if not test:
            raise SplitError(f"JIGSAWS setup fold {folder} ({folders[folder]['test'][0]}) matches no dataset video; "
                             "check that setup_dir belongs to the same task as the dataset.")
        folds.append(Fold(_fold_label(folder, scheme), train, test))
    return folds


# --------------------------------------------------------------------------- validation split

def inner_validation_split(train_ids: Sequence[str], samples: Sequence[Mapping[str, Any]], fraction: float = 0.2,
                           seed: int = 0) -> tuple[list[str], list[str]]:
    """Split a fold's training videos into (train, val), grouped by source_video.

    About `fraction` of the source videos (at least one; at least one left for training)
    go to validation, chosen with `numpy.random.default_rng(seed)`.
    """
    if not 0.0 < fraction < 1.0:
        raise SplitError(f"validation fraction must lie in (0, 1), got {fraction} (config field `val_fraction`).")
    source = {s["video_id"]: _source(s) for s in samples}
    missing = [v for v in train_ids if v not in source]
    if missing:
        raise SplitError(f"training ids absent from the samples: {missing[:5]}.")
    groups = sorted({source[v] for v in train_ids})
    if len(groups) < 2:
        raise SplitError(f"an inner validation split needs >= 2 source videos in the training fold, found {len(groups)}.")
    n_val = min(max(1, int(round(fraction * len(groups)))), len(groups) - 1)
    order = np.random.default_rng(seed).permutation(len(groups))
    val_groups = {groups[i] for i in order[:n_val]}
    train = sorted(v for v in train_ids if source[v] not in val_groups)
    val = sorted(v for v in train_ids if source[v] in val_groups)
    return train, val


# --------------------------------------------------------------------------- persistence

def save_splits(folds: Sequence[Fold], path: str, metadata: Mapping[str, Any] | None = None) -> str:
    """Write folds (+ optional metadata such as scheme and seed) to JSON, atomically."""
    payload = {"format_version": SPLITS_FORMAT_VERSION, "metadata": dict(metadata or {}),
               "folds": [f.to_dict() for f in folds]}
    atomic_write(path, json.dumps(payload, indent=1) + "\n")
    return os.fspath(path)


def load_splits(path: str) -> list[Fold]:
    """Folds written by `save_splits`."""
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise SplitError(f"splits file {path!r} not found; it is written by `save_splits` at the start of a run.") from None
    except json.JSONDecodeError as e:
        raise SplitError(f"splits file {path!r} is not valid JSON ({e}); delete it to remake the splits.") from None
    folds = payload.get("folds") if isinstance(payload, dict) else None
    if not isinstance(folds, list) or not all(isinstance(f, dict) and {"name", "train", "test"} <= set(f) for f in folds):
        raise SplitError(f"splits file {path!r} lacks a `folds` list of {{name, train, test}}; delete it to remake the splits.")
    return [Fold(str(f["name"]), [str(v) for v in f["train"]], [str(v) for v in f["test"]]) for f in folds]
