"""The one data-spec grammar of both data wings: ``NAME:PATH?key=value&key=value`` (``NAME`` alone, e.g.
``synthetic``, has no path). Pre-training specs (``csv:``, ``mimic:``, ``synthetic``;
:func:`g2d.config.pretrain_source`) and labelled sets (``siim:``, ``csv:FILE?labels=a,b``, ...;
:func:`g2d.data.labelled.specs.parse_spec`) are split here; each wing checks the names and options it
takes."""

from __future__ import annotations

from g2d.errors import DataError

__all__ = ["split_spec"]


def split_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``NAME:PATH[?key=value&key=value]`` -> ``(name, path, options as text)``.

    :raises DataError: an empty name, or an option without ``=``.
    """
    head, _, query = spec.partition("?")
    name, _, path = head.partition(":")
    if not name.strip():
        raise DataError(f"data spec {spec!r}: expected NAME:PATH (e.g. csv:pairs.csv, siim:/data/siim) or synthetic")
    opts: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise DataError(f"data spec {spec!r}: option {item!r} is not key=value")
        opts[key.strip()] = value.strip()
    return name.strip(), path, opts
