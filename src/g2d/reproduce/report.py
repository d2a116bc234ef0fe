"""What ``g2d reproduce`` writes from the cells' results: the table laid out like the paper's (Markdown,
CSV), the fraction sweeps, the validity gates per pre-trained seed and the paired differences with
their bootstrap intervals."""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from dataclasses import dataclass, field
from typing import Any

from g2d.reproduce.spec import Column, Difference, Experiment, Row, skipped

__all__ = ["CellResult", "format_markdown", "format_csv", "format_gates", "format_differences",
           "format_fraction_tables", "fraction_sweeps"]


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
        head += [c.name, exp.reference] if paper else [c.name]
    lines = [f"# {exp.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in exp.rows:
        cells = [row.name]
        for j, c in enumerate(exp.columns):
            cells += [_fmt(by[(row.name, c.name)], skipped(row, c), c.digits, row.baseline and row.model is None)] \
                + ([_paper(row, j)] if paper else [])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    sources = [f"- {row.name}: {row.source}" for row in exp.rows if row.source]
    if sources:
        lines += [f"Values in '{exp.reference}':", *sources, ""]
    if exp.notes:
        lines += [" ".join(exp.notes.split()), ""]
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
                exp.reference, "errors"])
    for r in results:
        j, c = cols[r.column]
        w.writerow([r.row, r.column, c.task, c.data, c.fraction, c.metric,
                    "" if r.mean is None else f"{r.mean:.4f}", "" if r.std is None else f"{r.std:.4f}",
                    len(r.values), ";".join(f"{v:.4f}" for v in r.values), _paper(rows[r.row], j),
                    " | ".join(r.errors)])
    return buf.getvalue()


def fraction_sweeps(exp: Experiment) -> dict[tuple[str, str, str, str], list[Column]]:
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
    sweeps = fraction_sweeps(exp)
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
                if all(skipped(row, c) for c in cols):
                    continue
                at = {c.fraction: c for c in cols}
                cells = [_fmt(by[(row.name, at[f].name)], skipped(row, at[f]), at[f].digits) if f in at else ""
                         for f in fractions]
                args = ", ".join(f"{k}={v}" for k, v in sorted(cols[0].args.items()))
                lines.append("| " + " | ".join([row.name, args, *cells]) + " |")
        lines.append("")
    lines.append("Mean ± sample std over seeds (n = finished seeds); 'not run' = no finished seed yet.")
    return "\n".join(lines) + "\n"
