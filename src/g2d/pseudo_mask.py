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
   85th percentile (default, Eq. 3), 75th percentile, median, mean, or a two-component 1-D GMM
   (threshold where the high component's posterior crosses 0.5, see :func:`_gmm_foreground`);
5. binarise with ``>= threshold`` (Eq. 3) or ``> threshold`` (release, ``strict=True``);
6. edge smoothing with an exact bilateral filter for binary masks, optionally re-binarised at 0.5;
7. multiply by the body mask again so that nothing outside the body is ever foreground.

Percentile semantics: linear interpolation between order statistics (as ``np.quantile``), over
the in-body pixels of the full-resolution upsampled map. At the 85th percentile about 15 % of the
body area is foreground; with ``strict=False`` a block of tied values at the threshold (nearest
upsampling) is included whole, with ``strict=True`` it is excluded whole.

Body mask (:func:`body_mask`): "histogram-based thresholding" per the paper, which gives no
details; this is our algorithm. Its priority is never to cut off lung (attention on the lungs is
what the pretext task is about); leaving some outside air in is the lesser error.

1. downsample to a long side of :data:`BODY_SIDE` (128) px with area averaging (anti-aliasing,
   speed), then a 3x3 binomial blur;
2. per-image 4-class Otsu (multi-level Otsu; classes roughly outside air / lung / soft tissue /
   bone and mediastinum) on a 64-bin histogram built with ``scatter_add``, exact search over all
   threshold triples in O(bins^2) per image. Pixels outside the image's [1st, 99.5th] percentile
   range or within 0.01 of black/white are left out of the histogram, so that saturated patches
   (black corner blocks, burnt-in labels) do not get a class of their own;
3. body candidates = at or above the *lowest* threshold, i.e. everything brighter than outside
   air. Plain 2-class Otsu splits lung from soft tissue instead, and the lungs then leak out to
   the image border through dim lateral chest walls (measured with border flood-fill hole
   filling: 64/247 JSRT images lost more than 1 % of their lung pixels);
4. morphological closing, radius :data:`BODY_CLOSE_RADIUS` (2) low-res px;
5. enclosure filling, which brings back dark lung parts below the threshold: a pixel becomes body
   if there is body on both sides of it in its row (lungs always lie between mediastinum and
   lateral chest wall), or at least :data:`BODY_COLUMN_RUN` x side (8 px) of body both above and
   below it in its column. The run length requirement keeps thin bright film edges at the image
   bottom from enclosing the outside-air strips beside the torso. Both are cumulative max/sum
   scans: no iteration, no connected-component labelling;
6. a degenerate result (< 5 % of the image) falls back to the whole image for that image
   (``torch.where``, no sync);
7. bilinear upsampling of the 0/1 mask to full size and ``>= 0.5``.

Measured on the shared real data (512 px JSRT, all 247 images; covid-notes, all 324 images with
V7 lung masks): lung pixels inside the body mask: JSRT 100 % for every image (also the 7
washed-out ones, and also at 224 px); covid-notes mean
99.9 %, 318/324 images >= 99 %, worst 92 % (tight crops whose apex and lateral lung both touch
the image border, where the lung is indistinguishable from outside air by this method). Body
fraction of the image on JSRT: median 0.95, 198/247 images below 0.97 (the rest are films where
the patient fills the frame).

Bilateral filter (:func:`bilateral_smooth_binary`): for a binary mask the range kernel only takes two
values (1 for neighbours of the same class, ``c = exp(-1 / (2 sigma_color^2))`` for the other
class), so the bilateral filter is exactly computable from two separable Gaussian filterings
(done as banded-matrix products); see the function docstring. The spatial Gaussian is truncated
at ``ceil(3 sigma_space)``, so pixels farther than that from any mask edge are exactly unchanged.

Defaults chosen here (not given by the paper or the release):

* ``bilateral_sigma_space = 0.25`` in units of one attention cell (the upsampling factor
  ``H / h'``): 8 px for 224 px input and a 7x7 map. This visibly rounds the corners of the 32-px
  blocks of a nearest-upsampled mask while keeping the foreground area (measured on random
  attention maps at the 85th percentile: 15.0 % -> 14.4-14.8 % on average, ~0.3 % of pixels
  changed). At 0.5 cells (16 px) the filter starts to act as curvature flow on whole blobs:
  single-cell blobs turn into shrunken discs and the 85th-percentile mask loses ~2 of its 15
  percentage points.
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
BODY_SIDE: int = 128
#: Radius (low-res px) of the morphological closing that seals gaps between lungs and outside air.
BODY_CLOSE_RADIUS: int = 2
#: Minimum body fraction of the image; below it the whole image is used instead.
BODY_MIN_FRACTION: float = 0.05
#: Percentiles bounding the intensities that enter the Otsu histogram.
BODY_HIST_RANGE: tuple[float, float] = (0.01, 0.995)
#: Pixels this close to 0 or 1 (saturated borders, burnt-in labels) are left out of the histogram.
BODY_SATURATION: float = 0.01
#: Histogram bins of the multi-Otsu threshold.
BODY_OTSU_BINS: int = 64
#: Minimum foreground run (fraction of the low-res long side) above and below for column filling.
BODY_COLUMN_RUN: float = 1.0 / 16.0
#: Number of EM iterations for the two-component GMM threshold.
GMM_ITERS: int = 50
#: Histogram bins used to fit the GMM.
GMM_BINS: int = 256
#: Grid points between the two GMM means searched for the posterior-0.5 crossing.
GMM_GRID: int = 1024

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
            factor ``H / h'`` (0.25 -> 8 px for a 7x7 map on 224 px).
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
    bilateral_sigma_space: float = 0.25
    bilateral_sigma_color: float = 1.0
    rebinarize: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field for an invalid configuration."""
        if self.upsample not in _UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {_UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.threshold not in _THRESHOLD_MODES:
            raise ValueError(f"threshold must be one of {_THRESHOLD_MODES}, got {self.threshold!r}")
        for name, ok in (("percentile", lambda v: 0.0 < v < 100.0),  # also rejects NaN
                         ("bilateral_sigma_space", lambda v: 0.0 < v < math.inf),
                         ("bilateral_sigma_color", lambda v: 0.0 < v < math.inf)):
            raw = getattr(self, name)
            try:
                good = not isinstance(raw, bool) and ok(float(raw))
            except (TypeError, ValueError):
                good = False
            if not good:
                rng = "in (0, 100)" if name == "percentile" else "a finite positive number"
                raise ValueError(f"{name} must be {rng}, got {raw!r}")
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
    """3x3 binomial blur, replicate padding. ``x`` [N, 1, h, w]."""
    # [0.25, 0.5, 0.25] built on the device: torch.tensor(list, device=cuda) would sync the stream.
    k = 0.5 - 0.25 * (torch.arange(3, device=x.device, dtype=x.dtype) - 1.0).abs()
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
    # Robust intensity range per image (nearest-rank percentiles; every row has the same length, so
    # kthvalue with a static k works and nothing waits on the device).
    n_px = flat.shape[1]
    k_lo = min(n_px, max(1, round(BODY_HIST_RANGE[0] * n_px)))
    k_hi = min(n_px, max(1, round(BODY_HIST_RANGE[1] * n_px)))
    lo = torch.kthvalue(flat, k_lo, dim=1, keepdim=True).values
    hi = torch.kthvalue(flat, k_hi, dim=1, keepdim=True).values
    valid = (flat >= lo) & (flat <= hi)
    valid &= (flat > BODY_SATURATION) & (flat < 1.0 - BODY_SATURATION)
    thr = _multi_otsu_lowest(flat, valid)  # [B, 1]
    fg = (flat >= thr).to(torch.float32).view(b, 1, h, w)

    side = max(h, w)
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


def _gaussian_band_matrix(n: int, sigma: float, device: torch.device) -> Tensor:
    """[n, n] matrix ``K`` with ``(K @ x)`` = 1-D Gaussian filtering of ``x`` along its first axis.

    Kernel truncated at ``ceil(3 sigma)`` and normalised to sum 1 over its full support; rows near
    the ends are simply cut (zero padding), so ``K @ 1`` is the in-image weight.
    """
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    idx = torch.arange(n, device=device)
    d = idx[:, None] - idx[None, :]
    band = d.abs() <= radius
    return torch.where(band, g[(d + radius).clamp(0, 2 * radius)], torch.zeros((), device=device))


@torch.no_grad()
def bilateral_smooth_binary(mask: Tensor, sigma_space: float, sigma_color: float) -> Tensor:
    """Exact bilateral filter of a binary mask (Tomasi & Manduchi), Gaussian spatial kernel.

    For a {0,1} mask the range kernel ``exp(-(m_p - m_q)^2 / (2 sigma_color^2))`` is 1 for
    neighbours of the same class and ``c = exp(-1 / (2 sigma_color^2))`` otherwise, so with
    ``G = g * m`` and ``O = g * (1 - m)`` (``g`` the spatial Gaussian with zero padding, i.e. only
    in-image neighbours count; ``G + O = N = g * 1`` is the border normalisation):

    * where ``m = 1``: ``out = G / (G + c O)``;
    * where ``m = 0``: ``out = c G / (O + c G)``.

    This equals the brute-force bilateral filter, but costs two separable Gaussian filterings
    instead of a ``(6 sigma)^2`` window per pixel. The separable Gaussian is applied as two matrix
    products with a banded [H, H] / [W, W] matrix (fast on any device, no big-kernel ``unfold``).
    ``O`` is filtered directly rather than taken as ``N - G``: where the window holds one class only,
    ``G`` or ``O`` is then exactly 0 and the pixel is returned exactly unchanged. (With TF32 matmuls
    enabled by the caller, values near edges carry ~1e-3 relative error; exact zeros stay exact.)

    Args:
        mask: ``[B, K, H, W]`` with values in {0, 1} (bool or float).
        sigma_space: spatial sigma in pixels (kernel truncated at ``ceil(3 sigma)``).
        sigma_color: range sigma on mask values.

    Returns:
        ``[B, K, H, W]`` float32 in [0, 1]; identical to ``mask`` farther than
        ``ceil(3 sigma_space)`` px (Chebyshev distance) from any pixel of the other class.
    """
    if mask.ndim != 4:
        raise ValueError(f"mask must be [B, K, H, W], got {tuple(mask.shape)}")
    if not (sigma_space > 0 and sigma_color > 0):
        raise ValueError("sigma_space and sigma_color must be positive")
    b, k, h, w = mask.shape
    m = (mask.detach() > 0.5).to(torch.float32).reshape(b * k, h, w)
    kh = _gaussian_band_matrix(h, float(sigma_space), m.device)
    kw = _gaussian_band_matrix(w, float(sigma_space), m.device)
    both = torch.cat([m, 1.0 - m], 0)  # one batched product for G and O
    filt = torch.matmul(torch.matmul(kh, both), kw.t())  # kw symmetric; .t() for clarity
    big_g, other = filt[: b * k].clamp_min(0.0), filt[b * k :].clamp_min(0.0)
    c = math.exp(-1.0 / (2.0 * float(sigma_color) ** 2))
    out_fg = big_g / (big_g + c * other).clamp_min(1e-30)
    out_bg = c * big_g / (other + c * big_g).clamp_min(1e-30)
    out = torch.where(m > 0.5, out_fg, out_bg).clamp_(0.0, 1.0)
    return out.view(b, k, h, w)


def _masked_quantile(vals: Tensor, valid: Tensor, q: float) -> Tensor:
    """Quantile ``q`` in (0, 1) of ``vals`` [N, P] over its ``valid`` entries, per row -> [N, 1].

    Same definition as ``np.quantile`` (``linear``) on the valid subset: with ``n`` valid values the
    position is ``q (n - 1)``, interpolated between neighbouring order statistics. Computed from
    the top: invalid entries become -inf and ``torch.topk`` with the static
    ``k = floor((1 - q)(P - 1)) + 2`` (no host sync; enough for every ``n <= P``) gives the valid
    values in descending order; position ``(1 - q)(n - 1)`` there is the same quantile. For the
    85th percentile this is ~5x cheaper than a full sort. Rows without valid entries give +inf.
    """
    p = vals.shape[1]
    k = min(p, int(math.floor((1.0 - q) * (p - 1))) + 2)
    neg_inf = torch.full_like(vals, float("-inf"))
    top = torch.topk(torch.where(valid, vals, neg_inf), k, dim=1, sorted=True).values
    n = valid.sum(1, keepdim=True)
    pos = (n - 1).clamp_min(0).to(vals.dtype) * (1.0 - q)
    lo = pos.floor().long().clamp_max(k - 1)
    hi = torch.minimum(lo + 1, (n - 1).clamp_min(0)).clamp_max(k - 1)
    frac = pos - lo.to(vals.dtype)
    v_lo = top.gather(1, lo)
    v_hi = top.gather(1, hi)
    out = v_lo + (v_hi - v_lo) * frac
    return torch.where(n > 0, out, torch.full_like(out, float("inf")))


def _gmm_foreground(vals: Tensor, valid: Tensor) -> Tensor:
    """Two-component 1-D GMM threshold per row, fitted by EM on a histogram of the valid values.

    ``vals`` [N, P], ``valid`` [N, P] bool -> bool [N, P]. Values are min-max normalised per row
    over the valid entries; EM (:data:`GMM_ITERS` iterations, fixed) runs on a
    :data:`GMM_BINS`-bin histogram, so its cost does not depend on the image size. Foreground is
    where the posterior of the high-mean component exceeds 0.5, made monotone: the threshold is the
    lowest of :data:`GMM_GRID` grid points between the two means at which that posterior exceeds
    0.5, and foreground is ``z >= threshold``. Between the means this is the posterior rule itself;
    outside them it avoids the artefact that the wider Gaussian "wins" both far tails (which would
    mark the flat low plateau's upper noise, or the lowest values, as foreground).
    """
    n_rows = vals.shape[0]
    big = torch.finfo(vals.dtype).max
    vmin = torch.where(valid, vals, torch.full_like(vals, big)).amin(1, keepdim=True)
    vmax = torch.where(valid, vals, torch.full_like(vals, -big)).amax(1, keepdim=True)
    span = (vmax - vmin).clamp_min(1e-12)
    z = ((vals - vmin) / span).clamp(0.0, 1.0)
    z = torch.where(valid, z, torch.zeros_like(z))

    idx = (z * GMM_BINS).long().clamp_(0, GMM_BINS - 1)
    hist = torch.zeros(n_rows, GMM_BINS, device=vals.device, dtype=torch.float32)
    hist.scatter_add_(1, idx, valid.to(torch.float32))
    wts = hist / hist.sum(1, keepdim=True).clamp_min(1.0)
    x = ((torch.arange(GMM_BINS, device=vals.device, dtype=torch.float32) + 0.5) / GMM_BINS)[None]

    # Init: means at mean -/+ one standard deviation, both with the overall variance.
    mean = (wts * x).sum(1, keepdim=True)
    var = (wts * (x - mean) ** 2).sum(1, keepdim=True)
    std = var.clamp_min(1e-8).sqrt()
    var_floor = (1.0 / GMM_BINS) ** 2  # no collapse onto a single bin
    mu = torch.cat([mean - std, mean + std], 1)  # [N, 2]
    sig2 = torch.cat([var, var], 1).clamp_min(var_floor)
    pi = torch.full_like(mu, 0.5)
    for _ in range(GMM_ITERS):
        log_joint = (pi.log() - 0.5 * sig2.log())[..., None] - 0.5 * (
            x[:, None, :] - mu[..., None]) ** 2 / sig2[..., None]  # [N, 2, bins]
        rw = torch.softmax(log_joint, dim=1) * wts[:, None, :]
        nk = rw.sum(2).clamp_min(1e-12)
        mu = (rw * x[:, None, :]).sum(2) / nk
        sig2 = ((rw * (x[:, None, :] - mu[..., None]) ** 2).sum(2) / nk).clamp_min(var_floor)
        pi = (nk / nk.sum(1, keepdim=True)).clamp_min(1e-6)

    hi = mu.argmax(1, keepdim=True)
    lo = 1 - hi
    mu_h, mu_l = mu.gather(1, hi), mu.gather(1, lo)
    s2_h, s2_l = sig2.gather(1, hi), sig2.gather(1, lo)
    const = (pi.gather(1, hi).log() - pi.gather(1, lo).log()) - 0.5 * (s2_h.log() - s2_l.log())
    t = torch.linspace(0.0, 1.0, GMM_GRID, device=vals.device)[None]
    grid = mu_l + (mu_h - mu_l) * t  # [N, GRID], from the low to the high mean
    # log posterior ratio high/low > 0  <=>  posterior(high) > 0.5
    score = const - 0.5 * (grid - mu_h) ** 2 / s2_h + 0.5 * (grid - mu_l) ** 2 / s2_l
    # First grid point with score > 0 (the last one, mu_h, if the low component wins throughout).
    first = torch.where(score > 0, t.expand_as(score), torch.ones_like(score)).amin(1, keepdim=True)
    thr = mu_l + (mu_h - mu_l) * first
    return valid & (z >= thr)


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
    # A generator on another device costs one small host-to-device copy; none without a generator.
    order = torch.randperm(n, generator=generator, device=dev).to(masks.device, non_blocking=True)
    src = torch.empty_like(order)
    src[order] = order.roll(-1)
    return masks[src]
