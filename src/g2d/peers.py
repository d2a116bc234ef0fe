"""Peers' released image encoders as frozen g2d encoders: ``--model KIND:PATH``.

Each :class:`PeerKind` says where a peer's checkpoint keeps its ResNet (container key, key prefix,
``nn.Sequential`` index names), what to leave out (classifier/projection ``fc``), what it lacks
(MedKLIP: no ``layer4``), its first convolution (1 channel for PRIOR and torchxrayvision) and the
input pipeline it was trained with (normalisation and geometry), so the encoder sees what it saw in
pre-training. Facts from the peers' code: ``../shared/reference/peer-checkpoints.md`` and
docs/peers.md. Every expected key and shape is checked: a wrong file names the kind and its first
mismatching key, never a silent ``strict=False``.

Files load with ``weights_only=True``; a container that needs pickled classes (GLoRIA's OmegaConf
hyper-parameters) is read only with ``trust_pickle=True`` (``--trust-pickle``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from g2d.checkpoint import load_checkpoint
from g2d.config import RESNET_CHANNELS, ImageEncoderCfg
from g2d.data.transforms import ImageTransformCfg
from g2d.errors import CheckpointError, PickledClassesError
from g2d.hub import HUB_PREFIX
from g2d.model.decoder import SMP_DECODER_CHANNELS, SegmentationHead, UNetDecoder
from g2d.model.image_encoder import IMAGENET_MEAN, IMAGENET_STD, ResNetEncoder

__all__ = ["PeerKind", "PEER_KINDS", "PeerEncoder", "global_input", "load_peer_encoder", "load_release_decoder",
           "read_peer_state", "split_model_spec", "resolve_kind", "BENCHX_METHODS", "BENCHX_LAYOUTS"]

log = logging.getLogger("g2d.peers")

# torchvision resnet children in order; indices 2 (relu), 3 (maxpool), 8 (avgpool) hold no parameters
_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4", "9": "fc"}


@dataclass(frozen=True)
class PeerKind:
    """How one peer stores its image encoder, and the input it expects.

    :ivar container: keys tried in order to find the state dict in a dict checkpoint (``()``: the file
        is the state dict).
    :ivar prefix: the encoder's key prefix, stripped (a regular expression; ``""``: none).
    :ivar index_names: the ResNet's children are ``nn.Sequential`` indices (0 conv1 ... 7 layer4).
    :ivar absent: stages the file does not have; they keep their random initialisation (seeded by
        the caller) and are reported.
    :ivar mean, std: per-channel normalisation of the [0, 1] image (after 1 -> 3 channels).
    :ivar preprocess: the deterministic geometry of the peer's evaluation pipeline.
    :ivar global_input: the peer's own forward resizes its input to this side before ``conv1``
        (bilinear, ``align_corners=True``; MGCA ``encoder.py:115``, GLoRIA ``vision_model.py:60``: 299).
        Applied where the peer's code runs that forward: linear probe, fine-tuning, zero-shot; not in
        segmentation and detection, whose peer code calls the encoder on the 224 input directly (MGCA
        ``segmentation_dataset.py``, ``detector_backbone.py``; GLoRIA's U-Net).
    :ivar zero_shot: how the peer scores zero-shot ("cosine" when an image-text cosine similarity,
        else a description of why g2d's zero-shot protocol cannot reproduce it).
    :ivar other_parts: top-level names under ``prefix`` that are the file's other parts, not the encoder
        (skipped by name; any other name there is an error): the classifier ``fc`` for every kind.
    """

    name: str
    container: tuple[str, ...]
    prefix: str
    index_names: bool = False
    absent: tuple[str, ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    preprocess: ImageTransformCfg = ImageTransformCfg(resize=256, crop=224, augment="none")
    global_input: int | None = None
    needs_pickle: bool = False
    zero_shot: str = "cosine"
    source: str = ""
    other_parts: tuple[str, ...] = ("fc",)


_HALF = (0.5, 0.5, 0.5)
_UNIT = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
_SQUARE_224 = ImageTransformCfg(resize=224, crop=224, augment="none", keep_aspect=False)
# MGCA / GLoRIA resize_img: longer side 256, zero-padded to a square; centre crop 224 at test time
_PADDED_256_224 = ImageTransformCfg(resize=256, crop=224, augment="none", pad_square=True)

PEER_KINDS: dict[str, PeerKind] = {k.name: k for k in (
    PeerKind("g2d-release", ("model_state_dict",), r"(encoder\.)?", mean=IMAGENET_MEAN, std=IMAGENET_STD,
             preprocess=ImageTransformCfg(resize=256, crop=256, augment="none"),
             zero_shot="the released G2D code saves no text tower or projection heads in these files",
             source="G2D-NeurIPS24 PRETRAIN/utils/trainer.py: {name}_encoder.pth (smp encoder) or "
                    "{name}_encoder_decoder.pth (encoder.* + decoder.*)",
             other_parts=("fc", "decoder", "segmentation_head")),
    PeerKind("torchvision", (), "", zero_shot="a torchvision ResNet has no text tower",
             source="a torchvision ResNet state dict (ImageNet normalisation)"),
    PeerKind("mgca", ("state_dict",), r"img_encoder_q\.model\.", mean=_HALF, std=_HALF,
             preprocess=_PADDED_256_224, global_input=299,
             source="MGCA resnet_50.ckpt (Lightning): img_encoder_q.model.*"),
    PeerKind("gloria", ("state_dict",), r"gloria\.img_encoder\.model\.", mean=_HALF, std=_HALF,
             preprocess=_PADDED_256_224, global_input=299, needs_pickle=True,
             source="GLoRIA chexpert_resnet50.ckpt (Lightning, OmegaConf hyper-parameters): "
                    "gloria.img_encoder.model.*"),
    PeerKind("convirt", ("model",), r"visual\.model\.", index_names=True, preprocess=_SQUARE_224,
             source="ViLMedic selfsup/convirt-mimic *.pth: visual.model.{0,1,4,5,6,7}"),
    PeerKind("medklip", ("model",), r"(module\.)?res_features\.", index_names=True, absent=("layer4",),
             preprocess=_SQUARE_224,
             zero_shot="MedKLIP scores with a query decoder over patch tokens, not an image-text cosine",
             source="MedKLIP checkpoint_final.pth: module.res_features.{0,1,4,5,6} (no layer4)"),
    PeerKind("kad", ("image_encoder",), r"resnet\.",
             preprocess=ImageTransformCfg(resize=512, crop=512, augment="none"),
             zero_shot="KAD scores with its TQN decoder (2-way softmax), not an image-text cosine",
             source="KAD best_valid.pt: image_encoder['resnet.*'] (torchvision names)"),
    PeerKind("biovil", (), r"encoder\.encoder\.", mean=_UNIT[0], std=_UNIT[1],
             preprocess=ImageTransformCfg(resize=512, crop=480, augment="none"),
             source="hi-ml biovil_image_resnet50_proj_size_128.pt: encoder.encoder.*"),
    PeerKind("prior", ("state_dict",), r"(image_encoder\.)?(encoder\.)?", mean=(0.4755,) * 3, std=(0.3011,) * 3,
             preprocess=_SQUARE_224,
             zero_shot="PRIOR's text path (prototype bank, sentence attention, local term) is not reproduced",
             source="PRIOR pretrained/prior_resnet50.pt (1-channel conv1, no prefix) or the whole model "
                    "(image_encoder.encoder.*)",
             # the whole model's other modules (models/prior.py:29-58, peer-checkpoints.md)
             other_parts=("fc", "atten_pool", "text_encoder", "global_image_projection", "local_image_projection",
                          "global_text_projection", "local_text_projection", "global_text_attention",
                          "sentence_bank", "item_gather", "local_cross_attention", "logit_scale",
                          "local_logit_scale", "predictor", "sentence_decoder", "image_decoder",
                          "prototype_queries")),
    PeerKind("medclip", (), r"vision_model\.model\.", mean=(0.5863,) * 3, std=(0.2795,) * 3,
             preprocess=ImageTransformCfg(resize=224, crop=224, augment="none", pad_square=True),
             source="MedCLIP pytorch_model.bin: vision_model.model.* (fc is its 512-d projection)"),
    PeerKind("xrv", (), "", mean=(0.5,) * 3, std=(0.5 / 1024,) * 3,
             preprocess=ImageTransformCfg(resize=512, crop=512, augment="none"),
             zero_shot="torchxrayvision is a supervised classifier without a text tower",
             source="torchxrayvision pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt (1-channel conv1, "
                    "input in [-1024, 1024])"),
)}


# BenchX (Zhou et al., NeurIPS 2024 Datasets and Benchmarks; github.com/yangzhou12/BenchX): methods re-pre-trained
# with their own code on one MIMIC-CXR split, so each file keeps its method's layout; BenchX loads the image
# encoder by the method's prefix (unifier/blocks/vision/visual_encoder.py load_pretrained, prefixes in
# configs/_base_/models/*.yml) and evaluates every method with one input pipeline
# (unifier/datasets/transforms.py: Resize 224, CenterCrop 224, grey to 3 channels, mean 0.4978, std 0.2449).
_BENCHX_MEAN, _BENCHX_STD = (0.4978,) * 3, (0.2449,) * 3
_BENCHX_GEOMETRY = ImageTransformCfg(resize=224, crop=224, augment="none")
# layouts of BenchX methods that are no g2d peer kind of their own
BENCHX_LAYOUTS: dict[str, PeerKind] = {
    # M-FLAG utils_builder.py ResNet_CXRBert: encoder = torchvision resnet50 with fc = Identity (no fc keys)
    "mflag": PeerKind("mflag", (), r"encoder\.", source="M-FLAG (BenchX M-FLAG.pth): encoder.* (torchvision "
                                                         "ResNet-50, fc Identity)"),
}
# (method as BenchX names its file, layout kind, image-encoder key prefix), tried in order
BENCHX_METHODS: tuple[tuple[str, str, str], ...] = (
    ("MGCA-resnet50", "mgca", "img_encoder_q.model."),
    ("GLoRIA", "gloria", "gloria.img_encoder.model."),
    ("ConVIRT", "convirt", "visual.model."),      # BenchX's VisualEncoder: named children (conv1, layer1, ...)
    ("MedKLIP", "medklip", "module.res_features."),
    ("MedCLIP-resnet50", "medclip", "vision_model.model."),
    ("M-FLAG", "mflag", "encoder."),
)
_VIT_KEYS = ("patch_embed", "pos_embed", "cls_token", "blocks.", "embeddings.patch_embeddings", "class_embedding")
PEER_KINDS["benchx"] = PeerKind(
    "benchx", ("state_dict", "model"), "", mean=_BENCHX_MEAN, std=_BENCHX_STD, preprocess=_BENCHX_GEOMETRY,
    needs_pickle=True,  # GLoRIA.ckpt carries pickled hyper-parameters (the hint of the refusal)
    zero_shot="resolved per file: the method's own text tower where g2d has its layout",
    source="BenchX re-pre-trained checkpoints (ConVIRT.pth, GLoRIA.ckpt, MGCA-resnet50.ckpt, M-FLAG.pth, "
           "MedKLIP.pth, MedCLIP-resnet50.bin): the method found by its encoder prefix")


def resolve_kind(kind_name: str, state: dict[str, Tensor], path: str | Path) -> tuple[PeerKind, str | None]:
    """The layout of a peer file: ``PEER_KINDS[kind_name]``, or for ``benchx`` the method's layout
    (found by its image-encoder prefix, :data:`BENCHX_METHODS`) with BenchX's input pipeline, named
    ``benchx-<layout>``. Returns ``(kind, BenchX method or None)``.

    :raises CheckpointError: a BenchX file of a ViT/Swin method (MGCA-ViT, MRM, REFERS, PTUnifier,
        MedCLIP-ViT: g2d's encoders are ResNets) or of no known method.
    """
    if kind_name != "benchx":
        return PEER_KINDS[kind_name], None
    for method, layout, prefix in BENCHX_METHODS:
        keys = [k[len(prefix):] for k in state if k.startswith(prefix)]
        if not keys:
            continue
        if any(k.startswith(_VIT_KEYS) for k in keys):
            break
        base = PEER_KINDS.get(layout) or BENCHX_LAYOUTS[layout]
        return dataclasses.replace(base, name=f"benchx-{layout}", mean=_BENCHX_MEAN, std=_BENCHX_STD,
                                   preprocess=_BENCHX_GEOMETRY, global_input=None,
                                   source=f"BenchX {method}: {base.source}"), method
    if any(v in k for k in state for v in _VIT_KEYS):
        raise CheckpointError(f"benchx: {path} holds a ViT or Swin encoder (BenchX's MGCA-ViT, MRM, REFERS, "
                              "PTUnifier or MedCLIP-ViT); g2d's image encoders are ResNets")
    raise CheckpointError(f"benchx: {path}: no BenchX method's image-encoder prefix found (tried "
                          f"{', '.join(p for _, _, p in BENCHX_METHODS)})")


def global_input(images: Tensor, size: int | None) -> Tensor:
    """``[B, C, H, W]`` resized to ``size x size`` as the peer's own forward does
    (:attr:`PeerKind.global_input`; bilinear, ``align_corners=True``); unchanged for ``None``."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)


def split_model_spec(spec: str) -> tuple[str, str]:
    """``KIND:PATH`` -> (kind, path); anything else (``random``, ``imagenet``, a path,
    ``hf-hub:ORG/NAME``) -> ("g2d", spec).
    An unknown ``KIND:`` prefix is an error that lists the kinds."""
    m = re.fullmatch(r"([a-z][a-z0-9-]*):(.+)", spec)
    if m is None or len(m.group(1)) == 1 or spec.startswith(HUB_PREFIX):  # a drive letter, a hub name
        return "g2d", spec
    kind, path = m.groups()
    if kind != "g2d" and kind not in PEER_KINDS:
        raise ValueError(f"unknown model kind {kind!r} in {spec!r}; use one of g2d, {', '.join(sorted(PEER_KINDS))}")
    return kind, path


class PeerEncoder(ResNetEncoder):
    """A :class:`ResNetEncoder` with a peer's weights and input normalisation (same stage maps)."""

    def __init__(self, arch: str, kind: PeerKind):
        super().__init__(ImageEncoderCfg(arch=arch, weights="none", input_norm="imagenet"))
        self.kind = kind.name
        self.mean.copy_(torch.tensor(kind.mean).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(kind.std).view(1, 3, 1, 1))


def _read(path: Path, kind: PeerKind, trust_pickle: bool) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{kind.name}: checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        return load_checkpoint(path)  # the project's safe loader: weights_only=True
    except PickledClassesError as err:
        if not trust_pickle:
            hint = (" (GLoRIA's checkpoint stores its OmegaConf config as pickled objects)" if kind.needs_pickle
                    else "")
            raise CheckpointError(
                f"{kind.name}: {path} holds more than tensors and plain data{hint}; nothing was executed. If you "
                f"trust the file's source, rerun with --trust-pickle (torch.load with weights_only=False), or "
                f"re-save its tensors as safetensors. ({err})") from None
    except CheckpointError as err:
        raise CheckpointError(f"{kind.name}: {err}") from None
    log.warning("%s: loading %s with weights_only=False (--trust-pickle): the file may execute code", kind.name, path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _state_dict(obj: Any, kind: PeerKind, path: Path) -> dict[str, Tensor]:
    for key in kind.container:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        where = list(kind.container) or "the top level"
        raise CheckpointError(f"{kind.name}: {path} has no state dict (looked under {where})")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


_STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def _encoder_keys(state: dict[str, Tensor], kind: PeerKind, path: Path) -> dict[str, Tensor]:
    """The encoder's tensors under torchvision names (prefix stripped, indices renamed, the kind's
    :attr:`PeerKind.other_parts` skipped).

    :raises CheckpointError: a name under the prefix that is neither the encoder's nor a known other part
        (a renamed or added key), naming it."""
    prefix = re.compile(kind.prefix)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = prefix.match(key)
        if m is None:
            continue
        name = key[m.end():]
        first, _, rest = name.partition(".")
        if kind.index_names and first in _CHILDREN:
            name, first = f"{_CHILDREN[first]}.{rest}", _CHILDREN[first]
        if first in _STAGES:
            out[name] = value
        elif first not in kind.other_parts:
            raise CheckpointError(f"{kind.name}: {path}: unexpected key {key!r}: not part of the {kind.name} "
                                  f"encoder ({', '.join(_STAGES)}) nor of its known other parts "
                                  f"({', '.join(kind.other_parts)})")
    return out


def _arch(keys: set[str]) -> str:
    """The ResNet depth from its keys (blocks per stage, bottleneck or basic)."""
    blocks = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = any(k.endswith("conv3.weight") for k in keys)
    table = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34", (3, 4, 6, 3, True): "resnet50",
             (3, 4, 23, 3, True): "resnet101"}
    for (b1, b2, b3, b4, bott), name in table.items():
        if bottleneck == bott and blocks[:3] == (b1, b2, b3) and blocks[3] in (b4, 0):
            return name
    raise CheckpointError(f"not a torchvision ResNet: blocks per stage {blocks}, bottleneck {bottleneck}")


def read_peer_state(kind_name: str, path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """Every tensor of a peer's checkpoint, from its container (read once; see :func:`load_peer_encoder`)."""
    kind = PEER_KINDS[kind_name]
    return _state_dict(_read(Path(path), kind, trust_pickle), kind, Path(path))


def load_peer_encoder(kind_name: str, path: str | Path, trust_pickle: bool = False,
                      state: dict[str, Tensor] | None = None) -> tuple[PeerEncoder, dict[str, Any]]:
    """A peer's image encoder as a g2d encoder, and a report of what was loaded.

    :param kind_name: a key of :data:`PEER_KINDS` (``benchx``: the method's layout, :func:`resolve_kind`).
    :return: (encoder in eval mode, ``{"kind", "arch", "loaded", "absent", "conv1_channels", "source",
        "preprocess"}``).
    :raises CheckpointError: the file is not of that kind (names the first mismatching key), or it
        needs pickled classes and ``trust_pickle`` is off.
    :param state: the file's tensors when already read (:func:`read_peer_state`).
    :raises FileNotFoundError: no such file.
    """
    path = Path(path)
    full = state if state is not None else read_peer_state(kind_name, path, trust_pickle)
    kind, method = resolve_kind(kind_name, full, path)
    state = _encoder_keys(full, kind, path)
    if not state:
        raise CheckpointError(f"{kind.name}: {path} has no key under the {kind.name} encoder prefix "
                              f"{kind.prefix!r} ({kind.source})")
    arch = _arch(set(state))
    if arch not in RESNET_CHANNELS:
        raise CheckpointError(f"{kind.name}: {arch} is not supported")
    conv1 = state.get("conv1.weight")
    in_channels = int(conv1.shape[1]) if conv1 is not None else 3
    if conv1 is not None and in_channels == 1:
        # a 1-channel stem on grey input copied to 3 channels: each copy gets a third of the kernel,
        # exact because every channel carries the same normalised value
        state["conv1.weight"] = conv1.expand(-1, 3, -1, -1) / 3.0
    encoder = PeerEncoder(arch, kind)
    expected = encoder.state_dict()
    absent = tuple(s for s in kind.absent if not any(k.startswith(s + ".") for k in state))
    missing = [k for k in expected if k not in state and not k.startswith(tuple(s + "." for s in absent))]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise CheckpointError(f"{kind.name}: {path} does not hold a {arch} encoder in the {kind.name} layout: "
                              f"{len(missing)} missing key(s), {len(unexpected)} unexpected; first: {first!r} "
                              f"({'missing' if missing else 'unexpected'})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{kind.name}: {path}: {k!r} has shape {tuple(v.shape)}, "
                                  f"{arch} expects {tuple(expected[k].shape)}")
    encoder.load_state_dict({**expected, **state})
    if absent:
        log.warning("%s: %s has no %s; it keeps a random initialisation", kind.name, path, ", ".join(absent))
    return encoder.eval(), {"kind": kind.name, "arch": arch, "loaded": len(state), "absent": list(absent),
                            "conv1_channels": in_channels, "source": kind.source,
                            "zero_shot": kind.zero_shot, **({"benchx_method": method} if method else {})}


def load_release_decoder(state: dict[str, Tensor], encoder: ResNetEncoder, path: str | Path
                         ) -> tuple[UNetDecoder | None, SegmentationHead | None]:
    """The U-Net decoder of a released-code ``{name}_encoder_decoder.pth`` (segmentation-models-pytorch's
    ``Unet``: ``decoder.blocks.*``, whose names g2d's decoder shares) and its segmentation head
    (``segmentation_head.0.*``, the pseudo-mask head), or ``(None, None)`` for an encoder-only file.
    Every decoder key and shape must match (smp's default widths 256-128-64-32-16); the head is
    ``None`` when the file holds none.

    :param state: the file's tensors (:func:`read_peer_state`); ``path`` names it in errors.
    :raises CheckpointError: decoder or head keys that do not fit.
    """
    dec = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    if not dec:
        return None, None
    decoder = UNetDecoder(encoder.channels, SMP_DECODER_CHANNELS)
    expected = decoder.state_dict()
    bad = sorted(set(expected) ^ set(dec)) or [k for k in dec if dec[k].shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"g2d-release: {path}: the decoder does not match smp's Unet decoder with widths "
                              f"{SMP_DECODER_CHANNELS}; first mismatching key: {bad[0]!r}")
    decoder.load_state_dict(dec)
    found = {k[len("segmentation_head."):]: v for k, v in state.items() if k.startswith("segmentation_head.")}
    if not found:
        return decoder.eval(), None
    weight = found.get("0.weight")
    if weight is None or weight.ndim != 4:
        raise CheckpointError(f"g2d-release: {path}: segmentation_head has no 4-d '0.weight' (keys {sorted(found)})")
    head = SegmentationHead(SMP_DECODER_CHANNELS[-1], weight.shape[0])
    expected = head.state_dict()
    bad = sorted(set(expected) ^ set(found)) or [k for k in found if found[k].shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"g2d-release: {path}: the segmentation head does not match smp's "
                              f"SegmentationHead; first mismatching key: segmentation_head.{bad[0]}")
    head.load_state_dict(found)
    return decoder.eval(), head.eval()
