"""Zero-shot grounding: a text prompt's similarity with every dense pixel embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from g2d.model import G2DModel


@torch.no_grad()
def similarity_maps(model: G2DModel, images: Tensor, prompts: list[str]) -> Tensor:
    """Cosine similarity of prompt ``i`` with image ``i``'s pixel embeddings, upsampled
    (bilinear) to the input size.

    :param images: [B, 1, H, W] in [0, 1]. :return: [B, H, W] in [-1, 1].
    """
    device = model.logit_scale.device
    pix = model.dense_embeddings(images.to(device))                  # [B, h, w, d]
    txt = model.encode_text(prompts)                                  # [B, d]
    sim = torch.einsum("bhwd,bd->bhw", pix, txt).unsqueeze(1)
    return F.interpolate(sim, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0].cpu()


def binarize(heat: Tensor, level: float = 0.5) -> Tensor:
    """Binarisation rule: min-max normalise each map to [0, 1], keep pixels >= ``level``.

    :param heat: [B, H, W]. :return: bool [B, H, W].
    """
    flat = heat.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return (heat - lo) / (hi - lo).clamp_min(1e-12) >= level


def dice_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """Dice of binary maps [B, H, W] per image; 1 when both are empty."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    inter = (pred * target).sum(1)
    denom = pred.sum(1) + target.sum(1)
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-12), torch.ones_like(denom))
