"""Helpers the tests share (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import argparse

from g2d.downstream import protocol


def parse_protocol_args(name: str, argv: list[str]) -> protocol.ProtocolArgs:
    """A protocol's ``Args`` from command-line flags, the way ``g2d eval NAME`` builds them
    (:func:`g2d.downstream.protocol.add_flags`, then :func:`~g2d.downstream.protocol.make`)."""
    parser = protocol.add_flags(argparse.ArgumentParser(prog=f"g2d eval {name}"), protocol.module(name).Args)
    return protocol.make(name, **vars(parser.parse_args(argv)))
