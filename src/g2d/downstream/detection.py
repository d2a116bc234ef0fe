"""``g2d eval detection``: YOLOv3 head on the frozen encoder's layer2-4 maps, scored by mAP@[0.40:0.75].

MGCA's protocol (G2D A.4.1): the encoder is frozen (BatchNorm statistics too; ``--update-bn``
reproduces MGCA's updating BN), a YOLOv3 head (:mod:`g2d.downstream.yolo`) is trained on the
stride 8/16/32 maps with YOLOv3's COCO anchors scaled by ``image_size / 416``. AdamW with betas
(0.9, 0.999) and weight decay 1e-6; lr 5e-4 and batch 16, except lr 2e-4 and batch 8 for label
fractions below 10 % (the paper's 1 % setting for RSNA and Object-CXR); at most 50 epochs with early
stopping on validation mAP (patience 10); the best validation epoch is tested. Detections: objectness
>= 0.5, then NMS at IoU 0.5. Images are resized to a square ``--image-size`` (224, no crop).

Two test numbers: ``map`` over every test image, and ``map_mgca`` over the images MGCA's code keeps
(those with ground truth and at least one detection); see :mod:`g2d.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from g2d.downstream.dense import (
    dataset_name,
    input_identity,
    make_optimizer,
    open_splits,
    positives,
    skip_counts,
    start_dense_run,
)
from g2d.downstream.harness import Fit, Frozen, batches, finished_metrics, make_loader, shuffled_loader
from g2d.downstream.protocol import DenseArgs, arg
from g2d.downstream.results import write_results
from g2d.downstream.yolo import (
    YOLOv3Head,
    decode,
    postprocess,
    scaled_anchors,
    yolo_loss,
)
from g2d.fingerprint import absolute_paths
from g2d.metrics import MAP_IOU_THRESHOLDS, DetectionScores, mean_average_precision

__all__ = ["run", "fit_and_test", "Detector", "detect"]

log = logging.getLogger("g2d.downstream")


@dataclass(kw_only=True)
class Args(DenseArgs):
    """``g2d eval detection``: its flags are these fields (``--name-with-dashes``)."""

    batch_size: int | None = arg(None, help='default 16; 8 when --fraction < 0.1')
    lr: float | None = arg(None, help='default 5e-4; 2e-4 when --fraction < 0.1')
    weight_decay: float = arg(1e-06)
    train_encoder: bool = arg(False, help="train the encoder too (not the paper's setting)")
    conf_threshold: float = arg(0.5, help='objectness threshold (MGCA 0.5)')
    nms_threshold: float = arg(0.5, help='NMS IoU threshold (MGCA 0.5)')
    head_width: int = arg(1024, help='YOLOv3 head width at stride 32 (MGCA: 1024; finer scales halve it)')


class Detector(nn.Module):
    """Encoder (frozen unless ``train_encoder``) -> layer2-4 maps -> :class:`YOLOv3Head`."""

    def __init__(self, encoder: nn.Module, channels: tuple[int, ...], image_size: int, train_encoder: bool = False,
                 update_bn: bool = False, num_classes: int = 1, head_width: int = 1024) -> None:
        super().__init__()
        self.encoder = encoder if train_encoder else Frozen(encoder, update_bn)
        self.head = YOLOv3Head((channels[2], channels[3], channels[4]), num_classes, width=head_width)
        self.image_size, self.num_classes = image_size, num_classes
        self.encoder_changes = train_encoder or update_bn
        self.anchors: Tensor  # a buffer: the anchors in pixels of this image size
        self.register_buffer("anchors", scaled_anchors(image_size), persistent=False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """:param images: ``[B, 1, S, S]``. :return: raw head outputs for strides 32, 16, 8."""
        return self.head(self.encoder(images)[2:5])

    def loss(self, images: Tensor, boxes: list[Tensor]) -> Tensor:
        return yolo_loss(self(images), boxes, self.anchors, self.image_size, self.num_classes)


@torch.no_grad()
def detect(model: Detector, images: Tensor, conf_threshold: float = 0.5,
           nms_threshold: float = 0.5) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per image ``(boxes [P, 4] xyxy pixels, scores [P], labels [P])`` after threshold and NMS."""
    return postprocess(decode(model(images), model.anchors, model.image_size), conf_threshold, nms_threshold,
                       image_size=model.image_size)


@torch.no_grad()
def evaluate(model: Detector, loader: Iterable, device: torch.device, conf: float, nms: float,
             progress: bool = False, desc: str = "eval") -> tuple[dict[str, Any], float]:
    """mAP two ways (:func:`mean_average_precision`) and the mean loss per image."""
    model.eval()
    scores, loss_sum, n = DetectionScores(), 0.0, 0
    for b in batches(loader, progress, desc):
        x = b["image"].to(device)
        outputs = model(x)
        loss_sum += float(yolo_loss(outputs, b["boxes"], model.anchors, model.image_size, model.num_classes)) * len(x)
        n += len(x)
        dets = postprocess(decode(outputs, model.anchors, model.image_size), conf, nms, image_size=model.image_size)
        for (bx, sc, _), gt in zip(dets, b["boxes"]):
            scores.add(bx, sc, gt)
    return mean_average_precision(scores, MAP_IOU_THRESHOLDS), loss_sum / max(n, 1)


def _figures(model: Detector, ds: Any, device: torch.device, out: Path, n: int, conf: float, nms: float) -> list[str]:
    """PNG per test image: ground-truth boxes (green) and detections with scores (red)."""
    if n <= 0:
        return []
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(n, len(ds))):
        s = ds[i]
        if s is None:
            continue
        boxes, scores, _ = detect(model, s["image"][None].to(device), conf, nms)[0]
        fig = Figure(figsize=(4, 4.3))
        ax = fig.subplots()
        ax.imshow(s["image"][0].numpy(), cmap="gray", vmin=0, vmax=1)
        for (x1, y1, x2, y2) in s["boxes"].tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1.2))
        for (x1, y1, x2, y2), sc in zip(boxes.cpu().tolist(), scores.cpu().tolist()):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", linewidth=1.0))
            ax.text(x1, y1, f"{sc:.2f}", color="red", fontsize=6, va="bottom")
        ax.set_title(f"{s['id']}\ngreen: ground truth, red: detections", fontsize=8)
        ax.axis("off")
        path = out / f"det_{i:03d}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        written.append(path.name)
    return written


def _defaults(args: Args) -> tuple[int, float]:
    low = args.fraction < 0.1  # the paper's 1 % runs
    return (args.batch_size or (8 if low else 16)), (args.lr if args.lr is not None else (2e-4 if low else 5e-4))


def run(args: Args) -> dict[str, Any]:
    """Train and test one detection run; writes ``OUT/metrics.json``, ``results.md``, ``ckpt.pt``,
    ``figures/``. Returns the metrics."""
    return fit_and_test(args)[0]


def fit_and_test(args: Args) -> tuple[dict[str, Any], nn.Module | None]:
    """:func:`run`, also returning the tested model (``None`` when ``OUT`` held the finished run)."""
    out = Path(args.out)
    batch_size, lr = _defaults(args)
    splits = open_splits(args)
    signature = {"task": "detection", **absolute_paths({"data": args.data, "model": str(args.model)}),
                 "fraction": args.fraction, **({"subset": args.subset} if args.subset else {}),
                 "seed": args.seed, "arch": args.arch, "batch_size": batch_size, "lr": lr,
                 "weight_decay": args.weight_decay, "image_size": args.image_size,
                 "train_encoder": args.train_encoder, "update_bn": args.update_bn,
                 "head_width": args.head_width, **input_identity(args, splits)}
    full_sig = {**signature, "epochs": args.epochs, "patience": args.patience,
                "conf_threshold": args.conf_threshold, "nms_threshold": args.nms_threshold}
    done = finished_metrics(out, full_sig)
    if done is not None:
        log.info("%s already holds the finished run", out)
        return done, None
    device, progress, tower = start_dense_run(args)
    if not getattr(splits["train"], "with_boxes", True):
        raise ValueError(f"{args.data}: the set has no boxes; detection needs a set with boxes")
    model = Detector(tower.encoder, tower.encoder.channels, args.image_size, args.train_encoder,
                     args.update_bn, head_width=args.head_width).to(device)
    optimizer = make_optimizer(model, lr, args.weight_decay)
    fit = Fit(model, optimizer, out, signature, args.epochs, args.patience, progress)
    fit.resume()
    val_loader = make_loader(splits["val"], batch_size, args.num_workers)

    def validate() -> tuple[float, float]:
        m, val_loss = evaluate(model, val_loader, device, args.conf_threshold, args.nms_threshold, progress,
                               "validation")
        return (m["map"] if m["map"] is not None else 0.0), val_loss

    fit.fit(shuffled_loader(splits["train"], batch_size, args.num_workers, args.seed),
            lambda b: model.loss(b["image"].to(device), b["boxes"]), validate, "detection")
    fit.load_best()
    test_loader = make_loader(splits["test"], batch_size, args.num_workers)
    m, test_loss = evaluate(model, test_loader, device, args.conf_threshold, args.nms_threshold, progress, "test")
    figures = _figures(model, splits["test"], device, out / "figures", args.figures, args.conf_threshold,
                       args.nms_threshold)
    metrics: dict[str, Any] = {
        "task": "detection", **m, **tower.provenance(),
        "map_rule": "map: all test images; map_mgca: images without ground truth or without any detection "
                    "skipped, as MGCA's shared_step",
        "iou_thresholds": list(MAP_IOU_THRESHOLDS), "test_loss": test_loss,
        "n_train": len(splits["train"]), "n_train_pos": positives(splits["train"]), "n_val": len(splits["val"]),
        "n_test": len(splits["test"]),
        "epochs_run": fit.epoch, "best_epoch": fit.best_epoch, "best_val_map": fit.best_score,
        "stopped_early": fit.stopped_early, "resumed_from_epoch": fit.resumed_from,
        "batch_size": batch_size, "lr": lr, "history": fit.history, "figures": figures,
        **skip_counts(splits), "args": full_sig,
    }
    row = {"task": "detection", "data": dataset_name(args.data), "model": tower.name, "fraction": args.fraction,
           "seed": args.seed, "map": m["map"], "map_mgca": m["map_mgca"], "best_epoch": fit.best_epoch}
    write_results(out, metrics, row)
    return metrics, model
