"""Image-report pairs listed in a CSV table (``csv:FILE`` in the CLI).

Bad rows are handled explicitly, never silently:

- at construction, rows whose text is empty, whitespace-only or NaN (or empty after cleaning), whose
  image path is empty, or whose image file does not exist are dropped; each is logged (CSV file name
  and 1-based data row, header excluded, blank lines not counted) and counted in
  :attr:`ImageTextPairs.skipped` by reason. If the dropped share exceeds ``max_skip_fraction`` the
  constructor raises :class:`~g2d.errors.DataError` with the counts (as every unusable table does:
  missing file or column, a ragged row, not UTF-8);
- an image that fails to decode when it is read (zero-byte, truncated, not an image) is logged,
  counted under ``"decode_error"`` and replaced by the next index ``(i + 1) % n`` (bounded number of
  tries), so DataLoader batches stay full.

Report text is never logged (privacy); only file names and row numbers are.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from g2d.data.images import read_image
from g2d.data.pretraining.text import clean_report, is_missing_text
from g2d.data.tables import read_table
from g2d.errors import DataError, ImageReadError

__all__ = ["PairsCfg", "ImageTextPairs", "collate_pairs"]

logger = logging.getLogger("g2d.data")

@dataclass(frozen=True)
class PairsCfg:
    """Where the pairs are and how to read them.

    Attributes:
        path: the CSV file (``.tsv`` files are read tab-separated unless ``delimiter`` is set).
        image_col: column holding image paths, relative to the image folder (absolute paths allowed).
        text_col: column holding the report text.
        split_col: optional column to filter rows on; must be given together with ``split``.
        split: keep only rows whose ``split_col`` equals this (after stripping whitespace). Rows of
            other splits are excluded, counted in ``n_other_split`` and not treated as skipped.
        max_skip_fraction: largest tolerated share of dropped rows (after the split filter).
        image_dir: folder the image paths are relative to, itself relative to the CSV's folder (or
            absolute); ``None`` means the CSV's folder. covid-notes needs ``"images"``.
        clean_text: apply :func:`g2d.data.pretraining.text.clean_report` to the text at construction; rows it
            leaves empty are dropped as ``"empty_after_cleaning"``. ``False`` keeps the raw text.
        delimiter: field separator; ``None`` -> tab for ``.tsv``, else comma.
        max_decode_retries: how many following indices to try when an image fails to decode.
    """

    path: str
    image_col: str = "image"
    text_col: str = "text"
    split_col: str | None = None
    split: str | None = None
    max_skip_fraction: float = 0.1
    image_dir: str | None = None
    clean_text: bool = True
    delimiter: str | None = None
    max_decode_retries: int = 16

    def __post_init__(self) -> None:
        if (self.split_col is None) != (self.split is None):
            raise ValueError("split_col and split must be given together (the row filter is explicit)")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.max_decode_retries < 1:
            raise ValueError(f"max_decode_retries must be >= 1, got {self.max_decode_retries}")


class _PackedStrings:
    """Strings stored as one UTF-8 byte buffer plus int64 offsets.

    Per-row Python ``str`` objects would have their refcounts touched by every forked DataLoader
    worker, copying the pages they live on (the copy-on-write growth open_clip warns about); two
    numpy arrays are never written to after construction.
    """

    def __init__(self, items: Sequence[str]) -> None:
        encoded = [s.encode("utf-8") for s in items]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        if encoded:
            np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        return self._data[lo:hi].tobytes().decode("utf-8")


class ImageTextPairs(torch.utils.data.Dataset):
    """Image-report pairs from a CSV table.

    ``dataset[i]`` is ``{"image": FloatTensor [1, S, S], "text": str, "index": int}``, where the
    image comes from ``transform(PIL.Image)``. ``index`` is the sample actually returned: it differs
    from ``i`` only when image ``i`` failed to decode and was replaced.

    Attributes:
        skipped: Counter of dropped rows by reason (``"empty_text"``, ``"nan_text"``,
            ``"empty_after_cleaning"``, ``"empty_image_path"``, ``"missing_image"``, and
            ``"decode_error"`` added while reading). Decode errors found inside DataLoader worker
            processes are counted in the worker's copy, not here; they are logged either way.
        n_rows: data rows in the CSV.
        n_other_split: rows excluded by the ``split_col``/``split`` filter.
        rows: int64 ``[n]``, 1-based CSV data row of each kept sample.
    """

    def __init__(self, cfg: PairsCfg, transform: Callable[[np.ndarray], Tensor]) -> None:
        self.cfg = cfg
        self.transform = transform
        self.skipped: Counter[str] = Counter()
        self._name = os.path.basename(cfg.path)

        # the one table reader, strict: a ragged row (an unbalanced quote) shifts no column silently
        header, rows_iter = read_table(cfg.path, strict=True, delimiter=cfg.delimiter, line_breaks=True)
        for col, role in ((cfg.image_col, "image"), (cfg.text_col, "text"), (cfg.split_col, "split")):
            if col is not None and col not in header:
                raise DataError(f"{cfg.path}: missing {role} column {col!r}; columns found: {header}")
        table = [(n, r.cells) for n, r in enumerate(rows_iter, 1)]

        csv_dir = os.path.dirname(os.path.abspath(cfg.path))
        base = os.path.join(csv_dir, cfg.image_dir) if cfg.image_dir else csv_dir
        if not os.path.isdir(base):
            raise DataError(f"{cfg.path}: image folder not found: {base}")

        self.n_rows = len(table)
        self.n_other_split = 0
        paths: list[str] = []
        texts: list[str] = []
        rows: list[int] = []
        for row, cells in table:
            if cfg.split_col is not None and cells[cfg.split_col] != cfg.split:
                self.n_other_split += 1
                continue
            raw = cells[cfg.text_col]
            text = ""
            reason: str | None = None
            if is_missing_text(raw):
                reason = "nan_text"
            elif not raw.strip():
                reason = "empty_text"
            else:
                text = clean_report(raw) if cfg.clean_text else raw
                if not text:
                    reason = "empty_after_cleaning"
            rel = cells[cfg.image_col]
            if reason is None and not rel:
                reason = "empty_image_path"
            image_path = os.path.join(base, rel)
            if reason is None and not os.path.isfile(image_path):
                reason = "missing_image"
            if reason is not None:
                self.skipped[reason] += 1
                # Never the text, nor folders (they may hold patient ids): file names and rows only.
                logger.warning("%s: data row %d skipped (%s)%s", self._name, row, reason,
                               f": {os.path.basename(image_path)}" if reason == "missing_image" else "")
                continue
            paths.append(image_path)
            texts.append(text)
            rows.append(row)

        if self.n_other_split:
            logger.info("%s: %d rows excluded by %s != %r", self._name, self.n_other_split,
                        cfg.split_col, cfg.split)
        considered = self.n_rows - self.n_other_split
        n_skipped = sum(self.skipped.values())
        if considered == 0:
            raise DataError(f"{cfg.path}: no data rows" + (
                f" with {cfg.split_col} == {cfg.split!r}" if cfg.split_col else ""))
        if not paths or n_skipped / considered > cfg.max_skip_fraction:
            raise DataError(
                f"{cfg.path}: {n_skipped} of {considered} rows unusable "
                f"({n_skipped / considered:.1%} > max_skip_fraction {cfg.max_skip_fraction:.1%}): "
                f"{dict(sorted(self.skipped.items()))}")

        self._paths = _PackedStrings(paths)
        self._texts = _PackedStrings(texts)
        self.rows = np.asarray(rows, dtype=np.int64)
        self._bad: set[int] = set()  # indices found undecodable in this process
        logger.info("%s", self.summary())

    def __len__(self) -> int:
        return len(self._paths)

    def image_path(self, i: int) -> str:
        """Resolved path of sample ``i``'s image."""
        return self._paths[i]

    def text(self, i: int) -> str:
        """Text of sample ``i`` (cleaned unless ``clean_text=False``)."""
        return self._texts[i]

    def _load(self, i: int) -> np.ndarray | None:
        """Image ``i`` through the package's one reader (:func:`g2d.data.images.read_image`: PNG, JPEG,
        TIFF, DICOM); ``None`` (logged, counted) if it cannot be read."""
        path = self._paths[i]
        try:
            return read_image(path)
        except ImageReadError as e:
            self._bad.add(i)
            self.skipped["decode_error"] += 1
            # not the error's message: it holds the full path (patient folders)
            cause = type(e.__cause__).__name__ if e.__cause__ is not None else "ImageReadError"
            logger.warning("%s: data row %d: image failed to decode (%s): %s", self._name,
                           int(self.rows[i]), cause, os.path.basename(path))
            return None

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        i %= n
        for k in range(min(self.cfg.max_decode_retries + 1, n)):
            j = (i + k) % n
            if j in self._bad:
                continue
            img = self._load(j)
            if img is None:
                continue
            return {"image": self.transform(img), "text": self._texts[j], "index": j, "requested": i}
        raise DataError(
            f"{self.cfg.path}: images of data rows {int(self.rows[i])} and the following "
            f"{min(self.cfg.max_decode_retries, n - 1)} samples all failed to decode")

    def note_served(self, requested: Iterable[int], served: Iterable[int]) -> None:
        """Record, in this process, the images a DataLoader worker found undecodable.

        Workers hold copies of the dataset, so their counts never reach the process that writes the
        run summary. A sample asked for as ``i`` and served from ``j`` proves every index from ``i`` up
        to ``j`` (cyclically, ``j`` excluded) undecodable.
        """
        n = len(self)
        for i, j in zip(requested, served):
            i, j = int(i), int(j)
            self.mark_bad((i + k) % n for k in range((j - i) % n))

    def mark_bad(self, indices: Iterable[int]) -> None:
        """Count each index not yet known undecodable once, as ``decode_error``."""
        for i in indices:
            if i not in self._bad:
                self._bad.add(int(i))
                self.skipped["decode_error"] += 1

    def bad_indices(self) -> set[int]:
        """Indices known undecodable in this process."""
        return set(self._bad)

    def summary(self) -> str:
        """One line: kept and skipped rows by reason."""
        kept = len(self._paths) if hasattr(self, "_paths") else 0
        considered = self.n_rows - self.n_other_split
        s = f"{self._name}: kept {kept} of {considered} rows"
        if self.cfg.split_col:
            s += f" with {self.cfg.split_col}={self.cfg.split!r} ({self.n_other_split} of other splits excluded)"
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        return s + (f"; skipped {total} ({reasons})" if total else "; skipped 0")


def collate_pairs(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate image-text samples (:class:`ImageTextPairs`, or any dataset whose items hold
    ``image``, ``text`` and ``index``, e.g. the synthetic set during pre-training).

    Returns:
        ``{"image": FloatTensor [B, 1, S, S], "text": list[str] (B), "index": LongTensor [B]}``,
        plus ``"requested": LongTensor [B]`` (the index asked for; differs from ``index`` where an
        undecodable image was replaced) when the samples carry it.
    """
    out = {
        "image": torch.stack([b["image"] for b in batch]),
        "text": [b["text"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
    }
    if "requested" in batch[0]:
        out["requested"] = torch.tensor([b["requested"] for b in batch], dtype=torch.long)
    return out
