"""Image preprocessing for training and evaluation, defined in one place.

Every image leaves as a float32 tensor ``[1, S, S]`` in ``[0, 1]`` (grayscale). The model replicates
channels and applies any normalisation itself, so nothing here normalises.

Two recipes are offered (``ImageTransformCfg.augment``):

``"paper"`` (G2D paper, A.3)
    Shorter side resized to ``resize`` (256) keeping the aspect ratio, centre crop ``crop`` (224);
    training adds random perspective and random auto-contrast. The paper's "resized to 256x256" is
    read as the usual torchvision ``Resize(256)`` (shorter side) followed by ``CenterCrop(224)``,
    as in the works it cites (ConVIRT/GLoRIA/MGCA), so anatomy is not distorted.
    The paper also lists "random grayscale". Every image here is converted to one grayscale
    channel first, and grayscale of a grayscale image (or of an RGB image that is then converted to
    luma anyway) is the identity, so ``RandomGrayscale`` would be a no-op in this pipeline and is
    deliberately not applied.

``"release"`` (the released G2D code, ``PRETRAIN/utils/dataset.py`` + ``ext_data.py``)
    Square resize to ``resize x resize`` (aspect ratio *not* preserved, as in ``ext_data.py``), no
    crop by default (the release's ``CenterCrop(256)`` is a no-op on its 256x256 arrays), and
    training adds ``RandomAffine(degrees=15, shear=15)`` (nearest, fill 0) and
    ``ColorJitter(brightness=0.2, contrast=0.2)``. The release's ImageNet normalisation is a model
    option, not part of this module. Differences that remain: the release resizes offline with
    ``skimage`` (order 1, no anti-aliasing, uint8 with a wrap-around at 256); we resize bilinearly with
    anti-aliasing in float.

``"none"``
    Paper geometry, no augmentation.

``pad_square`` (a peer's evaluation pipeline: MGCA's and GLoRIA's ``resize_img``, MedCLIP)
    The *longer* side resized to ``resize`` and the shorter one zero-padded, centred, to a
    ``resize x resize`` square; then the centre crop. Nothing of the image is cut off by the resize.

Evaluation (``train=False``) uses exactly the same deterministic resize + crop as training, and
:func:`eval_geometry` returns the resize scale and crop offsets so a heat map on the crop can be mapped
back to the original image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "ImageTransformCfg",
    "ImageTransform",
    "to_grayscale_float",
    "build_transform",
    "eval_geometry",
    "apply_geometry",
    "crop_to_original",
    "inference_geometry",
    "with_overrides",
    "check_sizes",
]

_AUGMENTS = ("paper", "release", "none")
# ITU-R 601 luma, the same weights as PIL's ``convert("L")``.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ImageTransformCfg:
    """Image preprocessing configuration.

    Attributes:
        resize: Target size of the resize step. With ``keep_aspect`` the *shorter* side becomes
            ``resize`` and the longer side ``round(resize * long / short)``; without it the image is
            resized to ``resize x resize``.
        crop: Side of the centre crop taken after the resize (output size ``S``). ``None`` (the
            default) resolves per recipe at construction: 224 for ``"paper"``/``"none"`` and
            ``resize`` (i.e. no crop) for ``"release"``. Must satisfy ``crop <= resize``.
        augment: ``"paper"`` | ``"release"`` | ``"none"`` (see the module docstring).
        keep_aspect: ``None`` resolves to ``False`` for ``"release"`` (square resize, as the release's
            ``ext_data.py``) and ``True`` otherwise.
        pad_square: resize the *longer* side to ``resize`` and zero-pad the shorter one, centred, to a
            square (MGCA / GLoRIA ``resize_img``, MedCLIP's padding); the aspect ratio is kept and
            ``keep_aspect`` is not read. The padding is black (0), as theirs.
        perspective_distortion: ``RandomPerspective`` distortion scale (``"paper"``). The paper names
            the torchvision transform without parameters, so torchvision's defaults (0.5, p=0.5) are
            the literal reading.
        perspective_p: Probability of applying the perspective warp (``"paper"``).
        autocontrast_p: ``RandomAutocontrast`` probability (``"paper"``), torchvision's default 0.5.
    """

    resize: int = 256
    crop: int | None = None
    augment: str = "paper"
    keep_aspect: bool | None = None
    pad_square: bool = False
    perspective_distortion: float = 0.5
    perspective_p: float = 0.5
    autocontrast_p: float = 0.5

    def __post_init__(self) -> None:
        if self.augment not in _AUGMENTS:
            raise ValueError(f"augment must be one of {_AUGMENTS}, got {self.augment!r}")
        if self.resize <= 0:
            raise ValueError(f"resize must be positive, got {self.resize}")
        # Frozen dataclass: resolve the per-recipe defaults once, so cfg.crop is always an int.
        if self.crop is None:
            object.__setattr__(self, "crop", self.resize if self.augment == "release" else 224)
        if self.keep_aspect is None:
            object.__setattr__(self, "keep_aspect", self.augment != "release")
        assert self.crop is not None
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"crop must be in (0, resize={self.resize}], got {self.crop}")
        for name in ("perspective_distortion", "perspective_p", "autocontrast_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    @property
    def output_size(self) -> int:
        """Side ``S`` of the ``[1, S, S]`` output."""
        assert self.crop is not None
        return self.crop


def inference_geometry(resize: int, image_size: int, augment: str,
                       keep_aspect: bool | None = None) -> ImageTransformCfg:
    """The deterministic geometry of a model pre-trained with ``data.resize``, ``model.image_size``
    and ``data.augment``: the same resize rule (square for ``"release"``, shorter side otherwise)
    and centre crop as its training transform, without the random augmentation. Inference,
    figures and evaluation defaults use it, so a model sees the pixels it was trained on.

    :param keep_aspect: a user's override of the resize rule (``None``: the recipe's).
    """
    trained = ImageTransformCfg(resize=max(resize, image_size), crop=image_size, augment=augment)
    return ImageTransformCfg(resize=trained.resize, crop=trained.crop, augment="none",
                             keep_aspect=trained.keep_aspect if keep_aspect is None else keep_aspect)


def check_sizes(resize: int | None, image_size: int | None, crop: int) -> None:
    """A user's ``--resize`` / ``--image-size`` (``None``: not given): positive, and a resize not
    below the ``crop`` it feeds, rather than silently changed.

    :raises ValueError: naming the flag.
    """
    for flag, value in (("--resize", resize), ("--image-size", image_size)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be a positive number of pixels, got {value}")
    if resize is not None and resize < crop:
        raise ValueError(f"--resize {resize} is smaller than the {crop}-px crop it feeds (--image-size, else the "
                         f"model's own): give --resize >= {crop} or a smaller --image-size")


def with_overrides(cfg: ImageTransformCfg, resize: int | None = None, image_size: int | None = None,
                   square: bool | None = None) -> ImageTransformCfg:
    """A deterministic geometry (e.g. a peer's own) with a user's ``--resize`` / ``--image-size`` /
    ``--square`` applied (:func:`check_sizes`); ``square=True`` squashes to a square (no padding, no
    aspect kept), ``False`` resizes the shorter side (no padding). Without ``--resize``, a larger
    ``--image-size`` raises the resize to it (no crop)."""
    size = image_size if image_size is not None else cfg.output_size
    check_sizes(resize, image_size, size)
    keep, pad = (cfg.keep_aspect, cfg.pad_square) if square is None else (not square, False)
    return ImageTransformCfg(resize=resize if resize is not None else max(cfg.resize, size), crop=size,
                             augment="none", keep_aspect=keep, pad_square=pad)


# --------------------------------------------------------------------------------------------------
# Conversion to one float channel
# --------------------------------------------------------------------------------------------------


def _minmax(x: np.ndarray) -> np.ndarray:
    """Scale by the image's real value range; a constant image becomes all zeros."""
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def _unit_range(x: np.ndarray) -> np.ndarray:
    """Map an array of any dtype to float32 in [0, 1].

    uint8 -> /255 (fixed, so 8-bit intensities keep their meaning); bool -> {0, 1}; other integer
    types (16-bit PNG, 12-bit data in uint16, int32 ``I`` images) -> min-max over the image, because
    their nominal range says little about the values actually used; float already inside [0, 1] is
    kept, other floats are min-max scaled.
    """
    if x.dtype == np.bool_:
        return x.astype(np.float32)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if np.issubdtype(x.dtype, np.integer):
        return _minmax(x.astype(np.float64))
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise ValueError("float image contains NaN or infinite values")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            return _minmax(x.astype(np.float64))
        return x.astype(np.float32)
    raise TypeError(f"unsupported image dtype {x.dtype}")


def _alpha_unit(a: np.ndarray) -> np.ndarray:
    """Alpha channel to [0, 1] by its dtype's nominal maximum (alpha is never min-max scaled)."""
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.float32) / float(np.iinfo(a.dtype).max)
    return np.clip(a.astype(np.float32), 0.0, 1.0)


def _hwc_to_gray(x: np.ndarray) -> np.ndarray:
    """``[H, W]`` or ``[H, W, C]`` (C in 1, 2, 3, 4) -> ``[H, W]`` float32 in [0, 1].

    2 channels are gray + alpha, 4 channels RGB + alpha; alpha is composited over black.
    """
    if x.ndim == 2:
        return _unit_range(x)
    if x.ndim != 3 or x.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an [H, W] or [H, W, C] image with C in 1..4, got shape {x.shape}")
    c = x.shape[2]
    if c == 1:
        return _unit_range(x[..., 0])
    color, alpha = (x[..., :-1], x[..., -1]) if c in (2, 4) else (x, None)
    color = _unit_range(np.ascontiguousarray(color))
    if color.shape[2] == 3:
        gray = _LUMA[0] * color[..., 0] + _LUMA[1] * color[..., 1] + _LUMA[2] * color[..., 2]
    else:
        gray = color[..., 0]
    if alpha is not None:
        gray = gray * _alpha_unit(alpha)
    return np.clip(gray, 0.0, 1.0).astype(np.float32)


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    # Respect an EXIF orientation tag (cheap check first: exif_transpose always copies).
    if img.getexif().get(0x0112, 1) not in (1, None):
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("1", "L", "LA", "RGB", "RGBA") or mode.startswith("I") or mode == "F":
        # I;16 / I;16B / I;16L / I / F come out as uint16 / int32 / float32 arrays and are then
        # scaled by their real range in _unit_range.
        arr = np.asarray(img)
    elif mode in ("P", "PA"):
        arr = np.asarray(img.convert("RGBA"))  # keeps palette transparency (tRNS)
    elif mode == "La":
        arr = np.asarray(img)[..., 0]  # premultiplied: already composited over black
    elif mode == "RGBa":
        arr = np.asarray(img)[..., :3]
    else:  # CMYK, YCbCr, LAB, HSV, ...
        arr = np.asarray(img.convert("RGB"))
    return _hwc_to_gray(arr)


def to_grayscale_float(img: Image.Image | np.ndarray | Tensor) -> Tensor:
    """Convert an image to one float channel in [0, 1].

    Args:
        img: a PIL image of any mode (``L``; ``RGB`` -> ITU-R 601 luma; ``RGBA``/``LA``/``P`` with
            transparency -> composited over black, then luma; ``I;16*``/``I``/``F`` -> scaled by the
            image's own min and max), a numpy array ``[H, W]`` or ``[H, W, C]`` (channels last), or a
            tensor ``[H, W]`` or ``[C, H, W]`` (channels first), C in 1..4. Arrays and tensors follow
            the dtype rules of ``_unit_range``: uint8 / 255, other integers and out-of-range floats
            min-max scaled, floats in [0, 1] kept.

    Returns:
        float32 tensor ``[1, H, W]`` in [0, 1].
    """
    if isinstance(img, Image.Image):
        gray = _pil_to_gray(img)
    elif isinstance(img, Tensor):
        t = img.detach().cpu()
        if t.ndim == 3:
            t = t.permute(1, 2, 0)
        gray = _hwc_to_gray(t.numpy())
    elif isinstance(img, np.ndarray):
        gray = _hwc_to_gray(img)
    else:
        raise TypeError(f"unsupported image type {type(img).__name__}")
    return torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32)).unsqueeze(0)


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------


def eval_geometry(orig_hw: tuple[int, int], cfg: ImageTransformCfg) -> dict[str, Any]:
    """Resize and crop parameters applied to an image of size ``orig_hw`` (train and eval alike).

    Returns a dict with:
        ``orig_hw``: ``(H, W)`` of the input.
        ``resized_hw``: ``(h, w)`` after the resize.
        ``scale_yx``: ``(h / H, w / W)``, resized pixels per original pixel on each axis.
        ``crop_top``, ``crop_left``: offsets of the crop inside the resized image (negative where
            ``pad_square`` pads: the crop starts in the padding).
        ``crop_hw``: ``(S, S)``.
        ``crop_box_orig``: ``(x1, y1, x2, y2)`` floats, the part of the original image the output
            covers (pixel-edge coordinates), e.g. for NaN-padding a heat map outside it.

    A point ``(y, x)`` of the output (pixel-centre convention) maps to the original image by
    :func:`crop_to_original`.
    """
    h0, w0 = int(orig_hw[0]), int(orig_hw[1])
    if h0 <= 0 or w0 <= 0:
        raise ValueError(f"image size must be positive, got {orig_hw}")
    r = cfg.resize
    if cfg.pad_square:
        # Longer side -> r; the shorter one rounded, then padded to r x r, centred (extra pixel at the end).
        if h0 >= w0:
            h, w = r, max(1, int(math.floor(r * w0 / h0 + 0.5)))
        else:
            h, w = max(1, int(math.floor(r * h0 / w0 + 0.5))), r
    elif cfg.keep_aspect:
        # Shorter side -> r; longer side rounded (torchvision truncates; rounding is closer).
        if h0 <= w0:
            h, w = r, max(r, int(math.floor(r * w0 / h0 + 0.5)))
        else:
            h, w = max(r, int(math.floor(r * h0 / w0 + 0.5))), r
    else:
        h, w = r, r
    s = cfg.output_size
    # Same rounding as torchvision's center_crop; with padding, the crop of the r x r canvas, shifted
    # by the canvas' padding before the image.
    if cfg.pad_square:
        top = int(round((r - s) / 2.0)) - (r - h) // 2
        left = int(round((r - s) / 2.0)) - (r - w) // 2
    else:
        top = int(round((h - s) / 2.0))
        left = int(round((w - s) / 2.0))
    sy, sx = h / h0, w / w0
    return {
        "orig_hw": (h0, w0),
        "resized_hw": (h, w),
        "scale_yx": (sy, sx),
        "crop_top": top,
        "crop_left": left,
        "crop_hw": (s, s),
        "crop_box_orig": (left / sx, top / sy, (left + s) / sx, (top + s) / sy),
    }


def crop_to_original(y: Tensor | np.ndarray | float, x: Tensor | np.ndarray | float,
                     geom: dict[str, Any]) -> tuple[Any, Any]:
    """Map output-pixel coordinates ``(y, x)`` (pixel centres, any shape) to the original image.

    Inverse of the resize + crop in :func:`eval_geometry`: ``orig = (out + offset + 0.5) / scale - 0.5``.
    """
    sy, sx = geom["scale_yx"]
    oy = (y + geom["crop_top"] + 0.5) / sy - 0.5
    ox = (x + geom["crop_left"] + 0.5) / sx - 0.5
    return oy, ox


def apply_geometry(x: Tensor, geom: dict[str, Any], interpolation: InterpolationMode = InterpolationMode.BILINEAR
                   ) -> Tensor:
    """``[C, H, W]`` -> ``[C, S, S]``: the resize and crop of ``geom`` (:func:`eval_geometry`); the
    parts of the crop outside the resized image (``pad_square``) are 0. Bilinear resizing is
    anti-aliased (a triangle filter: no overshoot beyond the input's range); ``NEAREST_EXACT`` for
    masks."""
    h, w = geom["resized_hw"]
    if (h, w) != tuple(x.shape[-2:]):
        x = TF.resize(x, [h, w], interpolation=interpolation,
                      antialias=interpolation == InterpolationMode.BILINEAR)
    s = geom["crop_hw"][0]
    # torchvision's crop zero-pads where the window leaves the image
    return TF.crop(x, geom["crop_top"], geom["crop_left"], s, s)


def _resize_and_crop(x: Tensor, cfg: ImageTransformCfg) -> Tensor:
    """``[1, H, W]`` -> ``[1, S, S]`` with the geometry of :func:`eval_geometry`."""
    return apply_geometry(x, eval_geometry((x.shape[-2], x.shape[-1]), cfg))


# --------------------------------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------------------------------


def _build_augment(cfg: ImageTransformCfg) -> Callable[[Tensor], Tensor] | None:
    if cfg.augment == "paper":
        # Applied after the crop so that train and eval see the same field of view. Fill 0 is the
        # black X-ray background. RandomGrayscale is omitted: a no-op on one channel (see module doc).
        return v2.Compose([
            v2.RandomPerspective(distortion_scale=cfg.perspective_distortion, p=cfg.perspective_p,
                                 interpolation=InterpolationMode.BILINEAR, fill=0.0),
            v2.RandomAutocontrast(p=cfg.autocontrast_p),
        ])
    if cfg.augment == "release":
        # As released: RandomAffine(15, shear=15) with torchvision's defaults (nearest, fill 0),
        # then ColorJitter(brightness=0.2, contrast=0.2).
        return v2.Compose([
            v2.RandomAffine(degrees=15, shear=15, interpolation=InterpolationMode.NEAREST, fill=0.0),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ])
    return None


class ImageTransform:
    """Callable image transform: any image -> float32 ``[1, S, S]`` in [0, 1].

    Picklable, so it works in DataLoader workers under fork and spawn. Random augmentations draw from
    torch's global RNG (seeded per worker by the DataLoader).
    """

    def __init__(self, cfg: ImageTransformCfg, train: bool) -> None:
        self.cfg = cfg
        self.train = bool(train)
        self.augment = _build_augment(cfg) if self.train else None

    def __call__(self, img: Image.Image | np.ndarray | Tensor) -> Tensor:
        x = _resize_and_crop(to_grayscale_float(img), self.cfg)
        if self.augment is not None:
            x = self.augment(x)
        return x.clamp(0.0, 1.0).contiguous()

    def __repr__(self) -> str:
        return f"ImageTransform(cfg={self.cfg}, train={self.train})"


def build_transform(cfg: ImageTransformCfg, train: bool) -> ImageTransform:
    """Build the image transform for training (``train=True``) or evaluation.

    Both share the deterministic geometry (resize, centre crop) of :func:`eval_geometry`; training
    adds the random augmentations of ``cfg.augment`` on top of the cropped image.

    Returns:
        a callable mapping a PIL image / array / tensor to float32 ``[1, S, S]`` in [0, 1],
        ``S = cfg.output_size``.
    """
    return ImageTransform(cfg, train)
