"""``object-cxr:DIR`` - Object-CXR foreign-object detection (JF Healthcare / MIDL 2020), as published.

Layout (``DIR``)::

    train.csv   dev.csv          columns image_name, annotation
    train/<image_name>           dev/<image_name>

``annotation`` is empty for an image without foreign objects, else ``;``-separated objects, each
``TYPE x1 y1 x2 y2 ...`` in the image's pixels: TYPE 0 rectangle and 1 ellipse (box = min/max of the
points), TYPE 2 polygon. ``labels = ["foreign_object"]`` (1 when the annotation is non-empty);
``boxes`` are ``x1, y1, x2, y2`` (continuous edges, the points' min/max). There are no masks.

Polygon rule (``polygon_rule``):

``"bbox"`` (default)
    The polygon's min/max bounding box: the smallest box holding the object, the faithful one.
``"mgca"``
    MGCA's (after xuyuan/xsd): the pole of inaccessibility ``c`` of the polygon's outline buffered
    by 100 px (``shapely`` ``polylabel``, tolerance 10), and the box centred on ``c`` with, per axis,
    half-side = the largest distance from ``c`` to the polygon's bounds. Larger than the object when
    ``c`` is off-centre; use it only to compare with MGCA's numbers. Needs the optional dependency
    ``shapely`` (``pip install shapely``), which implements polylabel.

Split (``SPLIT_TABLE = None``; the label files are not redistributable, so no table is shipped):
assigned at read time from the files themselves, deterministically - ``train.csv`` 90/10 train/val
exactly as MGCA (``train_test_split(rows, test_size=0.1, random_state=0)`` in file order, computed
over all rows, so a skipped bad row never moves another image), ``dev.csv`` is the test split
(7,200 / 800 / 1,000 on the published files). :func:`make_split` gives the same assignment.

Bad input: an annotation that does not parse (unknown TYPE, odd or too few coordinates,
non-numbers, an empty box), a blank or duplicated image name, or a missing image file is named with
``file:row``, counted and skipped.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from g2d.data.labelled.dataset import Record, SkipLog
from g2d.data.tables import read_table
from g2d.errors import DataError

__all__ = ["read_object_cxr", "make_split", "parse_annotation", "SPLIT_TABLE", "SPLIT_SEED", "TASKS",
           "POLYGON_RULES"]

SPLIT_TABLE = None
SPLIT_SEED = 0
TASKS = ["foreign_object"]
POLYGON_RULES = ("bbox", "mgca")
_FILES = (("train.csv", "train"), ("dev.csv", "dev"))


def _mgca_polygon_box(pts: np.ndarray) -> tuple[float, float, float, float]:
    """MGCA's polylabel-centred box (see the module docstring); ``pts`` float ``[P, 2]``."""
    try:
        from shapely.geometry import LineString
        from shapely.ops import polylabel
    except ImportError as e:  # optional dependency
        raise DataError("object-cxr: polygon_rule='mgca' needs shapely (pip install shapely)") from e
    line = LineString(np.concatenate([pts, pts[:1]]))
    c = np.asarray(polylabel(line.buffer(100), tolerance=10).coords[0])
    bounds = np.asarray(line.bounds).reshape(2, 2)
    half = np.abs(bounds - c).max(axis=0)
    return float(c[0] - half[0]), float(c[1] - half[1]), float(c[0] + half[0]), float(c[1] + half[1])


def parse_annotation(text: str, polygon_rule: str = "bbox") -> np.ndarray:
    """An Object-CXR annotation string -> float32 ``[N, 4]`` boxes ``x1, y1, x2, y2``.

    Raises:
        ValueError: the string does not parse (the message says why).
    """
    if polygon_rule not in POLYGON_RULES:
        raise DataError(f"object-cxr: polygon_rule must be one of {POLYGON_RULES}, got {polygon_rule!r}")
    boxes = []
    for k, obj in enumerate(text.split(";")):
        parts = obj.split()
        if not parts:
            raise ValueError(f"object {k + 1} is empty")
        kind = parts[0]
        if kind not in ("0", "1", "2"):
            raise ValueError(f"object {k + 1} has type {kind!r} (0 rectangle, 1 ellipse, 2 polygon)")
        try:
            xy = [float(v) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"object {k + 1} has a coordinate that is not a number") from None
        if len(xy) % 2 or not all(math.isfinite(v) for v in xy):
            raise ValueError(f"object {k + 1} has an odd number of coordinates")
        pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        if len(pts) < (3 if kind == "2" else 2):
            raise ValueError(f"object {k + 1} has too few points ({len(pts)})")
        if kind == "2" and polygon_rule == "mgca":
            box = _mgca_polygon_box(pts)
        else:
            (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
            box = (float(x1), float(y1), float(x2), float(y2))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"object {k + 1} has an empty box")
        boxes.append(box)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _image_names(label_file: Path) -> list[str]:
    _, rows = read_table(label_file, required=["image_name", "annotation"])
    return [r.cells["image_name"] for r in rows]


def make_split(label_file: Path) -> dict[str, str]:
    """image_name -> split from Object-CXR's ``train.csv`` (and ``dev.csv`` beside it, as test).

    ``train.csv`` rows (file order) go 90/10 to train/val with ``train_test_split(test_size=0.1,
    random_state=SPLIT_SEED)``, MGCA's split; every ``dev.csv`` name is ``test``. A name already in
    ``train.csv`` keeps its train/val assignment.
    """
    from sklearn.model_selection import train_test_split

    label_file = Path(label_file)
    names = _image_names(label_file)
    idx = np.arange(len(names))
    _, va = train_test_split(idx, test_size=0.1, random_state=SPLIT_SEED)
    val = set(va.tolist())
    out: dict[str, str] = {}
    for i in idx:  # a name listed twice keeps the split of its first row (the row the reader keeps)
        out.setdefault(names[i], "val" if i in val else "train")
    dev = label_file.with_name("dev.csv")
    if dev.is_file():
        for n in _image_names(dev):
            out.setdefault(n, "test")
    out.pop("", None)
    return out


def read_object_cxr(path: Path, polygon_rule: str = "bbox") -> tuple[list[Record], list[str], SkipLog]:
    """Read Object-CXR from its folder (see the module docstring).

    Args:
        path: folder with ``train.csv``, ``dev.csv``, ``train/`` and ``dev/``.
        polygon_rule: ``"bbox"`` (min/max box, default) or ``"mgca"`` (polylabel-centred box).

    Returns:
        ``(records, ["foreign_object"], skipped)``; ``Record.id`` = image_name, ``Record.split`` set
        (train/val from ``train.csv``, test from ``dev.csv``), ``boxes`` float32 ``[N, 4]``.
    """
    if polygon_rule not in POLYGON_RULES:
        raise DataError(f"object-cxr: polygon_rule must be one of {POLYGON_RULES}, got {polygon_rule!r}")
    path = Path(path)
    if not (path / "train.csv").is_file() and not (path / "dev.csv").is_file():
        raise DataError(f"object-cxr: neither train.csv nor dev.csv in {path}")
    splits = make_split(path / "train.csv") if (path / "train.csv").is_file() else {
        n: "test" for n in _image_names(path / "dev.csv") if n}
    skipped = SkipLog("object-cxr")
    records: list[Record] = []
    seen: set[str] = set()
    for fname, folder in _FILES:
        if not (path / fname).is_file():
            continue
        _, rows = read_table(path / fname, required=["image_name", "annotation"])
        for row in rows:
            name, ann = row.cells["image_name"], row.cells["annotation"]
            if not name:
                skipped.skip("blank_image_name", row.where)
                continue
            if name in seen:
                skipped.skip("duplicated_image", row.where)
                continue
            seen.add(name)
            if ann.lower() == "nan":
                ann = ""
            try:
                boxes = parse_annotation(ann, polygon_rule) if ann else np.zeros((0, 4), np.float32)
            except ValueError as e:
                skipped.skip("malformed_annotation", row.where, str(e))
                continue
            img = path / folder / name
            if not img.is_file():
                skipped.skip("missing_image", row.where, str(img))
                continue
            records.append(Record(id=name, image=str(img), labels=np.asarray([float(bool(ann))], np.float32),
                                  boxes=boxes, split=splits[name], source=row.where))
    if not records:
        raise DataError(f"object-cxr:{path}: no usable image ({skipped.summary()})")
    return records, list(TASKS), skipped
