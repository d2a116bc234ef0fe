"""The G2D model: image tower with attention pooling and U-Net decoder, text tower, projectors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from g2d.config import G2DConfig, ModelCfg
from g2d.image_input import as_model_input
from g2d.model.attention_pool import AttentionPool2d
from g2d.model.decoder import SegmentationHead, UNetDecoder
from g2d.model.image_encoder import ResNetEncoder
from g2d.model.projector import Projector
from g2d.model.text_encoder import TextEncoder

if TYPE_CHECKING:
    from g2d.data.transforms import ImageTransformCfg


@dataclass
class ImageOutput:
    """What the image tower computes for a batch of B images of size H x W.

    :ivar embedding: [B, d] global embedding in the joint space (L2-normalised if requested).
    :ivar attention: [B, heads, H/s, W/s] attention-pooling weights per head
        (s = ``model.image.output_stride``, 32 by default).
    :ivar dense: [B, C, H/s, W/s] the encoder's last feature map.
    :ivar features: the five encoder stage maps [/2, /4, /8, /16, /32] (the last ones at /s).
    :ivar decoder_logits: [B, K, H, W] decoder output logits (None without a decoder or when not
        requested); K = 1, or the head count for per-head pseudo masks.
    """

    embedding: Tensor
    attention: Tensor
    dense: Tensor
    features: list[Tensor]
    decoder_logits: Tensor | None


@dataclass
class G2DOutput:
    """:ivar image: the :class:`ImageOutput`. :ivar text_embedding: [B, d] L2-normalised.
    :ivar logit_scale: scalar, 1 / temperature."""

    image: ImageOutput
    text_embedding: Tensor
    logit_scale: Tensor


class G2DModel(nn.Module):
    """G2D (Liu et al., NeurIPS 2024): dual encoders for global alignment plus a U-Net decoder
    trained on pseudo masks built from the attention-pooling weights.

    Build with :func:`g2d.create_model` or load a trained one with :func:`g2d.load_model`.
    """

    # set by g2d.load_model: the full training config and its deterministic image geometry
    config: G2DConfig
    preprocess: ImageTransformCfg
    pixel_proj: Projector | None
    image_proj: Projector | None
    decoder: UNetDecoder | None
    segmentation_head: SegmentationHead | None

    def __init__(self, cfg: ModelCfg, text_backbone: nn.Module, tokenizer: Any,
                 temperature: float = 0.07, learnable_temperature: bool = False):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ResNetEncoder(cfg.image)
        dense_ch = self.image_encoder.channels[-1]
        spatial = cfg.image_size // cfg.image.output_stride
        d = cfg.embed_dim
        pool_options = dict(keys_include_query=cfg.pool.keys_include_query, token_norm=cfg.pool.token_norm,
                            key_center=cfg.pool.key_center, key_position=cfg.pool.key_position)
        if cfg.pool.pool_on == "features":
            self.pixel_proj = None
            self.pool = AttentionPool2d(dense_ch, cfg.pool.width, cfg.pool.heads, cfg.pool.width,
                                        spatial, **pool_options)
            self.image_proj = Projector(cfg.pool.width, d)
        else:  # release: per-pixel projection to d, attention pooling on the d-dim map
            self.pixel_proj = Projector(dense_ch, d)
            self.pool = AttentionPool2d(d, d, cfg.pool.heads, d, spatial, **pool_options)
            self.image_proj = None

        self.text_encoder = TextEncoder(cfg.text, text_backbone, tokenizer)
        self.text_proj = Projector(self.text_encoder.hidden_size, d)

        self.decoder = self.segmentation_head = None
        if cfg.decoder.mode != "none":
            per_head = cfg.decoder.mode in ("pseudo", "shuffled") and not cfg.pseudo_mask.aggregate_heads
            self.decoder = UNetDecoder(self.image_encoder.channels, tuple(cfg.decoder.channels))
            self.segmentation_head = SegmentationHead(cfg.decoder.channels[-1],
                                                      cfg.pool.heads if per_head else 1)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)),
                                        requires_grad=learnable_temperature)

    def save_pretrained(self, out_dir: str | Path, run_dir: str | Path | None = None) -> Path:
        """This model in the Hugging Face Hub format (:func:`g2d.hub.save_pretrained`): weights, full
        config, tokenizer, image preprocessing and a model card (with the ``g2d eval`` results under
        ``run_dir``). Load it back with ``g2d.load_model(out_dir)`` or, once pushed, ``hf-hub:ORG/NAME``."""
        from g2d.hub import save_pretrained

        return save_pretrained(self, out_dir, run_dir)

    # ------------------------------------------------------------------------------ image side

    def _dense_for_pool(self, dense: Tensor) -> Tensor:
        if self.pixel_proj is None:
            return dense
        return self.pixel_proj(dense.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def image_forward(self, images: Tensor, decode: bool = True, normalize: bool = True) -> ImageOutput:
        """:param images: [B, 1 or 3, H, W] in [0, 1] (``uint8`` is divided by 255).
        :return: :class:`ImageOutput`.
        :raises ImageInputError: images outside that contract (:func:`g2d.image_input.as_model_input`)."""
        return self._image_forward(as_model_input(images, "G2DModel.image_forward"), decode, normalize)

    def _image_forward(self, images: Tensor, decode: bool = True, normalize: bool = True) -> ImageOutput:
        """:meth:`image_forward` without the input check (training: images from g2d's own loaders,
        no host synchronisation per step)."""
        features = self.image_encoder(images)
        pooled, attention = self.pool(self._dense_for_pool(features[-1]))
        emb = self.image_proj(pooled) if self.image_proj is not None else pooled
        logits = None
        if decode and self.decoder is not None and self.segmentation_head is not None:
            logits = self.segmentation_head(self.decoder(features))
        return ImageOutput(F.normalize(emb, dim=-1) if normalize else emb, attention,
                           features[-1], features, logits)

    @torch.no_grad()
    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """[B, 1 or 3, H, W] in [0, 1] (``uint8`` is divided by 255) -> [B, d] global image embeddings.

        :raises ImageInputError: images outside that contract (e.g. 0-255 floats)."""
        images = as_model_input(images, "G2DModel.encode_image")
        return self._image_forward(images, decode=False, normalize=normalize).embedding

    def dense_embeddings(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Per-pixel embeddings in the joint space, for zero-shot grounding.

        :param images: [B, 1 or 3, H, W] in [0, 1] (``uint8`` is divided by 255). :return: [B, H/s, W/s, d].
        :raises ImageInputError: images outside that contract.
        """
        images = as_model_input(images, "G2DModel.dense_embeddings")
        dense = self._dense_for_pool(self.image_encoder(images)[-1])
        pix = self.pool.pixel_values(dense)
        if self.image_proj is not None:
            pix = self.image_proj(pix)
        return F.normalize(pix, dim=-1) if normalize else pix

    # ------------------------------------------------------------------------------- text side

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        return self.text_encoder.tokenize(texts, device=self.logit_scale.device)

    def text_forward(self, tokens: dict[str, Tensor], normalize: bool = True) -> Tensor:
        emb = self.text_proj(self.text_encoder(tokens))
        return F.normalize(emb, dim=-1) if normalize else emb

    @torch.no_grad()
    def encode_text(self, texts: list[str] | dict[str, Tensor], normalize: bool = True) -> Tensor:
        """A list of strings (or tokenizer output) -> [B, d] text embeddings."""
        tokens = self.tokenize(texts) if isinstance(texts, (list, tuple)) else texts
        return self.text_forward(tokens, normalize=normalize)

    # ---------------------------------------------------------------------------------- joint

    def forward(self, images: Tensor, tokens: dict[str, Tensor], decode: bool = True) -> G2DOutput:
        """The training forward: ``images`` [B, 1 or 3, H, W] in [0, 1] from g2d's loaders, not
        checked here (:meth:`image_forward` checks)."""
        image = self._image_forward(images, decode=decode)
        return G2DOutput(image, self.text_forward(tokens), self.logit_scale.exp())
