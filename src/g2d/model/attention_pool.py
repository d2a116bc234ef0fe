"""CLIP-style attention pooling that returns its per-head spatial attention weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionPool2d(nn.Module):
    """A query token (the mean of the pixel tokens) attends over a dense map's pixels.

    Written out by hand rather than with ``F.scaled_dot_product_attention`` (which does not return
    the weights) or ``nn.MultiheadAttention`` (whose query, key and value must share one width), so
    that the attention width can differ from the input width and the weights come back per head.

    :param in_dim: channels C of the dense map.
    :param width: query/key/value width; must be divisible by ``heads``.
    :param heads: number of attention heads.
    :param out_dim: width of the pooled output.
    :param spatial: side of the dense map at the configured input size (positional embedding).
    :param keys_include_query: put the query token among the keys (CLIP/release); its weight is
        then dropped from the returned spatial map, which sums to less than 1.
    :param token_norm: LayerNorm the pixel tokens before the query/key/value projections (not in
        CLIP or the release). Without it the ReLU features' norm (about 30 for the ``tiny`` preset)
        dwarfs the positional embedding and saturates the softmax to one cell (docs/attention.md).
    :param key_center: compute the keys from each pixel token minus that position's mean over
        images (the batch's mean in training, a running mean in eval, as BatchNorm keeps it), so
        attention responds to what differs from the usual anatomy at that place rather than to
        the anatomy itself. Values and the query are unchanged. Not in CLIP or the release.
    :param key_position: add the positional embedding to the keys (CLIP, release). Without it the
        attention logits depend on the tokens' content only (values and query keep their positions).
    """

    def __init__(self, in_dim: int, width: int, heads: int, out_dim: int, spatial: int,
                 keys_include_query: bool = False, token_norm: bool = False, key_center: bool = False,
                 key_position: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads={heads} does not divide attention width={width}")
        self.heads, self.width, self.spatial = heads, width, spatial
        self.keys_include_query = keys_include_query
        self.pos = nn.Parameter(torch.randn(spatial * spatial + 1, in_dim) / in_dim ** 0.5)
        self.q = nn.Linear(in_dim, width)
        self.k = nn.Linear(in_dim, width)
        self.v = nn.Linear(in_dim, width)
        self.out = nn.Linear(width, out_dim)
        self.norm: nn.LayerNorm | None = nn.LayerNorm(in_dim) if token_norm else None
        self.position_mean: Tensor  # a buffer, with key_center
        self.key_center, self.key_position = key_center, key_position
        if key_center:
            self.register_buffer("position_mean", torch.zeros(spatial * spatial, in_dim))

    def _resample(self, table: Tensor, h: int, w: int) -> Tensor:
        """A per-position table [spatial^2, C] at another map size [h * w, C] (bilinear)."""
        if h * w == self.spatial ** 2:
            return table
        c = table.shape[1]
        grid = table.T.reshape(1, c, self.spatial, self.spatial)
        return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False).reshape(c, h * w).T

    def _tokens(self, x: Tensor, update: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """[B, C, H, W] -> query token [B, 1, C], pixel tokens [B, HW, C] with positions, and the
        tokens the keys are computed from (centred per position with ``key_center``; ``update``:
        a training forward, whose batch mean is used and moves the running mean)."""
        h, w = x.shape[-2:]
        pix = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            pix = self.norm(pix)
        pos = torch.cat([self.pos[:1], self._resample(self.pos[1:], h, w)], dim=0)
        query = pix.mean(dim=1, keepdim=True) + pos[:1]
        key_pix = pix
        if self.key_center:
            # a batch of one has no mean over images but itself: it uses the running mean
            if update and self.training and x.shape[0] > 1 and h * w == self.spatial ** 2:
                mean = pix.mean(0)
                with torch.no_grad():
                    self.position_mean.lerp_(mean.detach().float(), 0.1)
            else:
                mean = self._resample(self.position_mean, h, w).to(pix.dtype)
            key_pix = pix - mean
        return query, pix + pos[1:], key_pix + pos[1:] if self.key_position else key_pix

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pool a dense map.

        :param x: [B, C, H, W] dense features.
        :return: pooled [B, out_dim] and attention [B, heads, H, W] (non-negative; each head's map
            sums to 1 over the pixels, or to 1 minus the query's self-weight when
            ``keys_include_query``).
        """
        b, _, h, w = x.shape
        query, pix, key_pix = self._tokens(x, update=True)
        keys = torch.cat([query, key_pix], dim=1) if self.keys_include_query else key_pix
        values = torch.cat([query, pix], dim=1) if self.keys_include_query else pix
        dh = self.width // self.heads
        q = self.q(query).view(b, 1, self.heads, dh).transpose(1, 2)          # [B, h, 1, dh]
        k = self.k(keys).view(b, -1, self.heads, dh).transpose(1, 2)          # [B, h, N, dh]
        v = self.v(values).view(b, -1, self.heads, dh).transpose(1, 2)
        weights = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(dh), dim=-1)  # [B, h, 1, N]
        pooled = (weights @ v).transpose(1, 2).reshape(b, self.width)
        spatial = weights[:, :, 0, 1:] if self.keys_include_query else weights[:, :, 0]
        return self.out(pooled), spatial.reshape(b, self.heads, h, w)

    def pixel_values(self, x: Tensor) -> Tensor:
        """Each pixel's value vector sent through the output projection, as if it alone were
        attended (MaskCLIP's reading of CLIP's pooling); used for dense image-text similarity.

        :param x: [B, C, H, W]. :return: [B, H, W, out_dim].
        """
        b, _, h, w = x.shape
        _, pix, _ = self._tokens(x)
        return self.out(self.v(pix)).view(b, h, w, -1)
