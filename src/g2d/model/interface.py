"""What zero-shot classification and grounding need from a model: G2D's own
(:class:`g2d.model.G2DModel`) and a peer's (:class:`g2d.peer_vlm.PeerVLModel`) both have it."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

__all__ = ["TextImageModel"]


class TextImageModel(Protocol):
    """A model with an image and a text tower in one embedding space."""

    @property
    def logit_scale(self) -> Tensor:
        """log of the cosine-similarity scale (a scalar parameter)."""
        ...

    def encode_image(self, images: Tensor) -> Tensor:
        """[B, 1 or 3, H, W] in [0, 1] -> [B, d], L2-normalised."""
        ...

    def encode_text(self, texts: list[str]) -> Tensor:
        """N prompts -> [N, d], L2-normalised."""
        ...

    def dense_embeddings(self, images: Tensor) -> Tensor:
        """[B, 1 or 3, H, W] in [0, 1] -> [B, h, w, d], L2-normalised per cell."""
        ...
