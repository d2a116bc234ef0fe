"""The input contract of every public entry point that takes image tensors: ``[B, 1 or 3, H, W]``,
floating point in [0, 1]. 8-bit images (``torch.uint8``) are converted (``/ 255``); anything else
outside the contract is refused with a message that names it, because a model fed another intensity
scale runs without any error and returns embeddings that have collapsed towards one another
(torchxrayvision #89; field case 23: 0-255 floats moved g2d's embeddings to cosine 0.25-0.30 of the
right ones and shrank the spread between images 17 x).
"""

from __future__ import annotations

import torch
from torch import Tensor

from g2d.errors import ImageInputError

__all__ = ["as_model_input", "RANGE_SLACK"]

# values this far outside [0, 1] are rounding, not another scale (resampling overshoot is clamped
# by g2d's readers; a bilinear resize of a [0, 1] image stays inside)
RANGE_SLACK = 1e-3


def as_model_input(images: Tensor, where: str) -> Tensor:
    """``images`` as the models take them: a floating tensor ``[B, 1 or 3, H, W]`` in [0, 1].

    :param where: the entry point, for messages (e.g. ``"G2DModel.encode_image"``).
    :return: ``images`` itself (floating, in range), or ``images / 255`` as float32 for ``uint8``.
    :raises ImageInputError: not a 4-d tensor with 1 or 3 channels; another integer or bool dtype;
        non-finite values; values outside [0, 1] (the message gives the range seen).
    """
    if not isinstance(images, Tensor):
        raise ImageInputError(f"{where}: images must be a torch.Tensor [B, 1 or 3, H, W] in [0, 1], got "
                              f"{type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ImageInputError(f"{where}: images must be [B, 1 or 3, H, W] in [0, 1], got shape {tuple(images.shape)}"
                              + (" (add the batch dimension: images[None])" if images.ndim == 3 else ""))
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ImageInputError(f"{where}: images must be floating point in [0, 1] (or uint8, divided by 255), got "
                              f"{images.dtype}; scale other integer images (12- or 16-bit) to [0, 1] first "
                              "(g2d.data.images.read_image does for files)")
    if images.numel() == 0:
        return images
    x = images.detach()
    if not bool(torch.isfinite(x).all()):
        raise ImageInputError(f"{where}: images hold NaN or infinite values")
    lo, hi = (float(v) for v in torch.aminmax(x))
    if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
        hint = " (8-bit values? divide by 255, or pass a uint8 tensor)" if hi > 2 else \
            " (normalised with a mean and std? g2d models normalise inside: pass [0, 1])" if lo < 0 else ""
        raise ImageInputError(f"{where}: images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")
    return images
