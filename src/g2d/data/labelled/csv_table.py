"""``csv:FILE`` - any labelled chest X-ray table (read with :func:`g2d.data.tables.read_table`, the one
table reader), and the label parsing the public-set readers share.

Columns (names configurable, header names are matched after stripping spaces):

``image`` (required)
    Image path, relative to the CSV's folder (or absolute). PNG/JPEG/TIFF/DICOM.
``mask`` (optional)
    Path of a binary mask image (any non-zero pixel is foreground, same size as the image). Several
    masks may be joined with ``;``; they are combined by union (e.g. JSRT ``left.png;right.png``).
    A blank cell means an empty mask (the sample's mask is all zeros).
``boxes`` (optional)
    ``x,y,w,h`` in the image's pixels, several boxes joined with ``;``; stored as ``x1,y1,x2,y2``
    (``x + w``, ``y + h``, continuous edges). A blank cell means no box.
``split`` (optional)
    ``train`` / ``val`` / ``test`` (``valid`` and ``validation`` are read as ``val``). Without the
    column, :func:`g2d.data.labelled.specs.open_dataset` draws a seeded 70/15/15 split by patient (or image).
``patient`` (optional)
    Patient id; seeded splits never put one patient in two splits.
``prompt`` (optional)
    Free text kept in ``Record.extra["prompt"]`` (e.g. a grounding phrase).
``id`` (optional)
    The record's id (default: the image path as written). With it, several rows may share an image,
    one per phrase (phrase grounding); without a ``patient`` column such rows count as one patient,
    so a seeded split keeps them together.
``finding`` (optional)
    The finding or structure a phrase names, kept in ``Record.extra["finding"]`` (phrase grounding's
    per-finding summary).
label columns
    Chosen with ``labels="a,b,c"`` (or a list). Values ``1`` / ``0`` (``1.0`` / ``0.0`` too); a blank
    cell or ``nan`` is NaN (unknown); ``-1`` is NaN as well (CheXpert-style *uncertain*: the
    evaluation treats it as unknown and skips it). ``labels=None`` reads no label column.

Bad rows - a missing image or mask file, a malformed box, a label value such as ``yes``, a
duplicated image (or id), an unknown split name - are named with ``file:row``, counted in the
:class:`~g2d.data.labelled.SkipLog` and skipped. Record ids are the ``id`` cells, else the image paths as
written in the CSV.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g2d.data.labelled.dataset import FileMask, Record, SkipLog, parse_label_size
from g2d.data.tables import TableRow, read_table
from g2d.errors import DataError

__all__ = ["read_labelled_csv", "UnionMask", "SPLIT_TABLE", "read_table", "parse_label", "TableRow"]

# csv: tables carry their own split (column) or get a seeded one in open_dataset.
SPLIT_TABLE = None

_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class UnionMask:
    """Union of several mask files (e.g. left + right lung). Each must have the image's size."""

    parts: tuple[FileMask, ...]

    def __call__(self, hw: tuple[int, int]) -> np.ndarray:
        m = np.zeros(hw, dtype=bool)
        for p in self.parts:
            m |= p(hw)
        return m


def parse_label(value: str) -> float:
    """``"1"``/``"0"`` (or ``1.0``/``0.0``) -> 1/0; blank, ``nan`` and ``-1`` (uncertain) -> NaN.

    Raises:
        ValueError: anything else (``"yes"``, ``"2"``...).
    """
    v = value.strip()
    if v == "" or v.lower() == "nan":
        return math.nan
    x = float(v)  # ValueError for "yes"
    if x in (0.0, 1.0):
        return x
    if x == -1.0:
        return math.nan
    raise ValueError(f"label value {value!r} is not 1, 0, -1 or blank")


def _parse_boxes(cell: str) -> np.ndarray:
    """``"x,y,w,h;x,y,w,h"`` -> float32 ``[N, 4]`` x1, y1, x2, y2; ValueError when malformed."""
    out = []
    for part in cell.split(";"):
        if not part.strip():
            continue
        vals = [float(v) for v in part.split(",")]
        if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
            raise ValueError(f"box {part.strip()!r} is not x,y,w,h")
        x, y, w, h = vals
        if w <= 0 or h <= 0:
            raise ValueError(f"box {part.strip()!r} has a non-positive width or height")
        out.append((x, y, x + w, y + h))
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def _label_names(labels: str | Sequence[str] | None) -> list[str]:
    if labels is None:
        return []
    names = labels.split(",") if isinstance(labels, str) else list(labels)
    names = [n.strip() for n in names if n.strip()]
    if len(set(names)) != len(names):
        raise DataError(f"labels {names}: a column is named twice")
    return names


def read_labelled_csv(path: Path, labels: str | Sequence[str] | None = None, image_col: str = "image",
                      mask_col: str = "mask", boxes_col: str = "boxes", split_col: str = "split",
                      patient_col: str = "patient", prompt_col: str = "prompt", id_col: str = "id",
                      finding_col: str = "finding", label_size: str | int | None = None
                      ) -> tuple[list[Record], list[str], SkipLog]:
    """Read a labelled table (see the module docstring for the columns).

    Args:
        path: the CSV file (``.csv`` / ``.csv.gz``); image and mask paths are relative to its folder.
        labels: label columns, ``"a,b,c"`` or a list; ``None`` reads none (``tasks == []``).
        image_col ... finding_col: column names; optional columns that are absent are simply unused.
        label_size: the pixel space of the boxes and masks when it is not each image's own (e.g.
            ``1024`` or ``"2048x1536"``, W x H); they are rescaled to the image read. Default: image
            pixels. See :func:`g2d.data.labelled.parse_label_size`.

    Returns:
        ``(records, tasks, skipped)``; records carry ``split`` when the table has a split column.

    Raises:
        DataError: missing file, no image column, a requested label column absent, or no usable row.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"csv:{path} is a folder; give the CSV file (csv:/data/my_set/labels.csv)")
    tasks = _label_names(labels)
    label_hw = parse_label_size(label_size)
    header, rows = read_table(path, required=[image_col, *tasks])
    root = path.parent
    skipped = SkipLog(f"csv:{path.name}")
    has = {c: c in header for c in (mask_col, boxes_col, split_col, patient_col, prompt_col, id_col, finding_col)}
    records: list[Record] = []
    seen: set[str] = set()
    for row in rows:
        c = row.cells
        img = c[image_col]
        if not img:
            skipped.skip("blank_image", row.where)
            continue
        rid = c[id_col] if has[id_col] else img
        if not rid:
            skipped.skip("blank_id", row.where)
            continue
        if rid in seen:
            skipped.skip("duplicated_id" if has[id_col] else "duplicated_image", row.where)
            continue
        img_path = root / img
        if not img_path.is_file():
            skipped.skip("missing_image", row.where, str(img_path))
            continue
        try:
            lab = np.asarray([parse_label(c[t]) for t in tasks], dtype=np.float32)
        except ValueError as e:
            skipped.skip("bad_label", row.where, str(e))
            continue
        mask = None
        if has[mask_col] and c[mask_col]:
            parts = [root / m.strip() for m in c[mask_col].split(";") if m.strip()]
            absent = [str(m) for m in parts if not m.is_file()]
            if absent:
                skipped.skip("missing_mask", row.where, absent[0])
                continue
            masks = tuple(FileMask(str(m)) for m in parts)
            mask = masks[0] if len(masks) == 1 else UnionMask(masks)
        boxes = None
        if has[boxes_col]:
            try:
                boxes = _parse_boxes(c[boxes_col])
            except ValueError as e:
                skipped.skip("bad_boxes", row.where, str(e))
                continue
        split = None
        if has[split_col]:
            split = _SPLIT_NAMES.get(c[split_col].lower())
            if split is None:
                skipped.skip("bad_split", row.where, f"split {c[split_col]!r} is not train/val/test")
                continue
        extra = {k: c[col] for k, col in (("prompt", prompt_col), ("finding", finding_col)) if has[col]}
        patient = ((c[patient_col] or None) if has[patient_col]
                   else f"image:{img}" if has[id_col] else None)  # one image's phrases stay in one split
        seen.add(rid)
        records.append(Record(id=rid, image=str(img_path), labels=lab, boxes=boxes, mask=mask,
                              patient=patient, split=split, source=row.where, extra=extra, label_hw=label_hw))
    if not records:
        raise DataError(f"csv:{path}: no usable rows ({skipped.summary()})")
    return records, tasks, skipped
