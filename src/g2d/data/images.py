"""Reading one radiograph from disk: PNG/JPEG/TIFF of any mode, and DICOM.

Every reader of the package goes through :func:`read_image`, so a corrupt, truncated, empty or
non-image file always raises the same :class:`ImageReadError` naming the file.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from g2d.data.transforms import to_grayscale_float
from g2d.errors import ImageReadError

__all__ = ["ImageReadError", "read_image", "image_size"]

_DICOM_SUFFIXES = (".dcm", ".dicom")
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError,
    KeyError, AttributeError, IndexError, TypeError,
)




def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - pydicom is a dependency
        raise ImageReadError(path, "reading DICOM needs pydicom (pip install pydicom)") from e
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut  # type: ignore[no-redef]
    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].astype(np.float64).mean(-1)
    elif arr.ndim != 2:
        raise ValueError(f"unsupported DICOM pixel array of shape {arr.shape}")
    else:
        # Modality LUT (or RescaleSlope/Intercept), then the first VOI LUT or window
        # (WindowCenter/Width): what a viewer shows, so a burned-in marker at the top of the stored
        # range cannot squeeze the tissue into a corner of [0, 1]. pydicom applies both as the
        # standard (PS3.3 C.11) defines them.
        arr = apply_modality_lut(arr, ds)
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            arr = apply_voi_lut(arr, ds, index=0)
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    # MONOCHROME1: high values are dark; invert so bone is bright as in every other format.
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        arr = 1.0 - arr
    return arr.astype(np.float32)


def read_image(path: str | Path) -> np.ndarray:
    """Read a radiograph as float32 ``[H, W]`` in [0, 1].

    PNG/JPEG/TIFF of any PIL mode follow :func:`g2d.data.transforms.to_grayscale_float` (RGB -> luma,
    alpha composited over black, 16-bit scaled by the image's own range). DICOM (``.dcm``) is read
    with pydicom: modality LUT (slope/intercept), then the VOI LUT or window when the file has one,
    min-max scaled and inverted when MONOCHROME1.

    Raises:
        ImageReadError: the file is missing, empty, or cannot be decoded (message names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(p, "file not found")
    if p.stat().st_size == 0:
        raise ImageReadError(p, "empty file (0 bytes)")
    try:
        if p.suffix.lower() in _DICOM_SUFFIXES:
            return _read_dicom(p)
        with Image.open(p) as im:
            im.load()
            return to_grayscale_float(im)[0].numpy()
    except ImageReadError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageReadError(p, f"cannot decode ({type(e).__name__}: {e})") from e
    except Exception as e:  # pydicom raises its own error types (InvalidDicomError, ...)
        if type(e).__module__.startswith("pydicom"):
            raise ImageReadError(p, f"cannot decode DICOM ({type(e).__name__}: {e})") from e
        raise


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header, without decoding the pixels where possible."""
    p = Path(path)
    try:
        if p.suffix.lower() in _DICOM_SUFFIXES:
            import pydicom

            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        with Image.open(p) as im:
            return im.height, im.width
    except Exception as e:
        raise ImageReadError(p, f"cannot read the image header ({type(e).__name__}: {e})") from e
