"""Does the attention map follow the image? Diagnostics of G2D's pseudo-mask mechanism.

G2D's dense objective (paper Sec. 3.2, Fig. 2 and Fig. 4) assumes that the attention-pooling
weights of a model aligned with reports highlight what the report names, so that pseudo masks built
from them differ from image to image. These functions measure whether they do, on any model and any
set with finding masks (or boxes filled into masks):

- **collapse** (:func:`collapse_r`): Pearson r between each image's attention map and the mean map
  over the set. 1.0 means every image gets the same map (a fixed template).
- **pointing game** (:func:`pointing_hits`): the centre of the attention map's arg-max cell lies
  inside the finding's mask dilated by ``1/16`` of the image side (a coarse map can only point at
  cell centres; the dilation forgives a finding that covers the cell but not its centre).
- **pseudo-mask overlap**: IoU and Dice between the pseudo mask built from the attention
  (:func:`g2d.pseudo_mask.build_pseudo_masks`) and the finding mask.
- **position-only prior**: the same scores when every image's attention is replaced by the set's
  mean map (pointing) and the pseudo mask is built from that mean map with each image's own body
  mask (overlap). A mechanism that uses the image must beat its prior; a collapsed one equals it.
- **uncertainty** (``interval``): a paired bootstrap interval over images of the head mean's IoU
  ratio (pseudo-mask IoU / prior IoU), so that a gate such as "IoU >= 2 x prior" can be read
  against the noise of a finite set.
- **oracle** (``oracle``): the pseudo-mask IoU of a map centred on each image's finding (its
  centroid, falling off with distance): what a map that points perfectly reaches with these
  pseudo-mask settings, since the percentile threshold makes the mask larger than a small finding.
- **saturation** (``peak_mass``, ``same_argmax``): per head, the mean attention weight on the
  arg-max cell (1.0 = one-hot softmax) and the share of images whose arg-max cell is the set's most
  common one.

Scores are reported for the head mean (what the pseudo mask of Eq. 2 uses) and per head, and,
given each image's finding name, per finding for the head mean (against the whole set's prior: a
finding that always sits in one place, like cardiomegaly, has a high prior).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from g2d.metrics import dice_per_image, iou_per_image
from g2d.pseudo_mask import PseudoMaskCfg, _dilate, build_pseudo_masks

__all__ = ["AttentionScores", "AttentionDiagnostics", "collapse_r", "pointing_hits", "iou_ratio_interval",
           "diagnose_attention", "collect_attention", "oracle_maps", "POINTING_DILATION"]

#: Dilation of the finding mask for the pointing game, as a fraction of the image side.
POINTING_DILATION = 1.0 / 16.0


def collapse_r(maps: Tensor) -> Tensor:
    """Pearson r of each map with the mean map of the set.

    :param maps: [N, h, w] (or [N, P]) attention maps of N images.
    :return: [N] float; NaN for a map that is constant (no variance), and all NaN when the mean map
        is constant.
    """
    x = maps.flatten(1).double()
    mean = x.mean(0, keepdim=True)
    xc, mc = x - x.mean(1, keepdim=True), mean - mean.mean()
    denom = xc.norm(dim=1) * mc.norm()
    r = (xc * mc).sum(1) / denom
    return torch.where(denom > 0, r, torch.full_like(r, float("nan"))).float()


def pointing_hits(maps: Tensor, targets: Tensor, dilation: float = POINTING_DILATION) -> Tensor:
    """Pointing game: does the centre of the map's arg-max cell fall inside the (dilated) target?

    Pointing at the cell centre, not at the arg-max of an upsampled map, keeps the answer free of
    the ties that bilinear upsampling makes around a peak.

    :param maps: [N, h, w] attention (or any score) maps (ties: the first cell in row-major order).
    :param targets: [N, H, W] bool finding masks over the same field of view.
    :param dilation: dilation radius as a fraction of the mean side ``(H + W) / 2`` (0: none).
    :return: [N] float 0/1.
    """
    if maps.shape[0] != targets.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps for {targets.shape[0]} targets")
    h, w = maps.shape[-2:]
    hh, ww = targets.shape[-2:]
    top = maps.flatten(1).argmax(1)
    y = ((top // w).double() + 0.5) * hh / h
    x = ((top % w).double() + 0.5) * ww / w
    y, x = y.long().clamp_max(hh - 1), x.long().clamp_max(ww - 1)
    radius = round(dilation * (hh + ww) / 2)
    grown = _dilate(targets.float()[:, None], radius)[:, 0] > 0 if radius > 0 else targets.bool()
    return grown[torch.arange(len(top)), y, x].float()


@dataclass
class AttentionScores:
    """Scores of one attention map per image (one head, or the head mean) over a set.

    :ivar collapse_r: mean Pearson r with the set's mean map (1 = the same map for every image).
    :ivar pointing: pointing-game hit rate; ``pointing_prior``: the same with the mean map.
    :ivar iou, dice: mean pseudo-mask IoU / Dice with the finding masks; ``*_prior``: the same for
        pseudo masks built from the mean map.
    :ivar peak_mass: mean attention weight on the arg-max cell (1 = one-hot; 1/(h*w) = uniform).
    :ivar same_argmax: share of images whose arg-max cell is the set's most common arg-max cell.
    """

    collapse_r: float
    pointing: float
    pointing_prior: float
    iou: float
    iou_prior: float
    dice: float
    dice_prior: float
    peak_mass: float
    same_argmax: float


@dataclass
class AttentionDiagnostics:
    """:ivar mean: scores of the head-mean map (Eq. 2). :ivar heads: scores of each head.
    :ivar n_images: images scored. :ivar map_hw: attention map size (h, w).
    :ivar per_group: head-mean scores of each group's images (``groups`` of
        :func:`diagnose_attention`, e.g. the finding), with the prior of the whole set."""

    mean: AttentionScores
    heads: list[AttentionScores]
    n_images: int
    map_hw: tuple[int, int]
    extra: dict[str, Any] = field(default_factory=dict)
    per_group: dict[str, tuple[int, AttentionScores]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Flat ``{"collapse_r": ..., "head0/collapse_r": ..., "nodule/pointing": ...,
        "nodule/n_images": ...}`` plus ``n_images``/``map_h``/``map_w``."""
        out: dict[str, Any] = dict(dataclasses.asdict(self.mean))
        for i, h in enumerate(self.heads):
            out.update({f"head{i}/{k}": v for k, v in dataclasses.asdict(h).items()})
        for name, (n, g) in self.per_group.items():
            out.update({f"{name}/n_images": n, **{f"{name}/{k}": v for k, v in dataclasses.asdict(g).items()}})
        out.update(n_images=self.n_images, map_h=self.map_hw[0], map_w=self.map_hw[1], **self.extra)
        return out


def _scores(maps: Tensor, pseudo: Tensor, prior: Tensor, targets: Tensor,
            mean_map: Tensor | None = None) -> AttentionScores:
    """maps [N, h, w]; pseudo / prior masks [N, H, W]; targets [N, H, W] bool; mean_map [h, w]
    (default: the mean of ``maps``)."""
    n = maps.shape[0]
    mean_map = (maps.mean(0) if mean_map is None else mean_map)[None].expand_as(maps)
    flat = maps.flatten(1)
    arg = flat.argmax(1)
    common = torch.mode(arg).values
    pseudo, prior = pseudo > 0.5, prior > 0.5
    return AttentionScores(
        collapse_r=float(torch.nanmean(collapse_r(maps))),
        pointing=float(pointing_hits(maps, targets).mean()),
        pointing_prior=float(pointing_hits(mean_map, targets).mean()),
        iou=float(iou_per_image(pseudo, targets).mean()),
        iou_prior=float(iou_per_image(prior, targets).mean()),
        dice=float(dice_per_image(pseudo, targets).mean()),
        dice_prior=float(dice_per_image(prior, targets).mean()),
        peak_mass=float((flat.max(1).values / flat.sum(1).clamp_min(1e-12)).mean()),
        same_argmax=float((arg == common).float().sum() / n),
    )


def iou_ratio_interval(iou: Tensor, iou_prior: Tensor, confidence: float = 0.95,
                       n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The ratio of mean IoUs ``mean(iou) / mean(iou_prior)`` and its BCa bootstrap interval,
    resampling images with their pairs (``scipy.stats.bootstrap``, paired).

    :param iou, iou_prior: [N] per-image IoU of the pseudo masks and of the prior's masks.
    :return: (ratio, low, high); NaNs when the prior's IoU is 0 on every image or N < 2.
    """
    import numpy as np
    from scipy.stats import bootstrap

    a, b = iou.double().numpy(), iou_prior.double().numpy()
    if len(a) < 2 or not b.any():
        return float("nan"), float("nan"), float("nan")

    def ratio(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return x.mean(axis) / np.maximum(y.mean(axis), 1e-12)

    res = bootstrap((a, b), ratio, paired=True, vectorized=True, n_resamples=n_resamples,
                    confidence_level=confidence, rng=np.random.default_rng(seed))
    return float(ratio(a, b)), float(res.confidence_interval.low), float(res.confidence_interval.high)


def oracle_maps(targets: Tensor, hw: tuple[int, int]) -> Tensor:
    """Maps that point perfectly: each peaks on its finding's centroid and falls off with distance.

    The pseudo mask keeps a percentile of the map (Eq. 2), so any map that decreases with distance
    from the centroid gives the same mask: a disc around the finding, cut by the body mask. It is
    a reference, not an upper bound (a map shaped like the finding and the body can overlap more).

    :param targets: [N, H, W] bool finding masks, none empty.
    :param hw: (h, w), the attention map's size.
    :return: [N, 1, h, w], each summing to 1.
    :raises ValueError: an empty target (it has no centroid).
    """
    t = targets.float()
    area = t.sum((1, 2))
    if (area == 0).any():
        raise ValueError("oracle_maps: an empty finding mask has no centroid")
    H, W = t.shape[-2:]
    ys, xs = torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32)
    cy, cx = (t.sum(2) * ys).sum(1) / area, (t.sum(1) * xs).sum(1) / area
    # cell centres in input pixels
    gy = (torch.arange(hw[0], dtype=torch.float32) + 0.5) * H / hw[0] - 0.5
    gx = (torch.arange(hw[1], dtype=torch.float32) + 0.5) * W / hw[1] - 0.5
    d = ((gy[None, :, None] - cy[:, None, None]) ** 2 + (gx[None, None, :] - cx[:, None, None]) ** 2).sqrt()
    maps = 1.0 / (1.0 + d / max(H, W))   # positive and strictly decreasing: no ties, no underflow
    return (maps / maps.sum((1, 2), keepdim=True))[:, None]


def diagnose_attention(attention: Tensor, images: Tensor, targets: Tensor,
                       cfg: PseudoMaskCfg | None = None,
                       groups: Sequence[str] | None = None,
                       interval: float | None = None,
                       oracle: bool = False) -> AttentionDiagnostics:
    """Score attention maps against finding masks (see the module docstring).

    :param attention: [N, heads, h, w] attention-pooling weights (:attr:`ImageOutput.attention`).
    :param images: [N, 1, H, W] in [0, 1], the model's input (for the pseudo masks' body mask).
    :param targets: [N, H, W] bool finding masks at the input's resolution; images whose target is
        empty should be left out by the caller (they cannot be pointed at).
    :param cfg: the pseudo-mask options the model was trained with (default: the paper's).
    :param groups: N names (e.g. each image's finding) to score the head mean per group as well.
    :param interval: a confidence level (e.g. 0.95): adds ``iou_ratio``, ``iou_ratio_low`` and
        ``iou_ratio_high`` (:func:`iou_ratio_interval` of the head mean) to ``extra``.
    :param oracle: adds ``oracle_iou`` to ``extra``: the pseudo-mask IoU of :func:`oracle_maps` at
        the attention's size. (No oracle prior: the mean of the oracle maps, unlike their masks,
        depends on how fast they fall off, which is arbitrary.)
    :raises ValueError: shapes that do not match, or no images.
    """
    if attention.ndim != 4 or images.ndim != 4 or targets.ndim != 3:
        raise ValueError(f"expected attention [N, heads, h, w], images [N, 1, H, W], targets [N, H, W]; "
                         f"got {tuple(attention.shape)}, {tuple(images.shape)}, {tuple(targets.shape)}")
    n = attention.shape[0]
    if n == 0 or images.shape[0] != n or targets.shape[0] != n or images.shape[-2:] != targets.shape[-2:]:
        raise ValueError(f"need N > 0 and matching sizes: attention {tuple(attention.shape)}, images "
                         f"{tuple(images.shape)}, targets {tuple(targets.shape)}")
    cfg = cfg or PseudoMaskCfg()
    hw = (attention.shape[-2], attention.shape[-1])
    attention, images, targets = attention.float().cpu(), images.float().cpu(), targets.bool().cpu()
    # Every map scored, as channels of one stack: each head, the head mean (Eq. 2 averages before
    # upsampling, as here), and the same for the set's mean maps (the prior). One pseudo-mask call
    # builds all their masks with one body mask per image.
    maps = torch.cat([attention, attention.mean(1, keepdim=True)], dim=1)     # [N, K + 1, h, w]
    prior = maps.mean(0, keepdim=True).expand_as(maps)
    k = maps.shape[1]
    masks = build_pseudo_masks(torch.cat([maps, prior], dim=1), images,
                               dataclasses.replace(cfg, aggregate_heads=False))
    scores = [_scores(maps[:, i], masks[:, i], masks[:, k + i], targets) for i in range(k)]
    per_group = {}
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"{len(groups)} group names for {n} images")
        for name in sorted(set(groups)):
            idx = torch.tensor([i for i, g in enumerate(groups) if g == name])
            per_group[name] = (len(idx), _scores(maps[idx, -1], masks[idx, k - 1], masks[idx, -1],
                                                 targets[idx], mean_map=prior[0, -1]))
    extra = {}
    if interval is not None:
        ratio, low, high = iou_ratio_interval(iou_per_image(masks[:, k - 1] > 0.5, targets),
                                              iou_per_image(masks[:, -1] > 0.5, targets), interval)
        extra = {"iou_ratio": ratio, "iou_ratio_low": low, "iou_ratio_high": high, "interval": interval}
    if oracle:
        best = build_pseudo_masks(oracle_maps(targets, hw), images, cfg)
        extra["oracle_iou"] = float(iou_per_image(best[:, 0] > 0.5, targets).mean())
    return AttentionDiagnostics(scores[-1], scores[:-1], n, hw, extra, per_group)


@torch.no_grad()
def collect_attention(model, images: Tensor, batch_size: int = 64) -> Tensor:
    """Attention maps of ``model`` (a :class:`g2d.model.G2DModel`) for ``images`` [N, 1, H, W],
    in eval mode (the model's mode is restored). :return: [N, heads, h, w] on the CPU."""
    was_training = model.training
    model.eval()
    device = model.logit_scale.device
    try:
        parts = [model.image_forward(images[i:i + batch_size].to(device), decode=False).attention.float().cpu()
                 for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def synthetic_probe(n: int, image_size: int, seed: int) -> tuple[Tensor, Tensor, list[str]]:
    """Held-out synthetic images with exactly one finding, for diagnostics during and after training.

    Draws generator samples of ``seed`` until ``n`` one-finding images are found.

    :return: images [n, 1, S, S], finding masks [n, S, S] bool, and each image's report.
    """
    from g2d.data.synthetic import SyntheticCXR, SyntheticCXRCfg

    ds = SyntheticCXR(SyntheticCXRCfg(num_samples=8 * n + 64, image_size=image_size, seed=seed))
    images, masks, texts = [], [], []
    for i in range(len(ds)):
        s = ds[i]
        if len(s["findings"]) == 1:
            images.append(s["image"])
            masks.append(s["finding_masks"][0] > 0.5)
            texts.append(s["text"])
            if len(images) == n:
                break
    if not images:
        raise ValueError(f"synthetic_probe: no image with exactly one finding among {len(ds)} samples")
    return torch.stack(images), torch.stack(masks), texts
