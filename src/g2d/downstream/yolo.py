"""YOLOv3 head, loss, decoding and NMS on ResNet layer2-4 features, as MGCA's detection protocol.

Written by hand: no maintained pip library provides a YOLOv3 head and loss that takes a custom
backbone's feature maps (ultralytics' YOLOv3 is tied to its own model YAMLs and trainer; torchvision
has no YOLO). The layout follows BobLiu20/YOLOv3_PyTorch, which MGCA's ``ModelMain``/``YOLOLoss``
copy: the three output scales are built top-down (layer4 -> upsample + layer3 -> upsample + layer2),
each ground-truth box is assigned to the best-matching anchor *of each scale* (by shape IoU), cells
whose anchors overlap a box by more than ``ignore_threshold`` get no "no-object" loss, and the loss
is ``2.5 * (BCE x + BCE y) + 2.5 * (MSE w + MSE h) + BCE obj + 0.5 * BCE no-obj + BCE class``, each
term averaged over all ``B * A * H * W`` cells (class BCE over the assigned cells).

Boxes are ``x1, y1, x2, y2`` pixels of the square network input throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

__all__ = ["COCO_ANCHORS", "scaled_anchors", "YOLOv3Head", "YOLOTargets", "build_targets", "yolo_loss",
           "decode", "postprocess", "STRIDES"]

# YOLOv3's COCO anchors (w, h) at 416 px, per output scale from coarse (stride 32) to fine (stride 8).
COCO_ANCHORS: tuple[tuple[tuple[int, int], ...], ...] = (
    ((116, 90), (156, 198), (373, 326)),
    ((30, 61), (62, 45), (59, 119)),
    ((10, 13), (16, 30), (33, 23)),
)
STRIDES: tuple[int, ...] = (32, 16, 8)


def scaled_anchors(image_size: int) -> Tensor:
    """COCO anchors scaled from 416 px to ``image_size`` (MGCA: ``x 224/416``). :return: ``[3, 3, 2]``
    pixels (w, h), scales ordered as :data:`STRIDES`."""
    return torch.tensor(COCO_ANCHORS, dtype=torch.float32) * (image_size / 416.0)


def _cbl(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=(k - 1) // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.1))


class _Embedding(nn.Module):
    """Five alternating 1x1/3x3 conv-BN-LeakyReLU, a 3x3 one, and a 1x1 output convolution; the
    fifth layer's map is the branch passed up to the next (finer) scale."""

    def __init__(self, widths: tuple[int, int], cin: int, cout: int) -> None:
        super().__init__()
        a, b = widths
        self.body = nn.Sequential(_cbl(cin, a, 1), _cbl(a, b, 3), _cbl(b, a, 1), _cbl(a, b, 3), _cbl(b, a, 1))
        self.out = nn.Sequential(_cbl(a, b, 3), nn.Conv2d(b, cout, 1, bias=True))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        branch = self.body(x)
        return self.out(branch), branch


class YOLOv3Head(nn.Module):
    """YOLOv3 neck + head over three feature maps.

    :param in_channels: channels of (layer2, layer3, layer4), e.g. (512, 1024, 2048) for ResNet-50.
    :param num_classes: object classes (1 for RSNA pneumonia and Object-CXR).
    :param num_anchors: anchors per scale.
    :param width: widest 3x3 layer (stride 32); MGCA/BobLiu use 1024, and each finer scale halves it.
    """

    def __init__(self, in_channels: tuple[int, int, int], num_classes: int = 1, num_anchors: int = 3,
                 width: int = 1024) -> None:
        super().__init__()
        if width % 8:
            raise ValueError(f"head width must be a multiple of 8, got {width}")
        c2, c3, c4 = in_channels
        w = width
        out = num_anchors * (5 + num_classes)
        self.num_classes, self.num_anchors = num_classes, num_anchors
        self.embedding0 = _Embedding((w // 2, w), c4, out)
        self.embedding1_cbl = _cbl(w // 2, w // 4, 1)
        self.embedding1 = _Embedding((w // 4, w // 2), c3 + w // 4, out)
        self.embedding2_cbl = _cbl(w // 4, w // 8, 1)
        self.embedding2 = _Embedding((w // 8, w // 4), c2 + w // 8, out)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """:param features: ``[layer2 /8, layer3 /16, layer4 /32]`` maps (a dilated encoder gives
            layer4 at /16, or layer3 and layer4 at /8: each map is upsampled to the next one's size).
        :return: raw outputs ``[B, A * (5 + C), h_i, w_i]`` at the three maps' sizes (coarsest first)."""
        x2, x3, x4 = features
        out0, b0 = self.embedding0(x4)
        x = F.interpolate(self.embedding1_cbl(b0), size=x3.shape[-2:], mode="nearest")
        out1, b1 = self.embedding1(torch.cat([x, x3], 1))
        x = F.interpolate(self.embedding2_cbl(b1), size=x2.shape[-2:], mode="nearest")
        out2, _ = self.embedding2(torch.cat([x, x2], 1))
        return [out0, out1, out2]


def _split(raw: Tensor, num_anchors: int) -> Tensor:
    """``[B, A*(5+C), H, W]`` -> ``[B, A, H, W, 5+C]``."""
    b, _, h, w = raw.shape
    return raw.view(b, num_anchors, -1, h, w).permute(0, 1, 3, 4, 2).contiguous()


@dataclass
class YOLOTargets:
    """Training targets of one output scale, each ``[B, A, H, W]`` (``cls``: ``[B, A, H, W, C]``).

    ``mask`` marks the cell/anchor responsible for a box; ``noobj`` the cells that get the no-object
    loss; ``tx, ty`` the box centre's offset in its cell (0..1); ``tw, th`` ``log(box / anchor)``.
    """

    mask: Tensor
    noobj: Tensor
    tx: Tensor
    ty: Tensor
    tw: Tensor
    th: Tensor
    cls: Tensor


def _shape_iou(wh: Tensor, anchors: Tensor) -> Tensor:
    """IoU of boxes and anchors placed at the same centre: ``[N, 2]`` x ``[A, 2]`` -> ``[N, A]``."""
    inter = torch.minimum(wh[:, None, 0], anchors[None, :, 0]) * torch.minimum(wh[:, None, 1], anchors[None, :, 1])
    return inter / (wh[:, None].prod(-1) + anchors[None].prod(-1) - inter)


def build_targets(boxes: list[Tensor], labels: list[Tensor] | None, anchors: Tensor, grid: tuple[int, int],
                  stride: int, num_classes: int = 1, ignore_threshold: float = 0.5) -> YOLOTargets:
    """Assign ground-truth boxes to the cells and anchors of one scale (BobLiu/MGCA ``get_target``).

    :param boxes: per image ``[N_i, 4]`` ``x1, y1, x2, y2`` pixels.
    :param labels: per image ``[N_i]`` class indices (``None``: all class 0).
    :param anchors: ``[A, 2]`` pixels (w, h) of this scale.
    :param grid: ``(H, W)`` cells; ``stride`` pixels per cell.
    """
    b, a = len(boxes), len(anchors)
    h, w = grid
    z = torch.zeros(b, a, h, w)
    t = YOLOTargets(mask=z.clone(), noobj=torch.ones(b, a, h, w), tx=z.clone(), ty=z.clone(), tw=z.clone(),
                    th=z.clone(), cls=torch.zeros(b, a, h, w, num_classes))
    anchors_g = anchors.float() / stride
    for i, bx in enumerate(boxes):
        bx = bx.detach().float().cpu().reshape(-1, 4)
        bx = bx[(bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])]
        if not len(bx):
            continue
        cls = (labels[i].long().cpu() if labels is not None else torch.zeros(len(bx), dtype=torch.long))
        gx, gy = (bx[:, 0] + bx[:, 2]) / 2 / stride, (bx[:, 1] + bx[:, 3]) / 2 / stride
        gwh = torch.stack([bx[:, 2] - bx[:, 0], bx[:, 3] - bx[:, 1]], 1) / stride
        gi, gj = gx.long().clamp(0, w - 1), gy.long().clamp(0, h - 1)
        ious = _shape_iou(gwh, anchors_g)
        best = ious.argmax(1)
        for k in range(len(bx)):
            t.noobj[i, ious[k] > ignore_threshold, gj[k], gi[k]] = 0
            n, cj, ci = best[k], gj[k], gi[k]
            t.noobj[i, n, cj, ci] = 0
            t.mask[i, n, cj, ci] = 1
            t.tx[i, n, cj, ci] = gx[k] - ci
            t.ty[i, n, cj, ci] = gy[k] - cj
            t.tw[i, n, cj, ci] = torch.log(gwh[k, 0] / anchors_g[n, 0] + 1e-16)
            t.th[i, n, cj, ci] = torch.log(gwh[k, 1] / anchors_g[n, 1] + 1e-16)
            t.cls[i, n, cj, ci, cls[k]] = 1
    return t


def yolo_loss(outputs: list[Tensor], boxes: list[Tensor], anchors: Tensor, image_size: int,
              num_classes: int = 1, ignore_threshold: float = 0.5,
              lambda_xy: float = 2.5, lambda_wh: float = 2.5) -> Tensor:
    """YOLOv3 loss summed over the scales (see the module docstring).

    :param outputs: :class:`YOLOv3Head` outputs (strides 32, 16, 8).
    :param boxes: per image ``[N_i, 4]`` pixels. :param anchors: :func:`scaled_anchors` ``[3, A, 2]``.
    """
    total = outputs[0].new_zeros(())
    for raw, anc in zip(outputs, anchors):
        p = _split(raw, len(anc))
        _, _, h, w, _ = p.shape
        t = build_targets(boxes, None, anc, (h, w), image_size // h, num_classes, ignore_threshold)
        t = YOLOTargets(*(v.to(p.device) for v in (t.mask, t.noobj, t.tx, t.ty, t.tw, t.th, t.cls)))
        n = t.mask.numel()
        # BCE-with-logits weighted by the masks equals the reference's BCE(sigmoid(x) * mask, t * mask)
        # (masked-out cells contribute 0 either way) without its log(0) clamping.
        def bce(x: Tensor, y: Tensor, m: Tensor, n: int = n) -> Tensor:
            return F.binary_cross_entropy_with_logits(x, y, weight=m, reduction="sum") / n

        loss_xy = bce(p[..., 0], t.tx, t.mask) + bce(p[..., 1], t.ty, t.mask)
        loss_wh = (((p[..., 2] - t.tw) * t.mask) ** 2).sum() / n + (((p[..., 3] - t.th) * t.mask) ** 2).sum() / n
        loss_conf = bce(p[..., 4], t.mask, t.mask) + 0.5 * bce(p[..., 4], torch.zeros_like(t.mask), t.noobj)
        sel = t.mask.bool()
        loss_cls = (F.binary_cross_entropy_with_logits(p[..., 5:][sel], t.cls[sel]) if sel.any()
                    else p.new_zeros(()))
        total = total + lambda_xy * loss_xy + lambda_wh * loss_wh + loss_conf + loss_cls
    return total


def decode(outputs: list[Tensor], anchors: Tensor, image_size: int) -> Tensor:
    """Raw head outputs -> ``[B, N, 5 + C]`` rows ``x1, y1, x2, y2, objectness, class probs...``
    (pixels, N = sum over scales of ``A * H * W``)."""
    rows = []
    for raw, anc in zip(outputs, anchors):
        p = _split(raw, len(anc))
        b, a, h, w, _ = p.shape
        stride = image_size / h
        gy, gx = torch.meshgrid(torch.arange(h, device=p.device), torch.arange(w, device=p.device), indexing="ij")
        cx = (torch.sigmoid(p[..., 0]) + gx) * stride
        cy = (torch.sigmoid(p[..., 1]) + gy) * stride
        aw = anc[:, 0].to(p.device).view(1, a, 1, 1)
        ah = anc[:, 1].to(p.device).view(1, a, 1, 1)
        bw, bh = torch.exp(p[..., 2]) * aw, torch.exp(p[..., 3]) * ah
        box = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        rows.append(torch.cat([box, torch.sigmoid(p[..., 4:])], -1).reshape(b, -1, p.shape[-1]))
    return torch.cat(rows, 1)


def postprocess(decoded: Tensor, conf_threshold: float = 0.5, nms_threshold: float = 0.5,
                max_detections: int = 100, image_size: int | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Confidence threshold on objectness, then per-class NMS (torchvision), as MGCA's
    ``non_max_suppression``; the score is the objectness.

    :param decoded: :func:`decode` output ``[B, N, 5 + C]``.
    :param image_size: when given, boxes are clipped to the image.
    :return: per image ``(boxes [P, 4], scores [P], labels [P])``, highest score first.
    """
    out = []
    for d in decoded:
        d = d[d[:, 4] >= conf_threshold]
        boxes, scores = d[:, :4], d[:, 4]
        labels = d[:, 5:].argmax(1) if d.shape[1] > 5 else torch.zeros(len(d), dtype=torch.long, device=d.device)
        if image_size is not None:
            boxes = boxes.clamp(0, image_size)
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
        keep = torchvision.ops.batched_nms(boxes, scores, labels, nms_threshold)[:max_detections]
        out.append((boxes[keep], scores[keep], labels[keep]))
    return out
