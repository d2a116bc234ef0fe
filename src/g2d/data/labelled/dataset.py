"""One interface for every labelled (downstream) chest X-ray set.

A reader turns a public set's raw files into a list of :class:`Record` (id, image path, labels,
boxes, mask source) plus the names of its label columns; :class:`LabelledCXR` turns records into
samples. The same sample layout comes out of SIIM, RSNA, Object-CXR, CheXpert, ChestX-ray14, COVIDx,
users' ``csv:`` tables and the embedded synthetic set::

    {"image":  FloatTensor [1, S, S] in [0, 1],
     "id":     str,
     "labels": FloatTensor [K] (1 / 0, NaN = unknown; K = len(dataset.tasks), may be 0),
     "mask":   FloatTensor [1, S, S] 0/1            (only when the set has masks),
     "boxes":  FloatTensor [N, 4] x1, y1, x2, y2 in output pixels (only when the set has boxes),
     "orig_hw": (H, W) of the file, "index": int}

Geometry is the deterministic resize (+ centre crop) of :mod:`g2d.data.transforms`, applied to the
image, the mask (nearest neighbour) and the boxes alike; :func:`g2d.data.transforms.eval_geometry`
maps outputs back to the file's pixels. Nothing is subset silently: rows dropped by a reader are
counted by reason in :class:`SkipLog`, and an image that fails to decode while training or evaluating
is named in the log, counted, and dropped from its batch by :func:`collate_labelled`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from g2d.data.images import read_image
from g2d.data.transforms import ImageTransformCfg, apply_geometry, eval_geometry
from g2d.errors import DataError, ImageReadError, LabelSpaceError

__all__ = ["MaskSource", "FileMask", "BoxMask", "Record", "SkipLog", "LabelledCXR", "collate_labelled",
           "DataError"]

log = logging.getLogger("g2d.data")




class MaskSource(Protocol):
    """Produces a record's binary mask at the image's original size."""

    def __call__(self, hw: tuple[int, int]) -> np.ndarray:  # bool [H, W]
        ...


@dataclass(frozen=True)
class FileMask:
    """A mask stored as an image file; any non-zero pixel is foreground. Its size must match."""

    path: str

    def __call__(self, hw: tuple[int, int]) -> np.ndarray:
        m = read_image(self.path) > 0
        if m.shape != tuple(hw):
            raise ImageReadError(self.path, f"mask size {m.shape} differs from the image's {tuple(hw)}")
        return m


@dataclass(frozen=True)
class BoxMask:
    """Boxes filled into a mask (RSNA segmentation): pixel ``(y, x)`` is inside box ``(x1, y1, x2, y2)``
    when ``x1 <= x + 0.5 < x2`` and ``y1 <= y + 0.5 < y2`` (pixel centres, continuous box edges)."""

    boxes: tuple[tuple[float, float, float, float], ...]

    def __call__(self, hw: tuple[int, int]) -> np.ndarray:
        m = np.zeros(hw, dtype=bool)
        for x1, y1, x2, y2 in self.boxes:
            c0, c1 = max(0, math.ceil(x1 - 0.5)), min(hw[1], math.ceil(x2 - 0.5))
            r0, r1 = max(0, math.ceil(y1 - 0.5)), min(hw[0], math.ceil(y2 - 0.5))
            m[r0:r1, c0:c1] = True
        return m


@dataclass
class Record:
    """One image of a labelled set, before any pixel is read.

    Attributes:
        id: unique id within the set (SIIM ImageId, RSNA patientId, file name, ...).
        image: path of the image file.
        labels: float32 ``[K]`` (1 / 0, NaN = unknown) in the order of the set's ``tasks``.
        boxes: float32 ``[N, 4]`` ``x1, y1, x2, y2`` in the file's pixels (continuous edges).
        mask: produces the binary mask at the file's size; ``None`` when the set has no masks.
        patient: patient id, when the set has one (splits never put a patient in two splits).
        split: ``train`` / ``val`` / ``test`` when the source itself assigns one (``csv:`` tables).
        source: where the record came from, e.g. ``"train-rle.csv:12"``, for messages.
        extra: reader-specific fields (e.g. a prompt for grounding).
        label_hw: ``(H, W)`` of the pixel space the boxes and mask are given in, when the set
            declares one (RSNA and SIIM: the 1024 x 1024 DICOMs); ``None`` = the image file's own
            pixels. :func:`labels_at` rescales them to the image actually read.
    """

    id: str
    image: str
    labels: np.ndarray | None = None
    boxes: np.ndarray | None = None
    mask: MaskSource | None = None
    patient: str | None = None
    split: str | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    label_hw: tuple[int, int] | None = None




def parse_label_size(value: str | int | tuple[int, int] | None) -> tuple[int, int] | None:
    """A reader's ``label_size`` option -> ``(H, W)`` or ``None`` (the image's own pixels).

    Accepts ``None`` / ``"image"``, a side (``1024`` or ``"1024"``: square), ``"WxH"`` or ``(H, W)``.

    :raises DataError: anything else.
    """
    if value is None or value == "image":
        return None
    if isinstance(value, tuple):
        return int(value[0]), int(value[1])
    text = str(value).lower().strip()
    try:
        if "x" in text:
            w, h = (int(v) for v in text.split("x"))
        else:
            w = h = int(text)
    except ValueError:
        raise DataError(f"label_size={value!r}: use 'image', a side such as 1024, or WxH such as 2048x1536") from None
    if w <= 0 or h <= 0:
        raise DataError(f"label_size={value!r} must be positive")
    return h, w


#: Largest relative difference of the height and width scale factors still read as one resize.
ASPECT_TOLERANCE = 0.01


def labels_at(rec: Record, hw: tuple[int, int]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The record's boxes ``[N, 4]`` and mask (bool ``[H, W]``) in the pixels of the image read.

    Labels given in another pixel space (``rec.label_hw``, e.g. RSNA's 1024-px boxes on a 512-px PNG
    conversion) are rescaled: boxes by the two scale factors, masks drawn in their own space and
    resized with nearest neighbour. A box that partly leaves the image is clipped later with the
    crop; one wholly outside cannot be a label of this image.

    :raises LabelSpaceError: the label space has another aspect ratio than the image (a crop or a
        padded conversion, which cannot be undone), or a box lies wholly outside the image.
    """
    h, w = hw
    space: tuple[int, int] = (int(rec.label_hw[0]), int(rec.label_hw[1])) if rec.label_hw else (h, w)
    sy, sx = h / space[0], w / space[1]
    if abs(sy / sx - 1) > ASPECT_TOLERANCE:
        raise LabelSpaceError("label_space_mismatch",
                              f"labels are given for {space[1]}x{space[0]} px, the image is {w}x{h}: "
                              "another aspect ratio, so they cannot be rescaled")
    boxes = None
    if rec.boxes is not None:
        boxes = np.asarray(rec.boxes, np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32)
        outside = (boxes[:, 0] >= w) | (boxes[:, 1] >= h) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
        if outside.any():
            b = rec.boxes[int(np.flatnonzero(outside)[0])]
            raise LabelSpaceError("box_outside_image", f"box {[float(v) for v in b]} lies outside the "
                                  f"{w}x{h} image" + (f" (labels in {space[1]}x{space[0]} px)"
                                                       if rec.label_hw else ""))
    mask = None
    if rec.mask is not None:
        mask = np.asarray(rec.mask(space)).astype(bool)
        if space != (h, w):
            t = torch.from_numpy(mask.astype(np.uint8))[None]
            mask = TF.resize(t, [h, w], interpolation=InterpolationMode.NEAREST_EXACT,
                             antialias=False)[0].numpy().astype(bool)
    return boxes, mask


class SkipLog:
    """Counts and logs what a reader or a run dropped, by reason, naming file and row.

    Report text and patient ids are never passed here (privacy); use file names and row numbers.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter[str] = Counter()

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Record one dropped row/file: ``where`` is ``"file:row"`` or a path."""
        self.counts[reason] += 1
        log.warning("%s: skipped %s (%s)%s", self.name, where, reason, f": {detail}" if detail else "")

    def note(self, reason: str, where: str, detail: str = "") -> None:
        """Log a bad row without counting it: for readers whose unit is several rows (an MS-CXR
        phrase, a VinDr image), which count the dropped unit once, so that the share checked against
        ``max_skip_fraction`` is of units, not rows and units mixed."""
        log.warning("%s: bad row %s (%s)%s", self.name, where, reason, f": {detail}" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return f"{self.name}: nothing skipped"
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"{self.name}: skipped {self.total} ({reasons})"

    def check(self, considered: int, max_fraction: float) -> None:
        """Stop with :class:`DataError` when more than ``max_fraction`` of ``considered`` was lost."""
        if considered == 0:
            raise DataError(f"{self.name}: no usable rows")
        if self.total / considered > max_fraction:
            raise DataError(f"{self.name}: {self.total} of {considered} rows unusable "
                            f"({self.total / considered:.1%} > max_skip_fraction {max_fraction:.0%}): "
                            f"{dict(sorted(self.counts.items()))}")


def _resize_mask(mask: np.ndarray, geom: dict[str, Any]) -> Tensor:
    """bool ``[H, W]`` -> float ``[1, S, S]`` 0/1 with the image's resize + crop (nearest)."""
    return apply_geometry(torch.from_numpy(mask.astype(np.uint8))[None], geom, InterpolationMode.NEAREST_EXACT).float()


def boxes_to_output(boxes: np.ndarray | None, geom: dict[str, Any], min_side: float = 1.0) -> Tensor:
    """Boxes in file pixels -> output pixels (scaled, shifted by the crop, clipped to the crop).

    Boxes left with a side shorter than ``min_side`` output pixels (cropped away) are dropped.
    """
    if boxes is None or len(boxes) == 0:
        return torch.zeros(0, 4)
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4).clone()
    sy, sx = geom["scale_yx"]
    s = geom["crop_hw"][0]
    b[:, 0::2] = (b[:, 0::2] * sx - geom["crop_left"]).clamp(0, s)
    b[:, 1::2] = (b[:, 1::2] * sy - geom["crop_top"]).clamp(0, s)
    keep = ((b[:, 2] - b[:, 0]) >= min_side) & ((b[:, 3] - b[:, 1]) >= min_side)
    return b[keep]


class LabelledCXR(torch.utils.data.Dataset):
    """A labelled chest X-ray set with the sample layout of the module docstring.

    Args:
        name: set name for messages (``"siim"``, ``"rsna"``, ``"csv:my.csv"``...).
        records: the images, in a fixed order.
        tasks: label names, the order of ``Record.labels``.
        geometry: resize / crop applied to image, mask and boxes (augmentation is not applied here:
            downstream protocols evaluate and, in the paper, train on the deterministic geometry).
        skipped: what the reader dropped; decode errors met later are added to it.
        with_mask / with_boxes: whether samples carry ``mask`` / ``boxes`` (default: when any
            record has them).
    """

    def __init__(self, name: str, records: Sequence[Record], tasks: Sequence[str],
                 geometry: ImageTransformCfg | None = None, skipped: SkipLog | None = None,
                 with_mask: bool | None = None, with_boxes: bool | None = None) -> None:
        self.name = name
        self.records = list(records)
        self.tasks = list(tasks)
        self.geometry = geometry or ImageTransformCfg(resize=224, crop=224, augment="none", keep_aspect=False)
        self.skipped = skipped or SkipLog(name)
        ids = [r.id for r in self.records]
        if len(set(ids)) != len(ids):
            dup = [k for k, v in Counter(ids).items() if v > 1][:5]
            raise DataError(f"{name}: duplicated ids {dup} (merge them in the reader)")
        self.with_mask = any(r.mask is not None for r in self.records) if with_mask is None else with_mask
        self.with_boxes = any(r.boxes is not None for r in self.records) if with_boxes is None else with_boxes

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def labels(self) -> np.ndarray:
        """float32 ``[N, K]`` label matrix (NaN = unknown), without reading any image."""
        k = len(self.tasks)
        return np.stack([r.labels if r.labels is not None else np.full(k, np.nan, np.float32)
                         for r in self.records]) if self.records else np.zeros((0, k), np.float32)

    def subset(self, ids: Sequence[str], name: str | None = None) -> LabelledCXR:
        """The records with these ids, in the given order; unknown ids are an error (no silent subsetting)."""
        by_id = {r.id: r for r in self.records}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"{self.name}: {len(missing)} requested ids not in the set, e.g. {missing[:3]}")
        return LabelledCXR(name or self.name, [by_id[i] for i in ids], self.tasks, self.geometry,
                           self.skipped, self.with_mask, self.with_boxes)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        rec = self.records[i]
        try:
            img = read_image(rec.image)
            geom = eval_geometry(img.shape, self.geometry)
            x = apply_geometry(torch.from_numpy(img)[None], geom)
            out: dict[str, Any] = {"image": x.clamp(0, 1).contiguous(),
                                   "id": rec.id, "orig_hw": tuple(img.shape), "index": i}
            boxes, m = labels_at(rec, img.shape) if self.with_mask or self.with_boxes else (None, None)
            if self.with_mask:
                out["mask"] = _resize_mask(m if m is not None else np.zeros(img.shape, bool), geom)
        except ImageReadError as e:
            self.skipped.skip("unreadable_image", rec.source or rec.image, e.reason)
            return None
        except LabelSpaceError as e:
            self.skipped.skip(e.reason, rec.source or rec.image, str(e))
            return None
        k = len(self.tasks)
        lab = rec.labels if rec.labels is not None else np.full(k, np.nan, np.float32)
        out["labels"] = torch.as_tensor(np.asarray(lab, dtype=np.float32))
        if self.with_boxes:
            out["boxes"] = boxes_to_output(boxes, geom)
        return out


def collate_labelled(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Batch samples of :class:`LabelledCXR`, dropping unreadable ones (``None``; already logged).

    Returns ``None`` when every sample of the batch was unreadable. Tensors ``image``/``mask``/
    ``labels`` are stacked (``[B, 1, S, S]``, ``[B, K]``); ``boxes`` stays a list of ``[N_i, 4]``;
    ``id``/``orig_hw``/``index`` are lists.
    """
    items = [b for b in batch if b is not None]
    if not items:
        return None
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [b[key] for b in items]
        out[key] = torch.stack(vals) if key in ("image", "mask", "labels") else vals
    return out

