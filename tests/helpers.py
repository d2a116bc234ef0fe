"""Helpers the tests share (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from g2d.downstream import protocol


def parse_protocol_args(name: str, argv: list[str]) -> protocol.ProtocolArgs:
    """A protocol's ``Args`` from command-line flags, the way ``g2d eval NAME`` builds them
    (:func:`g2d.downstream.protocol.add_flags`, then :func:`~g2d.downstream.protocol.make`)."""
    parser = protocol.add_flags(argparse.ArgumentParser(prog=f"g2d eval {name}"), protocol.module(name).Args)
    return protocol.make(name, **vars(parser.parse_args(argv)))


def strict_json(path: Path) -> dict:
    """A result file parsed as standard JSON: NaN / Infinity are not JSON and fail here."""
    def reject(token: str) -> None:
        raise ValueError(f"{token} is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=reject)
