"""Pseudo segmentation masks from attention-pooling weights (G2D paper, Sec. 3.2).

Every training step the [CLS]-query attention weights of the attention pool, ``[B, heads, h', w']``,
are turned into a binary pretext target ``[B, K, H, W]`` for the decoder. Everything here is
batched torch on the input's device, runs under ``torch.no_grad()`` and never synchronises with the
host (no ``.item()``, no loops over the batch, no Python branching on tensor values), so it can run
inside the training step at negligible cost.

Pipeline of :func:`build_pseudo_masks` (paper Sec. 3.2, Eq. 2-3):

1. aggregate heads by their mean (Eq. 2), or keep one map per head (Table 5d "w/o aggregation");
2. upsample to the image size: bilinear (default) or nearest (what the release runs);
3. body mask of the input image (below); attention outside the body is set to zero;
4. per-image (and per-map) threshold computed over the attention values *inside* the body only:
   85th percentile (default, Eq. 3), 75th percentile, median, mean, or a two-component 1-D GMM;
5. binarise with ``>= threshold`` (Eq. 3) or ``> threshold`` (release, ``strict=True``);
6. edge smoothing with an exact bilateral filter for binary masks, optionally re-binarised at 0.5;
7. multiply by the body mask again so that nothing outside the body is ever foreground.

Percentile semantics: linear interpolation between order statistics (as ``np.quantile``), over
the in-body pixels of the full-resolution upsampled map. At the 85th percentile about 15 % of the
body area is foreground; with ``strict=False`` a block of tied values at the threshold (nearest
upsampling) is included whole, with ``strict=True`` it is excluded whole.

Body mask (:func:`body_mask`), histogram-based thresholding as the paper says; the paper gives no
details, so this is our algorithm:

1. downsample to a long side of :data:`BODY_SIDE` (96) px with area averaging (anti-aliasing and
   speed), then a 3x3 Gaussian blur;
2. per-image Otsu threshold from a 256-bin histogram (``scatter_add``; batched). Pixels below the
   image's 1st or above its 99.5th percentile are left out of the histogram, so that small
   saturated patches (black corner blocks, burnt-in labels) do not become the Otsu split; if they
   are large they are inside the robust range and Otsu may split on them, which is what we want;
3. foreground = brighter than the threshold (bone, mediastinum, soft tissue). The dark lungs are
   mostly background at this stage;
4. keep the largest 8-connected component (batched label propagation: every pixel carries its
   linear index, repeated 3x3 max-pooling inside the foreground for a fixed number of steps, then
   a per-image histogram of labels); removes burnt-in letters and markers;
5. morphological closing (radius :data:`BODY_CLOSE_RADIUS` low-res px) to seal narrow gaps through
   which the lungs would connect to the outside air;
6. hole filling: background not connected to the image border (flood fill from the border by
   repeated 3x3 dilation constrained to the background) becomes body. This is what puts the lungs
   inside the body mask;
7. a degenerate result (< 5 % of the image) falls back to the whole image for that image
   (``torch.where``, no sync);
8. bilinear upsampling of the 0/1 mask to full size and ``>= 0.5``.

The iterative steps use a fixed number of iterations (no convergence test, which would need a host
sync). Unfinished label propagation can only split a very winding component; an unfinished flood
fill can only leave far-away background marked as body, i.e. it errs on the side of a larger body.

Bilateral filter (:func:`bilateral_smooth_binary`): for a binary mask the range kernel only takes two
values (1 for neighbours of the same class, ``c = exp(-1 / (2 sigma_color^2))`` for the other
class), so the bilateral filter is exactly computable from two separable Gaussian convolutions;
see the function docstring. The spatial Gaussian is truncated at ``ceil(3 sigma_space)``, so pixels
farther than that from any mask edge are exactly unchanged.

Defaults chosen here (not given by the paper or the release):

* ``bilateral_sigma_space = 0.5`` in units of one attention cell (the upsampling factor
  ``H / h'``): 16 px for 224 px input and a 7x7 map. Smaller values barely touch the 32-px block
  corners; larger ones start to erase single-cell blobs.
* ``bilateral_sigma_color = 1.0`` (``c = 0.61``). For a binary mask the range term only sets how
  strongly the other class is down-weighted; with re-binarisation a pixel flips only where the
  local foreground fraction ``f`` (Gaussian-weighted) is below ``c/(1+c) = 0.38`` (foreground
  pixels) or above ``1/(1+c) = 0.62`` (background pixels): straight edges (``f ~ 0.5``) stay put and
  only corners (``f ~ 0.25`` / ``0.75``) get rounded. ``sigma_color`` must exceed about 0.67
  (``c > 1/3``) for a re-binarised filter to round a 90-degree corner at all.
* ``rebinarize = True``: Eq. 3 defines a binary mask and the pretext loss is a segmentation loss
  (Dice + BCE); without re-binarisation every edge becomes a ~2-sigma wide band of soft values
  (about 0.62 / 0.38 next to straight edges), which blurs the target everywhere rather than only
  rounding corners. ``rebinarize=False`` returns the soft bilateral output in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PseudoMaskCfg",
    "body_mask",
    "aggregate_attention",
    "bilateral_smooth_binary",
    "build_pseudo_masks",
    "shuffle_masks",
    "BODY_SIDE",
    "BODY_CLOSE_RADIUS",
]

#: Long side (px) of the low-resolution copy on which the body mask is computed.
BODY_SIDE: int = 96
#: Radius (low-res px) of the morphological closing that seals gaps between lungs and outside air.
BODY_CLOSE_RADIUS: int = 3
#: Minimum body fraction of the image; below it the whole image is used instead.
BODY_MIN_FRACTION: float = 0.05
#: Percentiles bounding the intensities that enter the Otsu histogram.
BODY_HIST_RANGE: tuple[float, float] = (0.01, 0.995)
#: Pixels this close to 0 or 1 (saturated borders, burnt-in labels) are left out of the histogram.
BODY_SATURATION: float = 0.01
#: Histogram bins of the multi-Otsu threshold.
BODY_OTSU_BINS: int = 64
#: Foreground components smaller than this fraction of the (low-res) image are dropped.
BODY_MIN_COMPONENT: float = 0.02
#: Iterations (row pass + column pass) of the connected-component label propagation.
BODY_LABEL_ITERS: int = 8
#: Minimum foreground run (fraction of the low-res long side) above and below for column filling.
BODY_COLUMN_RUN: float = 1.0 / 16.0
#: Number of EM iterations for the two-component GMM threshold.
GMM_ITERS: int = 50
#: Histogram bins used to fit the GMM.
GMM_BINS: int = 256

_UPSAMPLE_MODES = ("bilinear", "nearest")
_THRESHOLD_MODES = ("percentile", "median", "mean", "gmm")


@dataclass
class PseudoMaskCfg:
    """Options of the pseudo-mask construction (paper Sec. 3.2; ablations of Table 5 b, d, f).

    Attributes:
        aggregate_heads: mean over heads (Eq. 2), one mask; False gives one mask per head.
        upsample: ``"bilinear"`` (default) or ``"nearest"`` (released code).
        body_mask: zero the attention outside the body mask (Table 5f).
        threshold: ``"percentile"`` | ``"median"`` | ``"mean"`` | ``"gmm"`` (Table 5b).
        percentile: percentile in (0, 100) used when ``threshold == "percentile"``.
        strict: False: foreground is ``>= threshold`` (Eq. 3); True: ``> threshold`` (release).
        smoothing: bilateral edge smoothing (Table 5f).
        bilateral_sigma_space: spatial sigma in units of one attention cell, i.e. of the upsampling
            factor ``H / h'`` (0.5 -> 16 px for a 7x7 map on 224 px).
        bilateral_sigma_color: range sigma on the 0/1 mask values (1.0 -> other-class weight 0.61).
        rebinarize: threshold the smoothed mask back to {0, 1} at 0.5 (see module docstring).
    """

    aggregate_heads: bool = True
    upsample: str = "bilinear"
    body_mask: bool = True
    threshold: str = "percentile"
    percentile: float = 85.0
    strict: bool = False
    smoothing: bool = True
    bilateral_sigma_space: float = 0.5
    bilateral_sigma_color: float = 1.0
    rebinarize: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field for an invalid configuration."""
        if self.upsample not in _UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {_UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.threshold not in _THRESHOLD_MODES:
            raise ValueError(f"threshold must be one of {_THRESHOLD_MODES}, got {self.threshold!r}")
        p = float(self.percentile)
        if not (0.0 < p < 100.0) or math.isnan(p):
            raise ValueError(f"percentile must be in (0, 100), got {self.percentile!r}")
        for name in ("bilateral_sigma_space", "bilateral_sigma_color"):
            v = float(getattr(self, name))
            if not (v > 0.0) or math.isinf(v):
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")
        for name in ("aggregate_heads", "body_mask", "strict", "smoothing", "rebinarize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------------------------
# body mask


def _dilate(x: Tensor, radius: int = 1) -> Tensor:
    return F.max_pool2d(x, 2 * radius + 1, stride=1, padding=radius)


def _erode(x: Tensor, radius: int = 1) -> Tensor:
    # max_pool pads with -inf, so erosion ignores out-of-image pixels (no shrinking at the border).
    return -F.max_pool2d(-x, 2 * radius + 1, stride=1, padding=radius)


def _gauss_blur3(x: Tensor) -> Tensor:
    k = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    k2 = (k[:, None] * k[None, :]).view(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2)


def _multi_otsu_lowest(x: Tensor, valid: Tensor, bins: int = BODY_OTSU_BINS) -> Tensor:
    """Lowest of the three thresholds of a 4-class Otsu split, per row.

    ``x`` [N, P] in [0, 1], ``valid`` [N, P] bool (pixels entering the histogram) -> [N, 1].
    Maximises the between-class variance ``sum_c S_c^2 / P_c`` over thresholds ``i < j < k``
    exactly, in O(bins^2) per image: for a fixed middle threshold ``j`` the best ``i`` and ``k``
    are independent.
    """
    n_rows = x.shape[0]
    idx = (x * bins).long().clamp_(0, bins - 1)
    hist = torch.zeros(n_rows, bins, dtype=torch.float32, device=x.device)
    hist.scatter_add_(1, idx, valid.to(torch.float32))
    p = hist / hist.sum(1, keepdim=True).clamp_min(1.0)
    centers = (torch.arange(bins, device=x.device, dtype=torch.float32) + 0.5) / bins
    zero = torch.zeros(n_rows, 1, device=x.device)
    cw = torch.cat([zero, p.cumsum(1)], 1)  # cw[:, a] = mass of bins < a
    cs = torch.cat([zero, (p * centers).cumsum(1)], 1)
    w = cw[:, None, :] - cw[:, :, None]  # [N, a, b]: mass of bins in [a, b)
    s = cs[:, None, :] - cs[:, :, None]
    # Empty or reversed classes are forbidden (large negative score).
    term = torch.where(w > 1e-9, s * s / w.clamp_min(1e-9), torch.full_like(w, -1e3))
    first = term[:, 0, :]  # class [0, i)
    last = term[:, :, bins]  # class [k, bins)
    best_i, arg_i = (first[:, :, None] + term).max(1)  # over i, for each j: [N, j]
    best_k, _ = (term + last[:, None, :]).max(2)  # over k, for each j
    j = (best_i + best_k).argmax(1, keepdim=True)
    i = arg_i.gather(1, j)
    return i.to(torch.float32) / bins  # body: x >= lower edge of bin i


def _run_max(lab: Tensor, fg: Tensor, dim: int) -> Tensor:
    """Replace every label by the maximum label of its run of foreground pixels along ``dim``.

    ``lab`` int64 [N, h, w] (0 on background), ``fg`` bool [N, h, w]. Runs are found with a
    cumulative sum of run starts; a cumulative max of ``run_id * M + label`` then cannot cross run
    boundaries because any earlier run has a smaller key.
    """
    m = lab.new_tensor(lab.shape[1] * lab.shape[2] + 1)
    prev = torch.cat([~fg.narrow(dim, 0, 1), fg.narrow(dim, 0, fg.shape[dim] - 1)], dim)
    run = torch.cumsum((fg != prev).to(torch.int64), dim)
    run_rev = run.amax(dim, keepdim=True) + 1 - run
    fwd = torch.cummax(run * m + lab, dim).values - run * m
    bwd = torch.cummax((run_rev * m + lab).flip(dim), dim).values.flip(dim) - run_rev * m
    return torch.maximum(fwd, bwd) * fg


def _drop_small_components(fg: Tensor, iters: int, min_size: float) -> Tensor:
    """Remove 4-connected components of ``fg`` [N, 1, h, w] (float 0/1) smaller than ``min_size`` px.

    Batched label propagation without host sync: every foreground pixel starts with its own linear
    index; each iteration replaces labels by the maximum along their horizontal run, then along
    their vertical run (exact run maxima via cumulative max). A component is fully labelled after
    as many iterations as its shape needs turns (a few for body-like blobs), not after as many as
    its diameter. Sizes come from a per-image histogram of labels. An unconverged component is
    split into a few large pieces (whole runs), so it is not lost by the size rule.
    """
    n, _, h, w = fg.shape
    f = fg.view(n, h, w) > 0.5
    lab = torch.arange(1, h * w + 1, device=fg.device, dtype=torch.int64).view(1, h, w) * f
    for _ in range(iters):
        lab = _run_max(lab, f, dim=2)
        lab = _run_max(lab, f, dim=1)
    lab = lab.view(n, -1)
    counts = torch.zeros(n, h * w + 1, device=fg.device, dtype=torch.float32)
    counts.scatter_add_(1, lab, f.view(n, -1).to(torch.float32))
    keep = (counts.gather(1, lab) >= min_size) & (lab > 0)
    return keep.view_as(fg).to(fg.dtype)


def _enclosed(fg: Tensor, min_run: int) -> Tensor:
    """Pixels with foreground on both sides in their row, or at least ``min_run`` foreground
    pixels both above and below them in their column. ``fg`` [N, 1, h, w] float 0/1."""
    row_l = torch.cummax(fg, dim=-1).values
    row_r = torch.cummax(fg.flip(-1), dim=-1).values.flip(-1)
    col_u = torch.cumsum(fg, dim=-2)
    col_d = torch.cumsum(fg.flip(-2), dim=-2).flip(-2)
    rows = torch.minimum(row_l, row_r)
    cols = ((col_u >= min_run) & (col_d >= min_run)).to(fg.dtype)
    return torch.maximum(rows, cols)


@torch.no_grad()
def body_mask(images: Tensor) -> Tensor:
    """Body (patient) mask of chest radiographs by histogram (multi-Otsu) thresholding.

    Algorithm in the module docstring. Lungs end up inside the mask through the low (air/lung)
    threshold, closing and row/column enclosure filling; a degenerate mask (< 5 % of the image) is
    replaced by the whole image.

    Args:
        images: ``[B, 1, H, W]`` float in [0, 1] (grayscale radiographs, not normalised).

    Returns:
        ``[B, 1, H, W]`` bool.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be [B, 1, H, W], got {tuple(images.shape)}")
    b, _, hh, ww = images.shape
    x = images.detach().to(torch.float32).clamp(0.0, 1.0)
    scale = min(1.0, BODY_SIDE / max(hh, ww))
    h, w = max(8, round(hh * scale)), max(8, round(ww * scale))
    if (h, w) != (hh, ww):
        x = F.adaptive_avg_pool2d(x, (h, w)) if scale < 1.0 else F.interpolate(x, (h, w))
    x = _gauss_blur3(x)

    flat = x.view(b, -1)
    q = torch.tensor(BODY_HIST_RANGE, device=x.device, dtype=torch.float32)
    lo_hi = torch.quantile(flat, q, dim=1)  # [2, B]
    valid = (flat >= lo_hi[0][:, None]) & (flat <= lo_hi[1][:, None])
    valid &= (flat > BODY_SATURATION) & (flat < 1.0 - BODY_SATURATION)
    thr = _multi_otsu_lowest(flat, valid)  # [B, 1]
    fg = (flat >= thr).to(torch.float32).view(b, 1, h, w)

    side = max(h, w)
    fg = _drop_small_components(fg, iters=BODY_LABEL_ITERS, min_size=BODY_MIN_COMPONENT * h * w)
    r = BODY_CLOSE_RADIUS
    fg = _erode(_dilate(fg, r), r)
    fg = torch.maximum(fg, _enclosed(fg, min_run=max(1, round(side * BODY_COLUMN_RUN))))

    frac = fg.mean(dim=(1, 2, 3), keepdim=True)
    fg = torch.where(frac >= BODY_MIN_FRACTION, fg, torch.ones_like(fg))
    if (h, w) != (hh, ww):
        fg = F.interpolate(fg, size=(hh, ww), mode="bilinear", align_corners=False)
    return fg >= 0.5


def aggregate_attention(attn: Tensor, aggregate: bool) -> Tensor:
    """Aggregate attention over heads (paper Eq. 2).

    Args:
        attn: ``[B, heads, h', w']`` attention weights of the pooling query.
        aggregate: True -> mean over heads; False -> unchanged (one map per head).

    Returns:
        ``[B, 1, h', w']`` if ``aggregate`` else ``[B, heads, h', w']``.
    """
    if attn.ndim != 4:
        raise ValueError(f"attn must be [B, heads, h, w], got {tuple(attn.shape)}")
    return attn.mean(dim=1, keepdim=True) if aggregate else attn


def _gaussian_kernel1d(sigma: float, device: torch.device) -> Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _separable_gauss(x: Tensor, k: Tensor) -> Tensor:
    """Zero-padded separable Gaussian of ``x`` [N, 1, H, W] (padding counts as 'not in image')."""
    r = (k.numel() - 1) // 2
    x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r))
    return F.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))


@torch.no_grad()
def bilateral_smooth_binary(mask: Tensor, sigma_space: float, sigma_color: float) -> Tensor:
    """Exact bilateral filter of a binary mask (Tomasi & Manduchi), Gaussian spatial kernel.

    For a {0,1} mask the range kernel ``exp(-(m_p - m_q)^2 / (2 sigma_color^2))`` is 1 for
    neighbours of the same class and ``c = exp(-1 / (2 sigma_color^2))`` otherwise, so with
    ``G = g * m`` and ``N = g * 1`` (``g`` the spatial Gaussian; ``N`` normalises for the image
    border, i.e. only in-image neighbours count):

    * where ``m = 1``: ``out = G / (G + c (N - G))``;
    * where ``m = 0``: ``out = c G / ((N - G) + c G)``.

    This is the brute-force bilateral filter exactly, at the price of two separable Gaussian
    convolutions, instead of a per-pixel ``(6 sigma)^2`` window.

    Args:
        mask: ``[B, K, H, W]`` with values in {0, 1} (bool or float).
        sigma_space: spatial sigma in pixels (kernel truncated at ``ceil(3 sigma)``).
        sigma_color: range sigma on mask values.

    Returns:
        ``[B, K, H, W]`` float32 in [0, 1]; unchanged farther than ``ceil(3 sigma_space)`` px from
        any edge.
    """
    if mask.ndim != 4:
        raise ValueError(f"mask must be [B, K, H, W], got {tuple(mask.shape)}")
    if not (sigma_space > 0 and sigma_color > 0):
        raise ValueError("sigma_space and sigma_color must be positive")
    b, k, h, w = mask.shape
    m = mask.detach().to(torch.float32).reshape(b * k, 1, h, w)
    g = _gaussian_kernel1d(float(sigma_space), m.device)
    big_g = _separable_gauss(m, g)
    norm = _separable_gauss(torch.ones(1, 1, h, w, device=m.device), g)
    c = math.exp(-1.0 / (2.0 * float(sigma_color) ** 2))
    other = (norm - big_g).clamp_min(0.0)
    big_g = big_g.clamp_min(0.0)
    out_fg = big_g / (big_g + c * other).clamp_min(1e-12)
    out_bg = c * big_g / (other + c * big_g).clamp_min(1e-12)
    out = torch.where(m > 0.5, out_fg, out_bg).clamp_(0.0, 1.0)
    return out.view(b, k, h, w)


def _masked_quantile(vals: Tensor, valid: Tensor, q: float) -> Tensor:
    """Quantile ``q`` in [0, 1] of ``vals`` [N, P] over ``valid`` entries, linear interpolation.

    Same definition as ``np.quantile`` (default ``linear``) on the valid subset. Rows without any
    valid entry get +inf (so nothing is foreground; cannot happen with a non-empty body mask).
    """
    big = torch.finfo(vals.dtype).max
    s, _ = torch.sort(torch.where(valid, vals, torch.full_like(vals, big)), dim=1)
    n = valid.sum(1, keepdim=True)
    pos = (n - 1).clamp_min(0).to(vals.dtype) * q
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max((n - 1).clamp_min(0))
    frac = pos - lo.to(vals.dtype)
    v_lo = s.gather(1, lo)
    v_hi = s.gather(1, hi)
    out = v_lo + (v_hi - v_lo) * frac
    return torch.where(n > 0, out, torch.full_like(out, float("inf")))


def _gmm_foreground(vals: Tensor, valid: Tensor) -> Tensor:
    """Two-component 1-D GMM per row, fitted by EM on a histogram of the valid values.

    ``vals`` [N, P], ``valid`` [N, P] bool -> bool [N, P]: posterior of the high-mean component
    > 0.5 and value above the low component's mean (the wider Gaussian would otherwise also "win"
    in the far low tail). Values are min-max normalised per row over the valid entries; EM runs on
    a :data:`GMM_BINS`-bin histogram (cheap: independent of the image size), the decision uses the
    exact pixel values.
    """
    n_rows = vals.shape[0]
    inf = torch.finfo(vals.dtype).max
    vmin = torch.where(valid, vals, torch.full_like(vals, inf)).amin(1, keepdim=True)
    vmax = torch.where(valid, vals, torch.full_like(vals, -inf)).amax(1, keepdim=True)
    span = (vmax - vmin).clamp_min(1e-12)
    z = ((vals - vmin) / span).clamp(0.0, 1.0)
    z = torch.where(valid, z, torch.zeros_like(z))

    idx = (z * GMM_BINS).long().clamp_(0, GMM_BINS - 1)
    hist = torch.zeros(n_rows, GMM_BINS, device=vals.device, dtype=torch.float32)
    hist.scatter_add_(1, idx, valid.to(torch.float32))
    wts = hist / hist.sum(1, keepdim=True).clamp_min(1.0)
    x = ((torch.arange(GMM_BINS, device=vals.device, dtype=torch.float32) + 0.5) / GMM_BINS)[None]

    mean = (wts * x).sum(1, keepdim=True)
    var = (wts * (x - mean) ** 2).sum(1, keepdim=True)
    std = var.clamp_min(1e-8).sqrt()
    var_floor = (1.0 / GMM_BINS) ** 2
    mu = torch.cat([mean - std, mean + std], 1)  # [N, 2]
    sig2 = torch.cat([var, var], 1).clamp_min(var_floor)
    pi = torch.full_like(mu, 0.5)

    def log_joint(xx: Tensor) -> Tensor:  # [N, 2, M]
        return (
            pi.log()[..., None]
            - 0.5 * sig2.log()[..., None]
            - 0.5 * (xx[:, None, :] - mu[..., None]) ** 2 / sig2[..., None]
        )

    for _ in range(GMM_ITERS):
        resp = torch.softmax(log_joint(x.expand(n_rows, -1)), dim=1)  # [N, 2, bins]
        rw = resp * wts[:, None, :]
        nk = rw.sum(2).clamp_min(1e-12)
        mu = (rw * x[:, None, :]).sum(2) / nk
        sig2 = ((rw * (x[:, None, :] - mu[..., None]) ** 2).sum(2) / nk).clamp_min(var_floor)
        pi = (nk / nk.sum(1, keepdim=True)).clamp_min(1e-6)

    hi = mu.argmax(1, keepdim=True)  # [N, 1]
    lj = log_joint(z)  # [N, 2, P]
    post_hi = torch.softmax(lj, dim=1).gather(1, hi[:, :, None].expand(-1, 1, z.shape[1]))[:, 0]
    mu_lo = mu.amin(1, keepdim=True)
    return valid & (post_hi > 0.5) & (z > mu_lo)


@torch.no_grad()
def build_pseudo_masks(attn: Tensor, images: Tensor, cfg: PseudoMaskCfg) -> Tensor:
    """Pseudo segmentation masks from attention-pooling weights (paper Sec. 3.2).

    Args:
        attn: ``[B, heads, h', w']`` attention of the pooling query over the dense feature map
            (any float dtype; gradients are not tracked).
        images: ``[B, 1, H, W]`` float in [0, 1], the input images (for the body mask and size).
        cfg: options; validated here.

    Returns:
        ``[B, K, H, W]`` float32 in [0, 1] (binary if ``cfg.rebinarize`` or not ``cfg.smoothing``),
        ``K = 1`` if ``cfg.aggregate_heads`` else ``heads``. Zero outside the body mask.
    """
    cfg.validate()
    if attn.ndim != 4:
        raise ValueError(f"attn must be [B, heads, h, w], got {tuple(attn.shape)}")
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[0] != attn.shape[0]:
        raise ValueError(
            f"images must be [B, 1, H, W] with B = {attn.shape[0]}, got {tuple(images.shape)}"
        )
    b, _, hh, ww = images.shape
    a = aggregate_attention(attn.detach().to(torch.float32), cfg.aggregate_heads)
    k = a.shape[1]
    if cfg.upsample == "bilinear":
        a = F.interpolate(a, size=(hh, ww), mode="bilinear", align_corners=False)
    else:
        a = F.interpolate(a, size=(hh, ww), mode="nearest")

    if cfg.body_mask:
        body = body_mask(images.to(a.device))  # [B, 1, H, W] bool
    else:
        body = torch.ones(b, 1, hh, ww, dtype=torch.bool, device=a.device)
    a = a * body  # attention outside the body set to zero (paper)

    vals = a.reshape(b * k, hh * ww)
    valid = body.expand(b, k, hh, ww).reshape(b * k, hh * ww)
    if cfg.threshold == "gmm":
        fg = _gmm_foreground(vals, valid)
    else:
        if cfg.threshold == "mean":
            thr = (vals * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1)
        else:
            q = 0.5 if cfg.threshold == "median" else float(cfg.percentile) / 100.0
            thr = _masked_quantile(vals, valid, q)
        fg = (vals > thr) if cfg.strict else (vals >= thr)
        fg = fg & valid
    m = fg.to(torch.float32).view(b, k, hh, ww)

    if cfg.smoothing:
        factor = 0.5 * (hh / attn.shape[2] + ww / attn.shape[3])
        m = bilateral_smooth_binary(m, cfg.bilateral_sigma_space * factor, cfg.bilateral_sigma_color)
        if cfg.rebinarize:
            m = (m >= 0.5).to(torch.float32)
        m = m * body  # smoothing must not leak foreground outside the body
    return m


def shuffle_masks(masks: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Permute masks across the batch so no mask stays with its own image (Table 8 "shuffled").

    A uniformly random cyclic permutation (a random ordering of the batch, each element taking
    the mask of the next one in that ordering) is always a derangement for ``B > 1``.

    Args:
        masks: ``[B, ...]``.
        generator: optional RNG; the permutation is drawn on the generator's device.

    Returns:
        ``[B, ...]``, ``out[i] = masks[src[i]]`` with ``src[i] != i`` for every i when ``B > 1``.
    """
    n = masks.shape[0]
    if n <= 1:
        return masks.clone()
    dev = generator.device if generator is not None else masks.device
    order = torch.randperm(n, generator=generator, device=dev).to(masks.device)
    src = torch.empty_like(order)
    src[order] = order.roll(-1)
    return masks[src]
