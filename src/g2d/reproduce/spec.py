"""The experiment files behind ``g2d reproduce TABLE`` (``g2d/experiments/<table>.yaml``) and their
scales (``scales.yaml``): typed rows, columns, gates and paired differences, read and checked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Column", "Row", "Gate", "Difference", "Experiment", "Scale", "EXPERIMENT_DIR", "list_experiments",
           "load_experiment", "list_scales", "load_scale", "skipped"]


EXPERIMENT_DIR = Path(__file__).parents[1] / "experiments"


@dataclass
class Column:
    """One downstream measurement: ``task`` on data set ``data`` at ``fraction``; ``metric`` is the
    key read from ``metrics.json`` and multiplied by ``scale`` (100 for percentages)."""

    name: str
    task: str
    data: str
    metric: str
    fraction: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)
    scale: float = 100.0
    digits: int = 1  # decimals shown in the tables
    subsets: int = 1  # label subsets per seed (--subset 0..subsets-1): paired units for `differences`


@dataclass
class Row:
    """A pre-training variant (``pretrain`` overrides on the scale's preset) or a baseline
    (``model: random|imagenet``). ``args`` override column flags per task name; ``skip`` lists column
    names or tasks the row has no value for ('/' in the paper); ``paper`` holds the paper's values, or for a
    table beyond the paper the values the row's own publication reports, with ``source`` citing them."""

    name: str
    pretrain: dict[str, Any] | None = None
    model: str | None = None
    baseline: bool = False  # a peer's row: its model comes from --baselines (row name -> KIND:PATH)
    args: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    paper: list[str | float | None] = field(default_factory=list)
    source: str = ""  # where ``paper``'s values come from, when not the G2D paper (paper, table, how read)


@dataclass
class Gate:
    """A check on one pre-trained seed: ``column``'s value (unscaled by ``Column.scale`` only if that
    is 1) must be >= ``min`` / <= ``max``, or >= ``times`` x the ``than`` column's value + ``plus``."""

    name: str
    column: str
    min: float | None = None
    max: float | None = None
    than: str | None = None
    times: float = 1.0
    plus: float = 0.0
    rows: list[str] | None = None  # the rows it binds (default: every pre-trained row)

    def binds(self, row: str) -> bool:
        return self.rows is None or row in self.rows

    def _operands(self, values: dict[str, float | None]) -> tuple[float, float | None] | None:
        """``(value, reference)``; ``None`` when a value it needs is missing (not run or failed)."""
        v = values.get(self.column)
        ref = values.get(self.than) if self.than is not None else None
        return None if v is None or (self.than is not None and ref is None) else (v, ref)

    def check(self, values: dict[str, float | None]) -> bool | None:
        """``None`` when a value it needs is missing (not run or failed)."""
        if (operands := self._operands(values)) is None:
            return None
        v, ref = operands
        ok = True
        if self.min is not None:
            ok &= v >= self.min
        if self.max is not None:
            ok &= v <= self.max
        if ref is not None:
            ok &= v >= self.times * ref + self.plus
        return bool(ok)

    def measured(self, values: dict[str, float | None]) -> str:
        """What the check compares, for the table: the value, ``v / ref`` as ``1.85x`` for a
        ``times`` gate, ``v - ref`` for a ``plus`` gate; "" when a value is missing."""
        if (operands := self._operands(values)) is None:
            return ""
        v, ref = operands
        if ref is None:
            return f"{v:.3f}"
        if self.times != 1.0:
            return f"{v / ref:.2f}x" if ref else "inf"
        return f"{v - ref:+.3f}"


@dataclass
class Difference:
    """A paired difference ``a - b`` with its 95 % interval (:func:`g2d.metrics.paired_bootstrap`):
    ``between: rows`` compares row ``a`` with row ``b`` on every column both have per-image scores for
    (``columns``: a regular expression that narrows them); ``between: columns`` compares column ``a``
    with column ``b`` within every row that has both (``rows`` narrows them). Units are paired by
    (seed, label subset)."""

    a: str
    b: str
    between: str = "rows"
    columns: str | None = None
    rows: list[str] | None = None


@dataclass
class Experiment:
    name: str
    title: str
    columns: list[Column]
    rows: list[Row]
    seeds: int = 3
    pretrain_seeds: bool = False
    gates: list[Gate] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)
    reference: str = "paper"  # the header of the reference values' columns ("published" beyond the paper)
    notes: str = ""           # printed under the table


@dataclass
class Scale:
    """How an experiment runs at one scale: pre-training preset/overrides, data specs by abstract
    name (``{data_root}`` and ``{shared}`` are substituted), and task flags (``"*"`` for all tasks)."""

    name: str
    preset: str
    pretrain: dict[str, Any]
    data: _LazyFill
    eval_args: dict[str, dict[str, Any]]
    seeds: int | None = None


def list_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml") if p.stem != "scales")


def _read_yaml(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_experiment(name_or_path: str | Path) -> Experiment:
    p = Path(name_or_path)
    if not p.suffix:
        p = EXPERIMENT_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"no experiment {name_or_path!r}; available: {list_experiments()}")
    d = _read_yaml(p)
    cols = [Column(**c) for c in d["columns"]]
    rows = [Row(**r) for r in d["rows"]]
    for r in rows:
        if sum((r.pretrain is not None, r.model is not None, r.baseline)) != 1:
            raise ValueError(f"{p}: row {r.name!r} needs exactly one of 'pretrain', 'model' or 'baseline'")
        if r.paper and len(r.paper) != len(cols):
            raise ValueError(f"{p}: row {r.name!r} has {len(r.paper)} paper values for {len(cols)} columns")
    gates = [Gate(**g) for g in d.get("gates", [])]
    names, row_names = {c.name: c for c in cols}, {r.name for r in rows}
    for g in gates:
        missing = {c for c in (g.column, g.than) if c is not None} - set(names)
        if missing:
            raise ValueError(f"{p}: gate {g.name!r} names columns {sorted(missing)} the table does not have")
        if any(names[c].subsets > 1 for c in (g.column, g.than) if c is not None):
            raise ValueError(f"{p}: gate {g.name!r} reads a column with several label subsets (one value per seed "
                             "is needed)")
        if set(g.rows or ()) - row_names:
            raise ValueError(f"{p}: gate {g.name!r} binds rows {sorted(set(g.rows or ()) - row_names)} the table "
                             "does not have")
    differences = [Difference(**x) for x in d.get("differences", [])]
    for x in differences:
        known = row_names if x.between == "rows" else set(names) if x.between == "columns" else None
        if known is None:
            raise ValueError(f"{p}: a difference's 'between' must be rows or columns, got {x.between!r}")
        if {x.a, x.b} - known:
            raise ValueError(f"{p}: difference {x.a!r} - {x.b!r} names {x.between} the table does not have: "
                             f"{sorted({x.a, x.b} - known)}")
    return Experiment(d.get("name", p.stem), d.get("title", p.stem), cols, rows, int(d.get("seeds", 3)),
                      bool(d.get("pretrain_seeds", False)), gates, differences, d.get("reference", "paper"),
                      d.get("notes", ""))


def list_scales() -> list[str]:
    """The scales of ``scales.yaml``."""
    return list(_read_yaml(EXPERIMENT_DIR / "scales.yaml"))


def load_scale(name: str, data_root: str | Path | None = None, shared: str | Path | None = None,
               jsrt_tables: str | Path | None = None) -> Scale:
    """A scale of ``scales.yaml`` with ``{data_root}``, ``{shared}`` and ``{jsrt_tables}`` filled in
    (each only checked when a spec that uses it is needed)."""
    scales = _read_yaml(EXPERIMENT_DIR / "scales.yaml")
    if name not in scales:
        raise ValueError(f"unknown scale {name!r}; use one of {sorted(scales)}")
    s = scales[name]
    subst = {k: str(v) if v else None
             for k, v in {"data_root": data_root, "shared": shared, "jsrt_tables": jsrt_tables}.items()}

    def fill(v: Any) -> Any:
        if not isinstance(v, str):
            return v
        for k, val in subst.items():
            if "{" + k + "}" in v:
                if val is None:
                    raise ValueError(f"scale {name!r} needs --{k.replace('_', '-')} (used in {v!r})")
                v = v.replace("{" + k + "}", val)
        return v

    return Scale(name, s["preset"], {k: fill(v) for k, v in s.get("pretrain", {}).items()},
                 _LazyFill(s.get("data", {}), fill), s.get("eval_args", {}), s.get("seeds"))


class _LazyFill(dict):
    """Data specs are substituted when used, so a scale only needs the roots of the sets a table uses."""

    def __init__(self, data: dict[str, str], fill: Callable[[Any], Any]) -> None:
        super().__init__(data)
        self._fill = fill

    def spec(self, name: str) -> str:
        if name not in self:
            raise ValueError(f"this scale has no data set {name!r} (has {sorted(self)})")
        return self._fill(self[name])


def skipped(row: Row, col: Column) -> bool:
    return col.name in row.skip or col.task in row.skip
