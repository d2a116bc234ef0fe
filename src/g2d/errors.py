"""Every error g2d raises on purpose, in one module, so callers catch them by one name wherever they
come from. The CLI turns ConfigError, DataError and CheckpointError into a one-line message."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ConfigError", "DataError", "LabelSpaceError", "ImageReadError", "ImageInputError", "CheckpointError",
           "CheckpointWriteError", "NonFiniteLossError"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class CheckpointError(ValueError):
    """A checkpoint or weights file cannot be loaded safely (not a tensor-only file, corrupt)."""


class PickledClassesError(CheckpointError):
    """A readable PyTorch file that holds pickled classes besides tensors: ``weights_only=True``
    refused it before running anything (only a trusted file may be read otherwise)."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, permissions); the previous file is intact."""


class DataError(ValueError):
    """A data set cannot be used (missing folder or file, malformed table, too many bad rows)."""


class LabelSpaceError(ValueError):
    """A record's boxes or mask cannot be placed on the image read (other aspect ratio, or a box
    outside the image). :ivar reason: the skip-log reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ImageInputError(ValueError):
    """An image tensor handed to a model or the inference code breaks the [0, 1] input contract
    (:func:`g2d.image_input.as_model_input`); the message names the entry point and what it got."""


class ImageReadError(RuntimeError):
    """An image file is missing, empty, truncated or not an image."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class NonFiniteLossError(RuntimeError):
    """Too many consecutive pre-training steps had a non-finite loss (``train.max_consecutive_nonfinite``);
    the last checkpoint is intact."""
