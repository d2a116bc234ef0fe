"""Atomic checkpoints, safe loading, and the exported inference model (safetensors + JSON)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from g2d.errors import CheckpointError, CheckpointWriteError, PickledClassesError

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_TEXT_DIR = "text"






_saves = 0  # checkpoint writes by this process, for the G2D_FAULT_KILL_IN_SAVE hook


def _stale_temps(path: Path) -> list[Path]:
    """Temporary files of ``path`` left by writers that died (SIGKILL skips ``finally``)."""
    out = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            out.append(tmp)
        except (ValueError, PermissionError):  # not our naming / another user's live process
            pass
    return out


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the file into place, so a crash or a full disk during the
    write leaves any previous file at ``path`` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    for stale in _stale_temps(path):
        stale.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write a training checkpoint atomically. ``state`` must hold only tensors and plain data, so
    it loads with ``torch.load(weights_only=True)``."""
    global _saves
    _saves += 1
    kill_at = os.environ.get("G2D_FAULT_KILL_IN_SAVE")

    def write(tmp: Path) -> None:
        torch.save(state, tmp)
        if kill_at is not None and _saves == int(kill_at):
            # Testing hook (docs/reliability.md): die during the N-th write of this process with
            # half of the temporary file on disk, as a kill or power loss mid-write would.
            os.truncate(tmp, os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        atomic_write(path, write)
    except OSError as err:
        hint = " (disk full)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        msg = (f"cannot write checkpoint {path}{hint}: {err.strerror or err}; the previous "
               f"checkpoint there, if any, is intact")
        raise CheckpointWriteError(err.errno, msg) from err


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint without executing code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        if "WeightsUnpickler error" in str(err) or "Weights only load failed" in str(err):
            raise PickledClassesError(f"cannot load checkpoint {path} safely (only tensors and plain data "
                                      f"are accepted): {_load_reason(err)}") from None
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch file, or a damaged one "
                              f"({_load_reason(err)})") from None


def _load_reason(err: Exception) -> str:
    """The informative part of torch.load's error, on one line. Its weights_only message suggests
    retrying with ``weights_only=False``, which is exactly what must not be done with such a file."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    return (text[:200] or type(err).__name__).split(". This is an internal")[0]


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state)`` that turns any mismatch (missing, unexpected or mis-shaped
    entries) into a one-line ``ValueError`` starting with ``what``."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{what}: {str(err)[:300]}") from None
    if missing or unexpected:
        raise ValueError(f"{what}: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, a G2D export folder, or a torch file (loaded
    with ``weights_only=True``; a training checkpoint's ``model`` entry is used)."""
    path = Path(path)
    if path.is_dir():
        path = path / EXPORT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = load_checkpoint(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def export_model(model: nn.Module, cfg_dict: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``model.safetensors``, ``config.json`` and the text tokenizer/config to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / EXPORT_WEIGHTS, lambda tmp: save_model(model, str(tmp)))
    atomic_write(out_dir / EXPORT_CONFIG,
                 lambda tmp: Path(tmp).write_text(json.dumps(cfg_dict, indent=2), encoding="utf-8"))
    text_dir = out_dir / EXPORT_TEXT_DIR
    if text_dir.exists():
        shutil.rmtree(text_dir)
    text: Any = model.text_encoder
    text.tokenizer.save_pretrained(text_dir)
    text.backbone.config.save_pretrained(text_dir)
    return out_dir
