"""What the dense protocols share (segmentation, detection, the dense linear probe): their data set
name, square geometry and splits (cut to the label fraction and subset), the run's identity, the
start of a run (flags, seed, image tower), the optimizer, and for masks: per-image Dice over a loader,
the per-image scores that paired comparisons read, and the test figures."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from g2d.data.labelled import LabelledCXR
from g2d.data.labelled.specs import open_dataset
from g2d.data.transforms import ImageTransformCfg
from g2d.downstream.harness import batches
from g2d.downstream.protocol import DenseArgs, ProtocolArgs
from g2d.fingerprint import dataset_identity, digest, model_identity
from g2d.metrics import dice_per_image
from g2d.seeding import seed_everything
from g2d.towers import ImageTower, load_image_tower, resolve_device

__all__ = ["dataset_name", "square_geometry", "open_splits", "positives", "skip_counts", "jsonable",
           "input_identity", "start_dense_run", "make_optimizer", "predict_dice", "per_image", "mask_figures"]

log = logging.getLogger("g2d.downstream")


def dataset_name(spec: str) -> str:
    """``"siim:/data"`` -> ``"siim"``; ``"synthetic:32"`` -> ``"synthetic"``."""
    return spec.split(":", 1)[0]


def square_geometry(size: int) -> ImageTransformCfg:
    """MGCA's geometry: straight resize to ``size x size`` (aspect not kept, no crop)."""
    if size <= 0 or size % 32:
        raise ValueError(f"--image-size must be a positive multiple of 32, got {size}")
    return ImageTransformCfg(resize=size, crop=size, augment="none", keep_aspect=False)


def open_splits(args: Any) -> dict[str, Any]:
    """train (cut to ``--fraction`` and label subset ``--subset``), val and test of ``--data`` at the
    square geometry ``--image-size`` (``args``: a protocol's ``Args`` with those fields).

    SIIM segmentation trains on MGCA/GLoRIA's balanced set (every positive plus as many negatives,
    the fraction taken from that set; :func:`g2d.data.labelled.siim.balance_train`) unless
    ``--siim-train all``; val and test keep every image."""
    geom = square_geometry(args.image_size)
    balance = dataset_name(args.data) == "siim" and getattr(args, "siim_train", "balanced") == "balanced"
    splits = {s: open_dataset(args.data, s, args.fraction if s == "train" and not balance else 1.0, geom,
                              subset=args.subset) for s in ("train", "val", "test")}
    if balance:
        from g2d.data.labelled.siim import balance_train

        train = splits["train"]
        assert isinstance(train, LabelledCXR)  # SIIM is read from files, never generated
        splits["train"] = balance_train(train, args.fraction, args.subset)
    if positives(splits["train"]) == 0:  # metrics.json records n_train_pos
        log.warning("%s: the training subset (fraction %g, subset %d, %d images) holds no positive image",
                    args.data, args.fraction, args.subset, len(splits["train"]))
    return splits


def positives(ds: Any) -> int | None:
    """Images of ``ds`` with at least one positive label (None for a set without labels)."""
    labels = ds.labels() if hasattr(ds, "labels") else None
    if labels is None or labels.ndim != 2 or labels.shape[1] == 0:
        return None
    return int((labels == 1).any(1).sum())


def skip_counts(splits: dict[str, Any]) -> dict[str, int]:
    """Per split: rows the reader dropped (missing files, bad rows, ids listed in the split table but
    unusable) and images that failed to decode during the run (dropped from their batch)."""
    out = {}
    for s, ds in splits.items():
        counts = ds.skipped.counts
        unreadable = int(counts.get("unreadable_image", 0))
        out[f"skipped_unreadable_{s}"] = unreadable
        out[f"skipped_rows_{s}"] = int(ds.skipped.total) - unreadable
    return out


def jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def input_identity(args: ProtocolArgs, splits: dict[str, Any]) -> dict[str, str]:
    """What the result depends on beyond the arguments' text: the splits' content (image files,
    labels) and the model's weight files, so a finished run or a checkpoint is never reused for
    replaced images, retrained weights or the same relative path in another folder."""
    return {"data_id": digest([dataset_identity(splits[s]) for s in ("train", "val", "test")]),
            "model_id": model_identity(str(args.model))}


def start_dense_run(args: DenseArgs) -> tuple[torch.device, bool, ImageTower]:
    """Checks the flags, seeds, then loads the image tower (right after seeding, so a random
    baseline's weights depend only on ``--seed``): (device, progress, tower)."""
    if args.update_bn and args.train_encoder:
        raise ValueError("--update-bn applies to a frozen encoder; --train-encoder already updates BatchNorm")
    device = resolve_device(args.device)
    seed_everything(args.seed, deterministic=True)
    tower = load_image_tower(args.model, args.arch, args.trust_pickle)
    return device, not args.no_progress, tower


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))


@torch.no_grad()
def predict_dice(model: nn.Module, loader: Iterable, device: torch.device, loss_fn: Callable | None = None,
                 progress: bool = False, desc: str = "eval") -> tuple[Tensor, float, int, list[str]]:
    """Per-image Dice ``[N]`` (loader order), the mean loss per image, the number of empty targets and
    the ids of the N scored images."""
    model.eval()
    dice, loss_sum, n, empty, ids = [], 0.0, 0, 0, []
    for b in batches(loader, progress, desc):
        x, m = b["image"].to(device), b["mask"].to(device)
        logits = model(x)
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, m)) * len(x)
        dice.append(dice_per_image(logits > 0, m > 0.5).cpu())
        empty += int(((m > 0.5).flatten(1).sum(1) == 0).sum())
        n += len(x)
        ids += list(b["id"])
    return (torch.cat(dice) if dice else torch.zeros(0, dtype=torch.float64)), loss_sum / max(n, 1), empty, ids


def per_image(scores: Tensor, ids: list[str]) -> dict[str, Any]:
    """Per-image test scores for paired comparisons (:func:`g2d.metrics.paired_bootstrap`): the
    scores in loader order and a digest of the ids they belong to (the ids themselves may hold
    patient numbers), so two runs are paired only when they scored the same images in the same order."""
    return {"dice": [round(float(v), 6) for v in scores], "ids_digest": digest(ids)}


def mask_figures(model: nn.Module, ds: Any, device: torch.device, out: Path, n: int) -> list[str]:
    """PNG per test image: image with ground truth (green) and prediction (red) outlines."""
    if n <= 0:
        return []
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    written = []
    model.eval()
    for i in range(min(n, len(ds))):
        s = ds[i]
        if s is None:
            continue
        with torch.no_grad():
            pred = (model(s["image"][None].to(device)) > 0)[0, 0].float().cpu().numpy()
        img, gt = s["image"][0].numpy(), s["mask"][0].numpy()
        d = float(dice_per_image(torch.tensor(pred[None]), torch.tensor(gt[None]))[0])
        fig = Figure(figsize=(4, 4.3))
        ax = fig.subplots()
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        for m, colour in ((gt, "lime"), (pred, "red")):
            if m.any() and not m.all():
                ax.contour(m, levels=[0.5], colors=colour, linewidths=1.2)
        ax.set_title(f"{s['id']}  Dice {d:.3f}\ngreen: ground truth, red: prediction", fontsize=8)
        ax.axis("off")
        path = out / f"seg_{i:03d}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        written.append(str(path.name))
    return written
