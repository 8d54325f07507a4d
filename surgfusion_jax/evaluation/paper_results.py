"""The paper's numbers (He et al., Tables I-V) as data, for "paper" columns (docs/design.md §6).

The numbers live in the package data file `evaluation/paper_tables.json` in the
compact layout of the printed tables (one list of values per printed row; its
"notes" say how ambiguous cells were read). This module expands them into long rows,
one dict per number:

  table       'I'..'V'
  dataset     'JIGSAWS' | 'RAH-skill' | 'RARP-skill'
  task        JIGSAWS 'KT' | 'NP' | 'SU' | 'Across Tasks'; None for the clinical sets
  scheme      'LOSO' | 'LOUO' | '4-Fold'
  method      e.g. 'ViSA', 'MAQA', 'SurgFusion-Net'
  modalities  canonical '+'-joined set in the order rgb, flow, mask, kinematics
              (Table I/II codes: V -> rgb, F -> flow, M -> mask, K -> kinematics)
  metric      'SCC' | 'MAE' | 'SCC_std' | 'MAE_std'
  value       float, or None where the paper prints '—'
  plus, where the table has them: input (the printed code), ref, block (Table III:
  'single' | 'csfb' | 'csfb+dfb'), fusion (Table IV: 'avg' | 'cat' | 'vanilla_ca' |
  'negative_ca' | 'dra'), heads (Table V), label.

`paper_table(table_id)` returns a table's rows; `paper_rows(**filters)` filters every
table; `lookup(table, ...)` returns exactly one value or raises `PaperLookupError`
naming the candidates. Filters are normalised: scheme 'loso'/'kfold', dataset 'rah',
task 'suturing', modalities ('mask', 'rgb') or 'V+F+M', method 'core+gart' all work.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
from typing import Any, Iterable

from surgfusion_jax import errors
from surgfusion_jax.data.feature_dataset import MODALITIES

DATA_FILE = "evaluation/paper_tables.json"
TABLE_IDS = ("I", "II", "III", "IV", "V")
MODALITY_ORDER = ("rgb", "flow", "mask", "kinematics")
_MODALITY_ALIASES = {"v": "rgb", "video": "rgb", "rgb": "rgb", "f": "flow", "flow": "flow", "opticalflow": "flow",
                     "m": "mask", "mask": "mask", "masks": "mask", "segmentation": "mask", "k": "kinematics",
                     "kinematics": "kinematics", "kin": "kinematics"}
_SCHEMES = {"loso": "LOSO", "louo": "LOUO", "kfold": "4-Fold", "4fold": "4-Fold", "fold4": "4-Fold"}
_DATASETS = {"jigsaws": "JIGSAWS", "rah": "RAH-skill", "rahskill": "RAH-skill", "rarp": "RARP-skill",
             "rarpskill": "RARP-skill"}
_TASKS = {"kt": "KT", "knottying": "KT", "np": "NP", "needlepassing": "NP", "su": "SU", "suturing": "SU",
          "across": "Across Tasks", "acrosstasks": "Across Tasks"}
_ROMAN = {"1": "I", "2": "II", "3": "III", "4": "IV", "5": "V"}


class PaperLookupError(errors.UserError, LookupError):
    """No number, or more than one, matches a paper-table query."""


def _key(text: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


def normalize_modalities(modalities: str | Iterable[str]) -> str:
    """'V+F+M' / ('mask', 'rgb') / 'rgb+flow' -> canonical 'rgb+flow+mask'-style string."""
    tokens = re.split(r"[+,\s]+", modalities) if isinstance(modalities, str) else list(modalities)
    names = set()
    for tok in tokens:
        if not str(tok).strip():
            continue
        name = _MODALITY_ALIASES.get(_key(tok))
        if name is None:
            raise PaperLookupError(f"unknown modality {tok!r}; use some of {MODALITY_ORDER} (or the codes V, F, M, K).")
        names.add(name)
    return "+".join(m for m in MODALITY_ORDER if m in names)


def _normalize(field: str, value: Any) -> Any:
    if value is None:
        return None
    if field == "modalities":
        return normalize_modalities(value)
    table = {"scheme": _SCHEMES, "dataset": _DATASETS, "task": _TASKS}.get(field)
    if table is not None:
        return table.get(_key(value), value)
    if field == "table":
        return table_id(value)
    if field == "metric":
        return {"scc": "SCC", "mae": "MAE", "sccstd": "SCC_std", "maestd": "MAE_std"}.get(_key(value), value)
    return value


def table_id(table: Any) -> str:
    """'I', 1, '1', 'Table I', 'table_iii' -> 'I'..'V'."""
    text = re.sub(r"(?i)^table[\s_-]*", "", str(table).strip()).upper()
    text = _ROMAN.get(text, text)
    if text not in TABLE_IDS:
        raise PaperLookupError(f"unknown paper table {table!r}; the paper has Tables {', '.join(TABLE_IDS)}.")
    return text


@functools.lru_cache(maxsize=1)
def _raw() -> dict:
    resource = importlib.resources.files("surgfusion_jax").joinpath(DATA_FILE)
    with resource.open("r", encoding="utf-8") as f:
        return json.load(f)


def _expand(tid: str, spec: dict) -> list[dict[str, Any]]:
    rows = []
    for printed in spec["rows"]:
        if len(printed["values"]) != len(spec["columns"]):
            raise ValueError(f"{DATA_FILE}: Table {tid} row {printed} has {len(printed['values'])} values "
                             f"for {len(spec['columns'])} columns.")
        base = {k: v for k, v in printed.items() if k not in ("values", "std", "metric")}
        if "input" in base:
            base["modalities"] = normalize_modalities(base["input"].split("+"))
        base.setdefault("method", spec.get("method"))
        base.setdefault("modalities", spec.get("modalities"))
        base["modalities"] = normalize_modalities(base["modalities"])
        for col, value in zip(spec["columns"], printed["values"]):
            row = {"table": tid, "dataset": spec.get("dataset"), "task": None, "scheme": spec.get("scheme"), **base}
            if tid == "I":
                row["task"], row["scheme"], metric = col[0], col[1], printed["metric"]
            elif tid == "II":
                row["dataset"], metric = col[0], col[1]
            else:
                row["dataset"], row["task"], row["scheme"], metric = col
            if printed.get("std"):
                metric += "_std"
            row["metric"], row["value"] = metric, value
            rows.append(row)
    return rows


def paper_table(table: Any) -> list[dict[str, Any]]:
    """All numbers of one table as long rows (fresh copies)."""
    tid = table_id(table)
    return copy.deepcopy(_expand(tid, _raw()["tables"][tid]))


def paper_notes() -> list[str]:
    """How the tables were transcribed (ambiguities and their resolution)."""
    return list(_raw()["notes"])


def paper_rows(table: Any = None, **filters: Any) -> list[dict[str, Any]]:
    """Rows of one table (or of all tables) whose fields equal the normalised filters."""
    tables = [table_id(table)] if table is not None else list(TABLE_IDS)
    wanted = {k: _normalize(k, v) for k, v in filters.items() if v is not None}
    out = []
    for tid in tables:
        for row in paper_table(tid):
            if all(_match(k, row.get(k, None), v) for k, v in wanted.items()):
                out.append(row)
    return out


def _match(field: str, have: Any, want: Any) -> bool:
    if have is None:
        return False
    if field == "method":
        return _key(have) == _key(want)
    if isinstance(want, str) and isinstance(have, str):
        return have.lower() == want.lower()
    return have == want


def lookup(table: Any, dataset: str | None = None, scheme: str | None = None, method: str | None = None,
           modalities: str | Iterable[str] | None = None, metric: str = "SCC", task: str | None = None,
           **extra: Any) -> float | None:
    """The one number of `table` matching the filters (None where the paper prints '—').

    Example: lookup('I', task='SU', scheme='loso', method='MAQA') -> 0.87;
    lookup('III', dataset='rah', block='csfb', modalities=('rgb', 'mask')) -> 0.7498.
    """
    rows = paper_rows(table, dataset=dataset, scheme=scheme, method=method, modalities=modalities,
                      metric=metric, task=task, **extra)
    if len(rows) != 1:
        query = dict(dataset=dataset, scheme=scheme, method=method, modalities=modalities, metric=metric,
                     task=task, **extra)
        query = {k: v for k, v in query.items() if v is not None}
        if not rows:
            options = sorted({(r.get("method"), r.get("dataset"), r.get("task"), r.get("scheme"), r.get("modalities"))
                              for r in paper_table(table)}, key=str)[:12]
            raise PaperLookupError(f"no number in Table {table_id(table)} for {query}; rows there include "
                                   f"(method, dataset, task, scheme, modalities) {options}.")
        keys = sorted({k for r in rows for k, v in r.items() if v != rows[0].get(k)} - {"value"})
        raise PaperLookupError(f"{len(rows)} numbers in Table {table_id(table)} match {query}; "
                               f"narrow it with {keys}.")
    return rows[0]["value"]


def reference_scores(dataset: str, scheme: str, task: str | None = None,
                     modalities: str | Iterable[str] = MODALITIES) -> dict[str, dict[str, float | None]]:
    """The paper's numbers for one of our runs, as `summary.write_results(paper=...)` wants them:
    {'rgb'|'flow'|'mask'|'fused': {'scc', 'mae'}}.

    Table III (4 decimals: unimodal branches and CSFB+DFB fusion of `modalities`) covers
    JIGSAWS LOUO and the clinical sets; other JIGSAWS schemes fall back to SurgFusion-Net's
    Table I entry (2 decimals, three modalities only). Missing entries are left out.
    """
    ds, sch = _normalize("dataset", dataset), _normalize("scheme", scheme)
    tk = _normalize("task", task)
    mods = normalize_modalities(modalities)
    if ds == "JIGSAWS" and tk is None:
        raise PaperLookupError("JIGSAWS reference numbers need task='KT' | 'NP' | 'SU' | 'Across Tasks'.")
    out: dict[str, dict[str, float | None]] = {}

    def grab(model: str, table: str, **filters: Any) -> None:
        try:
            out[model] = {"scc": lookup(table, metric="SCC", **filters), "mae": lookup(table, metric="MAE", **filters)}
        except PaperLookupError:
            pass

    in_table3 = bool(paper_rows("III", dataset=ds, task=tk, scheme=sch))
    if in_table3:
        for m in mods.split("+"):
            grab(m, "III", dataset=ds, task=tk, scheme=sch, block="single", modalities=m)
        if "+" in mods:
            grab("fused", "III", dataset=ds, task=tk, scheme=sch, block="csfb+dfb", modalities=mods)
    elif mods == "rgb+flow+mask":
        table = "I" if ds == "JIGSAWS" else "II"
        grab("fused", table, dataset=ds, task=tk, scheme=sch, method="SurgFusion-Net")
    return out
