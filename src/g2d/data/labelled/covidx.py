"""COVIDx CXR (``covidx:DIR``): the 3-class label ``.txt`` files and the ``train/`` and ``test/`` images.

``DIR`` holds a train and a test label file and the folders ``train/`` and ``test/``. Label files
(found in this order, or named with ``train_file=`` / ``test_file=``): ``train.txt`` / ``test.txt``,
``train_COVIDx*.txt`` / ``test_COVIDx*.txt`` (e.g. ``train_COVIDx9A.txt``, MGCA's), then
``train_split*.txt`` / ``test_split*.txt``. Each line is ``patient_id filename label [source]``
(whitespace separated, as COVID-Net reads them) with label ``normal``, ``pneumonia`` or ``COVID-19``.
The binary releases (COVIDx9B, CXR-3, CXR-4: ``positive`` / ``negative``) are refused with a
:class:`DataError`: the G2D / MGCA task is 3-class.

Protocol (MGCA ``classification_dataset.py``; G2D Table 6): tasks ``["normal", "pneumonia",
"COVID-19"]`` one-hot (loss cross-entropy, metric accuracy); test = the test file; val = 20 % of the
train file's images carved **by patient** with ``SPLIT_SEED`` (MGCA: ``train_test_split(train_size=0.8,
random_state=0)`` by image, which lets a patient sit in train and val); a ``val.txt`` next to the train
file, when there, is used instead. Records carry their split (``SPLIT_TABLE = None``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from g2d.data.labelled.chexpert import carve_by_patient
from g2d.data.labelled.dataset import Record, SkipLog
from g2d.errors import DataError

__all__ = ["read_covidx", "CLASSES", "SPLIT_TABLE", "SPLIT_SEED", "VAL_SHARE"]

log = logging.getLogger("g2d.data")

SPLIT_TABLE = None
SPLIT_SEED = 0  # MGCA random_state=0
VAL_SHARE = 0.2  # MGCA train_size=0.8 (G2D Table 6: 23,988 / 5,998)

CLASSES = ("normal", "pneumonia", "COVID-19")
_LABELS = {"normal": 0, "pneumonia": 1, "covid-19": 2}
_BINARY = {"positive", "negative"}
_PATTERNS = ("{}.txt", "{}_COVIDx*.txt", "{}_split*.txt")


def _find(folder: Path, part: str) -> Path:
    for pattern in _PATTERNS:
        hits = sorted(folder.glob(pattern.format(part)))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise DataError(f"covidx: several {part} label files in {folder}: {[h.name for h in hits]}; "
                            f"choose one with {part}_file=NAME")
    raise DataError(f"covidx: no {part} label file in {folder} (looked for "
                    f"{', '.join(p.format(part) for p in _PATTERNS)})")


def _parse(label_file: Path, skipped: SkipLog) -> list[tuple[str, str, int, str]]:
    """``(patient, filename, class index, "file:line")`` per usable line of a COVIDx label file."""
    rows: list[tuple[str, str, int, str]] = []
    try:
        lines = label_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"covidx: cannot read {label_file}: {e}") from e
    for k, line in enumerate(lines, start=1):
        where = f"{label_file.name}:{k}"
        tok = line.split()
        if not tok:
            continue
        if len(tok) < 3:
            skipped.skip("malformed_line", where, f"{len(tok)} fields, expected patient_id filename label [source]")
            continue
        label = tok[2].lower()
        if label in _BINARY:
            raise DataError(f"covidx: {where}: label {tok[2]!r} is the binary COVIDx format (COVIDx9B / CXR-3 / "
                            f"CXR-4); this reader needs the 3-class files (labels {list(CLASSES)}, COVIDx <= 9A)")
        if label not in _LABELS:
            skipped.skip("bad_label", where, f"label {tok[2]!r} not in {list(CLASSES)}")
            continue
        rows.append((tok[0], tok[1], _LABELS[label], where))
    return rows


def read_covidx(path: Path, train_file: str | None = None, test_file: str | None = None,
                val_file: str | None = None, check_files: bool = True,
                **_: Any) -> tuple[list[Record], list[str], SkipLog]:
    """COVIDx images with one-hot labels over :data:`CLASSES` and their split.

    Args:
        path: folder with the label files and ``train/``, ``test/``.
        train_file / test_file / val_file: label file names (or paths) overriding the search.
        check_files: skip lines whose image is missing from ``train/`` (train, val) or ``test/``.

    Returns:
        ``(records, ["normal", "pneumonia", "COVID-19"], skipped)``; ``Record.labels`` float32 ``[3]``
        one-hot, ``Record.split`` set, ``Record.id`` the file name, ``Record.patient`` the patient id.

    Raises:
        DataError: missing folder or label file, several candidate label files, the binary format.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"covidx: folder {folder} not found")

    def resolve(name: str | None, part: str) -> Path:
        if name is None:
            return _find(folder, part)
        p = Path(name) if Path(name).is_absolute() else folder / name
        if not p.is_file():
            raise DataError(f"covidx: {part} label file {p} not found")
        return p

    train_path, test_path = resolve(train_file, "train"), resolve(test_file, "test")
    val_path = resolve(val_file, "val") if val_file else (folder / "val.txt" if (folder / "val.txt").is_file()
                                                          else None)
    skipped = SkipLog("covidx")
    parts = [("test", test_path, "test"), ("train", train_path, "train")]
    if val_path is not None:
        parts.insert(1, ("val", val_path, "train"))  # COVIDx val images live in train/
    rows: list[tuple[str, str, str, int, str, str]] = []  # split, patient, file, class, where, folder
    seen: dict[str, str] = {}
    for split, label_file, sub in parts:  # test first: an image in test and train stays in test
        for patient, fname, cls, where in _parse(label_file, skipped):
            if fname in seen:
                same = seen[fname].split(":")[0] == label_file.name
                skipped.skip("duplicated_id" if same else "in_two_label_files", where, f"first at {seen[fname]}")
                continue
            seen[fname] = where
            rows.append((split, patient, fname, cls, where, sub))
    if val_path is None:
        # Carved from the label lines, before image files are checked: the same files give the
        # same split on every machine, whatever images a user lacks.
        groups: dict[str, list[str]] = {}
        for split, patient, fname, *_rest in rows:
            if split == "train":
                groups.setdefault(patient, []).append(fname)
        val = carve_by_patient(groups, round(VAL_SHARE * sum(map(len, groups.values()))), SPLIT_SEED)
        rows = [("val" if r[2] in val else r[0], *r[1:]) for r in rows]
    records: list[Record] = []
    for split, patient, fname, cls, where, sub in rows:
        image = folder / sub / fname
        if check_files and not image.is_file():
            skipped.skip("missing_image", where, str(Path(sub) / fname))
            continue
        labels = np.zeros(len(CLASSES), np.float32)
        labels[cls] = 1.0
        records.append(Record(id=fname, image=str(image), labels=labels, patient=patient, split=split,
                              source=where))
    if not any(r.split == "test" for r in records):
        raise DataError(f"covidx: no usable test images ({test_path.name}, {folder / 'test'})")
    log.info("covidx: %d images (%s); %s", len(records), ", ".join(
        f"{s}={sum(r.split == s for r in records)}" for s in ("train", "val", "test")), skipped.summary())
    return records, list(CLASSES), skipped
