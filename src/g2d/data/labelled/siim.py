"""``siim:DIR`` - SIIM-ACR pneumothorax segmentation, read from the Kaggle files as published.

Layout (``DIR``)::

    train-rle.csv                                  ImageId, " EncodedPixels" (Kaggle relative RLE)
    dicom-images-train/<study>/<series>/<ImageId>.dcm   (any depth; or PNG conversions <ImageId>.png)

Masks: Kaggle's *relative*, column-major RLE (``rle2mask``: start offsets relative to the end of the
previous run, decoded into a ``W*H`` vector, then ``reshape(W, H).T``), decoded at the image's real
size. Several rows of one image are merged by union. ``-1`` (with or without Kaggle's leading space)
marks an image without pneumothorax. ``labels = ["pneumothorax"]``: 1 when any row has a run.

Bad input: an RLE with an odd number of values or non-integers, a row without an ImageId or an image
whose file is absent is named with ``file:row``, counted and skipped; an RLE that runs past the end of
its image is found when the mask is decoded (the image size is only known then) and the image is
skipped by :class:`~g2d.data.labelled.LabelledCXR` with the same ``file:row`` naming.

Split (``SPLIT_TABLE = "siim"``): 70/15/15 **by ImageId** (MGCA split CSV rows, so an image with
several RLE rows could fall in two splits). MGCA's *balanced* training set (all positives plus as many
seeded negatives) is :func:`balance_train`, applied to the opened training split.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g2d.data.labelled.dataset import LabelledCXR, Record, SkipLog, parse_label_size
from g2d.data.labelled.splits import fraction_count, load_split, subset_ranks
from g2d.data.tables import read_table
from g2d.errors import DataError, ImageReadError

__all__ = ["read_siim", "make_split", "balance_train", "RLEMask", "decode_rle", "find_images",
           "SPLIT_TABLE", "SPLIT_SEED", "TASKS"]

#: The pixel space of the RLE masks: the 1024 x 1024 DICOMs (g2d.data.labelled.labels_at).
LABEL_SIZE = 1024

log = logging.getLogger("g2d.data")

SPLIT_TABLE = "siim"
SPLIT_SEED = 0
TASKS = ["pneumothorax"]
_LABEL_FILE = "train-rle.csv"


def decode_rle(runs: tuple[int, ...], hw: tuple[int, int], where: str = "rle") -> np.ndarray:
    """Kaggle relative RLE -> bool ``[H, W]`` (column-major, as Kaggle's ``rle2mask`` + ``.T``).

    ``runs`` alternates (offset from the end of the previous run, length).

    Raises:
        ImageReadError: a run passes the end of the ``H*W`` image (``where`` names the row).
    """
    h, w = int(hw[0]), int(hw[1])
    flat = np.zeros(h * w, dtype=bool)
    pos = 0
    for start, length in zip(runs[0::2], runs[1::2]):
        pos += start
        if pos + length > h * w:
            raise ImageReadError(where, f"RLE runs past the end of the {h}x{w} image")
        flat[pos:pos + length] = True
        pos += length
    return flat.reshape(w, h).T


@dataclass(frozen=True)
class RLEMask:
    """Union of an image's RLE rows, decoded at the image's size (``MaskSource``)."""

    rles: tuple[tuple[int, ...], ...]
    where: str = ""

    def __call__(self, hw: tuple[int, int]) -> np.ndarray:
        m = np.zeros(hw, dtype=bool)
        for r in self.rles:
            m |= decode_rle(r, hw, self.where)
        return m


def _parse_rle(cell: str) -> tuple[int, ...] | None:
    """``None`` for ``-1`` (no finding); the run tuple otherwise. ValueError when malformed."""
    s = cell.strip()
    if s == "-1":
        return None
    vals = s.split()
    if not vals:
        raise ValueError("empty RLE (use -1 for no pneumothorax)")
    try:
        runs = tuple(int(v) for v in vals)
    except ValueError:
        raise ValueError("RLE has a value that is not an integer") from None
    if len(runs) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(runs)})")
    if any(v < 0 for v in runs) or any(v == 0 for v in runs[1::2]):
        raise ValueError("RLE has a negative offset or a run of length <= 0")
    return runs


def find_images(root: Path, suffixes: tuple[str, ...] = (".dcm", ".png")) -> dict[str, Path]:
    """``{file stem: path}`` of the images found recursively under ``root``.

    When a stem exists in several formats the first suffix of ``suffixes`` wins (the original DICOM
    over a PNG conversion); the same stem twice in one format keeps the first path in sorted order.
    """
    found: dict[str, tuple[int, str]] = {}
    dup = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            stem, ext = os.path.splitext(fn)
            ext = ext.lower()
            if ext not in suffixes:
                continue
            pri = suffixes.index(ext)
            old = found.get(stem)
            if old is None or pri < old[0]:
                found[stem] = (pri, os.path.join(dirpath, fn))
            elif pri == old[0]:
                dup += 1
    if dup:
        log.warning("%s: %d image names found twice in the same format; the first in sorted order is used",
                    root, dup)
    return {k: Path(v[1]) for k, v in found.items()}


def _label_path(path: Path, label_file: str | None) -> Path:
    p = Path(label_file) if label_file else path / _LABEL_FILE
    if not p.is_absolute() and label_file:
        p = path / p
    if not p.is_file():
        raise DataError(f"siim: {p} not found (expected the Kaggle {_LABEL_FILE} in {path})")
    return p


def read_siim(path: Path, label_file: str | None = None, label_size: str | int | None = LABEL_SIZE
              ) -> tuple[list[Record], list[str], SkipLog]:
    """Read SIIM-ACR from its Kaggle folder (see the module docstring).

    Args:
        path: the folder holding ``train-rle.csv`` and the images (searched recursively).
        label_file: another RLE table (relative to ``path`` or absolute) instead of ``train-rle.csv``.
        label_size: the pixel space of the RLE masks: the 1024 x 1024 DICOMs (default); masks of
            images converted to another size are decoded there and resized. ``"image"``: the RLE
            is in each image file's own pixels. See :func:`g2d.data.labelled.parse_label_size`.

    Returns:
        ``(records, ["pneumothorax"], skipped)``; ``Record.id`` = ImageId, ``mask`` an :class:`RLEMask`.
    """
    path = Path(path)
    label_hw = parse_label_size(label_size)
    table = _label_path(path, label_file)
    _, rows = read_table(table, required=["ImageId", "EncodedPixels"])
    skipped = SkipLog("siim")
    rles: dict[str, list[tuple[int, ...]]] = {}
    first_row: dict[str, str] = {}
    bad: set[str] = set()
    for row in rows:
        iid = row.cells["ImageId"]
        if not iid:
            skipped.skip("blank_image_id", row.where)
            continue
        try:
            runs = _parse_rle(row.cells["EncodedPixels"])
        except ValueError as e:
            # One bad row makes the image's mask unknown: the whole image is skipped.
            skipped.skip("malformed_rle", row.where, str(e))
            bad.add(iid)
            continue
        first_row.setdefault(iid, row.where)
        rles.setdefault(iid, [])
        if runs is not None:
            rles[iid].append(runs)
    images = find_images(path)
    records = []
    for iid in sorted(rles):
        if iid in bad:
            continue
        img = images.get(iid)
        if img is None:
            skipped.skip("missing_image", first_row[iid], f"no {iid}.dcm or .png under {path}")
            continue
        found: tuple[tuple[int, ...], ...] = tuple(rles[iid])
        records.append(Record(id=iid, image=str(img), labels=np.asarray([float(bool(found))], np.float32),
                              mask=RLEMask(found, first_row[iid]), source=first_row[iid], label_hw=label_hw))
    if not records:
        raise DataError(f"siim:{path}: no usable image ({skipped.summary()})")
    return records, list(TASKS), skipped


def make_split(label_file: Path) -> dict[str, str]:
    """ImageId -> train/val/test, 70/15/15 by ImageId (no image in two splits).

    ``train_test_split(test_size=0.3, random_state=SPLIT_SEED)`` over the sorted unique ImageIds, the
    30 % halved again the same way (test first, as MGCA): MGCA's recipe, applied to ImageIds instead of
    CSV rows to remove its leakage.
    """
    from sklearn.model_selection import train_test_split

    _, rows = read_table(label_file, required=["ImageId", "EncodedPixels"])
    ids = sorted({r.cells["ImageId"] for r in rows if r.cells["ImageId"]})
    train, rest = train_test_split(ids, test_size=0.30, random_state=SPLIT_SEED)
    test, val = train_test_split(rest, test_size=0.5, random_state=SPLIT_SEED)
    return {**{i: "train" for i in train}, **{i: "val" for i in val}, **{i: "test" for i in test}}


def balance_train(ds: LabelledCXR, fraction: float = 1.0, subset: int = 0) -> LabelledCXR:
    """MGCA's balanced SIIM training set: every positive image plus as many negatives, then the
    label fraction taken from that balanced set (MGCA: ``data_pct`` of the balanced ids).

    ``ds`` is the whole training split (``open_dataset("siim:DIR", "train")``). The negatives are
    those with the smallest rank in the shipped split table (a seeded permutation), and the fraction
    keeps the balanced ids of smallest rank, so the choice is fixed, identical for everyone, and
    nested across fractions. MGCA draws both with ``np.random.choice``; the expected composition is
    the same (half positive at every fraction), the ids are not. Validation and test stay
    unbalanced, as in MGCA. Label subset ``subset`` >= 1 ranks by its seeded permutation
    (:func:`g2d.data.labelled.splits.subset_ranks`) instead of the table's.

    Raises:
        DataError: fewer negatives than positives.
    """
    table = load_split(SPLIT_TABLE)
    lab = ds.labels()[:, 0]
    redrawn = subset_ranks(ds.ids, subset)

    def rank(i: str) -> tuple[int, str]:
        return (table.get(i, ("", 1 << 62))[1] if redrawn is None else redrawn[i]), i

    pos = [r.id for r, y in zip(ds.records, lab) if y == 1]
    neg = sorted((r.id for r, y in zip(ds.records, lab) if y == 0), key=rank)
    if len(neg) < len(pos):
        raise DataError(f"{ds.name}: {len(pos)} positives but only {len(neg)} negatives; cannot balance")
    balanced = sorted([*pos, *neg[:len(pos)]], key=rank)
    keep = set(balanced[:fraction_count(len(balanced), fraction)])
    return ds.subset([i for i in ds.ids if i in keep], name=f"{ds.name}-balanced")
