"""Published train/val/test splits and nested label fractions, shipped with the package.

A split table ``g2d/data/splits/<name>.csv.gz`` has one row per id: ``id,split,rank``. ``split`` is
``train``, ``val`` or ``test``; ``rank`` orders the training ids by a seeded permutation (``-1`` for
val/test), so the fraction ``f`` of the training set is the ids with ``rank < ceil(f * n_train)``.
Fractions are therefore nested (the 1 % ids are inside the 10 % ids) and identical for every user.
``scripts/make_splits.py`` writes the tables from the public label files.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["SPLITS", "SPLIT_DIR", "check_fraction", "fraction_count", "load_split", "split_ids",
           "write_split", "rank_train"]

SPLITS = ("train", "val", "test")
SPLIT_DIR = Path(__file__).with_name("splits")


def check_fraction(fraction: float) -> float:
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return float(fraction)


def fraction_count(n_train: int, fraction: float) -> int:
    """Number of training ids kept at ``fraction`` (at least one)."""
    return max(1, math.ceil(check_fraction(fraction) * n_train - 1e-9)) if n_train else 0


def rank_train(ids: Sequence[str], seed: int) -> dict[str, int]:
    """Seeded permutation rank of each training id (sorted first, so input order does not matter)."""
    order = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(order))
    return {order[j]: r for r, j in enumerate(perm)}


def write_split(path: str | Path, assignment: dict[str, str], seed: int) -> Path:
    """Write a split table: ``assignment`` maps id -> train/val/test; training ids get seeded ranks."""
    bad = {s for s in assignment.values() if s not in SPLITS}
    if bad:
        raise ValueError(f"unknown split names {sorted(bad)}; use {SPLITS}")
    ranks = rank_train([i for i, s in assignment.items() if s == "train"], seed)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "split", "rank"])
    for i in sorted(assignment):
        w.writerow([i, assignment[i], ranks.get(i, -1)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same split always gives the same bytes.
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
        gz.write(buf.getvalue().encode())
    return path


def load_split(name_or_path: str | Path) -> dict[str, tuple[str, int]]:
    """``{id: (split, rank)}`` from a shipped split name (``"siim"``) or a split-table path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = SPLIT_DIR / f"{name_or_path}.csv.gz"
    if not p.is_file():
        shipped = sorted(q.name.removesuffix(".csv.gz") for q in SPLIT_DIR.glob("*.csv.gz"))
        raise FileNotFoundError(f"no split table {p} (shipped: {shipped})")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(rows[0]) != {"id", "split", "rank"}:
        raise ValueError(f"{p}: expected columns id,split,rank")
    return {r["id"]: (r["split"], int(r["rank"])) for r in rows}


def split_ids(table: dict[str, tuple[str, int]], split: str, fraction: float = 1.0,
              available: Iterable[str] | None = None) -> list[str]:
    """Ids of ``split`` (training ids cut to ``fraction``), in table order of rank / id.

    The fraction is taken over the *published* training list, then restricted to ``available`` ids,
    so a user missing a few files still trains on the same subset as everyone else minus those files.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = [(rank, i) for i, (s, rank) in table.items() if s == split]
    if split == "train":
        rows.sort()
        rows = rows[:fraction_count(len(rows), fraction)]
    else:
        check_fraction(fraction)
        rows.sort(key=lambda t: t[1])
    ids = [i for _, i in rows]
    if available is not None:
        have = set(available)
        ids = [i for i in ids if i in have]
    return ids
