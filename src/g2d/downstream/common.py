"""What every downstream task shares: the model under test, frozen modules, devices, result files."""

from __future__ import annotations

import json
import logging
import math
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from g2d.checkpoint import atomic_write
from g2d.config import ImageEncoderCfg
from g2d.factory import create_image_encoder, load_model
from g2d.model import G2DModel
from g2d.model.decoder import UNetDecoder
from g2d.model.image_encoder import ResNetEncoder

__all__ = ["Frozen", "ImageTower", "load_image_tower", "resolve_device", "write_results", "write_json", "strict_json",
           "run_info"]

log = logging.getLogger("g2d.downstream")


class Frozen(nn.Module):
    """A module that stays frozen: no gradients, and eval mode (BatchNorm statistics included)
    whatever ``.train()`` is called on a parent. Peers set ``requires_grad=False`` only, so their
    "frozen" encoders still update BatchNorm running statistics; ``update_bn=True`` reproduces that.
    """

    def __init__(self, module: nn.Module, update_bn: bool = False) -> None:
        super().__init__()
        self.module, self.update_bn = module, update_bn
        for p in module.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Frozen:
        super().train(mode)
        self.module.train(mode and self.update_bn)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)


@dataclass
class ImageTower:
    """The image side of a model under test.

    :ivar encoder: ResNet returning five stage maps ``[/2, /4, /8, /16, /32]``.
    :ivar decoder: G2D's pre-trained U-Net decoder (``None`` for random/ImageNet baselines and
        decoder-free pre-training).
    :ivar model: the whole G2D model when one was loaded (zero-shot tasks need its text side).
    :ivar name: ``random``, ``imagenet`` or the model path, for result tables.
    """

    encoder: ResNetEncoder
    decoder: UNetDecoder | None
    model: G2DModel | None
    name: str


def load_image_tower(spec: str, arch: str = "resnet50") -> ImageTower:
    """``random`` | ``imagenet`` | a G2D export / run folder / checkpoint (see :func:`g2d.load_model`).

    ``arch`` applies to the two baselines only; a loaded model brings its own architecture.
    """
    if spec in ("random", "imagenet"):
        # ImageNet weights expect ImageNet-normalised input; the random baseline sees [0, 1].
        enc = ImageEncoderCfg(arch=arch, weights="imagenet", input_norm="imagenet") if spec == "imagenet" \
            else ImageEncoderCfg(arch=arch, weights="none")
        return ImageTower(create_image_encoder(enc), None, None, spec)

    model = load_model(spec)
    return ImageTower(model.image_encoder, model.decoder, model, str(spec))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return torch.device(name)


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
