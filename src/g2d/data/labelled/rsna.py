"""``rsna:DIR`` - RSNA pneumonia detection, read from the Kaggle stage 2 files as published.

Layout (``DIR``)::

    stage_2_train_labels.csv          patientId,x,y,width,height,Target (one row per box)
    stage_2_train_images/<patientId>.dcm     (or <patientId>.png)

Rows are grouped per patient: boxes ``x1, y1, x2, y2 = x, y, x + width, y + height`` in the file's
pixels (continuous edges), ``labels = ["pneumonia"]`` = ``Target``, and the segmentation mask is the
boxes filled (:class:`~g2d.data.labelled.BoxMask`, MGCA's RSNA segmentation target).

Bad input: a row with a non-number, a ``Target`` other than 0/1, ``Target`` 1 without a box, a box on
a ``Target`` 0 row, or a non-positive width/height is named with ``file:row`` and counted; the whole
patient is then skipped so no image carries partial ground truth. Identical duplicated rows are
merged (counted as ``duplicated_row``). Patients without an image file are named and skipped.

Split (``SPLIT_TABLE = "rsna"``): 16,010 / 5,337 / 5,337 patients, exactly MGCA's detection split
(``train_test_split(test_size=5337*2, random_state=0)`` over the patients in sorted order, then
halved, test first), reproduced here so numbers stay comparable.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from g2d.data.labelled.dataset import BoxMask, Record, SkipLog, parse_label_size
from g2d.data.tables import read_table
from g2d.errors import DataError

__all__ = ["read_rsna", "make_split", "SPLIT_TABLE", "SPLIT_SEED", "TASKS"]

SPLIT_TABLE = "rsna"
SPLIT_SEED = 0
TASKS = ["pneumonia"]
N_EVAL = 5337  # MGCA's val and test sizes (patients)
_LABEL_FILE = "stage_2_train_labels.csv"
_IMAGE_DIR = "stage_2_train_images"
_COLUMNS = ["patientId", "x", "y", "width", "height", "Target"]


#: The pixel space of the label file's boxes: the 1024 x 1024 DICOMs. Images converted to another
#: size (512-px PNGs) get their boxes rescaled (g2d.data.labelled.labels_at).
LABEL_SIZE = 1024


def _parse_row(c: dict[str, str]) -> tuple[int, tuple[float, float, float, float] | None]:
    """``(target, box or None)``; ValueError naming what is wrong."""
    t = c["Target"]
    if t not in ("0", "1"):
        raise ValueError(f"Target {t!r} is not 0 or 1")
    cells = [c[k] for k in ("x", "y", "width", "height")]
    if not any(cells):
        if t == "1":
            raise ValueError("Target 1 without a box")
        return 0, None
    if not all(cells):
        raise ValueError("box partly blank")
    try:
        x, y, w, h = (float(v) for v in cells)
    except ValueError:
        raise ValueError("box value is not a number") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError("box value is not finite")
    if t == "0":
        raise ValueError("box on a Target 0 row")
    if w <= 0 or h <= 0:
        raise ValueError("box with non-positive width or height")
    return 1, (x, y, x + w, y + h)


def _find_image(root: Path, pid: str, names: set[str]) -> Path | None:
    for ext in (".dcm", ".png"):
        if pid + ext in names:
            return root / _IMAGE_DIR / (pid + ext)
    return None


def read_rsna(path: Path, label_file: str | None = None, label_size: str | int | None = LABEL_SIZE
              ) -> tuple[list[Record], list[str], SkipLog]:
    """Read RSNA pneumonia from its Kaggle folder (see the module docstring).

    Args:
        path: folder with ``stage_2_train_labels.csv`` and ``stage_2_train_images/``.
        label_file: another label table (relative to ``path`` or absolute; ``.csv``/``.csv.gz``/``.zip``).
        label_size: the pixel space of the boxes (default the 1024-px DICOMs; ``"image"`` = each
            file's own pixels); boxes are rescaled to the image read.

    Returns:
        ``(records, ["pneumonia"], skipped)``; ``Record.id`` = patientId (one image per patient),
        ``boxes`` float32 ``[N, 4]`` (``[0, 4]`` for negatives), ``mask`` a :class:`BoxMask`.
    """
    path = Path(path)
    label_hw = parse_label_size(label_size)
    table = path / (label_file or _LABEL_FILE)
    if not table.is_file():
        raise DataError(f"rsna: {table} not found (expected the Kaggle {_LABEL_FILE} in {path})")
    img_dir = path / _IMAGE_DIR
    if not img_dir.is_dir():
        raise DataError(f"rsna: image folder {img_dir} not found")
    names = set(p.name for p in img_dir.iterdir())
    _, rows = read_table(table, required=_COLUMNS)
    skipped = SkipLog("rsna")
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    targets: dict[str, int] = {}
    first_row: dict[str, str] = {}
    seen_rows: set[tuple[str, ...]] = set()
    bad: set[str] = set()
    for row in rows:
        c = row.cells
        pid = c["patientId"]
        if not pid:
            skipped.skip("blank_patient_id", row.where)
            continue
        key = tuple(c[k] for k in _COLUMNS)
        if key in seen_rows:
            skipped.skip("duplicated_row", row.where, "identical to an earlier row; merged")
            continue
        seen_rows.add(key)
        try:
            t, box = _parse_row(c)
        except ValueError as e:
            skipped.skip("malformed_row", row.where, str(e))
            bad.add(pid)
            continue
        first_row.setdefault(pid, row.where)
        boxes.setdefault(pid, [])
        if box is not None:
            boxes[pid].append(box)
        if targets.setdefault(pid, t) != t:
            skipped.skip("malformed_row", row.where, "Target differs from the patient's other rows")
            bad.add(pid)
    records = []
    for pid in sorted(boxes):
        if pid in bad:
            continue
        img = _find_image(path, pid, names)
        if img is None:
            skipped.skip("missing_image", first_row[pid], f"no image file in {img_dir}")
            continue
        b = tuple(boxes[pid])
        records.append(Record(id=pid, image=str(img), labels=np.asarray([float(targets[pid])], np.float32),
                              boxes=np.asarray(b, np.float32).reshape(-1, 4), mask=BoxMask(b),
                              patient=pid, source=first_row[pid], label_hw=label_hw))
    if not records:
        raise DataError(f"rsna:{path}: no usable image ({skipped.summary()})")
    return records, list(TASKS), skipped


def make_split(label_file: Path) -> dict[str, str]:
    """patientId -> train/val/test: MGCA's 16,010 / 5,337 / 5,337 split (on the full stage 2 file).

    ``train_test_split(test_size=2 * 5337, random_state=SPLIT_SEED)`` over the sorted patient ids
    (the order of MGCA's ``groupby("patientId")``), then ``train_test_split(test_size=0.5)`` of the
    rest returning (test, val) as MGCA names them. A table with at most 21,348 patients gets 40 %
    for val+test instead.
    """
    from sklearn.model_selection import train_test_split

    _, rows = read_table(label_file, required=["patientId"])
    ids = sorted({r.cells["patientId"] for r in rows if r.cells["patientId"]})
    # A smaller table (a subset, a test fixture) keeps the full file's 40 % val+test share.
    n_eval = 2 * N_EVAL if len(ids) > 4 * N_EVAL else round(0.4 * len(ids))
    train, rest = train_test_split(ids, test_size=n_eval, random_state=SPLIT_SEED)
    test, val = train_test_split(rest, test_size=0.5, random_state=SPLIT_SEED)
    return {**{i: "train" for i in train}, **{i: "val" for i in val}, **{i: "test" for i in test}}
