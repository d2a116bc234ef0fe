"""Command line (also ``python -m g2d``): assembles the subcommands of :mod:`g2d.commands` (one module
each, with ``register(subparsers)``) and turns bad input into a one-line error."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from g2d.errors import ConfigError, DataError, ImageReadError

# Each module has ``register(subparsers)``; its parsers set ``run=callable(args) -> exit code``.
COMMAND_MODULES: tuple[str, ...] = ("g2d.commands.pretrain", "g2d.commands.demo", "g2d.commands.prepare",
                                     "g2d.commands.evaluate", "g2d.commands.infer", "g2d.commands.figure",
                                     "g2d.commands.reproduce", "g2d.commands.push",
                                     "g2d.commands.app")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="g2d", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow later options (argparse stops a positional list there)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not getattr(args, "takes_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `g2d eval segmentation`, `g2d figure grounding`, `g2d prepare ...`: the command as typed
    name = " ".join(str(v) for v in (args.command, getattr(args, "task", None) or getattr(args, "kind", None)) if v)
    try:
        return args.run(args)
    except (ConfigError, DataError, ValueError, ImageReadError, FileNotFoundError, FileExistsError,
            IsADirectoryError, NotADirectoryError, PermissionError) as err:
        # Bad input (paths included) is a one-line message; --verbose shows the traceback.
        if args.verbose:
            raise
        print(f"g2d {name}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from g2d.errors import CheckpointWriteError, NonFiniteLossError
        from g2d.train.distributed import world_info_from_env

        if isinstance(err, (CheckpointWriteError, NonFiniteLossError)) and not args.verbose:
            # the run cannot go on (no checkpoints / diverged); the last checkpoint is intact
            print(f"g2d {name}: error: {err}", file=sys.stderr)
            return 1
        # Under torchrun every rank prints this, so the log says which rank failed first and why.
        print(f"g2d {name}: rank {world_info_from_env()[0]}: fatal: {type(err).__name__}: "
              f"{' '.join(str(err).split())[:500]}", file=sys.stderr, flush=True)
        raise
