"""Experiment runner behind ``g2d reproduce TABLE``.

An experiment file (``g2d/experiments/<table>.yaml``) lists *rows* (a pre-training variant given as
config overrides, or a baseline ``model: random|imagenet``) and *columns* (a downstream task on an
abstract data set name at a label fraction, with task flags). Every cell runs for N seeds. A *scale*
(``g2d/experiments/scales.yaml``) turns the abstract parts into something runnable: the pre-training
preset and data, the downstream data specs, and task flags (epochs, image size) for that scale.

Results are stored under ``OUT/cells/<key>/metrics.json`` where ``key`` hashes the exact task
arguments (and so, through the model path, the exact pre-training config); pre-training runs are
stored under ``OUT/pretrain/<key>/``. A stopped run continues where it left off, and a finished cell
is never computed twice.

An experiment with ``pretrain_seeds: true`` pre-trains every variant once per seed (``train.seed``),
so seed-to-seed spread includes pre-training's; a column with ``task: pretrain`` reads the pre-training
run itself (``pretrain_metrics.json``: the final contrastive loss against ln B). ``gates`` are checks
every pre-trained seed must pass for the table to mean anything (``format_gates``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from g2d.config import config_from_dict, get_config
from g2d.data.labelled.specs import open_dataset
from g2d.downstream import protocol
from g2d.downstream.protocol import ProtocolArgs
from g2d.errors import ConfigError
from g2d.fingerprint import absolute_paths, dataset_identity, digest, model_identity
from g2d.peers import PEER_KINDS, split_model_spec

__all__ = ["Column", "Row", "Gate", "Experiment", "Scale", "load_experiment", "load_scale", "list_scales",
           "list_experiments", "Runner", "CellResult", "format_markdown", "format_gates", "format_csv",
           "format_fraction_tables", "pretrain_metrics", "prepare_jsrt", "Difference", "format_differences"]

log = logging.getLogger("g2d.reproduce")

EXPERIMENT_DIR = Path(__file__).with_name("experiments")


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
    names or tasks the row has no value for ('/' in the paper); ``paper`` holds the paper's values."""

    name: str
    pretrain: dict[str, Any] | None = None
    model: str | None = None
    baseline: bool = False  # a peer's row: its model comes from --baselines (row name -> KIND:PATH)
    args: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    paper: list[str | float | None] = field(default_factory=list)


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
                      bool(d.get("pretrain_seeds", False)), gates, differences)


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




@dataclass
class CellResult:
    row: str
    column: str
    values: list[float]  # one per finished seed (and label subset), already scaled
    errors: list[str]
    seeds: list[int] = field(default_factory=list)  # the seed of each value
    subsets: list[int] = field(default_factory=list)  # the label subset of each value
    # (seed, subset) -> (per-image scores, already scaled; digest of the images' ids), where written
    per_image: dict[tuple[int, int], tuple[list[float], str]] = field(default_factory=dict)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else (0.0 if self.values else None)


def _keyed(parent: Path, key: Any) -> tuple[Path, list[Path]]:
    """Where a result is written, ``parent / digest(key with absolute paths)``
    (:func:`g2d.fingerprint.absolute_paths`), and where to look for it first: the folder a store
    from before 2026-12-01 used (the key with its paths as this command spells them; such a store
    may hold the same run under two spellings, and this command found this one before), then that."""
    new, spelled = parent / digest(absolute_paths(key)), parent / digest(key)
    return new, ([new] if new == spelled else [spelled, new])


class Runner:
    """Runs (or reuses) every cell of an experiment at a scale, writing under ``out``.

    :param run_task: ``(task, args) -> metrics`` with the protocol's ``Args`` (default: the protocol's
        ``run``, in-process).
    :param run_pretrain: ``(config, out_dir) -> model path`` (default: :func:`g2d.train.loop.pretrain`).
    :param columns: run only the columns whose name matches this regular expression (``re.search``);
        the others are collected from the store like ``collect_only`` cells.
    :param collect_only: run nothing (no pre-training, no cell); the table shows finished cells and
        "not run" for the others.
    :param baselines: peers' rows (``baseline: true``) -> ``KIND:PATH``, or ``{"model": KIND:PATH,
        "text_model": NAME|DIR}`` for zero-shot and grounding (docs/peers.md); a baseline row without
        one is shown as "not given", never dropped.
    """

    def __init__(self, exp: Experiment, scale: Scale, out: str | Path, seeds: int | None = None,
                 device: str = "auto", progress: bool = True,
                 run_task: Callable[[str, ProtocolArgs], dict[str, Any]] | None = None,
                 run_pretrain: Callable[[Any, Path], Path] | None = None,
                 columns: str | None = None, collect_only: bool = False,
                 baselines: dict[str, str | dict[str, str]] | None = None) -> None:
        self.exp, self.scale, self.out = exp, scale, Path(out)
        self.baselines = dict(baselines or {})
        unknown = set(self.baselines) - {r.name for r in exp.rows if r.baseline}
        if unknown:
            raise ValueError(f"--baselines names rows {sorted(unknown)} that {exp.name} has no baseline row for; "
                             f"its baseline rows: {[r.name for r in exp.rows if r.baseline]}")
        zero_shot_tasks = {c.task for c in exp.columns} & {"zeroshot", "grounding"}
        for name, given in self.baselines.items():
            spec = given["model"] if isinstance(given, dict) else given
            if split_model_spec(spec)[0] not in PEER_KINDS:  # raises for an unknown KIND
                raise ValueError(f"--baselines row {name!r}: {spec!r} is not KIND:PATH of a peer "
                                 f"({', '.join(sorted(PEER_KINDS))})")
            if isinstance(given, dict) and given.get("text_model") and not zero_shot_tasks:
                raise ValueError(f"--baselines row {name!r}: text_model is for zero-shot and grounding cells, "
                                 f"and {exp.name} has none")
        for row in exp.rows:  # a given baseline runs like a `model:` row
            entry = self.baselines.get(row.name) if row.baseline else None
            if isinstance(entry, dict):  # {model: KIND:PATH, text_model: NAME|DIR} (zero-shot, grounding)
                row.model = entry["model"]
                for task in ("zeroshot", "grounding"):
                    row.args[task] = {**row.args.get(task, {}), "text_model": entry.get("text_model")}
            elif entry is not None:
                row.model = entry
        self.columns = re.compile(columns) if columns else None
        self.collect_only = collect_only
        self.seeds = seeds or scale.seeds or exp.seeds
        self.device, self.progress = device, progress
        self.run_task = run_task or protocol.run
        self._data_ids: dict[str, str] = {}
        self._legacy_data_ids: dict[str, str] = {}
        self._indexes: dict[str, dict[str, Path]] = {}  # _index: folder -> key digest -> entry
        self.run_pretrain = run_pretrain or (lambda cfg, d: _pretrain(cfg, d, device, progress))

    # ------------------------------------------------------------------ pre-training variants

    def pretrain_config(self, row: Row, seed: int = 0):
        """The row's pre-training config; with ``pretrain_seeds`` the seed sets ``train.seed``."""
        seeded = {"train.seed": seed} if self.exp.pretrain_seeds else {}
        return get_config(self.scale.preset, {**self.scale.pretrain, **(row.pretrain or {}), **seeded})

    def pretrain_dir(self, row: Row, seed: int = 0) -> Path:
        """Keyed by the config with its paths absolute, however the command spelled them. A run
        stored before a config field was added (so under another key) is found by its config.yaml
        read with that field at its default (:meth:`_stored_runs`)."""
        wanted = self.pretrain_config(row, seed).to_dict()
        new, found = _keyed(self.out / "pretrain", wanted)
        done = next((d for d in found if (d / "export" / "model.safetensors").is_file()), None)
        if done is None:
            done = self._stored_runs().get(digest(absolute_paths(wanted)))
        return done or next((d for d in found if d.exists()), new)

    def _stored_runs(self) -> dict[str, Path]:
        """Finished pre-training runs by their config.yaml as this code reads it: fields added since
        they ran take their defaults, which by this project's rule are the behaviour before the field
        existed."""
        def read(cfg_file: Path) -> dict[str, Any] | None:
            if not (cfg_file.parent / "export" / "model.safetensors").is_file():
                return None
            return config_from_dict(yaml.safe_load(cfg_file.read_text(encoding="utf-8"))).to_dict()

        return self._index("pretrain", "config.yaml", read)

    def _index(self, folder: str, name: str, read: Callable[[Path], Any]) -> dict[str, Path]:
        """Entries of ``OUT/folder`` by the digest (paths absolute) of the key ``read`` rebuilds from
        each entry's file ``name`` (``None``: not finished), built once per Runner; a file this code
        cannot read is skipped."""
        if folder not in self._indexes:
            index: dict[str, Path] = {}
            for file in sorted((self.out / folder).glob(f"*/{name}")):
                try:
                    key = read(file)
                except (ConfigError, ValueError, TypeError, KeyError, yaml.YAMLError) as err:
                    log.debug("%s: not read (%s)", file, err)
                    continue
                if key is not None:
                    index.setdefault(digest(absolute_paths(key)), file.parent)
            self._indexes[folder] = index
        return self._indexes[folder]

    def model_for(self, row: Row, seed: int = 0) -> str:
        if row.model is not None:
            return row.model
        run_dir = self.pretrain_dir(row, seed)
        export = run_dir / "export"
        if not (export / "model.safetensors").is_file():
            log.info("pre-training %r (seed %d) in %s", row.name, seed, run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "variant.txt").write_text(f"{row.name}\nseed {seed}\n", encoding="utf-8")
            export = Path(self.run_pretrain(self.pretrain_config(row, seed), run_dir))
        return str(export)

    # ------------------------------------------------------------------ cells

    def cell_args(self, row: Row, col: Column, model: str, seed: int, out: str | Path = "",
                  subset: int = 0) -> ProtocolArgs:
        """The protocol's ``Args`` for one cell: scale flags (``"*"`` then the task's), the column's,
        then the row's, with dashes or underscores in their names."""
        flags = {**self.scale.eval_args.get("*", {}), **self.scale.eval_args.get(col.task, {}),
                 **col.args, **row.args.get(col.task, {})}
        return protocol.make(col.task, data=self.scale.data.spec(col.data), model=model, fraction=float(col.fraction),
                             seed=seed, subset=subset, device=self.device, no_progress=not self.progress,
                             out=str(out), **{k.replace("-", "_"): v for k, v in flags.items()})

    def run(self) -> list[CellResult]:
        """Every cell, seed by seed: a long run stopped part-way leaves whole seeds of the table,
        not whole rows. Each pre-training variant is trained once, before its first cell."""
        results = {(r.name, c.name): CellResult(r.name, c.name, [], []) for r in self.exp.rows
                   for c in self.exp.columns}
        models: dict[tuple[str, int], str | Exception] = {}
        for seed in range(self.seeds):
            pseed = seed if self.exp.pretrain_seeds else 0
            for row in self.exp.rows:
                for col in self.exp.columns:
                    res = results[row.name, col.name]
                    if _skipped(row, col) or (row.baseline and row.model is None):  # "not given"
                        continue
                    if self.collect_only or (self.columns and not self.columns.search(col.name)):
                        model = row.model if row.model is not None else str(self.pretrain_dir(row, pseed) / "export")
                        for subset in range(col.subsets):
                            self._run_cell(row, col, model, seed, res, compute=False, subset=subset)
                        continue
                    if (row.name, pseed) not in models:
                        try:
                            models[row.name, pseed] = self.model_for(row, pseed)
                        except Exception as e:  # a failed pre-training fails its row, not the table
                            log.error("pre-training of %r failed: %s", row.name, e)
                            models[row.name, pseed] = e
                    built = models[row.name, pseed]
                    if isinstance(built, Exception):
                        if seed == pseed:
                            res.errors.append(f"pretrain (seed {pseed}): {built}")
                        continue
                    for subset in range(col.subsets):
                        self._run_cell(row, col, built, seed, res, subset=subset)
        return list(results.values())

    def input_identity(self, spec: str, model: str) -> dict[str, str]:
        """The content a cell's result depends on beyond its arguments (g2d.fingerprint): the data
        set's records and files (once per spec and run) and the model's weight files."""
        if spec not in self._data_ids:
            try:
                self._data_ids[spec] = self._data_id(spec)
            except Exception as e:  # the task itself reports what is wrong with the data
                self._data_ids[spec] = f"unreadable: {type(e).__name__}"
        return {"data_id": self._data_ids[spec], "model_id": model_identity(model)}

    def _finished(self, cell_dir: Path, inputs: dict[str, str], spec: str) -> bool:
        """``cell_dir`` holds a result for these inputs (or from before inputs were tracked)."""
        if not (cell_dir / "metrics.json").is_file():
            return False
        stored = cell_dir / "inputs.json"
        return not stored.is_file() or self._same_inputs(json.loads(stored.read_text(encoding="utf-8")), inputs, spec)

    @staticmethod
    def _data_id(spec: str, mask_form: Callable[[Any], Any] | None = None) -> str:
        return digest([dataset_identity(open_dataset(spec, s, max_skip_fraction=1.0), mask_form=mask_form)
                       for s in ("train", "val", "test")])

    def _same_inputs(self, stored: dict[str, str], inputs: dict[str, str], spec: str) -> bool:
        """Stored inputs equal ``inputs``, or differ only by the data identity stores kept before
        2026-12-01 (mask paths as spelled; :func:`g2d.fingerprint.dataset_identity`), computed only
        for such a store."""
        if stored == inputs or {**stored, "data_id": ""} != {**inputs, "data_id": ""}:
            return stored == inputs
        if spec not in self._legacy_data_ids:
            try:
                self._legacy_data_ids[spec] = self._data_id(spec, mask_form=repr)
            except Exception:  # unreadable: no store can match it
                self._legacy_data_ids[spec] = ""
        return stored.get("data_id") == self._legacy_data_ids[spec] != ""

    def cell_key(self, row: Row, col: Column, model: str, seed: int, subset: int = 0) -> list[Any]:
        """The protocol's arguments, less the display-only ones (``protocol.key_fields``)."""
        return [col.task, protocol.key_fields(self.cell_args(row, col, model, seed, subset=subset))]

    def cell_dirs(self, row: Row, col: Column, model: str, seed: int, subset: int = 0) -> tuple[Path, list[Path]]:
        """Where the cell runs, and where to look for its result (:func:`_keyed`), then a cell
        stored before a protocol field was added (:meth:`_stored_cells`)."""
        key = self.cell_key(row, col, model, seed, subset)
        new, found = _keyed(self.out / "cells", key)
        if not any((d / "metrics.json").is_file() for d in found):
            old = self._stored_cells().get(digest(absolute_paths(key)))
            found = found + [old] if old is not None else found
        return new, found

    def _stored_cells(self) -> dict[str, Path]:
        """Finished cells by their recorded key (``key.json``) with fields added to the protocol
        since they ran at their defaults."""
        def read(key_file: Path) -> list[Any]:
            task, fields = json.loads(key_file.read_text(encoding="utf-8"))
            return [task, protocol.completed_key_fields(task, fields)]

        return self._index("cells", "key.json", read)

    def _run_cell(self, row: Row, col: Column, model: str, seed: int, res: CellResult,
                  compute: bool = True, subset: int = 0) -> None:
        """Adds the cell's stored result to ``res``, running the task first if it is not stored
        (and ``compute``; otherwise an unfinished cell adds nothing)."""
        if col.task == "pretrain":  # the pre-training run's own numbers, written when it ended
            self._add(res, col, seed, Path(model).parent / PRETRAIN_METRICS)
            return
        new, found = self.cell_dirs(row, col, model, seed, subset)
        args = self.cell_args(row, col, model, seed, out=new, subset=subset)
        inputs = {**self.input_identity(args.data, model), **protocol.content_inputs(args)}
        cell_dir = next((d for d in found if self._finished(d, inputs, args.data)),  # else a stale one, said below
                        next((d for d in found if (d / "metrics.json").is_file()), new))
        args = dataclasses.replace(args, out=str(cell_dir))
        metrics_file = cell_dir / "metrics.json"
        inputs_file = cell_dir / "inputs.json"
        if metrics_file.is_file() and not inputs_file.is_file():
            # a cell finished before inputs were tracked: taken as is, and tracked from now on
            inputs_file.write_text(json.dumps(inputs), encoding="utf-8")
        if metrics_file.is_file() and not self._finished(cell_dir, inputs, args.data):
            if not compute:
                res.errors.append(f"seed {seed}: {metrics_file} was computed from other images or weights")
                return
            log.info("%s: its model or data changed since it ran; running it again", cell_dir)
            metrics_file.unlink()
        if not metrics_file.is_file():
            if not compute:
                return
            log.info("%s | %s | seed %d subset %d -> %s", row.name, col.name, seed, subset, cell_dir)
            try:
                self.run_task(col.task, args)
            except Exception as e:
                log.error("%s | %s | seed %d subset %d failed: %s", row.name, col.name, seed, subset, e)
                res.errors.append(f"seed {seed}" + (f" subset {subset}" if subset else "") + f": {e}")
                return
            inputs_file.write_text(json.dumps(inputs), encoding="utf-8")
        key_file = cell_dir / "key.json"  # what it was computed for, read by _stored_cells
        if metrics_file.is_file() and not key_file.is_file():
            key_file.write_text(json.dumps(absolute_paths(self.cell_key(row, col, model, seed, subset)),
                                           default=str), encoding="utf-8")
        self._add(res, col, seed, metrics_file, subset)

    @staticmethod
    def _add(res: CellResult, col: Column, seed: int, metrics_file: Path, subset: int = 0) -> None:
        if not metrics_file.is_file():  # not run yet (a pre-training that has not ended)
            return
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        if col.metric not in metrics:
            res.errors.append(f"seed {seed}: metric {col.metric!r} not in {metrics_file}")
            return
        if metrics[col.metric] is None:  # strict JSON's null: undefined for this run, with its reason
            why = metrics.get("undefined", {}).get(col.metric, "undefined")
            res.errors.append(f"seed {seed}: {col.metric} is undefined ({why}) in {metrics_file}")
            return
        res.values.append(float(metrics[col.metric]) * col.scale)
        res.seeds.append(seed)
        res.subsets.append(subset)
        scores = metrics.get("per_image", {})
        if isinstance(scores.get(col.metric), list):
            res.per_image[seed, subset] = ([float(v) * col.scale for v in scores[col.metric]],
                                           str(scores.get("ids_digest", "")))

    def write(self, results: list[CellResult], info: dict[str, Any] | None = None) -> dict[str, Path]:
        """``OUT/<name>.md``, ``.csv`` and, for fraction sweeps, ``<name>_fractions.md`` / ``.png``."""
        self.out.mkdir(parents=True, exist_ok=True)
        md = format_markdown(self.exp, results, info or {})
        gates = format_gates(self.exp, results, self.seeds)
        if gates:
            md += "\n" + gates
        differences = format_differences(self.exp, results)
        if differences:
            md += "\n" + differences
        paths = {"markdown": self.out / f"{self.exp.name}.md", "csv": self.out / f"{self.exp.name}.csv"}
        paths["markdown"].write_text(md, encoding="utf-8")
        paths["csv"].write_text(format_csv(self.exp, results), encoding="utf-8")
        by_fraction = format_fraction_tables(self.exp, results)
        if by_fraction is not None:
            paths["fractions_markdown"] = self.out / f"{self.exp.name}_fractions.md"
            paths["fractions_markdown"].write_text(by_fraction, encoding="utf-8")
        png = plot_fractions(self.exp, results, self.out / f"{self.exp.name}_fractions.png")
        if png is not None:
            paths["plot"] = png
        return paths


def _skipped(row: Row, col: Column) -> bool:
    return col.name in row.skip or col.task in row.skip


def _fmt(res: CellResult, skipped: bool, digits: int = 1, not_given: bool = False) -> str:
    if not res.values:
        return "error" if res.errors else "/" if skipped else "not given" if not_given else "not run"
    n = len(res.values)
    return f"{res.mean:.{digits}f} ± {res.std:.{digits}f} (n={n})" if n > 1 else f"{res.mean:.{digits}f} (n=1)"


def format_gates(exp: Experiment, results: list[CellResult], seeds: int | None = None) -> str | None:
    """The validity gates per pre-trained row and seed: a table of pass / FAIL / missing, each with the
    quantity it compared (:meth:`Gate.measured`), and a verdict (issue 16: a comparison of
    pre-training variants means something only where every seed of every variant clearly learned).
    A gate with ``rows`` binds only those rows; elsewhere it shows "not bound" with its value.
    ``seeds``: the seeds expected (default ``exp.seeds``); one that has not finished is "missing" and
    fails the verdict. ``None`` for an experiment without gates."""
    if not exp.gates:
        return None
    by = {(r.row, r.column): r for r in results}
    lines = ["## Validity gates (every pre-trained seed)", "",
             "| method | seed | " + " | ".join(g.name for g in exp.gates) + " |",
             "|---|---|" + "---|" * len(exp.gates)]
    verdict = True
    pretrained = [row for row in exp.rows if row.pretrain is not None]
    expected = set(range(exp.seeds if seeds is None else seeds))
    for row in pretrained:
        for seed in sorted(expected | {s for c in exp.columns for s in by[(row.name, c.name)].seeds}):
            values = {c.name: dict(zip(by[(row.name, c.name)].seeds, by[(row.name, c.name)].values)).get(seed)
                      for c in exp.columns}
            marks = []
            for g in exp.gates:
                if not g.binds(row.name):
                    measured = g.measured(values)
                    marks.append(f"not bound ({measured})" if measured else "not bound")
                    continue
                ok = g.check(values)
                verdict &= ok is True
                marks.append("missing" if ok is None else f"{'pass' if ok else 'FAIL'} ({g.measured(values)})")
            lines.append(f"| {row.name} | {seed} | " + " | ".join(marks) + " |")
    lines += ["", "Verdict: " + ("every pre-trained seed passes every gate; the comparison is valid."
                                 if verdict and pretrained
                                 else "NOT every pre-trained seed passes every gate (or some are missing): "
                                      "read the comparison as not valid where a row fails."), ""]
    return "\n".join(lines)


def _pairs(exp: Experiment, x: Difference) -> list[tuple[str, tuple[str, str], tuple[str, str]]]:
    """``(where, (row, column) of a, (row, column) of b)`` for each comparison ``x`` makes."""
    if x.between == "rows":
        cols = [c.name for c in exp.columns if not x.columns or re.search(x.columns, c.name)]
        return [(c, (x.a, c), (x.b, c)) for c in cols]
    rows = [r.name for r in exp.rows if not x.rows or r.name in x.rows]
    return [(r, (r, x.a), (r, x.b)) for r in rows]


def format_differences(exp: Experiment, results: list[CellResult], n_boot: int = 10_000) -> str | None:
    """The experiment's ``differences`` as a table: mean difference ``a - b`` over paired units (same
    seed and label subset, the same test images by their ids' digest), its 95 % two-stage bootstrap
    interval over units and test images (:func:`g2d.metrics.paired_bootstrap`), and what it says.
    Pairs without per-image scores in both cells (not run, skipped, or a task that writes none) are
    left out. ``None`` when the experiment has no differences."""
    if not exp.differences:
        return None
    import numpy as np

    from g2d.metrics import paired_bootstrap

    by = {(r.row, r.column): r for r in results}
    lines = ["## Paired differences (95 % bootstrap intervals over label subsets, seeds and test images)", "",
             "| difference | where | units | images | mean | 95 % interval | reading |",
             "|---|---|---|---|---|---|---|"]
    for x in exp.differences:
        for where, ka, kb in _pairs(exp, x):
            ra, rb = by.get(ka), by.get(kb)
            if ra is None or rb is None:
                continue
            units = [u for u in sorted(ra.per_image) if u in rb.per_image and ra.per_image[u][1] == rb.per_image[u][1]
                     and len(ra.per_image[u][0]) == len(rb.per_image[u][0])]
            if not units or len({len(ra.per_image[u][0]) for u in units}) != 1:
                continue
            a = np.array([ra.per_image[u][0] for u in units])
            b = np.array([rb.per_image[u][0] for u in units])
            r = paired_bootstrap(a, b, n_boot=n_boot)
            reading = ("a > b" if r["low"] > 0 else "a < b" if r["high"] < 0 else "not resolved")
            lines.append(f"| {x.a} - {x.b} | {where} | {r['units']} | {r['images']} | {r['mean']:+.1f} | "
                         f"[{r['low']:+.1f}, {r['high']:+.1f}] | {reading} |")
    lines += ["", "Units: (seed, label subset) pairs both cells ran on; images: the test images each unit scored. "
                  "'not resolved': the interval holds 0.", ""]
    return "\n".join(lines)


def _paper(row: Row, j: int) -> str:
    if not row.paper or row.paper[j] is None:
        return ""
    return str(row.paper[j])


def format_markdown(exp: Experiment, results: list[CellResult], info: dict[str, Any]) -> str:
    """The table laid out like the paper's, with the paper's value beside each of ours (no paper
    columns for an experiment without paper values, e.g. ``jsrt``)."""
    by = {(r.row, r.column): r for r in results}
    paper = any(row.paper for row in exp.rows)
    head = ["method"]
    for c in exp.columns:
        head += [c.name, "paper"] if paper else [c.name]
    lines = [f"# {exp.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in exp.rows:
        cells = [row.name]
        for j, c in enumerate(exp.columns):
            cells += [_fmt(by[(row.name, c.name)], _skipped(row, c), c.digits, row.baseline and row.model is None)] \
                + ([_paper(row, j)] if paper else [])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Ours: mean ± sample std over seeds (n = finished seeds); '/' = not applicable; "
                 "'not run' = no finished seed yet; 'not given' = a peer's row without a checkpoint "
                 "(--baselines); 'error' = every seed failed (see errors below).")
    if info:
        lines.append("Run: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".")
    errors = [(r, e) for r in results for e in r.errors]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {r.row} | {r.column}: {e}" for r, e in errors]
    return "\n".join(lines) + "\n"


def format_csv(exp: Experiment, results: list[CellResult]) -> str:
    rows = {r.name: r for r in exp.rows}
    cols = {c.name: (j, c) for j, c in enumerate(exp.columns)}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "column", "task", "data", "fraction", "metric", "mean", "std", "n", "values",
                "paper", "errors"])
    for r in results:
        j, c = cols[r.column]
        w.writerow([r.row, r.column, c.task, c.data, c.fraction, c.metric,
                    "" if r.mean is None else f"{r.mean:.4f}", "" if r.std is None else f"{r.std:.4f}",
                    len(r.values), ";".join(f"{v:.4f}" for v in r.values), _paper(rows[r.row], j),
                    " | ".join(r.errors)])
    return buf.getvalue()


def _fraction_sweeps(exp: Experiment) -> dict[tuple[str, str, str, str], list[Column]]:
    """Columns grouped by (task, data, metric, args) where a group spans several label fractions."""
    groups: dict[tuple[str, str, str, str], list[Column]] = {}
    for c in exp.columns:
        groups.setdefault((c.task, c.data, c.metric, json.dumps(c.args, sort_keys=True)), []).append(c)
    return {k: sorted(v, key=lambda c: c.fraction) for k, v in groups.items() if len({c.fraction for c in v}) > 1}


def format_fraction_tables(exp: Experiment, results: list[CellResult]) -> str | None:
    """The fraction sweeps as one table per (task, data, metric): a row per method and column
    arguments (e.g. the transfer), a column per label fraction. ``None`` without sweeps.

    The paper-layout table puts every (target, transfer, fraction) in one row, which is unreadable
    for wide sweeps such as ``jsrt`` (18 columns)."""
    sweeps = _fraction_sweeps(exp)
    if not sweeps:
        return None
    by = {(r.row, r.column): r for r in results}
    tables: dict[tuple[str, str, str], list[list[Column]]] = {}
    for (task, data, metric, _), cols in sweeps.items():
        tables.setdefault((task, data, metric), []).append(cols)
    lines = [f"# {exp.title}: by label fraction", ""]
    for (task, data, metric), groups in tables.items():
        fractions = sorted({c.fraction for cols in groups for c in cols})
        head = ["method", "arguments", *(f"{100 * f:g} %" for f in fractions)]
        lines += [f"## {task} on {data} ({metric})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in exp.rows:
            for cols in groups:
                if all(_skipped(row, c) for c in cols):
                    continue
                at = {c.fraction: c for c in cols}
                cells = [_fmt(by[(row.name, at[f].name)], _skipped(row, at[f]), at[f].digits) if f in at else ""
                         for f in fractions]
                args = ", ".join(f"{k}={v}" for k, v in sorted(cols[0].args.items()))
                lines.append("| " + " | ".join([row.name, args, *cells]) + " |")
        lines.append("")
    lines.append("Mean ± sample std over seeds (n = finished seeds); 'not run' = no finished seed yet.")
    return "\n".join(lines) + "\n"


def plot_fractions(exp: Experiment, results: list[CellResult], path: Path) -> Path | None:
    """Metric vs label fraction per row, with error bars, one panel per (task, data, metric)."""
    sweeps = _fraction_sweeps(exp)
    if not sweeps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r.row, r.column): r for r in results}
    # panels without any finished cell (a table run in parts) are left out
    sweeps = {k: v for k, v in sweeps.items() if any(by[(row.name, c.name)].values for c in v for row in exp.rows)}
    if not sweeps:
        return None
    colours = {row.name: f"C{i % 10}" for i, row in enumerate(exp.rows)}  # one colour per row in every panel
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 3.6), squeeze=False)
    for ax, ((task, data, metric, _), cols) in zip(axes[0], sweeps.items()):
        for row in exp.rows:
            pts = [(c.fraction, by[(row.name, c.name)]) for c in cols if by[(row.name, c.name)].values]
            if pts:
                ax.errorbar([f for f, _ in pts], [r.mean for _, r in pts], yerr=[r.std for _, r in pts],
                            marker="o", capsize=3, label=row.name, color=colours[row.name])
        ax.set_xscale("log")
        ax.set_xlabel("label fraction")
        ax.set_ylabel(metric)
        ax.set_title(f"{task} on {data}" + (f" ({cols[0].args})" if cols[0].args else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


PRETRAIN_METRICS = "pretrain_metrics.json"


def pretrain_metrics(history: list[dict[str, float]], batch_size: int, tail: float = 0.1) -> dict[str, Any]:
    """The end of a pre-training run from its logged means (``TrainResult.history``): the contrastive
    loss (``vla``) averaged over the last ``tail`` of the logged steps (at least one entry), against
    chance, ln B for batch B (the CLIP loss of uniform similarities)."""
    if not history:
        raise ValueError("no logged training step")
    last = history[-max(1, round(tail * len(history))):]
    end = statistics.fmean(h["vla"] for h in last)
    ln_b = math.log(batch_size)
    return {"contrastive_end": end, "ln_batch": ln_b, "contrastive_over_ln_b": end / ln_b,
            "steps": int(history[-1]["step"]), "from_step": int(last[0]["step"])}


def _pretrain(cfg: Any, run_dir: Path, device: str, progress: bool) -> Path:
    from g2d.downstream.results import write_json
    from g2d.train.loop import pretrain

    result = pretrain(cfg, run_dir, resume="latest", progress=progress, device=device)
    if result.export_dir is None:
        raise RuntimeError(f"pre-training in {run_dir} ended without an export")
    if result.history:  # a run resumed after its last step logs nothing new
        write_json(run_dir / PRETRAIN_METRICS, pretrain_metrics(result.history, cfg.train.batch_size))
    return result.export_dir


def prepare_jsrt(shared: str | Path, out: str | Path) -> dict[str, Path]:
    """Write ``csv:`` tables for JSRT lungs, heart and clavicles with the shipped image-level split
    (``g2d/experiments/jsrt_split.csv``, seeded 70/15/15). Paths are absolute, so the tables can live
    anywhere. Returns ``{"jsrt-lungs": path, "jsrt-heart": path, "jsrt-clavicles": path}``."""
    root = Path(shared).expanduser().resolve() / "jsrt"  # the reader takes relative paths from the table's folder
    if not (root / "images").is_dir():
        raise FileNotFoundError(f"JSRT images not found under {root}")
    with open(EXPERIMENT_DIR / "jsrt_split.csv", newline="", encoding="utf-8") as f:
        split = {r["image"]: r["split"] for r in csv.DictReader(f)}
    structures = {"jsrt-lungs": ("left_lung", "right_lung"), "jsrt-heart": ("heart",),
                  "jsrt-clavicles": ("left_clavicle", "right_clavicle")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, parts in structures.items():
        path = out / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["image", "mask", "split"])
            for img, s in sorted(split.items()):
                masks = ";".join(str(root / "masks" / p / img) for p in parts)
                w.writerow([str(root / "images" / img), masks, s])
        written[name] = path
    return written

