"""Pre-training loader: the prepared store vs decoding the original JPEGs every step.

Writes ``--distinct`` synthetic chest-X-ray-like JPEGs (sides drawn from 512-1024 px) to a temporary
folder and hard-links them to 1k / 4k / 16k file names (a growing data set without the disk cost),
builds the store for each size with the library's writer, then measures, each in a fresh process:

- loader throughput per DataLoader worker (``num_workers=1``, batch 32, the paper's training
  transform, random sample order), for ``csv:`` (ImageTextPairs decoding the original JPEG) and
  ``mimic:``-style (ShardedPairs reading the store);
- peak RSS of the main process and of the worker.

Also prints the store's bytes per image and encode/decode cost for PNG vs JPEG (quality 95).
Files are in the page cache in both modes, so the throughput is decode + transform cost, not disk.

Usage: ``PYTHONPATH=src python benchmarks/bench_loader.py [--sizes 1000,4000,16000] [--read 320]``
(about 3-5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _fake_cxr(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth body-like blob with ribs-like stripes and noise (JPEG-compresses like a radiograph)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.45, 0.55), w * rng.uniform(0.45, 0.55)
    body = np.exp(-(((y - cy) / (0.45 * h)) ** 2 + ((x - cx) / (0.4 * w)) ** 2) ** 2)
    ribs = 0.15 * np.sin(y / rng.uniform(12, 20)) * body
    img = 0.8 * body + ribs + rng.normal(0, 0.03, (h, w))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_sources(folder: Path, distinct: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(distinct):
        h, w = int(rng.integers(512, 1025)), int(rng.integers(512, 1025))
        p = folder / f"src{k:03d}.jpg"
        Image.fromarray(_fake_cxr(rng, h, w), "L").save(p, quality=95)
        paths.append(p)
    return paths


def make_dataset(root: Path, sources: list[Path], n: int, fmt: str, shard_size: int = 1000) -> None:
    """``root/table.csv`` + ``root/img/*.jpg`` (hard links) and the store ``root/store``."""
    from g2d.data.pretraining.shards import encode_image, finalize_store, write_shard

    (root / "img").mkdir(parents=True)
    with open(root / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "text"])
        for i in range(n):
            name = f"img/{i:06d}.jpg"
            os.link(sources[i % len(sources)], root / name)
            w.writerow([name, f"Report {i}. No acute cardiopulmonary process. Heart size is normal."])
    encoded = [encode_image(p, 256, fmt)[0] for p in sources]  # each distinct image decoded once
    (root / "store" / "shards").mkdir(parents=True)
    names = []
    for s in range(0, n, shard_size):
        name = f"train-{s // shard_size:06d}.tar"
        names.append(name)
        write_shard(root / "store" / "shards" / name,
                    [(f"k{i:06d}", encoded[i % len(encoded)], fmt, f"Report {i}. No acute process.", {})
                     for i in range(s, min(n, s + shard_size))])
    finalize_store(root / "store", "train", names)


def measure(root: str, mode: str, read: int) -> dict[str, float]:
    """Run in a fresh process: images/s with one worker and peak RSS (MiB)."""
    import torch
    from torch.utils.data import DataLoader

    from g2d.data.pretraining.pairs import ImageTextPairs, PairsCfg, collate_pairs
    from g2d.data.pretraining.shards import ShardedPairs
    from g2d.data.transforms import ImageTransformCfg, build_transform

    torch.set_num_threads(1)
    tf = build_transform(ImageTransformCfg(resize=256, crop=224, augment="paper"), train=True)
    if mode == "jpeg":
        ds = ImageTextPairs(PairsCfg(str(Path(root) / "table.csv")), tf)
    else:
        ds = ShardedPairs(Path(root) / "store", "train", transform=tf)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:read].tolist()
    loader = DataLoader(ds, batch_size=32, sampler=order, num_workers=1, collate_fn=collate_pairs,
                        prefetch_factor=2)
    it = iter(loader)
    next(it)  # worker start-up excluded
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += batch["image"].shape[0]
    dt = time.perf_counter() - t0
    del it, loader
    kib = 1024.0  # ru_maxrss is in KiB on Linux
    return {"img_per_s": n / dt,
            "rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
            "rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib}


def format_costs(sources: list[Path]) -> list[str]:
    from g2d.data.pretraining.shards import encode_image

    rows = ["| stored format | KiB / image | prepare ms / image (decode+resize+encode) | decode ms / image |",
            "|---|---:|---:|---:|"]
    for fmt in ("png", "jpg"):
        t0 = time.perf_counter()
        blobs = [encode_image(p, 256, fmt)[0] for p in sources]
        enc = (time.perf_counter() - t0) / len(sources)
        t0 = time.perf_counter()
        for _ in range(5):
            for b in blobs:
                Image.open(io.BytesIO(b)).load()
        dec = (time.perf_counter() - t0) / (5 * len(blobs))
        rows.append(f"| {fmt} | {np.mean([len(b) for b in blobs]) / 1024:.1f} | {1000 * enc:.1f} | {1000 * dec:.2f} |")
    t0 = time.perf_counter()
    for p in sources:
        Image.open(p).load()
    rows.append(f"| (original JPEG, full decode) | {np.mean([p.stat().st_size for p in sources]) / 1024:.1f} | - | "
                f"{1000 * (time.perf_counter() - t0) / len(sources):.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,4000,16000")
    ap.add_argument("--distinct", type=int, default=64, help="distinct source JPEGs (hard-linked to N names)")
    ap.add_argument("--read", type=int, default=320, help="samples read per measurement")
    ap.add_argument("--measure", nargs=3, metavar=("ROOT", "MODE", "READ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], int(args.measure[2]))))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="g2d-bench-loader-") as tmp:
        sources = make_sources(Path(tmp) / "src", args.distinct)
        print(f"{len(sources)} distinct JPEGs, {args.read} samples read per row, 1 DataLoader worker, "
              f"batch 32, paper train transform (resize 256, crop 224, perspective + autocontrast), "
              f"{os.cpu_count()} CPU cores\n")
        print("\n".join(format_costs(sources)) + "\n")
        rows = ["| samples | reader | images/s per worker | peak RSS main (MiB) | peak RSS worker (MiB) |",
                "|---:|---|---:|---:|---:|"]
        for n in sizes:
            root = Path(tmp) / f"n{n}"
            for fmt in ("jpg", "png"):
                make_dataset(root / fmt, sources, n, fmt)
            for mode, fmt, label in (("jpeg", "jpg", "csv: original JPEG each step"),
                                     ("store", "jpg", "mimic: store, jpg q95"), ("store", "png", "mimic: store, png")):
                out = subprocess.run([sys.executable, __file__, "--measure", str(root / fmt), mode, str(args.read)],
                                     check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                rows.append(f"| {n} | {label} | {r['img_per_s']:.1f} | {r['rss_main_mib']:.0f} | "
                            f"{r['rss_worker_mib']:.0f} |")
                print(rows[-1], flush=True)
        print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
