"""``g2d eval linear``: a linear classifier on frozen, pooled image features (paper A.4.3, MGCA protocol).

The encoder is frozen in eval mode (:class:`g2d.downstream.harness.Frozen`: no gradients, BatchNorm
statistics untouched). Features are extracted once per image and cached (see
:func:`g2d.downstream.features.cached_features`), so the head trains on a feature matrix.

Choices (see docs/eval-recognition.md):

- features: ``--pool gap`` (default, as MGCA) global-average-pooled last ResNet stage (2048-d for
  ResNet-50, before any projection); ``--pool embedding`` the G2D attention-pooled projected embedding.
- hyper-parameters from the paper: AdamW (0.9, 0.999), lr 5e-4, weight decay 1e-6, batch 8, 50
  epochs, early stopping (patience 10) on validation macro AUROC (multi-label) or accuracy
  (multi-class); ``--monitor loss`` stops on validation loss as MGCA does. Test uses the best epoch.
- multi-label sets (CheXpert 5 classes, RSNA 1 class): BCE, macro AUROC over classes; single-label
  one-hot sets (COVIDx) are detected and use softmax + cross-entropy and top-1 accuracy.
- unknown labels (NaN) are left out per class, from the loss and from the AUROC.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from g2d.data.labelled.specs import open_dataset
from g2d.downstream.features import (
    cached_features,
    check_split,
    default_cache_dir,
    evaluate_scores,
    geometry_from_args,
    geometry_source,
    label_tasks,
    leave_out_classes_without_positives,
    model_key,
    train_positives,
)
from g2d.downstream.harness import Fit
from g2d.downstream.protocol import GeometryArgs, arg
from g2d.downstream.results import write_results
from g2d.errors import DataError
from g2d.fingerprint import absolute_paths
from g2d.losses import classification_loss
from g2d.metrics import is_multiclass
from g2d.towers import load_image_tower, resolve_device

__all__ = ["run", "train_linear_head"]

log = logging.getLogger("g2d.downstream")


@dataclass(kw_only=True)
class Args(GeometryArgs):
    """``g2d eval linear``: its flags are these fields (``--name-with-dashes``)."""

    pool: str = arg('gap', choices=('gap', 'embedding'),
                    help="gap: global-average-pooled last ResNet stage (MGCA); embedding: G2D's attention-pooled "
                         'projected embedding')
    epochs: int = arg(50)
    batch_size: int = arg(8)
    lr: float = arg(0.0005)
    weight_decay: float = arg(1e-06)
    patience: int = arg(10, help='early-stopping patience in epochs (0: off)')
    monitor: str = arg('metric', choices=('metric', 'loss'),
                       help='early stopping on validation AUROC/accuracy (metric) or loss (MGCA)')
    feature_cache: str | None = arg(None,
                                    help='folder of cached features (default $G2D_CACHE/features or '
                                         '~/.cache/g2d/features)')
    no_feature_cache: bool = arg(False, help='extract features in memory only')
    extract_batch_size: int = arg(64)


def _probs(logits: Tensor, multiclass: bool) -> Tensor:
    return logits.softmax(1) if multiclass else logits.sigmoid()


def train_linear_head(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], tasks: list[str],
                      multiclass: bool, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
                      patience: int, monitor: str, seed: int, device: torch.device
                      ) -> tuple[nn.Linear, dict[str, Any]]:
    """Train ``Linear(D, K)`` on features ``[N, D]`` / labels ``[N, K]`` with the protocols' harness
    (:class:`g2d.downstream.harness.Fit`, in memory: the features are cached, so no checkpoint); keep
    the best validation epoch.

    :return: the best head (CPU) and a summary (best epoch, epochs run, its validation loss and metric).
    """
    torch.manual_seed(seed)
    xs, ys = train[0].to(device), train[1].to(device)
    xv, yv = val[0].to(device), val[1]
    head = nn.Linear(xs.shape[1], ys.shape[1]).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    fit = Fit(head, opt, None, {}, epochs, patience, progress=False)
    seen: dict[int, tuple[float, float]] = {}  # epoch -> (validation loss, metric)

    def train_batches(epoch: int) -> Iterable[dict[str, Tensor]]:  # the order depends on (seed, epoch) only
        order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return ({"image": xs[idx], "labels": ys[idx]} for idx in order.split(batch_size))

    def validate() -> tuple[float, float]:
        with torch.no_grad():
            logits = head(xv)
            val_loss = classification_loss(logits, yv.to(device), multiclass).item()
        m = evaluate_scores(_probs(logits, multiclass).cpu().numpy(), yv.numpy(), tasks, multiclass)
        metric = m["acc"] if multiclass else m["auc"]
        seen[fit.epoch + 1] = (val_loss, metric)
        # a validation split with one label value has no AUROC: fall back to the loss
        return (-val_loss if monitor == "loss" or math.isnan(metric) else metric), val_loss

    fit.fit(train_batches, lambda b: classification_loss(head(b["image"]), b["labels"], multiclass), validate,
            "linear")
    fit.load_best()
    val_loss, val_metric = seen.get(fit.best_epoch, (math.nan, math.nan))
    return head.cpu(), {"best_epoch": fit.best_epoch, "epochs_run": fit.epoch, "val_loss": val_loss,
                        "val_metric": val_metric}


def _features(args: Args, tower, split: str, geom, device) -> tuple[Tensor, Tensor, Any]:
    ds = open_dataset(args.data, split, args.fraction if split == "train" else 1.0, geom, subset=args.subset)
    check_split(ds, f"{args.data} {split}")
    cache = None if args.no_feature_cache else (args.feature_cache or default_cache_dir())
    key = {"model": model_key(tower, args.seed), "data": absolute_paths(args.data), "split": split,
           "geometry": asdict(geom), "pool": args.pool}
    ids, feats = cached_features(tower, ds, key=key, cache_dir=cache, pooling=args.pool, device=device,
                                 batch_size=args.extract_batch_size, num_workers=args.num_workers,
                                 progress=not args.no_progress)
    row = {i: k for k, i in enumerate(ds.ids)}
    labels = ds.labels()[[row[i] for i in ids]] if ids else np.zeros((0, len(ds.tasks)), np.float32)
    return feats, torch.from_numpy(np.asarray(labels, np.float32)), ds


def run(args: Args) -> dict[str, Any]:
    torch.manual_seed(args.seed)  # the random baseline's weights depend on the seed
    tower = load_image_tower(args.model, args.arch, args.trust_pickle)
    device = resolve_device(args.device)
    geom = geometry_from_args(args, tower)
    (xs, ys, train_ds), (xv, yv, _), (xt, yt, _) = (_features(args, tower, s, geom, device)
                                                   for s in ("train", "val", "test"))
    tasks = label_tasks(train_ds, args.data)
    if len(xs) == 0 or len(xv) == 0 or len(xt) == 0:
        raise DataError(f"{args.data}: no readable images in train, val or test")
    multiclass = is_multiclass(ys.numpy()) and is_multiclass(yt.numpy())
    head, summary = train_linear_head(
        (xs, ys), (xv, yv), tasks, multiclass, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, patience=args.patience, monitor=args.monitor, seed=args.seed,
        device=device)
    with torch.no_grad():
        scores = _probs(head(xt), multiclass).numpy()
    test = leave_out_classes_without_positives(evaluate_scores(scores, yt.numpy(), tasks, multiclass),
                                               train_positives(ys.numpy(), tasks), f"{args.data} linear")
    metrics: dict[str, Any] = {
        "task": "linear", "data": args.data, "model": tower.name, "fraction": args.fraction, "seed": args.seed,
        **tower.provenance(),
        "type": "multiclass" if multiclass else "multilabel", "pool": args.pool, "feature_dim": int(xs.shape[1]),
        **test, **summary, "n_train": len(xs), "n_val": len(xv), "n_test": len(xt),
        "unknown_labels_test": int(np.isnan(yt.numpy()).sum()),
        "geometry": asdict(geom), "geometry_source": geometry_source(args, tower),
        "encoder_input": tower.global_input or geom.output_size,
        "protocol": {"optimizer": "AdamW(0.9, 0.999)", "lr": args.lr, "weight_decay": args.weight_decay,
                     "batch_size": args.batch_size, "epochs": args.epochs, "patience": args.patience,
                     "monitor": args.monitor, "encoder": "frozen, eval mode (BatchNorm statistics fixed)",
                     "nan_labels": "ignored per class in loss and AUROC"},
    }
    row = {"task": "linear", "data": args.data, "model": tower.name, "pool": args.pool,
           "fraction": args.fraction, "seed": args.seed, "auc": metrics["auc"]}
    if multiclass:
        row["acc"] = metrics["acc"]
    write_results(args.out, metrics, row)
    return metrics
