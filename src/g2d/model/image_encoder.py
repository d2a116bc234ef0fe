"""ResNet image encoder (torchvision) that exposes every stage's feature map."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from g2d.config import RESNET_CHANNELS, ImageEncoderCfg

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNetEncoder(nn.Module):
    """torchvision ResNet without its classifier.

    Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so ImageNet
    weights, the release's ``_encoder.pth`` files and segmentation-models-pytorch's ResNet encoders
    load directly. Built with random weights: :func:`g2d.factory.create_image_encoder` loads
    ``cfg.weights``.
    """

    mean: Tensor  # buffers
    std: Tensor

    def __init__(self, cfg: ImageEncoderCfg):
        super().__init__()
        net = getattr(torchvision.models, cfg.arch)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if cfg.output_stride <= 16:
            _dilate_stage(self.layer4, 2 if cfg.output_stride == 16 else 4, 1 if cfg.output_stride == 16 else 2)
        if cfg.output_stride == 8:
            _dilate_stage(self.layer3, 2, 1)
        self.output_stride = cfg.output_stride
        self.channels: tuple[int, ...] = RESNET_CHANNELS[cfg.arch]
        self.input_norm = cfg.input_norm
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: Tensor) -> Tensor:
        """[B, 1 or 3, H, W] in [0, 1] -> [B, 3, H, W] network input."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if self.input_norm == "imagenet":
            images = (images - self.mean) / self.std
        return images

    def forward(self, images: Tensor) -> list[Tensor]:
        """Return the five stage maps ``[stem /2, layer1 /4, layer2 /8, layer3 /16, layer4 /32]``
        (with ``output_stride`` 16: layer4 at /16; 8: layer3 and layer4 at /8).

        :param images: [B, 1 or 3, H, W] in [0, 1].
        :return: list of [B, C_i, H / 2^(i+1), W / 2^(i+1)] with C_i = ``self.channels[i]``.
        """
        x = self.relu(self.bn1(self.conv1(self.prepare(images))))
        f1 = self.layer1(self.maxpool(x))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [x, f1, f2, f3, f4]


def _dilate_stage(stage: nn.Sequential, dilation: int, first: int) -> None:
    """Turn a strided ResNet stage into a dilated one in place (DeepLab's output-stride trick).

    torchvision's ``replace_stride_with_dilation`` would do this but refuses ResNet-18/34 (its
    BasicBlock has no dilation argument), so the strides and dilations are set on the built
    convolutions: the stage keeps its resolution, the first block's 3x3 convolutions use the
    previous dilation ``first`` and the later blocks' use ``dilation``. Parameter names and shapes
    are unchanged, so any ResNet weights still load.
    """
    for i, block in enumerate(stage):
        for conv in block.modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            conv.stride = (1, 1)
            if conv.kernel_size == (3, 3):
                d = first if i == 0 else dilation
                conv.dilation, conv.padding = (d, d), (d, d)
