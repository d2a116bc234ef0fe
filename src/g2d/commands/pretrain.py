"""``g2d pretrain``: pre-train G2D (single process or under torchrun); see docs/pretrain.md."""

from __future__ import annotations

import argparse
from typing import Any

from g2d.config import get_config, list_presets, load_config_file, parse_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pre-train G2D (single process or under torchrun)",
                       description="Pre-train G2D. Settings: --preset, then --config FILE, then "
                                   "key=value overrides, then the explicit flags below.")
    p.add_argument("--preset", default="paper", choices=list_presets())
    p.add_argument("--config", help="YAML or JSON file of settings (nested or dotted keys)")
    p.add_argument("--data", help="'synthetic', 'csv:FILE' (an image-text table) or 'mimic:DIR' "
                                   "(a store written by 'g2d prepare mimic')")
    p.add_argument("--image-col", help="image column of a csv: table (default 'image')")
    p.add_argument("--text-col", help="text column of a csv: table (default 'text')")
    p.add_argument("--image-dir", help="folder, relative to the CSV, that image paths are relative to")
    p.add_argument("--out", required=True, help="run folder (config, checkpoints, TensorBoard, export)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--resume", help="'latest' or a checkpoint path")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any config field, e.g. model.pool.heads=4 loss.negatives=local")
    p.set_defaults(run=_run, takes_overrides=True)


def _pretrain_config(args: argparse.Namespace):
    overrides: dict[str, Any] = {}
    if args.config:
        overrides.update(load_config_file(args.config))
    overrides.update(parse_overrides(args.overrides))
    explicit = {"data.spec": args.data, "data.image_col": args.image_col, "data.text_col": args.text_col,
                "data.image_dir": args.image_dir, "train.epochs": args.epochs,
                "train.max_steps": args.max_steps, "train.batch_size": args.batch_size}
    overrides.update({k: v for k, v in explicit.items() if v is not None})
    return get_config(args.preset, overrides)


def _run(args: argparse.Namespace) -> int:
    from g2d.train.loop import pretrain

    result = pretrain(_pretrain_config(args), args.out, resume=args.resume, progress=not args.no_progress,
                      device=args.device)
    if result.export_dir is not None:
        print(f"trained {result.steps} steps; model exported to {result.export_dir}")
    return 0
