"""Image-to-text retrieval over a held-out set."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from g2d.model import G2DModel


@torch.no_grad()
def embed_pairs(model: G2DModel, images: Tensor, texts: Sequence[str], batch_size: int = 64
                ) -> tuple[Tensor, Tensor]:
    """Normalised embeddings of paired images [N, 1, H, W] and texts -> ([N, d], [N, d])."""
    model.eval()
    device = model.logit_scale.device
    img = torch.cat([model.encode_image(images[i:i + batch_size].to(device))
                     for i in range(0, len(images), batch_size)])
    txt = torch.cat([model.encode_text(list(texts[i:i + batch_size]))
                     for i in range(0, len(texts), batch_size)])
    return img.cpu(), txt.cpu()


