"""Non-linear projectors into the joint embedding space."""

from __future__ import annotations

from torch import Tensor, nn


class Projector(nn.Module):
    """Linear -> BatchNorm (no affine) -> ReLU -> Linear, applied over the last dimension.

    The layout is the release's ``proj_v``/``proj_t`` (1x1 convolutions there). Leading dimensions
    are flattened for the BatchNorm, so a per-pixel use ([B, H, W, C]) normalises over all pixels,
    like BatchNorm2d.

    :param in_dim: input width. :param out_dim: embedding width d (128/256/512, Table 5c).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or out_dim
        self.fc1 = nn.Linear(in_dim, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden, affine=False)
        self.fc2 = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """[..., in_dim] -> [..., out_dim]."""
        lead = x.shape[:-1]
        y = self.bn(self.fc1(x.reshape(-1, x.shape[-1])))
        return self.fc2(y.relu()).view(*lead, -1)
