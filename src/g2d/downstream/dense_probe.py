"""``g2d eval dense-probe``: a per-pixel linear classifier on frozen dense features, scored by Dice.

The field's low-variance test of dense features: DINOv2 (Oquab et al. 2023, Sec. 7.4 "linear") and
RAD-DINO (Pérez-García et al. 2025) report semantic segmentation with a linear layer on frozen patch
features. Here the layer is a logistic regression on per-channel standardised features
(``--features``):

- ``encoder``: the encoder's last stage map (stride 32 for an undilated ResNet);
- ``multiscale``: the four ResNet stages (strides 4, 8, 16, 32) brought to the stride-8 grid
  (average-pooled from finer, bilinearly upsampled from coarser) and concatenated;
- ``decoder``: the pre-trained U-Net decoder's last features, at input resolution (G2D models and
  ``g2d-release`` files with a decoder).

Its logits are upsampled bilinearly to the mask's resolution (``--image-size``), where the loss
(mean per-pixel binary cross-entropy plus ``l2 / 2 * |w|^2``) is taken, so the classifier is fitted
on the pixels the Dice is scored on. The fit is full-batch L-BFGS (strong Wolfe line search) for a
fixed number of iterations from a fixed start: deterministic, seconds on a CPU, no seed, no
learning rate, no early stopping. The L2 penalty and the probability threshold are chosen on the
validation Dice from ``--l2`` and :data:`THRESHOLDS`; the chosen pair is tested once. Scored like
``g2d eval segmentation`` (per-image Dice, empty-mask rule of :func:`g2d.metrics.dice_per_image`).
See docs/eval-dense.md.

Every ``--model`` kind works (G2D models, random/imagenet, peers' ``KIND:PATH``); ``decoder`` needs one
with a pre-trained decoder. Training and validation features are held in memory
(``--max-memory-gb``); test images are scored batch by batch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from g2d.downstream.dense import (
    dataset_name,
    input_identity,
    mask_figures,
    open_splits,
    per_image,
    positives,
    predict_dice,
    skip_counts,
)
from g2d.downstream.harness import batches, finished_metrics, make_loader
from g2d.downstream.protocol import ProtocolArgs, arg
from g2d.downstream.results import write_results
from g2d.errors import ConfigError
from g2d.fingerprint import absolute_paths
from g2d.metrics import dice_per_image
from g2d.seeding import seed_everything
from g2d.towers import ImageTower, load_image_tower, resolve_device

__all__ = ["Args", "run", "FEATURES", "THRESHOLDS", "dense_features", "fit_logistic", "DenseLinearProbe"]

log = logging.getLogger("g2d.downstream")

FEATURES = ("encoder", "multiscale", "decoder")
# probability thresholds tried on the validation Dice (with each L2 penalty)
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(kw_only=True)
class Args(ProtocolArgs):
    """``g2d eval dense-probe``: its flags are these fields (``--name-with-dashes``)."""

    features: str = arg("multiscale", choices=FEATURES,
                        help="encoder: last stage; multiscale: the four ResNet stages on the stride-8 grid; "
                             "decoder: the pre-trained decoder's last features")
    image_size: int = arg(224, help="square resize, no crop (multiple of 32); the masks are scored at this size")
    l2: str = arg("1e-4,1e-3,1e-2,1e-1", help="L2 penalties tried (comma-separated); the best on validation Dice "
                                              "is kept")
    iterations: int = arg(100, help="L-BFGS iterations of each fit")
    batch_size: int = arg(16, help="images per feature-extraction batch")
    max_memory_gb: float = arg(4.0, help="refuse a run whose training and validation features would take more")
    siim_train: str = arg("balanced", choices=("balanced", "all"),
                          help="SIIM only: the balanced training set (as g2d eval segmentation) or all of it")
    figures: int = arg(4, help="test images drawn to OUT/figures")

    def penalties(self) -> list[float]:
        try:
            values = [float(v) for v in str(self.l2).split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 0:
            raise ConfigError(f"--l2 must be comma-separated non-negative numbers, got {self.l2!r}")
        return values


# ------------------------------------------------------------------------------------- features


@torch.no_grad()
def dense_features(tower: ImageTower, images: Tensor, which: str) -> Tensor:
    """``[B, C, h, w]`` features of ``images`` (``[B, 1, S, S]`` in [0, 1]) as the module docstring says.

    :raises ConfigError: ``decoder`` for a tower without a pre-trained decoder, or an unknown choice."""
    if which not in FEATURES:
        raise ConfigError(f"--features must be one of {', '.join(FEATURES)}, got {which!r}")
    if which == "decoder" and tower.decoder is None:
        raise ConfigError(f"--features decoder needs a model with a pre-trained decoder; {tower.name!r} has none "
                          "(use encoder or multiscale)")
    stages = tower.encoder(images)
    if which == "encoder":
        return stages[-1].float()
    if which == "decoder":
        assert tower.decoder is not None
        return tower.decoder(stages).float()
    grid = stages[2].shape[-2:]  # stride 8

    def to_grid(m: Tensor) -> Tensor:
        if m.shape[-2:] == grid:
            return m
        if m.shape[-1] > grid[-1]:
            return F.adaptive_avg_pool2d(m, grid)
        return F.interpolate(m, size=grid, mode="bilinear", align_corners=False)

    return torch.cat([to_grid(m.float()) for m in stages[1:5]], dim=1)


def _extract(tower: ImageTower, ds: Any, which: str, batch_size: int, device: torch.device,
             max_bytes: float, progress: bool, desc: str) -> tuple[Tensor, Tensor]:
    """Features ``[N, C, h, w]`` (float32, CPU) and masks ``[N, S, S]`` (bool) of ``ds``."""
    feats: list[Tensor] = []
    masks: list[Tensor] = []
    for b in batches(make_loader(ds, batch_size, 0), progress, desc):
        f = dense_features(tower, b["image"].to(device), which).cpu()
        if not feats:
            need = f[0].numel() * 4 * len(ds)
            if need > max_bytes:
                raise ConfigError(f"dense probe: the {desc} features of {len(ds)} images take {need / 2**30:.3g} GiB "
                                  f"({tuple(f.shape[1:])} per image) > --max-memory-gb {max_bytes / 2**30:g}; use "
                                  "a smaller --fraction, --image-size or --features encoder, or raise the limit")
        feats.append(f)
        masks.append(b["mask"][:, 0] > 0.5)
    if not feats:
        raise ConfigError(f"dense probe: no readable image in the {desc} split")
    return torch.cat(feats), torch.cat(masks)


# ------------------------------------------------------------------------------------------ fit


def _logits(feats: Tensor, w: Tensor, b: Tensor, size: tuple[int, ...]) -> Tensor:
    """Per-pixel logits ``[N, size]``: the linear map on the feature grid, upsampled bilinearly."""
    z = torch.einsum("nchw,c->nhw", feats, w) + b
    if tuple(z.shape[-2:]) == tuple(size):
        return z
    return F.interpolate(z[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def fit_logistic(feats: Tensor, masks: Tensor, l2: float, iterations: int = 100, chunk: int = 32
                 ) -> tuple[Tensor, Tensor]:
    """Per-pixel logistic regression: weights ``[C]`` and bias ``[]`` minimising the mean binary
    cross-entropy of the upsampled logits (:func:`_logits`) against ``masks`` plus ``l2 / 2 * |w|^2``.

    Full-batch L-BFGS (``torch.optim.LBFGS``, strong Wolfe) from ``w = 0`` and the bias at the training
    pixels' log-odds; the gradient is accumulated over chunks of ``chunk`` images (memory), in a fixed
    order, so the fit is deterministic.

    :param feats: ``[N, C, h, w]`` standardised features. :param masks: ``[N, S, S]`` bool.
    """
    n, c = feats.shape[:2]
    size = tuple(masks.shape[-2:])
    target = masks.float()
    prior = float(target.mean().clamp(1e-4, 1 - 1e-4))
    w = torch.zeros(c, requires_grad=True)
    b = torch.tensor(math.log(prior / (1 - prior)), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations, max_eval=iterations * 2, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")
    pixels = float(target.numel())

    def closure() -> Tensor:
        opt.zero_grad()
        total = 0.0
        for i in range(0, n, chunk):
            z = _logits(feats[i:i + chunk], w, b, size)
            loss = F.binary_cross_entropy_with_logits(z, target[i:i + chunk], reduction="sum") / pixels
            loss.backward()
            total += float(loss.detach())
        reg = 0.5 * l2 * (w * w).sum()
        reg.backward()
        return torch.tensor(total + float(reg.detach()))

    opt.step(closure)
    return w.detach(), b.detach()


class DenseLinearProbe(nn.Module):
    """The fitted probe as a segmentation model: ``[B, 1, S, S]`` images in [0, 1] -> ``[B, 1, S, S]``
    logits shifted by the chosen threshold's log-odds, so ``> 0`` is the prediction (as a U-Net's)."""

    mean: Tensor
    std: Tensor
    w: Tensor
    b: Tensor

    def __init__(self, tower: ImageTower, which: str, mean: Tensor, std: Tensor, w: Tensor, b: Tensor,
                 threshold: float) -> None:
        super().__init__()
        self.tower, self.which, self.threshold = tower, which, threshold
        for name, t in (("mean", mean), ("std", std), ("w", w), ("b", b)):
            self.register_buffer(name, t.clone())

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        f = (dense_features(self.tower, images, self.which) - self.mean) / self.std
        z = _logits(f, self.w, self.b, tuple(images.shape[-2:]))
        return (z - math.log(self.threshold / (1 - self.threshold)))[:, None]


# ------------------------------------------------------------------------------------------ run


def _signature(args: Args, penalties: list[float]) -> dict[str, Any]:
    return {"task": "dense-probe", **absolute_paths({"data": args.data, "model": str(args.model)}),
            "fraction": args.fraction, "subset": args.subset, "seed": args.seed, "features": args.features,
            "arch": args.arch,
            "image_size": args.image_size, "l2": penalties, "iterations": args.iterations,
            "thresholds": list(THRESHOLDS), "siim_train": args.siim_train}


def run(args: Args) -> dict[str, Any]:
    """Fit and test one dense linear probe; writes ``OUT/metrics.json``, ``results.md`` and
    ``figures/``. Returns the metrics (``dice``: mean per-image test Dice in [0, 1]).

    :raises ConfigError: bad ``--l2``, ``decoder`` features without a decoder, features over
        ``--max-memory-gb``, or a split without readable images."""
    out = Path(args.out)
    penalties = args.penalties()
    splits = open_splits(args)
    signature = {**_signature(args, penalties), **input_identity(args, splits)}
    done = finished_metrics(out, signature)
    if done is not None:
        log.info("%s already holds the finished run", out)
        return done
    device = resolve_device(args.device)
    seed_everything(args.seed, deterministic=True)  # the random baseline's weights
    tower = load_image_tower(args.model, args.arch, args.trust_pickle)
    tower.encoder.to(device).eval()
    if tower.decoder is not None:
        tower.decoder.to(device).eval()
    progress, max_bytes = not args.no_progress, args.max_memory_gb * 2**30
    t0 = time.perf_counter()
    xs, ms = _extract(tower, splits["train"], args.features, args.batch_size, device, max_bytes, progress, "train")
    xv, mv = _extract(tower, splits["val"], args.features, args.batch_size, device,
                      max_bytes - xs.numel() * 4, progress, "val")
    t_extract = time.perf_counter() - t0
    mean = xs.mean(dim=(0, 2, 3), keepdim=True)[0]
    std = xs.std(dim=(0, 2, 3), keepdim=True)[0].clamp(min=1e-6)
    xs, xv = (xs - mean) / std, (xv - mean) / std
    t0 = time.perf_counter()
    best: tuple[float, float, float, Tensor, Tensor] | None = None  # (val Dice, l2, threshold, w, b)
    tried = []
    for l2 in penalties:
        w, b = fit_logistic(xs, ms, l2, args.iterations)
        prob = torch.sigmoid(_logits(xv, w, b, tuple(mv.shape[-2:])))
        for thr in THRESHOLDS:
            pred = prob > thr
            d = float(dice_per_image(pred, mv).mean())
            tried.append({"l2": l2, "threshold": thr, "val_dice": d,
                          "val_images_predicted_positive": float(pred.flatten(1).any(1).float().mean())})
            if best is None or d > best[0]:
                best = (d, l2, thr, w, b)
    t_fit = time.perf_counter() - t0
    assert best is not None
    val_dice, l2, thr, w, b = best
    if not any(t["val_images_predicted_positive"] for t in tried if (t["l2"], t["threshold"]) == (l2, thr)):
        log.warning("dense probe (%s features): no foreground predicted on any validation image; its validation "
                    "Dice %.3f is the share of images with an empty mask, not a segmentation", args.features, val_dice)
    probe = DenseLinearProbe(tower, args.features, mean, std, w, b, thr).to(device)
    test_loader = make_loader(splits["test"], args.batch_size, 0)
    dice, _, n_empty_target, test_ids = predict_dice(probe, test_loader, device, None, progress, "test")
    figures = mask_figures(probe, splits["test"], device, out / "figures", args.figures)
    metrics: dict[str, Any] = {
        "task": "dense-probe", "features": args.features, **tower.provenance(),
        "dice": float(dice.mean()) if len(dice) else None,
        "dice_rule": "per-image mean; empty target & empty prediction = 1, empty target & non-empty prediction = 0",
        "per_image": per_image(dice, test_ids), "subset": args.subset,
        "l2": l2, "threshold": thr, "val_dice": val_dice, "selection": tried,
        "feature_channels": int(xs.shape[1]), "feature_grid": list(xs.shape[-2:]),
        "mask_size": list(ms.shape[-2:]),
        "n_train": len(splits["train"]), "n_train_pos": positives(splits["train"]),
        "n_train_scored": int(len(xs)), "n_val": int(len(xv)), "n_test": len(splits["test"]),
        "n_test_scored": int(len(dice)), "n_test_empty_target": n_empty_target,
        "extract_seconds": round(t_extract, 2), "fit_seconds": round(t_fit, 2), "figures": figures,
        "protocol": {"classifier": "per-pixel logistic regression on standardised features, logits upsampled "
                                   "bilinearly to the mask", "optimizer": f"L-BFGS, {args.iterations} iterations, "
                                                                          "strong Wolfe",
                     "selection": "L2 penalty and threshold by validation Dice",
                     "encoder": "frozen, eval mode (BatchNorm statistics fixed)"},
        **skip_counts(splits), "args": signature,
    }
    row = {"task": "dense-probe", "data": dataset_name(args.data), "model": tower.name, "features": args.features,
           "fraction": args.fraction, "subset": args.subset, "dice": metrics["dice"], "l2": l2, "threshold": thr}
    write_results(out, metrics, row)
    return metrics
