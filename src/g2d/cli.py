"""Command line: ``g2d pretrain``, ``g2d demo`` and the commands of :mod:`g2d.commands`
(also as ``python -m g2d``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from g2d.config import get_config, list_presets, load_config_file, parse_overrides
from g2d.errors import ConfigError, DataError

# Each module has ``register(subparsers)``; its parsers set ``run=callable(args) -> exit code``.
COMMAND_MODULES: tuple[str, ...] = ("g2d.commands.prepare", "g2d.commands.evaluate", "g2d.commands.infer",
                                     "g2d.commands.figure", "g2d.commands.reproduce")


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
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


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="pre-train the tiny preset on synthetic data and evaluate it",
                       description="Runs the whole pre-training path on the embedded synthetic data "
                                   "on CPU and compares G2D with decoder-free pre-training and random "
                                   "initialisation.")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per pre-training run")
    p.add_argument("--train-samples", type=int, default=None)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--downstream-train", type=int, default=None,
                   help="synthetic images per downstream set (0 skips the downstream protocols)")
    p.add_argument("--downstream-epochs", type=int, default=None, help="segmentation epochs (detection: at most 4)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="g2d", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pretrain(sub)
    _add_demo(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow later options (argparse stops a positional list there)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and args.command != "pretrain"):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "pretrain":
            from g2d.train.loop import pretrain

            cfg = _pretrain_config(args)
            result = pretrain(cfg, args.out, resume=args.resume, progress=not args.no_progress,
                              device=args.device)
            if result.export_dir is not None:
                print(f"trained {result.steps} steps; model exported to {result.export_dir}")
        elif args.command == "demo":
            from g2d.demo import run_demo

            kwargs = {k: v for k, v in {"steps": args.steps, "train_samples": args.train_samples,
                                        "eval_samples": args.eval_samples,
                                        "downstream_train": args.downstream_train,
                                        "downstream_epochs": args.downstream_epochs}.items() if v is not None}
            results = run_demo(args.out, device=args.device, seed=args.seed, **kwargs)
            print(results["markdown"])
        else:
            return args.run(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        # Bad input is a one-line message; --verbose shows the traceback.
        if args.verbose:
            raise
        print(f"g2d {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from g2d.errors import CheckpointWriteError
        from g2d.train.distributed import world_info_from_env
        from g2d.train.loop import NonFiniteLossError

        if isinstance(err, (CheckpointWriteError, NonFiniteLossError)) and not args.verbose:
            # the run cannot go on (no checkpoints / diverged); the last checkpoint is intact
            print(f"g2d {args.command}: error: {err}", file=sys.stderr)
            return 1
        # Under torchrun every rank prints this, so the log says which rank failed first and why.
        print(f"g2d {args.command}: rank {world_info_from_env()[0]}: fatal: {type(err).__name__}: "
              f"{' '.join(str(err).split())[:500]}", file=sys.stderr, flush=True)
        raise
    return 0
