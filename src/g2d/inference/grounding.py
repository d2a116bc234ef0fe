"""Zero-shot grounding: a text prompt's similarity with every dense pixel embedding (paper A.4.2,
BioViL pipeline), mapped back to the original image, binarised, and scored.

Binarisation rules (:func:`binarize`):

- ``minmax`` (default): min-max normalise each map over its valid (non-NaN) pixels, keep ``>= level``
  (0.5);
- ``fixed``: keep raw cosine similarity ``> level`` (MedKLIP thresholds its raw attention weights at a
  fixed 0.008; cosine maps need their own level);
- ``quantile``: keep pixels at or above the map's ``level`` quantile (the release's pseudo-mask rule
  uses 0.85).

NaN pixels (outside the centre crop, see :func:`to_original`) are never foreground.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from g2d.image_input import as_model_input
from g2d.model.interface import TextImageModel

__all__ = ["similarity_maps", "dense_similarity", "to_original", "smooth", "binarize",
           "BINARIZE_RULES", "RESAMPLING"]

# how the dense similarity map reaches the original image's pixels (to_original), for result files
RESAMPLING = ("bilinear (torch grid_sample, align_corners=False) from the dense grid to each original pixel's "
              "centre, undoing the resize and centre crop; NaN outside the crop")

BINARIZE_RULES = ("minmax", "fixed", "quantile")


@torch.no_grad()
def dense_similarity(model: TextImageModel, images: Tensor, prompts: list[str]) -> Tensor:
    """Cosine similarity of prompt ``i`` with image ``i``'s pixel embeddings at the dense resolution.

    :param images: [B, 1, S, S] in [0, 1] (``uint8`` is divided by 255). :return: [B, S/32, S/32] in [-1, 1] (CPU).
    :raises ImageInputError: images outside that contract.
    """
    device = model.logit_scale.device
    images = as_model_input(images, "dense_similarity")
    pix = model.dense_embeddings(images.to(device))                  # [B, h, w, d]
    txt = model.encode_text(list(prompts))                           # [B, d]
    return torch.einsum("bhwd,bd->bhw", pix, txt).float().cpu()


@torch.no_grad()
def similarity_maps(model: TextImageModel, images: Tensor, prompts: list[str]) -> Tensor:
    """Cosine similarity of prompt ``i`` with image ``i``'s pixel embeddings, upsampled
    (bilinear) to the input size.

    :param images: [B, 1, H, W] in [0, 1] (``uint8`` is divided by 255). :return: [B, H, W] in [-1, 1].
    :raises ImageInputError: images outside that contract.
    """
    images = as_model_input(images, "similarity_maps")
    sim = dense_similarity(model, images, prompts).unsqueeze(1)
    return F.interpolate(sim, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def to_original(heat: Tensor, geom: dict[str, Any], out_hw: tuple[int, int] | None = None,
                mode: str = "bilinear") -> Tensor:
    """A map over the model's input crop ``[h, w]`` (any resolution covering the ``S x S`` crop, e.g.
    the dense ``S/32`` grid) -> the original image ``[H, W]``, undoing resize and centre crop.

    Each original pixel centre is mapped into crop coordinates (the inverse of
    :func:`g2d.data.transforms.crop_to_original`) and the map is sampled there (``mode``: ``bilinear``,
    the same as upsampling the map bilinearly to ``S x S`` first, or ``nearest``, hi-ml's default).
    Pixels whose centre falls outside the crop are NaN (as BioViL's NaN padding).

    :param geom: :func:`g2d.data.transforms.eval_geometry` of the original image.
    :param out_hw: another pixel grid over the same image (labels given at another resolution, e.g.
        RSNA's 1024-px boxes on a 512-px conversion); default the image's own ``[H, W]``.
    """
    h0, w0 = geom["orig_hw"]
    ho, wo = out_hw or (h0, w0)
    sy, sx = geom["scale_yx"]
    s = geom["crop_hw"][0]
    ys = (torch.arange(ho, dtype=torch.float64) + 0.5) * (h0 / ho) * sy - geom["crop_top"]  # crop pixel-edge coords
    xs = (torch.arange(wo, dtype=torch.float64) + 0.5) * (w0 / wo) * sx - geom["crop_left"]
    gy, gx = torch.meshgrid(ys / s * 2 - 1, xs / s * 2 - 1, indexing="ij")         # [-1, 1] = crop edges
    grid = torch.stack([gx, gy], dim=-1).float()[None]
    out = F.grid_sample(heat.float()[None, None], grid, mode=mode, padding_mode="border",
                        align_corners=False)[0, 0]
    inside = (gy.abs() <= 1) & (gx.abs() <= 1)
    return torch.where(inside, out, torch.full_like(out, float("nan")))


def smooth(heat: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing of dense maps ``[B, h, w]`` with ``sigma`` in grid cells (hi-ml's
    ``get_similarity_map_from_raw_data``: ``scipy.ndimage.gaussian_filter``, sigma 1.5, before
    upsampling); ``sigma`` 0 returns the maps unchanged."""
    if sigma <= 0:
        return heat
    from scipy.ndimage import gaussian_filter

    arr = heat.detach().cpu().double().numpy()
    return torch.from_numpy(np.stack([gaussian_filter(a, sigma=sigma) for a in arr])).to(heat.dtype)


def binarize(heat: Tensor, level: float = 0.5, rule: str = "minmax") -> Tensor:
    """Binarise maps (see the module docstring for the rules); NaN pixels are background.

    :param heat: [B, H, W] (or [H, W]). :return: bool of the same shape.
    """
    if rule not in BINARIZE_RULES:
        raise ValueError(f"rule must be one of {BINARIZE_RULES}, got {rule!r}")
    single = heat.ndim == 2
    h = heat[None] if single else heat
    valid = ~torch.isnan(h)
    flat = h.flatten(1)
    if rule == "fixed":
        out = h > level
    elif rule == "quantile":
        q = torch.stack([torch.quantile(f[~torch.isnan(f)], level) if (~torch.isnan(f)).any()
                         else f.new_tensor(float("inf")) for f in flat])
        out = h >= q[:, None, None]
    else:
        inf = torch.tensor(float("inf"))
        lo = torch.where(torch.isnan(flat), inf, flat).min(1).values[:, None, None]
        hi = torch.where(torch.isnan(flat), -inf, flat).max(1).values[:, None, None]
        out = (h - lo) / (hi - lo).clamp_min(1e-12) >= level
    out = out & valid
    return out[0] if single else out


