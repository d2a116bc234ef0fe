"""Metrics of the dense protocols: benchmark Dice (two aggregations) and detection mAP (two image sets).

Dice is written here because no library implements the benchmark's empty-mask rule: torchmetrics'
``DiceScore`` and MONAI's ``DiceMetric`` give NaN for an empty target and drop the image, while
MGCA/GLoRIA (``get_dice``) score it 1 when the prediction is empty too and 0 otherwise. mAP comes
from torchmetrics' ``MeanAveragePrecision`` (COCO 101-point AP, pycocotools backend).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["MAP_IOU_THRESHOLDS", "dice_per_image", "dice_mgca_batch_mean", "DetectionScores",
           "mean_average_precision"]

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
