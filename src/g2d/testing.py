"""Helpers for tests and benchmarks: locating the shared real data sets."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path | None:
    """Return the ``shared/data`` folder that sits beside the checkout, if any.

    Looks at ``$G2D_SHARED_DATA`` first, then walks up from this file and from the current
    directory looking for ``shared/data``.
    """
    env = os.environ.get("G2D_SHARED_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    starts = [Path(__file__).resolve(), Path.cwd().resolve()]
    for start in starts:
        for parent in [start, *start.parents]:
            cand = parent / "shared" / "data"
            if cand.is_dir():
                return cand
    return None
