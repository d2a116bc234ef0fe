"""CheXpert (``chexpert:DIR``): ``train.csv`` / ``valid.csv`` of CheXpert-v1.0 or CheXpert-v1.0-small.

``DIR`` is either the folder that holds ``CheXpert-v1.0*/`` or that folder itself (the one with
``train.csv``, ``valid.csv``, ``train/``, ``valid/``). Image paths in the CSVs start with the version
folder (``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``); they are resolved
against the folder above the CSV's, or against the CSV's folder with the version folder dropped.

Protocol (MGCA ``preprocess/chexpert.py`` + ``classification_dataset.py``, as G2D Table 6):

* frontal images only (``Frontal/Lateral == "Frontal"``); laterals are a protocol filter, not an error;
* tasks: the 5 competition classes (``classes="competition"``), or all 14 observations (``"all"``),
  or any list of observation column names;
* uncertain (-1) labels, ``uncertain="mgca"``: U-ones for Atelectasis, Edema, Pleural Effusion and
  U-zeros for Cardiomegaly, Consolidation (MGCA); the other 9 observations U-zeros. Also ``"ones"``,
  ``"zeros"``, ``"ignore"`` (NaN) or a ``{class: "ones"|"zeros"|"ignore"}`` dict (missing classes
  follow ``"mgca"``);
* blank (no mention) labels: 0 as MGCA (``blank="zero"``), or NaN (``blank="nan"``);
* split (shipped table ``splits/chexpert.csv.gz``): test = the official ``valid.csv`` frontal images
  (202); val = about 5,000 frontal ``train.csv`` images carved **by patient** with ``SPLIT_SEED``
  (MGCA draws 5,000 images, which lets a patient sit in train and val); train = the rest (~186k).

Record ids are the CSV path without its version folder (``train/patient00001/study1/
view1_frontal.jpg``), so the full-size and the small download share one split table.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from g2d.data.labelled.dataset import Record, SkipLog
from g2d.data.tables import read_table
from g2d.errors import DataError

__all__ = ["read_chexpert", "make_split", "carve_by_patient", "SPLIT_TABLE", "SPLIT_SEED", "COMPETITION",
           "OBSERVATIONS", "MGCA_UNCERTAIN", "VAL_IMAGES"]

log = logging.getLogger("g2d.data")

SPLIT_TABLE = "chexpert"
SPLIT_SEED = 0  # MGCA's np.random.seed(0)
VAL_IMAGES = 5000  # MGCA CHEXPERT_VALID_NUM; G2D Table 6: 186,027 / 5,000 / 202

COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                "Pleural Other", "Fracture", "Support Devices")
# MGCA classification_dataset.py: uncertain -> 1 for these, -> 0 for Cardiomegaly and Consolidation.
MGCA_UNCERTAIN: dict[str, str] = {c: ("ones" if c in ("Atelectasis", "Edema", "Pleural Effusion") else "zeros")
                                  for c in OBSERVATIONS}
_POLICIES = ("ones", "zeros", "ignore")
_META = ("Path", "Frontal/Lateral")
_PATIENT = re.compile(r"(?:^|/)(patient\d+)(?:/|$)")
_VALUES = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0, "": None}


def carve_by_patient(groups: Mapping[str, Sequence[str]], n_target: int, seed: int) -> set[str]:
    """Ids of whole patients, drawn in a seeded order until at least ``n_target`` ids are taken.

    ``groups`` maps patient -> ids. Patients are sorted before the permutation, so the result does
    not depend on input order; the carved set holds ``n_target`` ids plus at most one patient's worth.
    """
    keys = sorted(groups)
    taken: set[str] = set()
    for j in np.random.default_rng(seed).permutation(len(keys)):
        if len(taken) >= n_target:
            break
        taken.update(groups[keys[j]])
    return taken


def canonical_id(path: str) -> str:
    """``CheXpert-v1.0-small/train/p/s/v.jpg`` -> ``train/p/s/v.jpg`` (version folder dropped)."""
    head, sep, rest = path.partition("/")
    return rest if sep and head.lower().startswith("chexpert") else path


def _rows(csv_path: Path, skipped: SkipLog, frontal_only: bool) -> Iterator[tuple[str, dict[str, str], str]]:
    """Valid rows of a CheXpert CSV as ``(canonical id, row, "file:row")``; bad rows are skipped."""
    name = csv_path.name
    seen: set[str] = set()
    n_lateral = 0
    header, rows = read_table(csv_path)
    missing = [c for c in (*_META, *OBSERVATIONS) if c not in header]
    if missing:
        raise DataError(f"chexpert: {csv_path} lacks columns {missing} (is it a CheXpert train/valid.csv?)")
    for r in rows:
        row, where = r.cells, r.where
        path = row.get("Path", "")
        if not path:
            skipped.skip("blank_path", where)
            continue
        if not _PATIENT.search(path):
            skipped.skip("no_patient_in_path", where)
            continue
        view = row.get("Frontal/Lateral", "")
        if view not in ("Frontal", "Lateral"):
            skipped.skip("bad_view", where, f"Frontal/Lateral={view!r}")
            continue
        bad = [c for c in OBSERVATIONS if row.get(c, "") not in _VALUES]
        if bad:
            skipped.skip("bad_label", where, f"{bad[0]}={row.get(bad[0])!r} (allowed 1.0, 0.0, -1.0, blank)")
            continue
        rid = canonical_id(path)
        if rid in seen:
            skipped.skip("duplicated_id", where)
            continue
        seen.add(rid)
        if frontal_only and view != "Frontal":
            n_lateral += 1
            continue
        yield rid, row, where
    if n_lateral:
        log.info("chexpert: %s: %d lateral views left out (frontal filter)", name, n_lateral)


def _patient(path: str) -> str:
    m = _PATIENT.search(path)
    assert m is not None  # _rows only yields paths with a patient folder
    return m.group(1)


def _find_csvs(path: Path) -> tuple[Path, Path | None]:
    """``(train.csv, valid.csv or None)`` under ``path`` (the version folder or the folder above)."""
    if path.is_file():
        raise DataError(f"chexpert: {path} is a file; give the folder holding train.csv (or CheXpert-v1.0*/)")
    if not path.is_dir():
        raise DataError(f"chexpert: folder {path} not found")
    candidates = [path] + sorted(q for q in path.glob("CheXpert-v1.0*") if q.is_dir())
    for d in candidates:
        if (d / "train.csv").is_file() or (d / "valid.csv").is_file():
            train = d / "train.csv"
            valid = d / "valid.csv"
            if not train.is_file():
                raise DataError(f"chexpert: {train} not found (needed for train/val)")
            return train, valid if valid.is_file() else None
    raise DataError(f"chexpert: no train.csv in {path} or {path}/CheXpert-v1.0*/")


def _policy(uncertain: str | Mapping[str, str], tasks: Sequence[str]) -> list[str]:
    if isinstance(uncertain, str):
        if uncertain == "mgca":
            return [MGCA_UNCERTAIN[t] for t in tasks]
        if uncertain not in _POLICIES:
            raise DataError(f"chexpert: uncertain must be 'mgca', {_POLICIES} or a dict, got {uncertain!r}")
        return [uncertain] * len(tasks)
    unknown = [c for c in uncertain if c not in OBSERVATIONS]
    bad = {v for v in uncertain.values() if v not in _POLICIES}
    if unknown or bad:
        raise DataError(f"chexpert: uncertain dict has unknown classes {unknown} or policies {sorted(bad)}")
    return [uncertain.get(t, MGCA_UNCERTAIN[t]) for t in tasks]


def _tasks(classes: str | Sequence[str]) -> list[str]:
    if classes == "competition":
        return list(COMPETITION)
    if classes == "all":
        return list(OBSERVATIONS)
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",")]
    unknown = [c for c in classes if c not in OBSERVATIONS]
    if unknown or not classes:
        raise DataError(f"chexpert: unknown classes {unknown}; use 'competition', 'all' or names of {OBSERVATIONS}")
    return list(classes)


def _labels(row: dict[str, str], tasks: Sequence[str], policy: Sequence[str], blank: float) -> np.ndarray:
    out = np.empty(len(tasks), np.float32)
    for j, (t, pol) in enumerate(zip(tasks, policy)):
        v = _VALUES[(row.get(t) or "").strip()]
        if v is None:
            out[j] = blank
        elif v < 0:
            out[j] = 1.0 if pol == "ones" else 0.0 if pol == "zeros" else math.nan
        else:
            out[j] = v
    return out


def read_chexpert(path: Path, classes: str | Sequence[str] = "competition",
                  uncertain: str | Mapping[str, str] = "mgca", blank: str = "zero",
                  frontal_only: bool = True, check_files: bool = True,
                  **_: Any) -> tuple[list[Record], list[str], SkipLog]:
    """Frontal CheXpert images of ``train.csv`` and ``valid.csv`` as records.

    Args:
        path: the folder holding ``CheXpert-v1.0*/`` or that version folder itself.
        classes: ``"competition"`` (5 tasks), ``"all"`` (14) or a list / comma string of column names.
        uncertain: -1 label policy (module docstring); ``blank``: ``"zero"`` (MGCA) or ``"nan"``.
        frontal_only: the frontal filter of the protocol (turn off to read laterals too).
        check_files: skip rows whose image file is missing (one ``stat`` per row).

    Returns:
        ``(records, tasks, skipped)``; ``Record.labels`` float32 ``[K]``; ``valid.csv`` records carry
        ``split="test"``; ``Record.patient`` is the ``patientNNNNN`` folder.

    Raises:
        DataError: missing folder / CSV / columns, unknown options.
    """
    tasks = _tasks(classes)
    policy = _policy(uncertain, tasks)
    if blank not in ("zero", "nan"):
        raise DataError(f"chexpert: blank must be 'zero' or 'nan', got {blank!r}")
    blank_value = 0.0 if blank == "zero" else math.nan
    train_csv, valid_csv = _find_csvs(Path(path))
    if valid_csv is None:
        log.warning("chexpert: no valid.csv next to %s; the test split (official valid set) is unavailable",
                    train_csv)
    skipped = SkipLog("chexpert")
    records: list[Record] = []
    seen: set[str] = set()
    for csv_path, split in ((train_csv, None), (valid_csv, "test")):
        if csv_path is None:
            continue
        for rid, row, where in _rows(csv_path, skipped, frontal_only):
            if rid in seen:  # an image listed in train.csv and valid.csv
                skipped.skip("duplicated_id", where, "also listed in the other CSV")
                continue
            rel = row["Path"].strip()
            # The CSV path starts with the version folder: resolve from the folder above the CSV's,
            # or from the CSV's own folder when the user renamed / flattened the version folder.
            first, alt = csv_path.parent.parent / rel, csv_path.parent / canonical_id(rel)
            if rel.partition("/")[0] != csv_path.parent.name:
                first, alt = alt, first
            image = alt if check_files and not first.is_file() and alt.is_file() else first
            if check_files and not image.is_file():
                skipped.skip("missing_image", where)  # the path holds the patient id: not logged
                continue
            seen.add(rid)
            records.append(Record(id=rid, image=str(image), labels=_labels(row, tasks, policy, blank_value),
                                  patient=_patient(rel), split=split, source=where))
    log.info("chexpert: %d images read; %s", len(records), skipped.summary())
    return records, tasks, skipped


def make_split(label_file: Path) -> dict[str, str]:
    """``{id: split}`` for the frontal images of a CheXpert ``train.csv`` (plain or ``.gz``).

    val = whole patients drawn with ``SPLIT_SEED`` until ``VAL_IMAGES`` images are taken, train =
    the rest; the frontal images of a ``valid.csv`` next to ``label_file`` (when there) are test.
    No patient is in two splits (the official valid patients are not in ``train.csv``).
    """
    label_file = Path(label_file)
    if not label_file.is_file():
        raise DataError(f"chexpert: label file {label_file} not found")
    skipped = SkipLog("chexpert make_split")
    groups: dict[str, list[str]] = {}
    for rid, row, _ in _rows(label_file, skipped, frontal_only=True):
        groups.setdefault(_patient(row["Path"]), []).append(rid)
    val = carve_by_patient(groups, VAL_IMAGES, SPLIT_SEED)
    out = {i: ("val" if i in val else "train") for ids in groups.values() for i in ids}
    valid = label_file.with_name("valid.csv")
    if valid.is_file():
        for rid, _row, where in _rows(valid, skipped, frontal_only=True):
            if rid in out:
                raise DataError(f"chexpert: {where} is also in {label_file.name}")
            out[rid] = "test"
    else:
        log.warning("chexpert: no valid.csv next to %s; the table has no test rows", label_file)
    log.info("%s", skipped.summary())
    return out
