"""NIH ChestX-ray14 (``cxr14:DIR``): ``Data_Entry_2017*.csv``, ``train_val_list.txt``, ``test_list.txt``.

``DIR`` is the NIH download: the label table (``Data_Entry_2017_v2020.csv`` preferred, else
``Data_Entry_2017.csv``), the two official list files, and the PNGs in ``images/`` or in
``images_001/images/`` ... ``images_012/images/`` (the tarballs unpacked side by side).

Protocol (G2D fine-tuned classification, "official split, following KAD"; G2D Table 6: 77,872 /
8,652 / 25,596):

* 14 tasks in :data:`CLASSES` order (KAD / MedKLIP order); ``Finding Labels`` is ``|``-separated,
  ``No Finding`` = all zeros. Every image of the table is used (no view filter);
* test = ``test_list.txt``; val = 10 % of ``train_val_list.txt`` (8,652 images), carved by
  **patient** (KAD's carve is not published; MAVL splits by image, which puts a patient in train and
  val); train = the rest.

The official lists are not derivable from the label table (they are a random patient split), so no
split table is shipped (``SPLIT_TABLE = None``): the reader reads the user's lists and every record
carries its split. What *is* shipped is the order table ``splits/cxr14_order.csv.gz``
(``ORDER_TABLE``): a seeded rank (``SPLIT_SEED``) of all 112,120 image indices of the label table in
the torchxrayvision wheel, written by ``scripts/make_splits.py``. Patients enter val in the order of
their best-ranked image, and the 1 % / 10 % training subsets are the best-ranked training images, so
the carve and the subsets are published, not recomputed by a random generator on each machine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from g2d.data.labelled.dataset import Record, SkipLog
from g2d.data.labelled.splits import load_order, order_ranks
from g2d.data.tables import read_table
from g2d.errors import DataError

__all__ = ["read_cxr14", "make_split", "order_ids", "CLASSES", "SPLIT_TABLE", "ORDER_TABLE", "SPLIT_SEED",
           "VAL_SHARE"]

log = logging.getLogger("g2d.data")

SPLIT_TABLE = None
ORDER_TABLE = "cxr14_order"
SPLIT_SEED = 0
VAL_SHARE = 0.1  # 8,652 of 86,524 train_val images (G2D Table 6)

CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
           "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
_INDEX = {c: j for j, c in enumerate(CLASSES)}
_LABEL_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
_LISTS = {"train_val_list.txt": "trainval", "test_list.txt": "test"}


def _entries(label_file: Path, skipped: SkipLog) -> dict[str, tuple[np.ndarray, str, str]]:
    """``{image index: (labels [14], patient, "file:row")}`` of a Data_Entry table; bad rows skipped."""
    out: dict[str, tuple[np.ndarray, str, str]] = {}
    header, rows = read_table(label_file)
    missing = [c for c in ("Image Index", "Finding Labels", "Patient ID") if c not in header]
    if missing:
        raise DataError(f"cxr14: {label_file} lacks columns {missing} (is it Data_Entry_2017*.csv?)")
    for r in rows:
        row, where = r.cells, r.where
        image = row["Image Index"]
        findings = [t.strip() for t in row["Finding Labels"].split("|")]
        patient = row["Patient ID"]
        if not image:
            skipped.skip("blank_image_index", where)
            continue
        if not patient:
            skipped.skip("blank_patient_id", where)
            continue
        unknown = [t for t in findings if t not in _INDEX and t != "No Finding"]
        if unknown:
            skipped.skip("bad_label", where, f"unknown finding {unknown[0]!r}")
            continue
        if "No Finding" in findings and len(findings) > 1:
            skipped.skip("bad_label", where, "'No Finding' together with findings")
            continue
        if image in out:
            skipped.skip("duplicated_id", where, f"first at {out[image][2]}")
            continue
        labels = np.zeros(len(CLASSES), np.float32)
        for t in findings:
            if t in _INDEX:
                labels[_INDEX[t]] = 1.0
        out[image] = (labels, patient, where)
    return out


def _lists(folder: Path, skipped: SkipLog) -> dict[str, tuple[str, str]]:
    """``{image index: ("trainval" | "test", "list:line")}`` from the two official list files."""
    out: dict[str, tuple[str, str]] = {}
    both: set[str] = set()
    for fname, part in _LISTS.items():
        p = folder / fname
        if not p.is_file():
            raise DataError(f"cxr14: {p} not found (the official split lists come with the NIH download)")
        with open(p) as f:
            for k, line in enumerate(f, start=1):
                image = line.strip()
                if not image:
                    continue
                where = f"{fname}:{k}"
                if image in out:
                    if out[image][0] == part:
                        skipped.skip("duplicated_id", where, f"first at {out[image][1]}")
                    else:
                        skipped.skip("in_both_lists", where, f"also at {out[image][1]}")
                        both.add(image)
                    continue
                out[image] = (part, where)
    for image in both:  # neither split may claim an image the lists disagree on
        del out[image]
    return out


def _find_label_file(folder: Path) -> Path:
    for name in _LABEL_FILES:
        for p in (folder / name, folder / f"{name}.gz"):
            if p.is_file():
                return p
    raise DataError(f"cxr14: none of {list(_LABEL_FILES)} in {folder}")


def _assign(entries: dict[str, tuple[np.ndarray, str, str]], lists: dict[str, tuple[str, str]],
            skipped: SkipLog) -> dict[str, str]:
    """Official test list = test; val = whole train_val patients, in the order table's order, up to
    ``VAL_SHARE``; train = the rest."""
    for image, (_, where) in sorted(lists.items(), key=lambda kv: kv[1][1]):
        if image not in entries:
            skipped.skip("listed_but_no_label_row", where)
    groups: dict[str, list[str]] = {}
    out: dict[str, str] = {}
    for image, (_, patient, where) in entries.items():
        part = lists.get(image, (None, ""))[0]
        if part is None:
            skipped.skip("not_in_split_lists", where)
        elif part == "test":
            out[image] = "test"
        else:
            groups.setdefault(patient, []).append(image)
    ranks = order_ranks([i for ids in groups.values() for i in ids], load_order(ORDER_TABLE), SPLIT_SEED)
    n_target = round(VAL_SHARE * len(ranks))
    n_val = 0
    for patient in sorted(groups, key=lambda p: min(ranks[i] for i in groups[p])):
        part = "val" if n_val < n_target else "train"
        n_val += len(groups[patient]) if part == "val" else 0
        for image in groups[patient]:
            out[image] = part
    return out


def make_split(label_file: Path) -> dict[str, str]:
    """``{image index: split}`` from a Data_Entry table and the official lists in the same folder.

    Raises:
        DataError: the label file or a list file is missing (the lists are not derivable from the
            table, so a table cannot be shipped from the label file alone).
    """
    label_file = Path(label_file)
    if not label_file.is_file():
        raise DataError(f"cxr14: label file {label_file} not found")
    skipped = SkipLog("cxr14 make_split")
    split = _assign(_entries(label_file, skipped), _lists(label_file.parent, skipped), skipped)
    log.info("%s", skipped.summary())
    return split


def order_ids(label_file: Path) -> list[str]:
    """Every image index of a Data_Entry table: the ids that ``ORDER_TABLE`` ranks."""
    skipped = SkipLog("cxr14 order_ids")
    ids = list(_entries(Path(label_file), skipped))
    log.info("%s", skipped.summary())
    return ids


def _image_index(folder: Path) -> dict[str, Path]:
    """File name -> path over ``images/`` and ``images_*/images/`` (and ``images_*/`` flattened)."""
    dirs = [folder / "images"] + sorted(folder.glob("images_*/images")) + sorted(folder.glob("images_*"))
    index: dict[str, Path] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        with os.scandir(d) as it:  # one listing instead of 112k stat calls
            for e in it:
                if e.is_file():
                    index.setdefault(e.name, Path(e.path))
    return index


def read_cxr14(path: Path, check_files: bool = True, **_: Any) -> tuple[list[Record], list[str], SkipLog]:
    """ChestX-ray14 images with their official / carved split.

    Args:
        path: the NIH download folder (label table, list files, ``images*/``).
        check_files: skip rows whose PNG is not in ``images/`` or ``images_*/images/``.

    Returns:
        ``(records, CLASSES, skipped)``: ``Record.labels`` float32 ``[14]`` 0/1, ``Record.split`` set,
        ``Record.patient`` the ``Patient ID``, ``Record.id`` the ``Image Index``.

    Raises:
        DataError: missing folder, label table, list file, image folder or columns.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"cxr14: folder {folder} not found")
    label_file = _find_label_file(folder)
    skipped = SkipLog("cxr14")
    entries = _entries(label_file, skipped)
    split = _assign(entries, _lists(folder, skipped), skipped)
    index = _image_index(folder)
    if check_files and not index:
        raise DataError(f"cxr14: no images in {folder}/images/ or {folder}/images_*/images/")
    records: list[Record] = []
    for image, (labels, patient, where) in entries.items():
        if image not in split:
            continue
        file = index.get(image)
        if file is None and check_files:
            skipped.skip("missing_image", where)
            continue
        records.append(Record(id=image, image=str(file or folder / "images" / image), labels=labels,
                              patient=patient, split=split[image], source=where))
    log.info("cxr14: %d images read; %s", len(records), skipped.summary())
    return records, list(CLASSES), skipped
