"""Published train/val/test splits and nested label fractions, shipped with the package.

A split table ``g2d/data/splits/<name>.csv.gz`` has one row per id: ``id,split,rank``. ``split`` is
``train``, ``val`` or ``test``; ``rank`` orders the training ids by a seeded permutation (``-1`` for
val/test), so the fraction ``f`` of the training set is the ids with ``rank < ceil(f * n_train)``.
Fractions are therefore nested (the 1 % ids are inside the 10 % ids) and identical for every user.
``scripts/make_splits.py`` writes the tables from the public label files.

Where the split itself cannot be derived from a public label file (ChestX-ray14: the official lists
come only with the images), an *order table* ``<name>_order.csv.gz`` (``id,rank``) ranks every id
of the label file instead: the reader takes split membership from the user's files and every ordered
choice (validation carve, training fractions) from the shipped ranks, so those are published too.

Label subset ``k`` (``--subset k``, 0 by default) re-draws the training fractions: ``k = 0`` is the
published order above; ``k >= 1`` ranks the same training ids by the seeded permutation
:func:`subset_ranks` instead.

Where the records name their patient, every order g2d draws itself (a ``csv:`` table's fractions,
every re-drawn subset) ranks **patients** (:func:`rank_groups`) and a fraction keeps whole patients
(``ceil(f * n_patients)`` of them, all their training images), so no patient is half in a subset and
the subsets stay nested. The published orders of the shipped tables (subset 0) are not changed: they
rank images (docs/data.md says which sets that concerns). Every subset has the published size at each
fraction (in patients where it is drawn by patient) and is nested across fractions, and every model
drawn with the same ``k`` trains on the same images, so a comparison between models can pair them
subset by subset (docs/decoder-transfer.md).
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

import numpy as np

from g2d.data.tables import read_table

__all__ = ["SPLITS", "SPLIT_DIR", "check_fraction", "fraction_count", "load_split", "split_ids",
           "write_split", "rank_train", "rank_groups", "write_order", "load_order", "order_ranks", "subset_ranks",
           "check_subset"]

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


def rank_groups(ids: Sequence[str], groups: Mapping[str, str], seed: int) -> dict[str, int]:
    """Ranks of ``ids`` with whole groups (patients) in a seeded order: the groups (sorted first) are
    permuted, and each group's ids (sorted) take consecutive ranks. An id without a group is its own."""
    members: dict[str, list[str]] = {}
    for i in sorted(ids):
        members.setdefault(groups.get(i) or f"\0{i}", []).append(i)
    order = rank_train(list(members), seed)
    ranks, r = {}, 0
    for g in sorted(members, key=order.__getitem__):
        for i in members[g]:
            ranks[i], r = r, r + 1
    return ranks


# seeds of the re-drawn label subsets: subset k uses SUBSET_SEED + k (far from the split seeds)
SUBSET_SEED = 7_000_000


def check_subset(subset: int) -> int:
    if int(subset) != subset or subset < 0:
        raise ValueError(f"subset must be an integer >= 0 (0: the published fractions), got {subset!r}")
    return int(subset)


def subset_ranks(ids: Iterable[str], subset: int, groups: Mapping[str, str] | None = None) -> dict[str, int] | None:
    """Ranks of the training ids for label subset ``subset``: ``None`` for 0 (keep the published
    ranks), else a seeded permutation of ``ids`` (sorted first, so input order does not matter), of
    whole ``groups`` (patients) where given (:func:`rank_groups`)."""
    if check_subset(subset) == 0:
        return None
    seed = SUBSET_SEED + subset
    return rank_groups(list(ids), groups, seed) if groups else rank_train(list(ids), seed)


def _write_table(path: str | Path, header: list[str], rows: Iterable[Sequence]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same table always gives the same bytes.
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
        gz.write(buf.getvalue().encode())
    return path


def _read_table(name_or_path: str | Path, columns: set[str]) -> list[dict[str, str]]:
    """The rows of a shipped table name (``"siim"``) or a path, with exactly ``columns``."""
    p = Path(name_or_path)
    if not p.suffix:
        p = SPLIT_DIR / f"{name_or_path}.csv.gz"
    if not p.is_file():
        shipped = sorted(q.name.removesuffix(".csv.gz") for q in SPLIT_DIR.glob("*.csv.gz"))
        raise FileNotFoundError(f"no split table {p} (shipped: {shipped})")
    header, rows = read_table(p, sorted(columns))
    if set(header) != columns:
        raise ValueError(f"{p}: expected columns {','.join(sorted(columns))}")
    return [r.cells for r in rows]


def write_split(path: str | Path, assignment: dict[str, str], seed: int) -> Path:
    """Write a split table: ``assignment`` maps id -> train/val/test; training ids get seeded ranks."""
    bad = {s for s in assignment.values() if s not in SPLITS}
    if bad:
        raise ValueError(f"unknown split names {sorted(bad)}; use {SPLITS}")
    ranks = rank_train([i for i, s in assignment.items() if s == "train"], seed)
    rows = ((i, assignment[i], ranks.get(i, -1)) for i in sorted(assignment))
    return _write_table(path, ["id", "split", "rank"], rows)


def load_split(name_or_path: str | Path) -> dict[str, tuple[str, int]]:
    """``{id: (split, rank)}`` from a shipped split name (``"siim"``) or a split-table path."""
    return {r["id"]: (r["split"], int(r["rank"])) for r in _read_table(name_or_path, {"id", "split", "rank"})}


def write_order(path: str | Path, ids: Iterable[str], seed: int) -> Path:
    """Write an order table (``id,rank``): a seeded permutation rank of every id."""
    ranks = rank_train(list(set(ids)), seed)
    return _write_table(path, ["id", "rank"], ((i, ranks[i]) for i in sorted(ranks)))


def load_order(name_or_path: str | Path) -> Mapping[str, int]:
    """``{id: rank}`` (read-only) from a shipped order-table name (``"cxr14_order"``) or path.

    Cached per file and modification time: one ``open_dataset`` reads it for the validation carve
    and again for the training ranks, and ChestX-ray14's table has 112,120 rows."""
    p = Path(name_or_path)
    p = SPLIT_DIR / f"{name_or_path}.csv.gz" if not p.suffix else p
    return _load_order(str(p), p.stat().st_mtime_ns if p.is_file() else None)


@lru_cache(maxsize=4)
def _load_order(path: str, _mtime_ns: int | None) -> Mapping[str, int]:
    return MappingProxyType({r["id"]: int(r["rank"]) for r in _read_table(path, {"id", "rank"})})


def order_ranks(ids: Iterable[str], order: Mapping[str, int], seed: int) -> dict[str, int]:
    """Ranks of ``ids``: the order table's rank, and ids the table lacks after all of them (seeded).

    Unlisted ids (a label table newer than the shipped one) keep a deterministic place without
    moving any listed id, so the published choices stay what they are.
    """
    ids = list(ids)
    extra = [i for i in ids if i not in order]
    base = max(order.values(), default=-1) + 1
    ranks = {i: base + r for i, r in rank_train(extra, seed).items()}
    ranks.update((i, order[i]) for i in ids if i in order)
    return ranks


def split_ids(table: dict[str, tuple[str, int]], split: str, fraction: float = 1.0,
              available: Iterable[str] | None = None, subset: int = 0,
              groups: Mapping[str, str] | None = None) -> list[str]:
    """Ids of ``split`` (training ids cut to ``fraction``), in table order of rank / id.

    The fraction is taken over the *published* training list, then restricted to ``available`` ids,
    so a user missing a few files still trains on the same subset as everyone else minus those files.
    ``subset`` >= 1 ranks the training ids by :func:`subset_ranks` instead of the table's ranks. With
    ``groups`` (id -> patient; the ranks must keep each group together, as :func:`rank_groups` does)
    the fraction counts patients: the first ``fraction_count(n_patients, fraction)`` in rank order,
    with all their ids.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = [(rank, i) for i, (s, rank) in table.items() if s == split]
    if split == "train":
        redrawn = subset_ranks([i for _, i in rows], subset, groups)
        if redrawn is not None:
            rows = [(redrawn[i], i) for _, i in rows]
        rows.sort()
        if groups:
            def group(i: str) -> str:
                return groups.get(i) or f"\0{i}"

            patients = list(dict.fromkeys(group(i) for _, i in rows))  # in rank order
            keep = set(patients[:fraction_count(len(patients), fraction)])
            rows = [(r, i) for r, i in rows if group(i) in keep]
        else:
            rows = rows[:fraction_count(len(rows), fraction)]
    else:
        check_fraction(fraction)
        rows.sort(key=lambda t: t[1])
    ids = [i for _, i in rows]
    if available is not None:
        have = set(available)
        ids = [i for i in ids if i in have]
    return ids
