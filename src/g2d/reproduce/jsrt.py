"""The JSRT tables of the ``shared`` scale: ``csv:`` tables of lungs, heart and clavicles with the shipped
image-level split, and a phrase table naming each SCR structure (phrase grounding)."""

from __future__ import annotations

import csv
from pathlib import Path

from g2d.data.tables import read_table
from g2d.reproduce.spec import EXPERIMENT_DIR

__all__ = ["prepare_jsrt", "ANATOMY_PHRASES"]

# SCR structure -> phrase. Laterality is the patient's (SCR's): the left lung is on the image's right.
ANATOMY_PHRASES = {"heart": "the heart", "left_lung": "the left lung", "right_lung": "the right lung",
                   "left_clavicle": "the left clavicle", "right_clavicle": "the right clavicle"}


def prepare_jsrt(shared: str | Path, out: str | Path) -> dict[str, Path]:
    """Write ``csv:`` tables for JSRT lungs, heart and clavicles with the shipped image-level split
    (``g2d/experiments/jsrt_split.csv``, seeded 70/15/15). Paths are absolute, so the tables can live
    anywhere. Returns ``{"jsrt-lungs": path, "jsrt-heart": path, "jsrt-clavicles": path, "jsrt-phrases": path}``;
    ``jsrt-phrases`` has one row per image and structure (:data:`ANATOMY_PHRASES`: ``id``, ``prompt``,
    ``finding``, the structure's mask)."""
    root = Path(shared).expanduser().resolve() / "jsrt"  # the reader takes relative paths from the table's folder
    if not (root / "images").is_dir():
        raise FileNotFoundError(f"JSRT images not found under {root}")
    _, rows = read_table(EXPERIMENT_DIR / "jsrt_split.csv", ("image", "split"))
    split = {r.cells["image"]: r.cells["split"] for r in rows}
    structures = {"jsrt-lungs": ("left_lung", "right_lung"), "jsrt-heart": ("heart",),
                  "jsrt-clavicles": ("left_clavicle", "right_clavicle")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, parts in structures.items():
        path = out / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["image", "mask", "split"])
            for img, s in sorted(split.items()):
                masks = ";".join(str(root / "masks" / p / img) for p in parts)
                w.writerow([str(root / "images" / img), masks, s])
        written[name] = path
    path = out / "jsrt-phrases.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "image", "mask", "prompt", "finding", "split"])
        for img, s in sorted(split.items()):
            for part, phrase in ANATOMY_PHRASES.items():
                w.writerow([f"{img}/{part}", str(root / "images" / img), str(root / "masks" / part / img), phrase,
                            part, s])
    written["jsrt-phrases"] = path
    return written
