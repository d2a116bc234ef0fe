"""``g2d eval finetune``: whole-model fine-tuning (ChestX-ray14 protocol of KAD / paper A.4.3).

The pre-trained ResNet and a new ``Linear(C, K)`` on its global-average-pooled last stage are all
trained. Defaults from the paper: images resized to 256 x 256 (``--square``, no crop), AdamW
(0.9, 0.999) lr 1e-4, batch 64, 50 epochs, early stopping (patience 10) on validation mean AUROC;
BCE on known labels only (NaN labels are ignored per class in the loss and the AUROC); single-label
one-hot sets use cross-entropy and also report accuracy. Test uses the best validation epoch.

Every epoch writes ``OUT/ckpt.pt`` (model, optimizer, RNG, early-stopping state, best state) atomically
through the protocols' harness (:class:`g2d.downstream.harness.Fit`); rerunning the same command resumes
(``--no-resume`` starts over). With a seed, CPU runs are deterministic, resumed or not.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from g2d.data.labelled.specs import open_dataset
from g2d.data.transforms import ImageTransformCfg, build_transform
from g2d.downstream.features import (
    check_split,
    evaluate_scores,
    geometry_from_args,
    geometry_source,
    label_tasks,
    leave_out_classes_without_positives,
    train_positives,
)
from g2d.downstream.harness import Fit, make_loader, progress_bar
from g2d.downstream.protocol import GeometryArgs, arg
from g2d.downstream.results import write_results
from g2d.fingerprint import absolute_paths, dataset_identity, digest
from g2d.losses import classification_loss
from g2d.metrics import is_multiclass
from g2d.model.image_encoder import ResNetEncoder
from g2d.peers import global_input
from g2d.towers import load_image_tower, resolve_device

__all__ = ["run", "Classifier"]

log = logging.getLogger("g2d.downstream")


@dataclass(kw_only=True)
class Args(GeometryArgs):
    """``g2d eval finetune``: its flags are these fields (``--name-with-dashes``)."""

    epochs: int = arg(50)
    batch_size: int = arg(64)
    lr: float = arg(0.0001)
    weight_decay: float = arg(0.01, help='AdamW weight decay (torch default)')
    patience: int = arg(10, help='early-stopping patience in epochs (0: off)')
    augment: str = arg('none', choices=('none', 'paper', 'release'),
                       help='training augmentation on the cropped image (g2d.data.transforms recipes)')
    no_resume: bool = arg(False, help='ignore OUT/ckpt.pt and start over')
    resize: int | None = arg(256, help="resize before the centre crop")
    image_size: int | None = arg(256, help="side of the centre crop fed to the model")
    square: bool | None = arg(True, help="resize both sides (aspect ratio not kept)")


class Classifier(nn.Module):
    """ResNet encoder + ``Linear(C_last, K)`` on the global-average-pooled last stage.

    :param encoder: five-stage :class:`ResNetEncoder`. ``forward``: ``[B, 1, H, W]`` -> logits ``[B, K]``.
    :param input_size: resize the input to this side first, as a peer's own forward does
        (:attr:`g2d.peers.PeerKind.global_input`: MGCA and GLoRIA fine-tune at 299).
    """

    def __init__(self, encoder: ResNetEncoder, num_classes: int, input_size: int | None = None) -> None:
        super().__init__()
        self.encoder, self.input_size = encoder, input_size
        self.head = nn.Linear(encoder.channels[-1], num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(global_input(images, self.input_size))[-1].mean(dim=(2, 3)))


def _signature(args: Args, geom: ImageTransformCfg) -> str:
    """What a checkpoint must share with the run that resumes it (``--epochs`` may grow)."""
    keys = ("data", "model", "arch", "fraction", "seed", "batch_size", "lr", "weight_decay", "augment")
    subset = {"subset": args.subset} if args.subset else {}  # runs from before --subset keep their signature
    return digest(absolute_paths({k: getattr(args, k) for k in keys}) | {"geometry": asdict(geom)} | subset)


@torch.no_grad()
def _predict(model: Classifier, loader, multiclass: bool, device: torch.device, progress: bool,
             desc: str) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    scores, labels = [], []
    for batch in progress_bar(loader, len(loader), desc, not progress):
        if batch is None:
            continue
        logits = model(batch["image"].to(device)).float()
        scores.append((logits.softmax(1) if multiclass else logits.sigmoid()).cpu().numpy())
        labels.append(batch["labels"].numpy())
    k = model.head.out_features
    return (np.concatenate(scores) if scores else np.zeros((0, k)),
            np.concatenate(labels) if labels else np.zeros((0, k)))


def run(args: Args) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    tower = load_image_tower(args.model, args.arch, args.trust_pickle)
    geom = geometry_from_args(args, tower)
    train_ds = open_dataset(args.data, "train", args.fraction, geom, subset=args.subset)
    val_ds, test_ds = (open_dataset(args.data, s, 1.0, geom) for s in ("val", "test"))
    for ds, s in ((train_ds, "train"), (val_ds, "val"), (test_ds, "test")):
        check_split(ds, f"{args.data} {s}")
    tasks = label_tasks(train_ds, args.data)
    multiclass = is_multiclass(train_ds.labels()) and is_multiclass(test_ds.labels())
    model = Classifier(tower.encoder, len(tasks), tower.global_input).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    augment = None
    if args.augment != "none":
        augment = build_transform(ImageTransformCfg(resize=geom.output_size, crop=geom.output_size,
                                                    augment=args.augment),
                                  train=True).augment

    # settings a checkpoint must share, plus the content behind them (Fit starts anew, with a warning,
    # when only the images or weights changed)
    signature = {"settings": _signature(args, geom), "model_id": tower.identity,
                 "data_id": digest([dataset_identity(d) for d in (train_ds, val_ds, test_ds)])}
    progress = not args.no_progress
    fit = Fit(model, opt, Path(args.out), signature, args.epochs, args.patience, progress)
    if not args.no_resume:
        fit.resume()
    # BatchNorm in train mode cannot take a batch of one image
    drop_last = len(train_ds) > args.batch_size

    def train_loader(epoch: int) -> Any:  # the order depends on (seed, epoch) only
        return make_loader(train_ds, args.batch_size, args.num_workers, shuffle=True,
                           seed=args.seed * 100_003 + epoch + 1, drop_last=drop_last)

    def batch_loss(batch: dict[str, Any]) -> Tensor:
        x, y = batch["image"].to(device), batch["labels"].to(device)
        if augment is not None:
            x = torch.stack([augment(xi) for xi in x])
        return classification_loss(model(x), y, multiclass)

    def validate() -> tuple[float, float]:
        scores, labels = _predict(model, make_loader(val_ds, args.batch_size, args.num_workers), multiclass,
                                  device, progress, "val")
        m = evaluate_scores(scores, labels, tasks, multiclass)
        metric = m["acc"] if multiclass else m["auc"]
        return (-math.inf if math.isnan(metric) else metric), 0.0

    fit.fit(train_loader, batch_loss, validate, "finetune")
    fit.load_best()
    history = [{"epoch": h["epoch"], "train_loss": h["train_loss"],
                "val": h["val_score"] if math.isfinite(h["val_score"]) else math.nan} for h in fit.history]
    scores, labels = _predict(model, make_loader(test_ds, args.batch_size, args.num_workers), multiclass,
                              device, progress, "test")
    test = leave_out_classes_without_positives(evaluate_scores(scores, labels, tasks, multiclass),
                                               train_positives(train_ds.labels(), tasks), f"{args.data} finetune")
    metrics: dict[str, Any] = {
        "task": "finetune", "data": args.data, "model": tower.name, "fraction": args.fraction, "seed": args.seed,
        **tower.provenance(),
        "type": "multiclass" if multiclass else "multilabel", **test,
        "best_epoch": fit.best_epoch, "epochs_run": fit.epoch, "history": history,
        "n_train": len(train_ds), "n_val": len(val_ds), "n_test": int(len(labels)),
        "skipped": {"train": train_ds.skipped.total, "val": val_ds.skipped.total, "test": test_ds.skipped.total},
        "geometry": asdict(geom), "geometry_source": geometry_source(args, tower),
        "encoder_input": tower.global_input or geom.output_size,
        "protocol": {"optimizer": "AdamW(0.9, 0.999)", "lr": args.lr, "weight_decay": args.weight_decay,
                     "batch_size": args.batch_size, "epochs": args.epochs, "patience": args.patience,
                     "augment": args.augment, "trainable": "whole encoder + linear head",
                     "nan_labels": "ignored per class in loss and AUROC"},
    }
    row = {"task": "finetune", "data": args.data, "model": tower.name, "fraction": args.fraction,
           "seed": args.seed, "auc": metrics["auc"]}
    if multiclass:
        row["acc"] = metrics["acc"]
    write_results(args.out, metrics, row)
    return metrics
