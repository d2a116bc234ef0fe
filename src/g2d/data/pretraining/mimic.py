"""MIMIC-CXR(-JPG) to an image-text store for pre-training (``g2d prepare mimic``).

Inputs (the official PhysioNet files):

- ``ROOT/mimic-cxr-2.0.0-split.csv.gz`` (``dicom_id, study_id, subject_id, split``),
- ``ROOT/mimic-cxr-2.0.0-metadata.csv.gz`` (``dicom_id, ..., ViewPosition, ...``),
- ``ROOT/files/pXX/pYYYYYYYY/sZZZZZZZZ/<dicom_id>.jpg``,
- reports ``files/pXX/pYYYYYYYY/sZZZZZZZZ.txt`` from ``mimic-cxr-reports.zip`` (any folder prefix
  inside the zip) or from a folder holding ``files/``.

Rules, in the order they are applied (each dropped image is counted under its reason in
``report.json``):

1. ``other_split``: ``split`` not in ``splits`` (default: ``train`` only, the official split;
   excluded rather than dropped);
2. ``no_metadata``: the dicom_id is missing from the metadata table;
3. ``not_frontal``: ``ViewPosition`` not in ``views`` (default ``PA``, ``AP``: the frontal views, as
   MGCA's preprocessing which the paper follows; laterals, ``LL``, ``AP AXIAL``, ... are dropped);
   ``no_view``: an empty ``ViewPosition`` (no view recorded), dropped too and counted apart;
4. ``no_report``: no report file for the study;
5. ``no_findings_or_impression``: the report has neither section (:func:`g2d.data.pretraining.text.extract_sections`);
   a report with only one of them uses that one;
6. ``too_few_tokens``: fewer than ``min_tokens`` (3, MGCA) word tokens in the final text;
7. ``missing_image``: the JPEG does not exist;
8. ``corrupt_image``: it exists but does not decode (named in the report and the log; never fatal).

Text (``text_recipe``): ``"paper"`` = cleaned FINDINGS then IMPRESSION
(:func:`g2d.data.pretraining.text.pretrain_text`); ``"release"`` = the released code's ``release_text``.

The work is split into shards of ``shard_size`` images processed in parallel; a shard whose tar and
sidecar exist with the same inputs and settings is not redone, so an interrupted run resumes and a
repeated run is a no-op (idempotent).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from g2d.data.pretraining.shards import (
    IMAGE_FORMATS,
    STORE_VERSION,
    encode_image,
    finalize_store,
    read_sidecar,
    write_shard,
)
from g2d.data.pretraining.text import count_tokens, extract_sections, pretrain_text
from g2d.data.tables import read_table
from g2d.errors import DataError
from g2d.fingerprint import file_stamp

__all__ = ["MimicPrepareCfg", "prepare_mimic", "ReportSource", "SPLIT_FILE", "METADATA_FILE", "DROP_REASONS"]

logger = logging.getLogger("g2d.data")

SPLIT_FILE = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv.gz"
DROP_REASONS = ("other_split", "no_metadata", "not_frontal", "no_view", "no_report", "no_findings_or_impression",
                "too_few_tokens", "missing_image", "corrupt_image")
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
_REPORT_MEMBER = re.compile(r"(?:^|/)files/p\d\d/p(\d+)/s(\d+)\.txt$")


@dataclass
class MimicPrepareCfg:
    """Settings of ``g2d prepare mimic`` (documented in docs/prepare.md)."""

    root: str
    reports: str
    out: str
    splits: tuple[str, ...] = ("train",)
    views: tuple[str, ...] = ("PA", "AP")
    min_tokens: int = 3
    text_recipe: str = "paper"
    image_size: int = 256
    image_format: str = "jpg"  # see docs/prepare.md for the PNG/JPEG measurements
    jpeg_quality: int = 95
    shard_size: int = 1000
    workers: int | None = None  # None: all CPU cores
    progress: bool = True

    def __post_init__(self) -> None:
        self.splits, self.views = tuple(self.splits), tuple(self.views)
        if self.image_format not in IMAGE_FORMATS:
            raise DataError(f"image format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.text_recipe not in ("paper", "release"):
            raise DataError(f"text recipe must be 'paper' or 'release', got {self.text_recipe!r}")
        if self.shard_size < 1 or self.image_size < 8 or self.min_tokens < 0:
            raise DataError("shard_size >= 1, image_size >= 8 and min_tokens >= 0 are required")

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change the stored bytes (a store built with others is not resumed)."""
        keys = ("splits", "views", "min_tokens", "text_recipe", "image_size", "image_format",
                "jpeg_quality", "shard_size")
        values = {k: getattr(self, k) for k in keys}
        return {"version": STORE_VERSION, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _read_gz_table(path: Path, needed: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows ``(data_row, {column: value})`` of a gzipped CSV (:func:`g2d.data.tables.read_table`);
    DataError naming missing columns or an unreadable file."""
    if not path.is_file():
        raise DataError(f"{path}: not found (expected the official MIMIC-CXR-JPG file)")
    try:
        header, rows = read_table(path)
        missing = [c for c in needed if c not in header]
        if missing:
            raise DataError(f"{path.name}: missing columns {missing}; found {header}")
        for n, row in enumerate(rows, 1):
            yield n, row.cells
    except (OSError, EOFError) as e:
        raise DataError(f"{path.name}: cannot read ({type(e).__name__}: {e})") from None


class ReportSource:
    """Report texts by ``(subject_id, study_id)`` from ``mimic-cxr-reports.zip`` or a folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        if self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile as e:
                raise DataError(f"{self.path}: not a zip file ({e})") from None
            for name in self._zip.namelist():
                m = _REPORT_MEMBER.search(name)
                if m:
                    self._members[m.group(2)] = name
            if not self._members:
                raise DataError(f"{self.path}: no files/pXX/pYYYYYYYY/sZZZZZZZZ.txt reports inside")
        elif self.path.is_dir():
            base = self.path
            if not (base / "files").is_dir() and (base / "mimic-cxr-reports" / "files").is_dir():
                base = base / "mimic-cxr-reports"
            if not (base / "files").is_dir():
                raise DataError(f"{self.path}: no files/ folder of reports")
            self._base = base
        else:
            raise DataError(f"reports not found: {self.path}")

    def read(self, subject_id: str, study_id: str) -> str | None:
        """The report text, ``None`` if the study has none (or it is unreadable: logged)."""
        try:
            if self._zip is not None:
                name = self._members.get(study_id)
                return None if name is None else self._zip.read(name).decode("utf-8", errors="replace")
            p = self._base / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}.txt"
            return p.read_text(encoding="utf-8", errors="replace") if p.is_file() else None
        except (OSError, zipfile.BadZipFile, zlib.error) as e:
            logger.warning("report of study file s%s.txt unreadable (%s)", study_id, type(e).__name__)
            return None


def _image_rel(subject_id: str, study_id: str, dicom_id: str) -> str:
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


# --------------------------------------------------------------------------------------------------
# Work per shard (runs in worker processes)
# --------------------------------------------------------------------------------------------------


def _shard_hash(rows: list[dict[str, Any]], fingerprint: dict[str, Any], root: str) -> str:
    """A shard is rebuilt when its settings, rows, report texts or any image file (absolute path,
    size, mtime: one replaced in place, or another --root) changed."""
    h = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode())
    for r in rows:
        h.update(json.dumps([r["dicom_id"], r["image"], r["text"], file_stamp(Path(root) / r["image"])]).encode())
    return h.hexdigest()


def _build_shard(tar_path: str, root: str, rows: list[dict[str, Any]], cfg: dict[str, Any],
                 digest: str) -> dict[str, Any]:
    corrupt: list[str] = []

    def samples() -> Iterator[tuple[str, bytes, str, str, dict[str, Any]]]:
        for r in rows:
            try:
                data, (h0, w0) = encode_image(Path(root) / r["image"], cfg["image_size"], cfg["image_format"],
                                              cfg["jpeg_quality"])
            except _DECODE_ERRORS as e:
                corrupt.append(r["image"])
                # the file name (dicom_id) only: the folders are patient and study ids
                logger.warning("corrupt image skipped (%s): %s", type(e).__name__, Path(r["image"]).name)
                continue
            meta = {k: r[k] for k in ("dicom_id", "subject_id", "study_id", "split", "view", "image")}
            meta.update(orig_h=h0, orig_w=w0)
            yield r["dicom_id"], data, cfg["image_format"], r["text"], meta

    side = write_shard(tar_path, samples(), extra={"hash": digest, "corrupt": corrupt})
    return side


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


def _select(cfg: MimicPrepareCfg, counts: Counter[str]) -> list[dict[str, Any]]:
    """Kept rows (before image decoding), in the split table's order; fills ``counts``."""
    root = Path(cfg.root)
    views: dict[str, str] = {}
    for _, r in _read_gz_table(root / METADATA_FILE, ("dicom_id", "ViewPosition")):
        views[r["dicom_id"]] = (r["ViewPosition"] or "").strip()
    reports = ReportSource(cfg.reports)
    texts: dict[str, tuple[str | None, str]] = {}  # study_id -> (text or None, drop reason)
    kept: list[dict[str, Any]] = []
    table = list(_read_gz_table(root / SPLIT_FILE, ("dicom_id", "study_id", "subject_id", "split")))
    bar = _bar(cfg.progress, len(table), "reports", "row")
    for n, r in table:
        bar.update(1)
        dicom, study, subject, split = (r["dicom_id"].strip(), r["study_id"].strip(),
                                        r["subject_id"].strip(), r["split"].strip())
        counts["rows"] += 1
        if split not in cfg.splits:
            counts["other_split"] += 1
            continue
        view = views.get(dicom)
        if view is None:
            counts["no_metadata"] += 1
            logger.warning("%s: data row %d: dicom_id not in %s", SPLIT_FILE, n, METADATA_FILE)
            continue
        if view not in cfg.views:
            # an empty ViewPosition (a missing view) is counted apart from a lateral or another view
            counts["not_frontal" if view else "no_view"] += 1
            continue
        if study not in texts:
            texts[study] = _study_text(reports.read(subject, study), cfg)
        text, reason = texts[study]
        if text is None:
            counts[reason] += 1
            continue
        rel = _image_rel(subject, study, dicom)
        if not (root / rel).is_file():
            counts["missing_image"] += 1
            logger.warning("%s: data row %d: image missing: %s", SPLIT_FILE, n, Path(rel).name)
            continue
        kept.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "split": split,
                     "view": view, "image": rel, "text": text})
    bar.close()
    return kept


def _study_text(report: str | None, cfg: MimicPrepareCfg) -> tuple[str | None, str]:
    if report is None:
        return None, "no_report"
    sec = extract_sections(report)
    findings, impression = sec.get("findings"), sec.get("impression")
    if not findings and not impression:
        return None, "no_findings_or_impression"
    text = pretrain_text(findings, impression, cfg.text_recipe)
    if count_tokens(text) < max(cfg.min_tokens, 1):
        return None, "too_few_tokens"
    return text, ""


def _bar(enabled: bool, total: int, desc: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def prepare_mimic(cfg: MimicPrepareCfg) -> dict[str, Any]:
    """Build (or finish, or verify) the store at ``cfg.out``.

    Returns:
        the report: ``{"rows", "kept": {split: n}, "dropped": {reason: n}, "corrupt_images": [...],
        "settings": {...}}`` (also written to ``OUT/report.json`` and ``OUT/report.md``).
    """
    out = Path(cfg.out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    fp = cfg.fingerprint()
    settings_file = out / "prepare.json"
    if settings_file.is_file():
        old = json.loads(settings_file.read_text())
        if old != fp:
            raise DataError(f"{out} was prepared with other settings ({settings_file}); use a new --out")
    else:
        settings_file.write_text(json.dumps(fp, indent=1))

    counts: Counter[str] = Counter()
    kept = _select(cfg, counts)
    by_split: dict[str, list[dict[str, Any]]] = {s: [r for r in kept if r["split"] == s] for s in cfg.splits}
    enc = {"image_size": cfg.image_size, "image_format": cfg.image_format, "jpeg_quality": cfg.jpeg_quality}

    jobs: list[tuple[str, list[dict[str, Any]], str]] = []
    tar_names: dict[str, list[str]] = {}
    done = 0
    for split, rows in by_split.items():
        names = []
        for k in range(0, len(rows), cfg.shard_size):
            chunk = rows[k:k + cfg.shard_size]
            name = f"{split}-{k // cfg.shard_size:06d}.tar"
            names.append(name)
            digest = _shard_hash(chunk, fp, cfg.root)
            side = read_sidecar(out / "shards" / name)
            if side is not None and side.get("hash") == digest:
                done += len(chunk)
                continue
            jobs.append((name, chunk, digest))
        tar_names[split] = names
    if done:
        logger.info("%s: %d images already in finished shards, %d shards to do", out, done, len(jobs))

    workers = cfg.workers or os.cpu_count() or 1
    bar = _bar(cfg.progress, sum(len(c) for _, c, _ in jobs), "images", "img")
    if jobs and workers > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = {pool.submit(_build_shard, str(out / "shards" / name), cfg.root, chunk, enc, digest): chunk
                       for name, chunk, digest in jobs}
            for fut in as_completed(futures):
                fut.result()
                bar.update(len(futures[fut]))
    else:
        for name, chunk, digest in jobs:
            _build_shard(str(out / "shards" / name), cfg.root, chunk, enc, digest)
            bar.update(len(chunk))
    bar.close()

    corrupt: list[str] = []
    stored: dict[str, set[str]] = {}
    kept_counts: dict[str, int] = {}
    for split, names in tar_names.items():
        stored[split] = set()
        for name in names:
            side = read_sidecar(out / "shards" / name)
            assert side is not None
            corrupt.extend(side.get("corrupt", []))
            stored[split].update(side["keys"])
        index = finalize_store(out, split, names)
        kept_counts[split] = len(index)
    counts["corrupt_image"] = len(corrupt)
    _write_manifest(out, kept, stored)

    report: dict[str, Any] = {"rows": counts["rows"], "kept": kept_counts,
              "dropped": {r: counts[r] for r in DROP_REASONS}, "corrupt_images": sorted(corrupt),
              "settings": asdict(cfg)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_report_md(report))
    logger.info("%s: kept %s of %d rows; dropped %s", out, kept_counts, counts["rows"],
                {k: v for k, v in report["dropped"].items() if v})
    return report


_MANIFEST_COLUMNS = ("key", "split", "dicom_id", "subject_id", "study_id", "view", "image", "text")


def _write_manifest(out: Path, kept: list[dict[str, Any]], stored: dict[str, set[str]]) -> None:
    """``manifest.csv.gz``: one row per stored image, written last (marks the store complete)."""
    tmp = out / "manifest.csv.gz.tmp"
    # mtime=0: byte-identical manifest on a repeated run
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
            io.TextIOWrapper(gz, encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(_MANIFEST_COLUMNS)
        for r in kept:
            if r["dicom_id"] in stored.get(r["split"], ()):
                w.writerow([r["dicom_id"], *(r[c] for c in _MANIFEST_COLUMNS[1:])])
    os.replace(tmp, out / "manifest.csv.gz")


def _report_md(report: dict[str, Any]) -> str:
    lines = ["# MIMIC-CXR preparation report", "", f"Rows in the split table: {report['rows']}", "",
             "| split | images kept |", "|---|---:|"]
    lines += [f"| {s} | {n} |" for s, n in report["kept"].items()]
    lines += ["", "| reason | images dropped |", "|---|---:|"]
    lines += [f"| {r} | {n} |" for r, n in report["dropped"].items()]
    if report["corrupt_images"]:
        lines += ["", "Corrupt images (skipped):", ""] + [f"- {p}" for p in report["corrupt_images"]]
    return "\n".join(lines) + "\n"
