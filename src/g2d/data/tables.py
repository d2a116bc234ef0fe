"""The one table reader of both data wings (image-report pairs for pre-training, labelled sets for
evaluation).

Written here rather than with pandas: tables are read row by row (ChestX-ray14's 112k rows, MIMIC's
split file), every bad row is named ``file:line`` and skipped or refused by the caller, and the Python
``csv`` module already handles the quoting.
"""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from g2d.errors import DataError

__all__ = ["TableRow", "read_table"]


@dataclass
class TableRow:
    """One data row of a table: ``where`` is ``"file:line"`` for messages, ``cells`` by column name."""

    where: str
    cells: dict[str, str]


def _open_text(path: Path) -> io.TextIOBase:
    """A text handle on ``.csv``/``.tsv``, ``.csv.gz`` or a ``.zip`` holding one CSV (as Kaggle ships
    them); ``utf-8-sig`` tolerates the byte-order mark spreadsheet programs write."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", newline="", encoding="utf-8-sig")
    if name.endswith(".zip"):
        zf = zipfile.ZipFile(path)
        members = [m for m in zf.namelist() if m.lower().endswith(".csv") and not m.startswith("__MACOSX")]
        if len(members) != 1:
            raise DataError(f"{path}: expected one .csv inside the zip, found {members}")
        return io.TextIOWrapper(zf.open(members[0]), encoding="utf-8-sig", newline="")
    return open(path, newline="", encoding="utf-8-sig")


def read_table(path: str | Path, required: Sequence[str] = (), *, strict: bool = False,
               delimiter: str | None = None, line_breaks: bool = False) -> tuple[list[str], Iterator[TableRow]]:
    """Header (stripped names) and rows of a table (``.csv``, ``.tsv``, ``.csv.gz`` or single-file
    ``.zip``).

    Column names are stripped of spaces, so Kaggle's ``" EncodedPixels"`` reads as ``EncodedPixels``.
    Cell values are stripped too. Fully blank lines are skipped. A row with fewer fields than the
    header gets blank cells, unless ``strict``: then a row whose field count differs from the header's
    is an error naming it (a malformed CSV, e.g. an unbalanced quote, would otherwise shift columns).
    A quoted cell holding a line break is an error naming its lines unless ``line_breaks`` (report
    text): in a table of paths and labels it is an unbalanced quote, which would read the rows after
    it into one cell and lose them without a word.

    :param delimiter: default ``,``, or a tab for ``.tsv`` files.
    :raises DataError: the file is missing, empty, not UTF-8, not parseable as CSV, has a duplicated
        column name, lacks a ``required`` column, has a line break inside a cell (unless
        ``line_breaks``), or (``strict``) a ragged row.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    sep = delimiter or ("\t" if p.name.lower().endswith((".tsv", ".tsv.gz")) else ",")
    f = _open_text(p)
    reader = csv.reader(f, delimiter=sep, strict=strict)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        f.close()
        raise DataError(f"{p}: empty table (no header)") from None
    except UnicodeDecodeError as err:
        f.close()
        raise DataError(f"{p}: not UTF-8 text ({err})") from None
    except csv.Error as err:
        f.close()
        raise DataError(f"{p}: cannot read the header: {err}") from None
    twice = sorted({h for h in header if header.count(h) > 1})
    missing = [c for c in required if c not in header]
    if twice or missing:
        f.close()
        raise DataError(f"{p}: " + (f"column(s) {twice} appear more than once" if twice else
                                    f"missing column(s) {missing}") + f"; columns found: {header}")

    def rows() -> Iterator[TableRow]:
        n, last_line = 0, reader.line_num
        with f:
            try:
                for row in reader:
                    first_line, last_line = last_line + 1, reader.line_num
                    if not any(c.strip() for c in row):
                        continue
                    n += 1
                    if not line_breaks and any("\n" in c or "\r" in c for c in row):
                        raise DataError(f"{p}: data row {n} runs over lines {first_line}-{last_line}: a quoted cell "
                                        "holds a line break, most likely an unbalanced quote (\") that reads the "
                                        "rows after it into one cell; fix the quoting of that row")
                    if strict and len(row) != len(header):
                        raise DataError(f"{p}: data row {n} (line {reader.line_num}) has {len(row)} fields, the "
                                        f"header has {len(header)}; the table is malformed (unbalanced quotes?)")
                    cells = {h: (row[j].strip() if j < len(row) else "") for j, h in enumerate(header)}
                    yield TableRow(f"{p.name}:{reader.line_num}", cells)
            except csv.Error as err:
                raise DataError(f"{p}: cannot parse the table near line {reader.line_num}: {err}") from None
            except UnicodeDecodeError as err:
                raise DataError(f"{p}: not UTF-8 text ({err})") from None

    return header, rows()
