"""``chexlocalize:ROOT`` - CheXlocalize (Saporta et al., Nature Machine Intelligence 2022): radiologists'
pixel masks for 10 findings on CheXpert's validation and test images, read from the released
segmentation JSON (rajpurkarlab/cheXlocalize).

Layout::

    ROOT/gt_segmentations_val.json     {cxr_id: {finding: {"size": [H, W], "counts": "<COCO RLE>"}}}
    ROOT/gt_segmentations_test.json    (either file may be absent; its split is then empty)
    IMAGES/valid/patientNNNNN/studyN/viewN_frontal.jpg   (CheXpert; ``val/`` also accepted)
    IMAGES/test/patientNNNNN/studyN/viewN_frontal.jpg    (``?images=IMAGES``, default ROOT)

``cxr_id`` is the image path with ``/`` as ``_`` (``patient64541_study1_view1_frontal``). Masks are
pycocotools' compressed RLE of a Fortran-ordered ``uint8`` array, decoded with ``pycocotools.mask``;
their ``size`` is the original image's ``[H, W]``, kept as the label space, so a down-sized copy of
CheXpert (``CheXpert-v1.0-small``) is scored at the masks' resolution. The JSON lists every finding for
each image, negatives as empty masks: a record is one (image, finding) pair with a non-empty mask.

Findings (:data:`TASKS`, the JSON's keys): CheXlocalize calls CheXpert's "Lung Opacity" "Airspace
Opacity". Record: ``id`` ``<cxr_id>/<finding>``, ``patient`` ``patientNNNNN``, ``labels`` one-hot,
``extra``: ``prompt`` (the finding in lower case), ``finding``, ``image_id``; ``split`` ``val`` or
``test`` (CheXlocalize's own: 234 validation and 668 test images), no training split.

Bad input, named ``file:cxr_id`` and counted: an id that is not ``patientN_studyN_viewN_...``, an
unknown finding, a mask without ``size``/``counts`` or that fails to decode, an absent image.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from g2d.data.labelled.dataset import Record, SkipLog
from g2d.errors import DataError

__all__ = ["read_chexlocalize", "RLEMask", "TASKS", "SPLIT_TABLE"]

SPLIT_TABLE = None  # val / test from the two files
TASKS = ["Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Airspace Opacity", "Edema", "Consolidation",
         "Atelectasis", "Pneumothorax", "Pleural Effusion", "Support Devices"]
_FILES = {"val": "gt_segmentations_val.json", "test": "gt_segmentations_test.json"}
_IMAGE_DIRS = {"val": ("valid", "val", "CheXpert-v1.0/valid", "CheXpert-v1.0-small/valid"),
               "test": ("test", "CheXpert-v1.0/test")}
_ID = re.compile(r"(patient\d+)_(study\d+)_(view\d+_[a-z]+)")


@dataclass(frozen=True)
class RLEMask:
    """A COCO compressed-RLE mask (``size`` ``[H, W]``, ``counts``), decoded on use at its own size."""

    size: tuple[int, int]
    counts: str

    def __call__(self, hw: tuple[int, int]) -> np.ndarray:
        from pycocotools import mask as coco_mask

        if tuple(hw) != self.size:
            raise ValueError(f"RLE mask of size {self.size} asked for at {tuple(hw)}")
        return coco_mask.decode({"size": list(self.size), "counts": self.counts.encode()}).astype(bool)


def _area(size: tuple[int, int], counts: str) -> int:
    from pycocotools import mask as coco_mask

    return int(coco_mask.area({"size": list(size), "counts": counts.encode()}))


def read_chexlocalize(path: Path, images: str | None = None) -> tuple[list[Record], list[str], SkipLog]:
    """Read CheXlocalize (see the module docstring). ``images``: CheXpert's folder holding ``valid/``
    (or ``val/``) and ``test/`` (default ``path``).

    :raises DataError: neither JSON file, a file that is not a JSON object, or no usable pair.
    """
    root = Path(path)
    image_root = Path(images).expanduser() if images else root
    present = {s: root / f for s, f in _FILES.items() if (root / f).is_file()}
    if not present:
        raise DataError(f"chexlocalize: neither {' nor '.join(_FILES.values())} in {root}")
    skipped = SkipLog(f"chexlocalize:{root.name}")
    records: list[Record] = []
    for split, file in present.items():
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"chexlocalize: {file} is not JSON ({err})") from None
        if not isinstance(data, dict):
            raise DataError(f"chexlocalize: {file} is not a JSON object of cxr_id -> findings")
        folder = next((image_root / d for d in _IMAGE_DIRS[split] if (image_root / d).is_dir()), None)
        for cxr_id, findings in data.items():
            where = f"{file.name}:{cxr_id}"
            m = _ID.fullmatch(cxr_id)
            if m is None or not isinstance(findings, dict):
                skipped.skip("bad_id", where, "expected patientN_studyN_viewN_<frontal|lateral> -> {finding: rle}")
                continue
            image = folder / m.group(1) / m.group(2) / f"{m.group(3)}.jpg" if folder else None
            if image is None or not image.is_file():
                skipped.skip("missing_image", where, str(image or image_root / _IMAGE_DIRS[split][0]))
                continue
            for finding, rle in findings.items():
                if finding not in TASKS:
                    skipped.skip("unknown_finding", where, f"{finding!r} is not one of CheXlocalize's {TASKS}")
                    continue
                try:
                    size = (int(rle["size"][0]), int(rle["size"][1]))
                    counts = rle["counts"]
                    if not isinstance(counts, str):
                        raise TypeError("counts is not a string")
                    area = _area(size, counts)
                except (KeyError, TypeError, ValueError, IndexError) as err:
                    skipped.skip("bad_mask", where, f"{finding}: {err}")
                    continue
                if area == 0:
                    continue  # a negative finding: CheXlocalize stores every finding of a listed image
                records.append(Record(id=f"{cxr_id}/{finding}", image=str(image),
                                      labels=np.array([float(t == finding) for t in TASKS], np.float32),
                                      mask=RLEMask(size, counts), patient=m.group(1), split=split, source=where,
                                      extra={"prompt": finding.lower(), "finding": finding, "image_id": cxr_id},
                                      label_hw=size))
    if not records:
        raise DataError(f"chexlocalize:{root}: no usable (image, finding) pair ({skipped.summary()})")
    return records, list(TASKS), skipped
