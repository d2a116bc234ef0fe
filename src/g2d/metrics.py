"""Every metric g2d reports, in one module: Dice / IoU / pixel recall / pointing game on binary maps
(with the benchmarks' documented empty-mask rules), detection mAP (torchmetrics), AUROC (scikit-learn)
and retrieval top-1.

Dice is written here because no library implements the benchmark's empty-mask rule: torchmetrics'
``DiceScore`` and MONAI's ``DiceMetric`` give NaN for an empty target and drop the image, while
MGCA/GLoRIA (``get_dice``) score it 1 when the prediction is empty too and 0 otherwise. mAP comes
from torchmetrics' ``MeanAveragePrecision`` (COCO 101-point AP, pycocotools backend); AUROC from
scikit-learn's ``roc_auc_score``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("g2d.metrics")

__all__ = ["MAP_IOU_THRESHOLDS", "dice_per_image", "dice_mgca_batch_mean", "iou_per_image", "recall_per_image",
           "pointing_game", "DetectionScores", "mean_average_precision", "is_multiclass", "auroc_per_class",
           "auroc_undefined", "nan_mean", "max_f1_threshold", "threshold_metrics", "image_to_text_top1",
           "paired_bootstrap", "cnr", "mean_iou_over_thresholds", "otsu_binarize", "PHRASE_IOU_THRESHOLDS",
           "bootstrap_interval"]


# MGCA / G2D A.4.1: mAP averaged over IoU 0.40, 0.45, ..., 0.75 (8 thresholds)
MAP_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.40 + 0.05 * k, 2) for k in range(8))


def dice_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """Dice of each image's binary prediction against its binary target.

    Empty-mask rule (MGCA/GLoRIA ``get_dice``, Kaggle SIIM): an empty target scores 1 when the
    prediction is empty too and 0 otherwise; a non-empty target scores ``2|P∩T| / (|P|+|T|)``
    (no smoothing).

    :param pred: bool or 0/1 ``[N, (1,) H, W]`` (threshold logits at 0 = sigmoid at 0.5 first).
    :param target: bool or 0/1, same shape.
    :return: float64 ``[N]``.
    """
    p = pred.reshape(pred.shape[0], -1).bool()
    t = target.reshape(target.shape[0], -1).bool()
    inter = (p & t).sum(1).double()
    sp, st = p.sum(1).double(), t.sum(1).double()
    dice = 2 * inter / (sp + st).clamp(min=1)
    return torch.where(st == 0, (sp == 0).double(), dice)


def dice_mgca_batch_mean(per_image: Sequence[float] | Tensor, batch_size: int) -> float:
    """MGCA's reported Dice: the per-image Dice averaged within each test batch of ``batch_size``
    (images in test order), then the mean of those batch means. A last partial batch weighs as much
    as a full one, so this differs from the per-image mean unless ``batch_size`` divides the set.
    """
    v = torch.as_tensor(per_image, dtype=torch.float64).flatten()
    if v.numel() == 0:
        return math.nan
    return float(torch.stack([c.mean() for c in v.split(batch_size)]).mean())


class DetectionScores:
    """Collects per-image detections and ground truth for :func:`mean_average_precision`.

    ``add(pred_boxes [P, 4], scores [P], gt_boxes [G, 4])`` per image, boxes ``x1, y1, x2, y2``
    pixels, one class.
    """

    def __init__(self) -> None:
        self.preds: list[dict[str, Tensor]] = []
        self.targets: list[dict[str, Tensor]] = []

    def add(self, boxes: Tensor, scores: Tensor, gt_boxes: Tensor) -> None:
        self.preds.append({"boxes": boxes.detach().float().cpu().reshape(-1, 4),
                           "scores": scores.detach().float().cpu().reshape(-1),
                           "labels": torch.zeros(len(boxes), dtype=torch.long)})
        self.targets.append({"boxes": gt_boxes.detach().float().cpu().reshape(-1, 4),
                             "labels": torch.zeros(len(gt_boxes), dtype=torch.long)})

    def __len__(self) -> int:
        return len(self.preds)


def _map(preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]],
         iou_thresholds: Sequence[float]) -> float | None:
    from torchmetrics.detection import (
        MeanAveragePrecision,  # slow import; only when needed
    )

    if not preds or not any(len(t["boxes"]) for t in targets):
        return None  # undefined: no ground-truth box (torchmetrics would say -1)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=list(iou_thresholds))
    metric.update(preds, targets)
    value = float(metric.compute()["map"])
    return None if value < 0 else value


def mean_average_precision(scores: DetectionScores,
                           iou_thresholds: Sequence[float] = MAP_IOU_THRESHOLDS) -> dict[str, float | int | None]:
    """mAP two ways.

    * ``map``: every image counts - missed boxes on images without detections and false positives
      on images without ground truth included.
    * ``map_mgca``: MGCA's ``shared_step`` skips images without any ground-truth box and images
      without any detection (after the confidence threshold and NMS), so only positive images
      with at least one confident detection count. Optimistic; kept for comparison with MGCA tables.

    Returns ``map``, ``map_mgca`` (``None`` when undefined: no ground-truth box left), and the
    image counts ``map_images``, ``map_mgca_images``, ``mgca_skipped_no_gt``, ``mgca_skipped_no_pred``
    (an image with neither is counted under ``no_gt``).
    """
    keep, no_gt, no_pred = [], 0, 0
    for i, (p, t) in enumerate(zip(scores.preds, scores.targets)):
        if len(t["boxes"]) == 0:
            no_gt += 1
        elif len(p["boxes"]) == 0:
            no_pred += 1
        else:
            keep.append(i)
    return {"map": _map(scores.preds, scores.targets, iou_thresholds),
            "map_mgca": _map([scores.preds[i] for i in keep], [scores.targets[i] for i in keep],
                             iou_thresholds),
            "map_images": len(scores), "map_mgca_images": len(keep),
            "mgca_skipped_no_gt": no_gt, "mgca_skipped_no_pred": no_pred}


def iou_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """IoU ``|P and G| / |P or G|`` of binary maps [B, H, W] per image; 1 when both are empty."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def recall_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """Pixel recall ``|P and G| / |G|`` per image [B, H, W]; NaN when G is empty."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    g = target.sum(1).float()
    return torch.where(g > 0, (pred & target).sum(1).float() / g.clamp_min(1), torch.full_like(g, float("nan")))


def pointing_game(heat: Tensor, target: Tensor) -> Tensor:
    """MedKLIP's point score per image: 1 when any arg-max pixel of ``heat`` [B, H, W] lies in ``target``."""
    h = torch.nan_to_num(heat.flatten(1).float(), nan=-float("inf"))
    top = h == h.max(1, keepdim=True).values
    return (top & target.flatten(1).bool()).any(1).float()


#: BioViL-T's phrase-grounding mIoU: IoU of ``map > t`` with the boxes, averaged over these raw cosine
#: thresholds (the values of the public re-implementation vios-s/ldm-phrase-grounding
#: ``metrics/eval_metrics.py``; the papers do not list them).
PHRASE_IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)


def cnr(heat: Tensor, target: Tensor) -> Tensor:
    """Contrast-to-noise ratio per map (BioViL, Boecking et al. ECCV 2022, MS-CXR phrase grounding):
    ``|mean_A - mean_notA| / sqrt(var_A + var_notA)`` of the similarity values inside the ground truth
    ``A`` and outside it, over the valid (non-NaN) pixels; population variances.

    :param heat: [B, H, W] raw similarities (NaN = outside the model's view). :param target: bool [B, H, W]
        (the union of a phrase's boxes). :return: [B]; NaN where either region has no valid pixel or
        both variances are 0.
    """
    h = heat.flatten(1).double()
    t = target.flatten(1).bool()
    valid = ~torch.isnan(h)
    out = []
    for hv, tv, vv in zip(h, t, valid):
        inside, outside = hv[tv & vv], hv[~tv & vv]
        if inside.numel() == 0 or outside.numel() == 0:
            out.append(float("nan"))
            continue
        spread = math.sqrt(float(inside.var(unbiased=False) + outside.var(unbiased=False)))
        out.append(abs(float(inside.mean() - outside.mean())) / spread if spread > 0 else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


def mean_iou_over_thresholds(heat: Tensor, target: Tensor,
                             thresholds: Sequence[float] = PHRASE_IOU_THRESHOLDS) -> Tensor:
    """Per map [B, H, W], the IoU of ``heat > t`` with ``target`` averaged over ``thresholds`` (BioViL-T's
    mIoU; see :data:`PHRASE_IOU_THRESHOLDS`). NaN pixels are never foreground. :return: [B]."""
    h = torch.nan_to_num(heat.float(), nan=-float("inf"))
    return torch.stack([iou_per_image(h > t, target) for t in thresholds]).double().mean(0)


def otsu_binarize(heat: Tensor) -> Tensor:
    """CheXlocalize's default segmentation of a saliency map (``heatmap_to_segmentation.py``): min-max
    normalise each map over its valid pixels, keep the pixels above Otsu's threshold
    (scikit-image's ``threshold_otsu``). NaN pixels are background; a constant map gives an empty mask.

    :param heat: [B, H, W]. :return: bool [B, H, W].
    """
    from skimage.filters import threshold_otsu

    out = torch.zeros(heat.shape, dtype=torch.bool)
    for k, m in enumerate(heat.double()):
        valid = ~torch.isnan(m)
        v = m[valid]
        if v.numel() == 0 or float(v.max() - v.min()) <= 0:
            continue
        norm = (m - v.min()) / (v.max() - v.min())
        t = threshold_otsu(norm[valid].numpy())
        out[k] = (norm > t) & valid
    return out


def bootstrap_interval(values: np.ndarray, groups: Sequence[object] | None = None, n_boot: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean of ``values`` [N] (NaN ignored) with a percentile bootstrap interval that resamples whole
    ``groups`` (e.g. images, when an image has several phrases; default: each value its own group),
    CheXlocalize's 1,000 replicates over CXRs. Written here because scipy's ``bootstrap`` resamples
    single observations, not clusters.

    :return: ``{"mean", "low", "high", "n"}``; NaN bounds when no value is finite.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot {n_boot}: at least 1 bootstrap replicate")
    v = np.asarray(values, np.float64)
    keys = list(range(len(v))) if groups is None else list(groups)
    if len(keys) != len(v):
        raise ValueError(f"{len(v)} values but {len(keys)} group keys")
    ok = np.isfinite(v)
    if not ok.any():
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    index = {g: i for i, g in enumerate(dict.fromkeys(k for k, o in zip(keys, ok) if o))}
    gid = np.array([index[k] for k, o in zip(keys, ok) if o])
    vs, cs = np.bincount(gid, weights=v[ok]), np.bincount(gid).astype(np.float64)  # per-group sums, counts
    w = np.random.default_rng(seed).multinomial(len(vs), np.full(len(vs), 1.0 / len(vs)), size=n_boot)
    reps = (w @ vs) / (w @ cs)
    lo, hi = np.quantile(reps, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"mean": float(v[ok].mean()), "low": float(lo), "high": float(hi), "n": int(ok.sum())}


def is_multiclass(labels: np.ndarray) -> bool:
    """Single-label one-hot sets (COVIDx): K >= 2 columns, no NaN, exactly one 1 per row."""
    return (labels.ndim == 2 and labels.shape[1] >= 2 and len(labels) > 0 and not np.isnan(labels).any()
            and bool(np.all(labels.sum(1) == 1)))


def auroc_per_class(scores: np.ndarray, labels: np.ndarray, tasks: Sequence[str]) -> dict[str, float]:
    """sklearn ROC AUC per class over the rows whose label is known (NaN labels are left out).

    A class whose known labels are all one value has no AUROC: NaN, and it is left out of the mean.
    """
    from sklearn.metrics import roc_auc_score

    out: dict[str, float] = {}
    for k, name in enumerate(tasks):
        known = ~np.isnan(labels[:, k])
        y = labels[known, k]
        out[name] = float(roc_auc_score(y, scores[known, k])) if len(np.unique(y)) == 2 else math.nan
    return out


def auroc_undefined(labels: np.ndarray, tasks: Sequence[str], key: str = "auc_per_class") -> dict[str, str]:
    """Why each class's AUROC is undefined (for ``metrics.json``'s ``"undefined"``):
    ``{"auc_per_class/b": "one class in test (all 0)"}``; classes with an AUROC are not listed."""
    out: dict[str, str] = {}
    for k, name in enumerate(tasks):
        y = labels[~np.isnan(labels[:, k]), k]
        values = np.unique(y)
        if len(values) == 0:
            out[f"{key}/{name}"] = "no known label in test"
        elif len(values) == 1:
            out[f"{key}/{name}"] = f"one class in test (all {values[0]:g})"
    return out


def nan_mean(values: dict[str, float] | Sequence[float]) -> float:
    vals = [v for v in (values.values() if isinstance(values, dict) else values) if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def image_to_text_top1(image_emb: Tensor, text_emb: Tensor, keys: Sequence[object] | None = None
                       ) -> float:
    """Share of images whose most similar text is their own.

    :param keys: optional per-pair keys (e.g. the set of findings); a retrieved text then counts
        as correct when its key equals the image's, since several reports can describe the same
        image content equally well.
    """
    best = (image_emb @ text_emb.T).argmax(dim=1)
    if keys is None:
        return (best == torch.arange(len(best))).float().mean().item()
    return sum(keys[int(j)] == keys[i] for i, j in enumerate(best)) / len(best)


def max_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The score threshold ``t`` that maximises F1 of ``score >= t`` (sklearn's PR curve).

    :param scores, labels: 1-D, labels 0/1 (no NaN). :return: ``(t, max F1)``; ``(nan, nan)`` without
        any positive label.
    """
    from sklearn.metrics import precision_recall_curve

    if labels.sum() == 0:
        return math.nan, math.nan
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    p, r = precision[:-1], recall[:-1]  # the last point has no threshold
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    k = int(np.argmax(f1))
    return float(thresholds[k]), float(f1[k])


def _f1_acc(scores: np.ndarray, labels: np.ndarray, t: float, strict: bool = False) -> tuple[float, float]:
    from sklearn.metrics import f1_score

    pred = (scores > t) if strict else (scores >= t)
    return float(f1_score(labels, pred, zero_division=0.0)), float((pred == labels.astype(bool)).mean())


def threshold_metrics(scores: np.ndarray, labels: np.ndarray, tasks: Sequence[str], rule: str | float,
                      val_scores: np.ndarray | None = None, val_labels: np.ndarray | None = None
                      ) -> dict[str, Any]:
    """Per-class and mean AUROC, F1 and accuracy of test ``scores`` ``[N, K]`` against ``labels``.

    :param rule: ``"val"`` (needs ``val_scores``/``val_labels``), ``"test-max-f1"`` or a number.
        Classes with no positive validation label fall back to 0.5 (logged, and listed in
        ``threshold_fallback``).
    """
    auc = auroc_per_class(scores, labels, tasks)
    f1s, accs, thr, fallback = {}, {}, {}, []
    for k, t in enumerate(tasks):
        known = ~np.isnan(labels[:, k])
        s, y = scores[known, k], labels[known, k]
        if rule == "test-max-f1":
            thr[t], f1s[t] = max_f1_threshold(s, y)
            accs[t] = _f1_acc(s, y, thr[t], strict=True)[1] if not math.isnan(thr[t]) else math.nan
            continue
        if rule == "val":
            assert val_scores is not None and val_labels is not None, "rule 'val' needs validation scores"
            vk = ~np.isnan(val_labels[:, k])
            thr[t] = max_f1_threshold(val_scores[vk, k], val_labels[vk, k])[0]
            if math.isnan(thr[t]):
                log.warning("class %s has no positive validation label: threshold 0.5", t)
                thr[t] = 0.5
                fallback.append(t)
        else:
            thr[t] = float(rule)
        f1s[t], accs[t] = _f1_acc(s, y, thr[t]) if len(y) else (math.nan, math.nan)
    return {"auc": nan_mean(auc), "f1": nan_mean(f1s), "acc": nan_mean(accs), "auc_per_class": auc,
            "f1_per_class": f1s, "acc_per_class": accs, "thresholds": thr, "threshold_fallback": fallback,
            "undefined": auroc_undefined(labels, tasks)}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
    """Mean difference ``a - b`` with a two-stage percentile bootstrap interval over units and images.

    ``a`` and ``b`` are ``[U, N]``: the per-image scores of two methods on the same ``N`` test images
    in ``U`` paired units (a unit is one label subset and seed: both methods trained on the same
    images). Each replicate draws ``U`` units and ``N`` images with replacement, the images crossed
    with the units since every unit scores the same test set, and takes the mean difference; the
    interval is the replicates' ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles. So
    the interval holds the variation of both the training subsets (and seeds) and the test images.
    Written here because scipy's ``bootstrap`` resamples one level only.

    :return: ``{"mean", "low", "high", "units", "images"}`` in the scores' unit.
    :raises ValueError: shapes that differ or are not 2-d, or no unit / image.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"paired_bootstrap needs two [units, images] arrays of one shape, got {a.shape} and {b.shape}")
    d = a - b
    u, n = d.shape
    rng = np.random.default_rng(seed)
    # the counts of each unit and image in a replicate; the mean of the resampled block is w^T d v / (U N)
    wu = rng.multinomial(u, np.full(u, 1.0 / u), size=n_boot)
    wn = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    reps = ((wu @ d) * wn).sum(1) / (u * n)
    lo, hi = np.quantile(reps, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"mean": float(d.mean()), "low": float(lo), "high": float(hi), "units": u, "images": n}
