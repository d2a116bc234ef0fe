"""``ms-cxr:ROOT`` - MS-CXR phrase grounding (Boecking et al., ECCV 2022; PhysioNet ``ms-cxr``), read
from its released local-alignment table and joined to MIMIC-CXR-JPG images.

Layout::

    ROOT/MS_CXR_Local_Alignment_v1.1.0.csv     (or any MS_CXR_Local_Alignment_v*.csv; the newest is read,
                                                or pass the table itself as ROOT)
    IMAGES/files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg   (MIMIC-CXR-JPG; ``?images=IMAGES``, default ROOT)

Table columns (the release's JSON converted by its own script): ``dicom_id, category_name, label_text,
path, x, y, w, h, image_width, image_height`` and, from v1.1.0, ``split``. A phrase (``label_text``)
with several boxes has one row per box: rows are grouped by ``(dicom_id, label_text)`` into one record
per image-phrase pair (1,162 pairs over 8 findings in the release). Boxes are COCO ``x, y, w, h`` in
the original image's pixels (``image_width x image_height``, the DICOM's size, which MIMIC-CXR-JPG
keeps): stored as ``x1, y1, x2, y2`` with that label space, so a down-sized copy of the images is
scored at the labels' resolution.

Record: ``id`` ``<dicom_id>#<k>`` (k-th phrase of the image, in table order), ``patient`` the
``pNNNNNNNN`` of ``path``, ``labels`` one-hot over :data:`TASKS`, ``extra``: ``prompt`` (the phrase),
``finding`` (``category_name``), ``image_id``.

Split: the table's ``split`` column (v1.1.0, by patient); tables without it (v0.1, v1.0) put every pair
in ``test``, the set BioViL evaluates on whole.

Bad input, named ``file:row`` and counted; the whole phrase is skipped so no pair carries part of its
boxes: a non-number or non-positive box, a box outside ``image_width x image_height``, sizes that differ
between one image's rows, a blank phrase, an unknown category, a ``path`` that is not
``files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg``, an image file that is absent.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from g2d.data.labelled.dataset import Record, SkipLog
from g2d.data.tables import read_table
from g2d.errors import DataError

__all__ = ["read_ms_cxr", "TASKS", "SPLIT_TABLE", "find_table"]

SPLIT_TABLE = None  # the records carry the table's split
TASKS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Lung Opacity", "Pleural Effusion", "Pneumonia",
         "Pneumothorax"]
_COLUMNS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height"]
_PATH = re.compile(r"files/p\d{2}/(p\d+)/s\d+/([^/]+)\.jpg")
_SPLITS = {"train": "train", "val": "val", "valid": "val", "test": "test"}


def find_table(root: Path) -> Path:
    """The local-alignment table under ``root`` (the newest ``MS_CXR_Local_Alignment_v*.csv``), or
    ``root`` itself when it is a file.

    :raises DataError: no such table."""
    if root.is_file():
        return root
    found = sorted(root.glob("MS_CXR_Local_Alignment_v*.csv"),
                   key=lambda p: [int(v) for v in re.findall(r"\d+", p.stem)])
    if not found:
        raise DataError(f"ms-cxr: no MS_CXR_Local_Alignment_v*.csv in {root} (pass the folder PhysioNet's "
                        "ms-cxr download unpacks to, or the table itself)")
    return found[-1]


def _image(images: Path, rel: str) -> Path | None:
    """The image of ``path`` under the MIMIC-CXR-JPG root (``files/...``), or under ``files/`` itself,
    as ``.jpg`` or the MIMIC-CXR DICOM's ``.dcm``."""
    for base in (images / rel, images / rel.removeprefix("files/")):
        for p in (base, base.with_suffix(".dcm")):
            if p.is_file():
                return p
    return None


def read_ms_cxr(path: Path, images: str | None = None) -> tuple[list[Record], list[str], SkipLog]:
    """Read MS-CXR (see the module docstring). ``images``: the MIMIC-CXR-JPG root (default ``path``,
    or the table's folder when ``path`` is the table).

    :raises DataError: no table, a missing column, or no usable pair.
    """
    path = Path(path)
    table = find_table(path)
    root = Path(images).expanduser() if images else (path if path.is_dir() else path.parent)
    if not root.is_dir():
        raise DataError(f"ms-cxr: images folder {root} not found (?images=MIMIC-CXR-JPG root)")
    header, rows = read_table(table, required=_COLUMNS, strict=True)
    has_split = "split" in header
    skipped = SkipLog(f"ms-cxr:{table.name}")
    groups: dict[tuple[str, str], list] = {}
    bad: set[tuple[str, str]] = set()
    for row in rows:
        c = row.cells
        key = (c["dicom_id"], c["label_text"])
        groups.setdefault(key, []).append(row)
        try:
            if not c["label_text"]:
                raise ValueError("blank label_text")
            if c["category_name"] not in TASKS:
                raise ValueError(f"category {c['category_name']!r} is not one of MS-CXR's {TASKS}")
            m = _PATH.fullmatch(c["path"])
            if m is None or m.group(2) != c["dicom_id"]:
                raise ValueError(f"path {c['path']!r} is not files/pNN/pNNNNNNNN/sNNNNNNNN/{c['dicom_id']}.jpg")
            x, y, w, h, iw, ih = (float(c[k]) for k in ("x", "y", "w", "h", "image_width", "image_height"))
            if not all(math.isfinite(v) for v in (x, y, w, h, iw, ih)):
                raise ValueError("a box or size value is not finite")
            if w <= 0 or h <= 0 or iw <= 0 or ih <= 0:
                raise ValueError("non-positive box or image size")
            if x < 0 or y < 0 or x + w > iw + 1 or y + h > ih + 1:  # 1 px of rounding (the boxes are int())
                raise ValueError(f"box {x, y, w, h} leaves the {iw:g}x{ih:g} image")
            if has_split and c["split"].lower() not in _SPLITS:
                raise ValueError(f"split {c['split']!r} is not train/val/test")
        except ValueError as e:
            skipped.note("bad_row", row.where, str(e))
            bad.add(key)
    records: list[Record] = []
    per_image: dict[str, int] = {}
    sizes: dict[str, tuple[float, float]] = {}
    for key, group in groups.items():
        if key in bad:
            skipped.skip("phrase_with_bad_row", group[0].where, f"{len(group)} row(s) of the phrase dropped")
            continue
        c0 = group[0].cells
        size = (float(c0["image_height"]), float(c0["image_width"]))
        if any((float(r.cells["image_height"]), float(r.cells["image_width"])) != size for r in group) or \
                sizes.setdefault(key[0], size) != size:
            skipped.skip("inconsistent_image_size", group[0].where, f"image {key[0]} has rows with other sizes")
            continue
        splits = {_SPLITS[r.cells["split"].lower()] for r in group} if has_split else {"test"}
        if len(splits) > 1:
            skipped.skip("inconsistent_split", group[0].where, f"phrase rows in splits {sorted(splits)}")
            continue
        if len({r.cells["category_name"] for r in group}) > 1:
            skipped.skip("inconsistent_category", group[0].where, "one phrase with several categories")
            continue
        image = _image(root, c0["path"])
        if image is None:
            skipped.skip("missing_image", group[0].where, str(root / c0["path"]))
            continue
        boxes = np.array([[float(r.cells["x"]), float(r.cells["y"]), float(r.cells["x"]) + float(r.cells["w"]),
                           float(r.cells["y"]) + float(r.cells["h"])] for r in group], np.float32)
        k = per_image.get(key[0], 0)
        per_image[key[0]] = k + 1
        labels = np.array([float(t == c0["category_name"]) for t in TASKS], np.float32)
        patient = _PATH.fullmatch(c0["path"]).group(1)  # type: ignore[union-attr]  # validated above
        records.append(Record(id=f"{key[0]}#{k}", image=str(image), labels=labels, boxes=boxes,
                              patient=patient, split=splits.pop(), source=group[0].where,
                              extra={"prompt": key[1], "finding": c0["category_name"], "image_id": key[0]},
                              label_hw=(int(size[0]), int(size[1]))))
    if not records:
        raise DataError(f"ms-cxr:{table}: no usable image-phrase pair ({skipped.summary()})")
    return records, list(TASKS), skipped
