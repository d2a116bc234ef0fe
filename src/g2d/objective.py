"""The pre-training objective (paper Sec. 3.1-3.2): vision-language alignment (Eq. 1, CLIP loss) plus
pixel alignment (Eq. 4: Dice + BCE against pseudo masks built on the fly from the attention map), or
the decoder ablations of Table 5a / Table 8 (``model.decoder.mode``: none, reconstruction, shuffled).

The trainer (:mod:`g2d.train.loop`) and the step benchmarks call :func:`compute_losses`, so what is
timed is what is trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor

from g2d.config import G2DConfig
from g2d.losses import attention_concentration_loss, contrastive_loss, pixel_alignment_loss, reconstruction_loss
from g2d.model import G2DModel
from g2d.model.g2d import G2DOutput
from g2d.pseudo_mask import build_pseudo_masks, shuffle_masks

__all__ = ["StepLosses", "CachedEmbeddings", "cache_embeddings", "compute_losses", "pseudo_mask_targets"]

# attention [B, heads, h, w], images [B, C, H, W] -> masks [B, 1, H, W] in {0, 1}
MaskBuilder = Callable[[Tensor, Tensor], Tensor]
Phase = Callable[[str], AbstractContextManager]


@dataclass
class StepLosses:
    """One (micro-)batch's losses. ``total`` and ``objective`` carry the graph: ``objective`` is what
    this micro-batch backpropagates (its share of the step's loss: ``total / micro_batches`` without
    cached negatives). ``terms`` are the named, detached scalars the trainer logs, whatever they are
    (declared here only): ``total``, ``vla`` (contrastive), ``pa`` (pixel alignment), ``acc``
    (in-batch image-to-text top-1), ``fg`` (the pseudo masks' foreground fraction), and
    ``concentration`` when ``loss.attention_concentration`` is set."""

    total: Tensor
    objective: Tensor
    terms: dict[str, Tensor]

    @property
    def vla(self) -> Tensor:
        return self.terms["vla"]


@dataclass
class CachedEmbeddings:
    """The image and text embeddings ``[N, d]`` of every micro-batch of an accumulated step, computed
    without gradients (:func:`cache_embeddings`), in micro-batch order; micro-batch ``j`` holds rows
    ``starts[j]:starts[j + 1]``."""

    image: Tensor
    text: Tensor
    starts: list[int]

    def with_fresh(self, j: int, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """The whole batch's embeddings with micro-batch ``j``'s replaced by ``image`` / ``text``
        (with gradients): gradients reach this micro-batch's forward only."""
        lo, hi = self.starts[j], self.starts[j + 1]
        return (torch.cat([self.image[:lo], image.to(self.image.dtype), self.image[hi:]]),
                torch.cat([self.text[:lo], text.to(self.text.dtype), self.text[hi:]]))


@torch.no_grad()
def cache_embeddings(model: G2DModel, micro_batches: list[tuple[Tensor, dict[str, Tensor]]]) -> CachedEmbeddings:
    """The first pass of an accumulated step with the whole batch as negatives (open_clip's
    ``accum_freq``; Gao et al. 2021, gradient cache): each micro-batch's embeddings without gradients.
    The model's mode is kept (train mode: BatchNorm statistics move; the trainer restores them)."""
    images, texts, starts = [], [], [0]
    for x, tokens in micro_batches:
        images.append(model.image_forward(x, decode=False).embedding.float())
        texts.append(model.text_forward(tokens).float())
        starts.append(starts[-1] + x.shape[0])
    return CachedEmbeddings(torch.cat(images), torch.cat(texts), starts)


def pseudo_mask_targets(attention: Tensor, images: Tensor, cfg: G2DConfig,
                        build: MaskBuilder | None = None) -> Tensor:
    """The decoder's targets [B, 1, H, W] from the attention map (no gradient): the paper's
    construction (:func:`g2d.pseudo_mask.build_pseudo_masks`) unless ``build`` replaces it, shuffled
    across the batch for ``model.decoder.mode=shuffled`` (Table 8)."""
    with torch.no_grad():
        masks = (build or (lambda a, x: build_pseudo_masks(a, x, cfg.model.pseudo_mask)))(
            attention.float(), images.float())
        return shuffle_masks(masks) if cfg.model.decoder.mode == "shuffled" else masks


def compute_losses(model: G2DModel, images: Tensor, tokens: dict[str, Tensor], cfg: G2DConfig, step: int,
                   forward: Callable[..., G2DOutput] | None = None, phase: Phase | None = None,
                   build_masks: MaskBuilder | None = None, micro_batches: int = 1,
                   cached: CachedEmbeddings | None = None, index: int = 0) -> StepLosses:
    """One pre-training forward and its losses: ``vla + w * pa`` with ``w = loss.pa_weight`` after
    ``loss.contrastive_only_steps`` (0 before: the decoder still runs, so DDP sees every parameter),
    plus ``loss.attention_concentration`` times the attention's concentration loss when set.

    Gradient accumulation over ``micro_batches``: without ``cached`` every micro-batch's contrastive
    loss has its own images and texts as negatives (``train.accum_negatives=micro``) and the
    objective is ``total / micro_batches``. With ``cached`` (:func:`cache_embeddings` of the step's
    micro-batches; this is micro-batch ``index``) the contrastive loss is the whole batch's, with this
    micro-batch's embeddings fresh, and the objective is ``vla + (the per-image terms) / micro_batches``:
    summed over the micro-batches, the gradients are those of the whole batch (equal in eval mode;
    in train mode BatchNorm normalises each micro-batch by its own statistics, as any accumulation).

    :param images: [B, C, H, W] model input. ``tokens``: the tokenizer's output for B reports.
    :param forward: the callable that runs the model (the DDP wrapper when distributed).
    :param phase: ``phase(name)`` -> context manager around "forward", "pseudo_masks" and "losses"
        (the step benchmark's timer); nothing by default.
    :param build_masks: replaces the paper's pseudo-mask construction (the benchmark's release-style
        masks).
    """
    phase = phase or (lambda name: contextlib.nullcontext())
    mode = cfg.model.decoder.mode
    with phase("forward"):
        out = (forward or model)(images, tokens, decode=mode != "none")
    masks = None
    if mode in ("pseudo", "shuffled"):
        with phase("pseudo_masks"):
            masks = pseudo_mask_targets(out.image.attention, images, cfg, build_masks)
    with phase("losses"):
        image_emb, text_emb = out.image.embedding, out.text_embedding
        if cached is not None:
            image_emb, text_emb = cached.with_fresh(index, image_emb, text_emb)
        vla = contrastive_loss(image_emb, text_emb, out.logit_scale, cfg.loss)
        pa = fg = vla.new_zeros(())
        logits = out.image.decoder_logits
        if mode == "reconstruction":
            assert logits is not None
            pa = reconstruction_loss(logits, images)
        elif masks is not None and logits is not None:
            pa, fg = pixel_alignment_loss(logits, masks, cfg.loss), masks.mean()
        pa_weight = cfg.loss.pa_weight if step >= cfg.loss.contrastive_only_steps else 0.0
        per_image = pa_weight * pa
        extra = {}
        if cfg.loss.attention_concentration:
            conc = attention_concentration_loss(out.image.attention)
            per_image = per_image + cfg.loss.attention_concentration * conc
            extra["concentration"] = conc.detach()
        total = vla + per_image
        objective = total / micro_batches if cached is None else vla + per_image / micro_batches
        with torch.no_grad():
            acc = (out.image.embedding @ out.text_embedding.T).argmax(1).eq(
                torch.arange(images.shape[0], device=images.device)).float().mean()
    terms = {"total": total.detach(), "vla": vla.detach(), "pa": pa.detach(), "acc": acc, "fg": fg, **extra}
    return StepLosses(total, objective, terms)
