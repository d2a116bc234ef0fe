"""``vindr:ROOT`` - VinDr-CXR (Nguyen et al., Scientific Data 2022; PhysioNet ``vindr-cxr`` 1.0.0): boxes of
22 local findings per radiologist, and image-level labels, on DICOM images.

Layout (as PhysioNet unpacks it)::

    ROOT/annotations/annotations_train.csv      image_id,rad_id,class_name,x_min,y_min,x_max,y_max
    ROOT/annotations/annotations_test.csv       (the CSVs may also sit in ROOT itself)
    ROOT/annotations/image_labels_train.csv     image_id,rad_id,<one 0/1 column per label>
    ROOT/annotations/image_labels_test.csv
    ROOT/train/<image_id>.dicom,  ROOT/test/<image_id>.dicom

Boxes are ``x_min, y_min, x_max, y_max`` in the DICOM's pixels; a "No finding" row has no box. The
15,000 training images were each read by three radiologists independently (``rad_id`` R1..R17), the
3,000 test images by a consensus of five (one set of labels per image).

Readers (``?readers=``), a documented choice since VinDr defines no merge of the training readers:

- ``all`` (default): the labels as released. A finding is present when any reader marked it, and every
  reader's boxes are kept (on the test images: the consensus).
- ``majority``: a finding is present when more than half of the image's readers marked it; the boxes
  of those readers are kept.

Units (``?unit=``):

- ``finding`` (default; phrase grounding): one record per (image, local finding) present, ``id``
  ``<image_id>/<finding>``, its boxes, ``labels`` one-hot over :data:`LOCAL`, ``extra``: ``prompt`` (the
  finding's words, :data:`PROMPTS`), ``finding``, ``image_id``.
- ``image`` (classification, class-agnostic boxes): one record per image, ``labels`` over the
  image-label table's columns (local and global labels) merged by the reader rule, ``boxes`` every
  kept box of a local finding.

Split: ``train`` and ``test`` as published; VinDr has no validation split. Bad input, named
``file:row`` and counted; the image is then skipped whole (no partial ground truth): a box that is
not four numbers with ``x_min < x_max`` and ``y_min < y_max``, a box on "No finding", an unknown
finding, a label value other than 0/1. Images without a file are named and skipped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from g2d.data.labelled.dataset import Record, SkipLog
from g2d.data.tables import read_table
from g2d.errors import DataError

__all__ = ["read_vindr", "LOCAL", "PROMPTS", "READER_RULES", "SPLIT_TABLE"]

SPLIT_TABLE = None  # train / test from the files
LOCAL = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
         "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
         "Mediastinal shift", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening",
         "Pneumothorax", "Pulmonary fibrosis", "Rib fracture"]
# the finding's words as a prompt (abbreviations spelled out)
PROMPTS = {**{f: f.lower() for f in LOCAL}, "Enlarged PA": "enlarged pulmonary artery",
           "ILD": "interstitial lung disease", "Nodule/Mass": "nodule or mass"}
READER_RULES = ("all", "majority")
UNITS = ("finding", "image")
_NO_FINDING = "No finding"
_SPLITS = ("train", "test")


def _csv(root: Path, name: str) -> Path | None:
    for p in (root / "annotations" / name, root / name):
        if p.is_file():
            return p
    return None


def _image(root: Path, split: str, image_id: str) -> Path | None:
    for ext in (".dicom", ".dcm", ".png", ".jpg"):
        p = root / split / f"{image_id}{ext}"
        if p.is_file():
            return p
    return None


def _kept(marks: dict[str, list], readers: set[str], rule: str) -> set[str]:
    """The readers whose marks of one finding count: every one (``all``) or, when more than half of
    the image's readers marked it, those (``majority``)."""
    if rule == "all" or len(marks) * 2 > len(readers):
        return set(marks)
    return set()


def read_vindr(path: Path, readers: str = "all", unit: str = "finding") -> tuple[list[Record], list[str], SkipLog]:
    """Read VinDr-CXR (see the module docstring).

    :raises DataError: an unknown ``readers``/``unit``, no annotation table, a missing column, or no
        usable record.
    """
    if readers not in READER_RULES:
        raise DataError(f"vindr: readers={readers!r}; use one of {READER_RULES}")
    if unit not in UNITS:
        raise DataError(f"vindr: unit={unit!r}; use one of {UNITS}")
    root = Path(path)
    skipped = SkipLog(f"vindr:{root.name}")
    records: list[Record] = []
    tasks: list[str] = list(LOCAL)
    label_tasks: list[str] | None = None  # the first image-label table's columns; the other is reordered to them
    found = False
    for split in _SPLITS:
        ann = _csv(root, f"annotations_{split}.csv")
        if ann is None:
            continue
        found = True
        header, rows = read_table(ann, required=["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
                                  strict=True)
        # image -> finding -> reader -> boxes; image -> every reader who read it
        boxes: dict[str, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        image_readers: dict[str, set[str]] = defaultdict(set)
        first_row: dict[str, str] = {}
        bad: dict[str, str] = {}
        for row in rows:
            c = row.cells
            iid, name, rad = c["image_id"], c["class_name"], c.get("rad_id", "") or "consensus"
            first_row.setdefault(iid, row.where)
            image_readers[iid].add(rad)
            cells = [c[k] for k in ("x_min", "y_min", "x_max", "y_max")]
            try:
                if name == _NO_FINDING:
                    if any(cells):
                        raise ValueError("a box on a 'No finding' row")
                    continue
                if name not in LOCAL:
                    raise ValueError(f"class {name!r} is not one of VinDr's 22 local findings or 'No finding'")
                x1, y1, x2, y2 = (float(v) for v in cells)
                if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x1 >= x2 or y1 >= y2 or x1 < 0 or y1 < 0:
                    raise ValueError(f"box {cells} is not x_min < x_max, y_min < y_max, non-negative")
            except ValueError as e:
                skipped.note("bad_row", row.where, str(e))
                bad.setdefault(iid, row.where)
                continue
            boxes[iid][name][rad].append((x1, y1, x2, y2))
        labels, label_names = _image_labels(root, split, readers, skipped, bad)
        if label_names:
            if label_tasks is None:
                label_tasks = label_names
            elif set(label_names) != set(label_tasks):
                raise DataError(f"vindr:{root}: image_labels_{split}.csv has other label columns than the "
                                f"training table: {sorted(set(label_names) ^ set(label_tasks))}")
            order = [label_names.index(t) for t in label_tasks]
            labels = {k: v[order] for k, v in labels.items()}
            if unit == "image":
                tasks = label_tasks
        for iid in sorted(image_readers):
            if iid in bad:
                skipped.skip("image_with_bad_row", first_row[iid], "every row of the image dropped")
                continue
            image = _image(root, split, iid)
            if image is None:
                skipped.skip("missing_image", first_row[iid], str(root / split / f"{iid}.dicom"))
                continue
            kept = {f: [b for r in _kept(by_reader, image_readers[iid], readers) for b in by_reader[r]]
                    for f, by_reader in boxes[iid].items()}
            kept = {f: b for f, b in kept.items() if b}
            if unit == "finding":
                for f in sorted(kept, key=LOCAL.index):
                    records.append(Record(id=f"{iid}/{f}", image=str(image),
                                          labels=np.array([float(t == f) for t in LOCAL], np.float32),
                                          boxes=np.array(kept[f], np.float32), split=split, source=first_row[iid],
                                          extra={"prompt": PROMPTS[f], "finding": f, "image_id": iid}))
                continue
            if label_names:
                if iid not in labels:
                    skipped.skip("no_image_labels", first_row[iid], f"{iid} is not in image_labels_{split}.csv")
                    continue
                lab = labels[iid]
            else:  # no image-label table: the local findings from the boxes
                lab = np.array([float(f in kept) for f in LOCAL], np.float32)
            all_boxes = [b for f in kept for b in kept[f]]
            records.append(Record(id=iid, image=str(image), labels=lab,
                                  boxes=np.array(all_boxes, np.float32).reshape(-1, 4), split=split,
                                  source=first_row[iid], extra={"image_id": iid}))
    if not found:
        raise DataError(f"vindr: no annotations_train.csv or annotations_test.csv under {root} or {root}/annotations")
    if not records:
        raise DataError(f"vindr:{root}: no usable record ({skipped.summary()})")
    if unit == "image" and len({len(r.labels) for r in records if r.labels is not None}) > 1:
        raise DataError(f"vindr:{root}: one split has an image-label table and the other none")
    return records, tasks, skipped


def _image_labels(root: Path, split: str, readers: str, skipped: SkipLog,
                  bad: dict[str, str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """``image_labels_{split}.csv`` merged over readers by the rule: ``{image_id: labels}`` and the label
    names (the training table's "Other diseases" is the test table's "Other disease": read as the
    former). ``({}, [])`` when the table is absent."""
    table = _csv(root, f"image_labels_{split}.csv")
    if table is None:
        return {}, []
    header, rows = read_table(table, required=["image_id"], strict=True)
    names = [h for h in header if h not in ("image_id", "rad_id")]
    votes: dict[str, list[np.ndarray]] = defaultdict(list)
    for row in rows:
        try:
            vals = [float(row.cells[n]) for n in names]
            if any(v not in (0.0, 1.0) for v in vals):
                raise ValueError("a label value is not 0 or 1")
        except ValueError as e:
            skipped.note("bad_label", row.where, str(e))
            bad.setdefault(row.cells["image_id"], row.where)
            continue
        votes[row.cells["image_id"]].append(np.array(vals, np.float32))
    merged = {}
    for iid, v in votes.items():
        stack = np.stack(v)
        merged[iid] = ((stack.max(0) if readers == "all" else (stack.sum(0) * 2 > len(stack))).astype(np.float32))
    return merged, ["Other diseases" if n == "Other disease" else n for n in names]
