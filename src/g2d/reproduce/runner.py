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

import dataclasses
import json
import logging
import math
import re
import statistics
from collections.abc import Callable
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
from g2d.reproduce.plots import plot_fractions
from g2d.reproduce.report import (
    CellResult,
    format_csv,
    format_differences,
    format_fraction_tables,
    format_gates,
    format_markdown,
)
from g2d.reproduce.spec import Column, Experiment, Row, Scale, skipped

__all__ = ["Runner", "PRETRAIN_METRICS", "pretrain_metrics"]

log = logging.getLogger("g2d.reproduce")


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
                    if skipped(row, col) or (row.baseline and row.model is None):  # "not given"
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

    def stand_ins(self) -> dict[str, str]:
        """``{set name: spec}`` of the columns' sets that this scale reads as generated data (the ``small``
        scale's ``synthetic:N`` for SIIM, MS-CXR, ...): a table must not pass them off as the named set."""
        specs = {c.data: str(self.scale.data[c.data]) for c in self.exp.columns if c.data in self.scale.data}
        return {n: s for n, s in sorted(specs.items()) if s.startswith("synthetic") and not n.startswith("synthetic")}

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
