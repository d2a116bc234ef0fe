"""ResNet image encoder (torchvision) that exposes every stage's feature map."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from g2d.checkpoint import load_weights, read_state_dict
from g2d.config import RESNET_CHANNELS, ImageEncoderCfg

log = logging.getLogger("g2d.model")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's weight enums for `weights="imagenet"`; V1 matches the release (resnet50-19c8e357 is
# the same network as torchvision's IMAGENET1K_V1).
_TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


class ResNetEncoder(nn.Module):
    """torchvision ResNet without its classifier.

    Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so ImageNet
    weights, the release's ``_encoder.pth`` files and segmentation-models-pytorch's ResNet encoders
    load directly.
    """

    def __init__(self, cfg: ImageEncoderCfg):
        super().__init__()
        net = getattr(torchvision.models, cfg.arch)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels: tuple[int, ...] = RESNET_CHANNELS[cfg.arch]
        self.input_norm = cfg.input_norm
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        load_image_weights(self, cfg.weights, cfg.arch)

    def prepare(self, images: Tensor) -> Tensor:
        """[B, 1 or 3, H, W] in [0, 1] -> [B, 3, H, W] network input."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if self.input_norm == "imagenet":
            images = (images - self.mean) / self.std
        return images

    def forward(self, images: Tensor) -> list[Tensor]:
        """Return the five stage maps ``[stem /2, layer1 /4, layer2 /8, layer3 /16, layer4 /32]``.

        :param images: [B, 1 or 3, H, W] in [0, 1].
        :return: list of [B, C_i, H / 2^(i+1), W / 2^(i+1)] with C_i = ``self.channels[i]``.
        """
        x = self.relu(self.bn1(self.conv1(self.prepare(images))))
        f1 = self.layer1(self.maxpool(x))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [x, f1, f2, f3, f4]


def load_image_weights(encoder: ResNetEncoder, weights: str, arch: str) -> None:
    """Load ``none`` / ``imagenet`` / a file into ``encoder``; never downloads."""
    if weights == "none":
        return
    if weights == "imagenet":
        enum = getattr(torchvision.models, _TORCHVISION_WEIGHTS[arch]).IMAGENET1K_V1
        file = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        if not file.is_file():
            raise FileNotFoundError(
                f"ImageNet weights for {arch} are not in the local torch hub cache ({file}). "
                f"Download {enum.url} on a machine with internet and copy it there, or pass the file's "
                "path as model.image.weights=PATH, or use model.image.weights=none.")
        state = torch.load(file, map_location="cpu", weights_only=True)
    else:
        state = read_state_dict(weights)
        # Accept a full G2D state dict or an smp/release encoder export.
        for prefix in ("image_encoder.", "encoder."):
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                break
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    load_weights(encoder, state, f"image weights {weights!r} do not fit {arch}")
    log.info("loaded image encoder weights from %s", weights)
