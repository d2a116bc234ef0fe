"""``g2d eval TASK``: run one downstream protocol (:mod:`g2d.downstream`) and write ``metrics.json``.
Each protocol's flags are the fields of its ``Args`` dataclass (:mod:`g2d.downstream.protocol`)."""

from __future__ import annotations

import argparse

from g2d.downstream import protocol


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="run a downstream protocol", description=__doc__)
    tasks = p.add_subparsers(dest="task", required=True)
    for name, (_, help_) in protocol.PROTOCOLS.items():
        t = tasks.add_parser(name, help=help_, description=help_)
        protocol.add_flags(t, protocol.module(name).Args)
        t.set_defaults(run=_run)


def _run(ns: argparse.Namespace) -> int:
    name = ns.task
    values = {k: v for k, v in vars(ns).items() if k not in ("task", "run", "command", "verbose")}
    args = protocol.make(name, **values)
    metrics = protocol.run(name, args)
    print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    print(f"wrote {args.out}/metrics.json")
    return 0
