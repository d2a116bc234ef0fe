"""Vision-language alignment (InfoNCE) and pixel-alignment (Dice + BCE) losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from g2d.config import LossCfg


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for the local part.

    Written here because torch's autograd-aware gather (``torch.distributed.nn``) is deprecated and
    its replacement is private; all-reduce + slice works on every backend, gloo included.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` [B, d] from every rank -> [world * B, d], keeping gradients for all parts
    (every rank must pass the same B)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor, cfg: LossCfg) -> Tensor:
    """Symmetric InfoNCE (paper Eq. 1, both directions).

    With ``negatives="global"`` each rank scores its own B images against the texts of all ranks
    (and its B texts against all images): memory grows linearly with the world size, and the mean
    of the per-rank losses (what DDP's gradient averaging optimises) equals the loss of the whole
    concatenated batch.

    :param image: [B, d] L2-normalised. :param text: [B, d] L2-normalised.
    :param logit_scale: scalar 1 / temperature.
    """
    if cfg.negatives == "global" and dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        all_image, all_text = gather_with_grad(image), gather_with_grad(text)
    else:
        rank, all_image, all_text = 0, image, text
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    logits_i2t = logit_scale * image @ all_text.T
    logits_t2i = logit_scale * text @ all_image.T
    loss = F.cross_entropy(logits_i2t.float(), labels) + F.cross_entropy(logits_t2i.float(), labels)
    return loss / 2 if cfg.contrastive_reduction == "mean" else loss


def dice_loss(logits: Tensor, target: Tensor, on: str = "probs", eps: float = 1e-5) -> Tensor:
    """1 - mean soft Dice over images and channels.

    :param logits: [B, K, H, W]. :param target: [B, K, H, W] in [0, 1].
    :param on: "probs" (sigmoid first, paper) or "logits" (raw logits, as the release computes it).
    """
    pred = torch.sigmoid(logits.float()) if on == "probs" else logits.float()
    dims = (2, 3)
    inter = (pred * target).sum(dims)
    dice = (2 * inter + eps) / (pred.sum(dims) + target.sum(dims) + eps)
    return 1 - dice.mean()


def pixel_alignment_loss(logits: Tensor, target: Tensor, cfg: LossCfg) -> Tensor:
    """Paper Eq. 4: dice_weight * Dice + bce_weight * BCE (defaults 1/2 and 1/2)."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return cfg.dice_weight * dice_loss(logits, target, cfg.dice_input) + cfg.bce_weight * bce


def reconstruction_loss(logits: Tensor, images: Tensor) -> Tensor:
    """Decoder target ``reconstruction`` (Table 5a): MSE between sigmoid(decoder) and the
    grayscale input in [0, 1]."""
    target = images.mean(dim=1, keepdim=True) if images.shape[1] != logits.shape[1] else images
    return F.mse_loss(torch.sigmoid(logits.float()), target.float())


def masked_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """BCE-with-logits averaged over the known (non-NaN) labels only."""
    known = ~torch.isnan(labels)
    if not known.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known], labels[known])


def classification_loss(logits: Tensor, y: Tensor, multiclass: bool) -> Tensor:
    """Downstream classification: cross-entropy on one-hot rows (``multiclass``, e.g. COVIDx) or
    BCE over the known labels (multi-label sets with NaN for unknown)."""
    return F.cross_entropy(logits, y.argmax(1)) if multiclass else masked_bce(logits, y)


def attention_concentration_loss(attention: Tensor) -> Tensor:
    """Mean spatial variance of each head's attention map (the concentration loss of SCOPS, Hung et
    al., CVPR 2019): 0 for a map on one cell, about 1/6 for a uniform one.

    :param attention: [B, heads, h, w] non-negative maps (renormalised to sum to 1 per head).
    :return: scalar, the mean over images and heads of var_y + var_x, with cell centres at
        coordinates in (0, 1) (units: squared map side).
    """
    p = attention.float().flatten(2)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    h, w = attention.shape[-2:]
    ys = ((torch.arange(h, device=p.device) + 0.5) / h).repeat_interleave(w)
    xs = ((torch.arange(w, device=p.device) + 0.5) / w).repeat(h)
    var_y, var_x = ((p * c ** 2).sum(-1) - (p * c).sum(-1) ** 2 for c in (ys, xs))
    return (var_y + var_x).mean()

