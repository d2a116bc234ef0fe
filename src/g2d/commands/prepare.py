"""``g2d prepare mimic``: build the pre-training image-text store from MIMIC-CXR-JPG (docs/prepare.md)."""

from __future__ import annotations

import argparse
import json


def _csv_list(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _add_mimic(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mimic", help="MIMIC-CXR-JPG + reports -> sharded store for --data mimic:DIR",
                       description="Reads the official MIMIC-CXR-JPG files and reports, keeps frontal "
                                   "views of the chosen splits with a FINDINGS or IMPRESSION section, "
                                   "resizes every image once and writes WebDataset tar shards, an index, "
                                   "manifest.csv.gz and report.json/.md. Resumable: rerun the same "
                                   "command to finish an interrupted run.")
    p.add_argument("--root", required=True, help="MIMIC-CXR-JPG folder (split/metadata csv.gz and files/)")
    p.add_argument("--reports", required=True, help="mimic-cxr-reports.zip or a folder holding files/")
    p.add_argument("--out", required=True, help="store folder (use it as --data mimic:OUT)")
    p.add_argument("--splits", type=_csv_list, default=("train",), help="official splits to store (default train)")
    p.add_argument("--views", type=_csv_list, default=("PA", "AP"), help="ViewPosition values kept (default PA,AP)")
    p.add_argument("--min-tokens", type=int, default=3, help="drop texts with fewer word tokens (default 3)")
    p.add_argument("--text", dest="text_recipe", choices=("paper", "release"), default="paper",
                   help="'paper': cleaned FINDINGS + IMPRESSION; 'release': the released code's recipe")
    p.add_argument("--image-size", type=int, default=256, help="shorter side of stored images (default 256)")
    p.add_argument("--format", dest="image_format", choices=("jpg", "png"), default="jpg",
                   help="stored image format: jpg (default, quality 95, 4:4:4) or png (lossless, ~2x "
                        "larger and slower to decode)")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--shard-size", type=int, default=1000, help="images per tar shard (default 1000)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_mimic)


def run_mimic(args: argparse.Namespace) -> int:
    """Run ``g2d prepare mimic``; prints the report's counts. Exit code 0."""
    from g2d.data.pretraining.mimic import MimicPrepareCfg, prepare_mimic

    cfg = MimicPrepareCfg(root=args.root, reports=args.reports, out=args.out, splits=args.splits,
                          views=args.views, min_tokens=args.min_tokens, text_recipe=args.text_recipe,
                          image_size=args.image_size, image_format=args.image_format,
                          jpeg_quality=args.jpeg_quality, shard_size=args.shard_size, workers=args.workers,
                          progress=not args.no_progress)
    report = prepare_mimic(cfg)
    print(f"kept {json.dumps(report['kept'])} of {report['rows']} rows; dropped "
          f"{json.dumps({k: v for k, v in report['dropped'].items() if v})}")
    print(f"wrote {args.out}/manifest.csv.gz and {args.out}/report.md; use --data mimic:{args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``prepare`` (with sub-command ``mimic``) to the ``g2d`` sub-parsers."""
    p = sub.add_parser("prepare", help="prepare pre-training data", description=__doc__)
    kinds = p.add_subparsers(dest="kind", required=True)
    _add_mimic(kinds)
