"""U-Net decoder over the ResNet stage features, with segmentation-models-pytorch's layout.

Kept in-repo (about 50 lines) instead of importing smp's ``UnetDecoder``, whose call signature has
changed across releases (the release code breaks on smp >= 0.5). Parameter names match smp's
``Unet`` (``decoder.blocks.N.conv1.0.weight``, ``segmentation_head.0.weight``), so the pre-trained
decoder loads into ``smp.Unet`` for "encoder + decoder" transfer (tests/test_model.py checks it; with
``model.image.output_stride`` 32, since smp's ResNet is strided).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """Nearest upsampling to the skip map's size (x2 without one), concatenation with the skip map,
    two 3x3 conv-BN-ReLU. A dilated encoder (``output_stride`` 16 or 8) gives stages of equal
    size, where the upsampling is the identity."""

    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.conv1 = ConvBNReLU(cin + skip, cout)
        self.conv2 = ConvBNReLU(cout, cout)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        if skip is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


# segmentation-models-pytorch's default decoder widths (the release's U-Net)
SMP_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class UNetDecoder(nn.Module):
    """Five decoder blocks from the /32 map up to input resolution.

    :param encoder_channels: channels of the five stage maps [/2, /4, /8, /16, /32].
    :param channels: output channels of the five blocks (smp default 256, 128, 64, 32, 16).
    """

    def __init__(self, encoder_channels: tuple[int, ...], channels: tuple[int, ...]):
        super().__init__()
        skips = list(reversed(encoder_channels[:-1])) + [0]
        ins = [encoder_channels[-1], *channels[:-1]]
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, channels))
        self.channels = tuple(channels)
        for m in self.modules():  # smp's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, features: list[Tensor]) -> Tensor:
        """:param features: the encoder's five maps. :return: [B, channels[-1], H, W]."""
        skips = list(reversed(features[:-1])) + [None]
        x = features[-1]
        for block, skip in zip(self.blocks, skips):
            x = block(x, skip)
        return x


class SegmentationHead(nn.Sequential):
    """3x3 convolution to ``classes`` logit maps (smp's ``SegmentationHead`` layout)."""

    def __init__(self, cin: int, classes: int):
        conv = nn.Conv2d(cin, classes, 3, padding=1)
        nn.init.xavier_uniform_(conv.weight)
        assert conv.bias is not None  # Conv2d's default
        nn.init.zeros_(conv.bias)
        super().__init__(conv)
