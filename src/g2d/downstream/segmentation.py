"""``g2d eval segmentation``: U-Net on the pre-trained encoder, scored by Dice (G2D A.4.1, MGCA protocol).

The encoder is frozen - BatchNorm running statistics included (:class:`g2d.downstream.harness.Frozen`);
MGCA's "frozen" encoder still updates them, which ``--update-bn`` reproduces. ``--train-encoder`` is
MedKLIP's setting (encoder trained too). Defaults are the paper's: AdamW lr 2e-4, weight decay 0.05,
betas (0.9, 0.999), batch 8 (SIIM) / 16 (RSNA), at most 50 epochs with early stopping on validation
Dice (patience 10), the best validation-Dice epoch evaluated on test. Images are resized to a square
``--image-size`` (224, no crop) as MGCA does. See docs/eval-dense.md and docs/decoder-transfer.md.

What is transferred (``--transfer``, :data:`TRANSFERS`):

- ``encoder``: a new U-Net decoder and head on the encoder (the peers' protocol), of widths
  ``--decoder-channels`` (smp's 256-128-64-32-16 by default, or ``model``: the loaded model's own, so
  that it matches the pre-trained decoder it is compared with);
- ``encoder-decoder``: G2D's pre-trained decoder, trained, with a new 1-channel head;
- ``encoder-decoder-head``: the pre-trained decoder *and* its pseudo-mask head, both trained (the
  pretext task and the downstream task are both a binary mask; the reading of the paper's Sec. 3
  "the task head of the pretext task facilitates a smoother transfer", docs/decoder-transfer.md);
- ``frozen-decoder``: the pre-trained decoder frozen (BatchNorm statistics too), only a new head
  trained: a probe of the decoder's features.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from g2d.downstream.dense import (
    dataset_name,
    input_identity,
    jsonable,
    make_optimizer,
    mask_figures,
    open_splits,
    per_image,
    positives,
    predict_dice,
    skip_counts,
    start_dense_run,
)
from g2d.downstream.harness import Fit, Frozen, finished_metrics, make_loader, shuffled_loader
from g2d.downstream.protocol import DenseArgs, arg
from g2d.downstream.results import write_results
from g2d.fingerprint import absolute_paths
from g2d.metrics import dice_mgca_batch_mean
from g2d.model.decoder import SMP_DECODER_CHANNELS, SegmentationHead, UNetDecoder

__all__ = ["run", "fit_and_test", "UNet", "build_unet", "TRANSFERS", "decoder_widths", "unet_decoder_widths",
           "recalibrate_batchnorm",
           "mixed_loss", "dice_bce_loss", "soft_dice"]

log = logging.getLogger("g2d.downstream")

# MGCA/G2D batch sizes by data set; other sets (csv:, synthetic) get SIIM's 8
SEG_BATCH_SIZE = {"siim": 8, "rsna": 16}


@dataclass(kw_only=True)
class Args(DenseArgs):
    """``g2d eval segmentation``: its flags are these fields (``--name-with-dashes``)."""

    transfer: str = arg('encoder', choices=('encoder', 'encoder-decoder', 'encoder-decoder-head', 'frozen-decoder'),
                        help="encoder: new U-Net decoder and head; encoder-decoder: G2D's pre-trained decoder, new "
                             "head; encoder-decoder-head: the pre-trained decoder and pseudo-mask head; "
                             "frozen-decoder: the pre-trained decoder frozen, only a new head trained")
    decoder_channels: str = arg('smp', metavar='smp|model|A,B,C,D,E',
                                help="widths of the new decoder of --transfer encoder: smp (256,128,64,32,16), "
                                     "model (the loaded G2D model's own decoder widths), or five integers")
    recalibrate_bn: bool = arg(False, help="before each validation and the test, re-estimate the trained "
                                           "decoder's BatchNorm statistics on the training images")
    batch_size: int | None = arg(None, help='default 8 for SIIM, 16 for RSNA, 8 otherwise')
    lr: float = arg(0.0002)
    train_encoder: bool = arg(False, help="train the encoder too (MedKLIP's setting)")
    loss: str = arg('mixed', choices=('mixed', 'dice-bce'),
                    help="mixed: MGCA's 10*focal - log(soft Dice); dice-bce: BCE + (1 - soft Dice)")
    mgca_batch_size: int | None = arg(None, help='test batch size of the dice_mgca_batch_mean variant '
                                                 '(default: --batch-size, as MGCA)')
    siim_train: str = arg('balanced', choices=('balanced', 'all'),
                          help='SIIM only: train on every positive plus as many negatives (MGCA/GLoRIA, paper A.4.1; '
                               'the fraction is taken from that set), or on the whole training split')


# ------------------------------------------------------------------------------------------- model


class UNet(nn.Module):
    """Encoder (five stage maps) -> U-Net decoder -> 1-channel logits at input resolution."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, head: nn.Module, train_encoder: bool = False,
                 update_bn: bool = False) -> None:
        super().__init__()
        self.encoder = encoder if train_encoder else Frozen(encoder, update_bn)
        self.decoder, self.head = decoder, head
        self.encoder_changes = train_encoder or update_bn

    def forward(self, images: Tensor) -> Tensor:
        """:param images: ``[B, 1, S, S]`` in [0, 1]. :return: logits ``[B, 1, S, S]``."""
        return self.head(self.decoder(self.encoder(images)))


TRANSFERS = ("encoder", "encoder-decoder", "encoder-decoder-head", "frozen-decoder")


def decoder_widths(tower: Any, choice: str = "smp") -> tuple[int, ...]:
    """The widths of a new decoder: ``smp`` (256, 128, 64, 32, 16), ``model`` (the loaded G2D model's
    configured decoder widths, also for a model pre-trained without a decoder), or ``"A,B,C,D,E"``.

    :raises ValueError: ``model`` for a tower without a G2D config (random, imagenet, peers), or a
        list that is not five positive integers."""
    if choice == "smp":
        return SMP_DECODER_CHANNELS
    if choice == "model":
        if tower.decoder is not None:
            return tuple(tower.decoder.channels)
        config = getattr(tower.model, "config", None)
        if config is None:
            raise ValueError(f"--decoder-channels model needs a G2D model; {tower.name!r} has no decoder "
                             "widths of its own: give them, e.g. --decoder-channels 128,64,32,16,8")
        return tuple(config.model.decoder.channels)
    try:
        widths = tuple(int(c) for c in choice.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 5 or min(widths) <= 0:
        raise ValueError(f"--decoder-channels must be smp, model or five positive integers A,B,C,D,E; got {choice!r}")
    return widths


def build_unet(tower: Any, transfer: str = "encoder", train_encoder: bool = False,
               update_bn: bool = False, decoder_channels: str = "smp") -> UNet:
    """A U-Net on ``tower.encoder`` (a :class:`g2d.towers.ImageTower`) with what
    ``transfer`` (:data:`TRANSFERS`, module docstring) takes from the pre-trained model. A kept
    pseudo-mask head with one output per attention head (``model.pseudo_mask.aggregate_heads=false``)
    becomes one output that is their mean (weights and bias averaged: the mean of the head logits).

    :raises ValueError: an unknown ``transfer``, or a transfer that needs a pre-trained decoder (or head)
        on a model without one.
    """
    if transfer not in TRANSFERS:
        raise ValueError(f"--transfer must be one of {', '.join(TRANSFERS)}, got {transfer!r}")
    encoder = copy.deepcopy(tower.encoder)
    if transfer == "encoder":
        fresh = UNetDecoder(tuple(encoder.channels), decoder_widths(tower, decoder_channels))
        return UNet(encoder, fresh, SegmentationHead(fresh.channels[-1], 1), train_encoder, update_bn)
    if tower.decoder is None:
        raise ValueError(f"--transfer {transfer} needs a model with a pre-trained decoder, but {tower.name!r} has "
                         f"none (random/imagenet baselines and decoder-free pre-training have no decoder); "
                         f"use --transfer encoder")
    decoder: UNetDecoder = copy.deepcopy(tower.decoder)
    if decoder_channels not in ("smp", "model") and decoder_widths(tower, decoder_channels) != tuple(decoder.channels):
        log.warning("--decoder-channels %s sizes a new decoder; --transfer %s keeps the pre-trained decoder's "
                    "widths %s", decoder_channels, transfer, ",".join(map(str, decoder.channels)))
    head = SegmentationHead(decoder.channels[-1], 1)
    if transfer == "encoder-decoder-head":
        if tower.head is None:
            raise ValueError(f"--transfer encoder-decoder-head needs the pre-trained segmentation head, and "
                             f"{tower.name!r} has none")
        new, old = head[0], tower.head[0]
        assert isinstance(new, nn.Conv2d) and isinstance(old, nn.Conv2d) and new.bias is not None \
            and old.bias is not None
        with torch.no_grad():  # K head outputs -> their mean (K = 1: a copy)
            new.weight.copy_(old.weight.mean(0, keepdim=True))
            new.bias.copy_(old.bias.mean(0, keepdim=True))
    return UNet(encoder, Frozen(decoder) if transfer == "frozen-decoder" else decoder, head, train_encoder,
                update_bn)


def unet_decoder_widths(model: UNet) -> tuple[int, ...]:
    """The widths of a U-Net's decoder, frozen or not."""
    decoder = model.decoder.module if isinstance(model.decoder, Frozen) else model.decoder
    assert isinstance(decoder, UNetDecoder)
    return tuple(decoder.channels)


@torch.no_grad()
def recalibrate_batchnorm(model: UNet, loader: Iterable, device: torch.device) -> int:
    """Re-estimate the running statistics of the BatchNorm layers that train (not a frozen encoder's
    or decoder's) as a cumulative average over ``loader``'s images, in train mode; returns the number
    of images. A pre-trained decoder's running statistics come from pre-training and a new one's from
    its initialisation, and a few-label run's few optimizer steps (momentum 0.1) move them only part
    of the way: evaluation would then normalise with statistics of neither (docs/decoder-transfer.md)."""
    layers = [m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and not _under_frozen(model, name)]
    if not layers:
        return 0
    was_training, momenta = model.training, [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for part in model.modules():  # a frozen part stays in eval mode, even one with --update-bn
        if isinstance(part, Frozen):
            part.module.eval()
    n = 0
    for b in loader:
        if b is None:
            continue
        model(b["image"].to(device))
        n += len(b["image"])
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.train(was_training)
    return n


def _under_frozen(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:k])), Frozen) for k in range(1, len(parts)))


# -------------------------------------------------------------------------------------------- loss


def soft_dice(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """MGCA's ``dice_loss`` (a score despite the name): soft Dice of ``sigmoid(logits)`` pooled over
    the whole batch, ``(2 I + smooth) / (sum p + sum t + smooth)``."""
    p, t = torch.sigmoid(logits).flatten(), target.flatten()
    return (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def mixed_loss(logits: Tensor, target: Tensor, alpha: float = 10.0, gamma: float = 2.0) -> Tensor:
    """MGCA's ``MixedLoss``: ``alpha * focal(gamma) - log(soft Dice)``; the focal term is the mean
    over pixels of ``BCE * (1 - p_t)^gamma`` (torchvision's ``sigmoid_focal_loss`` with alpha off)."""
    focal = torchvision.ops.sigmoid_focal_loss(logits, target, alpha=-1, gamma=gamma, reduction="mean")
    return alpha * focal - torch.log(soft_dice(logits, target))


def dice_bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """``BCE + (1 - soft Dice)`` with the batch-pooled soft Dice of :func:`soft_dice`."""
    return F.binary_cross_entropy_with_logits(logits, target) + 1 - soft_dice(logits, target)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mixed": mixed_loss, "dice-bce": dice_bce_loss}


# ------------------------------------------------------------------------------------------ run


def _signature(args: Args, batch_size: int, decoder_channels: tuple[int, ...]) -> dict[str, Any]:
    # options added since 2026-12-07 enter only when not at their default: finished runs keep their key
    added: dict[str, Any] = {k: v for k, v in (("subset", args.subset), ("recalibrate_bn", args.recalibrate_bn)) if v}
    if args.transfer == "encoder" and decoder_channels != SMP_DECODER_CHANNELS:
        added["decoder_channels"] = list(decoder_channels)
    return {"task": "segmentation", **absolute_paths({"data": args.data, "model": str(args.model)}),
            "fraction": args.fraction,
            "seed": args.seed, "transfer": args.transfer, "arch": args.arch, "batch_size": batch_size,
            "lr": args.lr, "weight_decay": args.weight_decay, "image_size": args.image_size,
            "train_encoder": args.train_encoder, "update_bn": args.update_bn, "loss": args.loss,
            "siim_train": args.siim_train, **added}


def run(args: Args) -> dict[str, Any]:
    """Train and test one segmentation run; writes ``OUT/metrics.json``, ``results.md``, ``ckpt.pt``,
    ``figures/``. Returns the metrics."""
    return fit_and_test(args)[0]


def fit_and_test(args: Args) -> tuple[dict[str, Any], nn.Module | None]:
    """:func:`run`, also returning the tested model (``None`` when ``OUT`` held the finished run)."""
    out = Path(args.out)
    batch_size = args.batch_size or SEG_BATCH_SIZE.get(dataset_name(args.data), 8)
    if args.transfer not in TRANSFERS:
        raise ValueError(f"--transfer must be one of {', '.join(TRANSFERS)}, got {args.transfer!r}")
    if args.recalibrate_bn and args.transfer == "frozen-decoder":
        raise ValueError("--recalibrate-bn re-estimates a trained decoder's BatchNorm statistics; --transfer "
                         "frozen-decoder keeps the pre-trained ones (frozen means frozen): leave one out")
    splits = open_splits(args)
    device, progress, tower = start_dense_run(args)
    model = build_unet(tower, args.transfer, args.train_encoder, args.update_bn, args.decoder_channels).to(device)
    widths = unet_decoder_widths(model)
    signature = {**_signature(args, batch_size, widths), **input_identity(args, splits)}
    full_sig = {**signature, "epochs": args.epochs, "patience": args.patience,
                "mgca_batch_size": args.mgca_batch_size or batch_size}
    done = finished_metrics(out, full_sig)
    if done is not None:
        log.info("%s already holds the finished run", out)
        return done, None
    loss_fn = LOSSES[args.loss]
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    fit = Fit(model, optimizer, out, signature, args.epochs, args.patience, progress)
    fit.resume()
    val_loader = make_loader(splits["val"], batch_size, args.num_workers)
    calibration_loader = make_loader(splits["train"], batch_size, args.num_workers)

    def validate() -> tuple[float, float]:
        if args.recalibrate_bn:
            recalibrate_batchnorm(model, calibration_loader, device)
        dice, val_loss, _, _ = predict_dice(model, val_loader, device, loss_fn, progress, "validation")
        return (float(dice.mean()) if len(dice) else 0.0), val_loss

    fit.fit(shuffled_loader(splits["train"], batch_size, args.num_workers, args.seed),
            lambda b: loss_fn(model(b["image"].to(device)), b["mask"].to(device)), validate, "segmentation")
    fit.load_best()
    test_loader = make_loader(splits["test"], batch_size, args.num_workers)
    dice, test_loss, n_empty_target, test_ids = predict_dice(model, test_loader, device, loss_fn, progress, "test")
    mgca_bs = args.mgca_batch_size or batch_size
    figures = mask_figures(model, splits["test"], device, out / "figures", args.figures)
    metrics: dict[str, Any] = {
        "task": "segmentation", **tower.provenance(),
        "dice": float(dice.mean()) if len(dice) else None,
        "dice_mgca_batch_mean": jsonable(dice_mgca_batch_mean(dice, mgca_bs)),
        "dice_rule": "per-image mean; empty target & empty prediction = 1, empty target & non-empty prediction = 0",
        "mgca_batch_size": mgca_bs,
        "test_loss": test_loss,
        "n_train": len(splits["train"]), "n_train_pos": positives(splits["train"]),
        "n_val": len(splits["val"]), "n_test": len(splits["test"]),
        "n_test_scored": int(len(dice)), "n_test_empty_target": n_empty_target,
        "epochs_run": fit.epoch, "best_epoch": fit.best_epoch, "best_val_dice": fit.best_score,
        "stopped_early": fit.stopped_early, "resumed_from_epoch": fit.resumed_from,
        "batch_size": batch_size, "history": fit.history, "figures": figures,
        "subset": args.subset, "transfer": args.transfer, "decoder_channels": list(widths),
        "recalibrate_bn": args.recalibrate_bn, "per_image": per_image(dice, test_ids),
        **skip_counts(splits), "args": full_sig,
    }
    row = {"task": "segmentation", "data": dataset_name(args.data), "model": tower.name, "fraction": args.fraction,
           "subset": args.subset, "transfer": args.transfer, "seed": args.seed, "dice": metrics["dice"],
           "dice_mgca_batch_mean": metrics["dice_mgca_batch_mean"], "best_epoch": fit.best_epoch}
    write_results(out, metrics, row)
    return metrics, model
