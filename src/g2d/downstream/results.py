"""Result files of every protocol and experiment: strict JSON (NaN -> null with the reason),
``metrics.json`` + ``results.md``, and the machine and commit recorded beside them."""

from __future__ import annotations

import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from g2d.checkpoint import atomic_write

__all__ = ["run_info", "strict_json", "write_json", "write_results"]


def run_info() -> dict[str, Any]:
    """Machine and commit, recorded next to every result."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": gpu, "commit": commit}


def strict_json(data: Any) -> tuple[Any, dict[str, str]]:
    """``data`` with every NaN / infinite float replaced by ``None`` (JSON's ``null``), and the
    ``/``-joined key path of each replaced value mapped to a generic reason.

    Python's ``json`` writes NaN as a bare ``NaN``, which is not JSON (JavaScript's ``JSON.parse``,
    jq and most other readers reject the file)."""
    found: dict[str, str] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            found[path] = "not a finite number" if not math.isnan(value) else "undefined for this run"
            return None
        return value

    return walk(data, ""), found


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """The one writer of result files: strict JSON (``allow_nan=False``), atomically. Undefined
    values become ``null`` and are listed under ``"undefined"`` with their reason; reasons the
    producer already gave there (e.g. ``{"auc_per_class/b": "one class in test"}``) are kept."""
    clean, found = strict_json({k: v for k, v in data.items() if k != "undefined"})
    reasons = {**found, **data.get("undefined", {})}
    if reasons:
        clean["undefined"] = reasons
    text = json.dumps(clean, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return Path(path)


def write_results(out_dir: str | Path, metrics: dict[str, Any], row: dict[str, Any]) -> Path:
    """Write ``metrics.json`` (metrics + run info, :func:`write_json`) and ``results.md`` (one
    Markdown table row) atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", {**metrics, "run": run_info()})

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    md = ("| " + " | ".join(row) + " |\n|" + "---|" * len(row) + "\n| "
          + " | ".join(fmt(v) for v in row.values()) + " |\n")
    atomic_write(out / "results.md", lambda p: Path(p).write_text(md))
    return out / "metrics.json"
