"""The one door to a model for evaluation and inference: a G2D model (export, run folder, checkpoint,
``hf-hub:``), a baseline (``random``, ``imagenet``) or a peer's checkpoint (``KIND:PATH``) as the image
tower the protocols use (:func:`load_image_tower`) or as an image-text model for zero-shot and grounding
(:func:`load_text_image_model`), and the device they run on (:func:`resolve_device`). The downstream
protocols, the inference commands and the web app all load through here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from g2d.config import ImageEncoderCfg
from g2d.data.transforms import ImageTransformCfg
from g2d.errors import ConfigError
from g2d.factory import create_image_encoder, load_model
from g2d.fingerprint import model_identity
from g2d.model import G2DModel
from g2d.model.decoder import SegmentationHead, UNetDecoder
from g2d.model.image_encoder import ResNetEncoder
from g2d.model.interface import TextImageModel
from g2d.peer_vlm import load_peer_vl_model
from g2d.peers import (
    PEER_KINDS,
    load_peer_encoder,
    load_release_decoder,
    read_peer_state,
    resolve_kind,
    split_model_spec,
)

__all__ = ["ImageTower", "load_image_tower", "load_text_image_model", "resolve_device", "require_g2d"]

log = logging.getLogger("g2d.towers")


@dataclass
class ImageTower:
    """The image side of a model under test.

    :ivar encoder: ResNet returning five stage maps ``[/2, /4, /8, /16, /32]``.
    :ivar decoder: G2D's pre-trained U-Net decoder (``None`` for random/ImageNet baselines and
        decoder-free pre-training).
    :ivar head: the pre-trained decoder's segmentation head (the pseudo-mask head; ``None`` without a
        decoder or when the file holds none).
    :ivar model: the whole G2D model when one was loaded (zero-shot tasks need its text side).
    :ivar name: ``random``, ``imagenet`` or the model path, for result tables.
    """

    encoder: ResNetEncoder
    decoder: UNetDecoder | None
    model: G2DModel | None
    name: str
    preprocess: ImageTransformCfg | None = None  # a peer's evaluation geometry (g2d models: model.preprocess)
    peer: dict[str, Any] | None = None  # what load_peer_encoder loaded (kind, arch, absent stages, ...)
    global_input: int | None = None  # a peer's own forward resizes to this first (g2d.peers.PeerKind.global_input)
    head: SegmentationHead | None = None

    @property
    def identity(self) -> str:
        """The weights' identity (:func:`g2d.fingerprint.model_identity`) and a peer's own input size."""
        return model_identity(self.name) + (f"@{self.global_input}px" if self.global_input else "")

    def provenance(self) -> dict[str, Any]:
        """``{"peer": ...}`` for a peer's checkpoint (kind, architecture, BenchX method, absent stages),
        else ``{}``: every protocol's ``metrics.json`` carries it."""
        return {"peer": self.peer} if self.peer else {}


def load_image_tower(spec: str, arch: str = "resnet50", trust_pickle: bool = False) -> ImageTower:
    """``random`` | ``imagenet`` | a G2D export / run folder / checkpoint (see :func:`g2d.load_model`) |
    ``KIND:PATH``, a peer's released checkpoint (:mod:`g2d.peers`; ``g2d:PATH`` is ours).

    ``arch`` applies to the two baselines only; a loaded model brings its own architecture.
    ``trust_pickle`` lets a peer file that needs pickled classes load (``--trust-pickle``).
    """
    kind, path = split_model_spec(spec)
    if kind in PEER_KINDS:
        state = read_peer_state(kind, path, trust_pickle)  # read once for the encoder and the decoder
        peer, _ = resolve_kind(kind, state, path)           # benchx: the method's layout and BenchX's input
        encoder, report = load_peer_encoder(kind, path, state=state)
        decoder, head = load_release_decoder(state, encoder, path) if kind == "g2d-release" else (None, None)
        return ImageTower(encoder, decoder, None, spec, peer.preprocess,
                          {**report, "decoder": decoder is not None}, peer.global_input, head)
    spec = path
    if spec in ("random", "imagenet"):
        # ImageNet weights expect ImageNet-normalised input; the random baseline sees [0, 1].
        enc = ImageEncoderCfg(arch=arch, weights="imagenet", input_norm="imagenet") if spec == "imagenet" \
            else ImageEncoderCfg(arch=arch, weights="none")
        return ImageTower(create_image_encoder(enc), None, None, spec)

    model = load_model(spec)
    return ImageTower(model.image_encoder, model.decoder, model, str(spec), head=model.segmentation_head)


def load_text_image_model(spec: str, what: str, trust_pickle: bool = False, text_model: str | None = None,
                          device: torch.device | str = "cpu") -> tuple[ImageTower, TextImageModel]:
    """The model for zero-shot classification or grounding, and its image tower (name, geometry):
    a G2D model (export, run folder, checkpoint, ``hf-hub:``) or ``KIND:PATH`` of a peer whose
    zero-shot is an image-text cosine (:func:`g2d.peer_vlm.load_peer_vl_model`; ``text_model``: its
    text model's hub name or folder).

    :raises ConfigError: ``random``/``imagenet``, a peer without a cosine zero-shot (the reason), or
        ``text_model`` given for a G2D model.
    """
    kind, path = split_model_spec(spec)
    if kind in PEER_KINDS:
        vl = load_peer_vl_model(kind, path, text_model, trust_pickle).to(device)
        return ImageTower(vl.image_encoder, None, None, spec, vl.peer_kind.preprocess,
                          {**vl.report, "decoder": False}, vl.peer_kind.global_input), vl
    if path in ("random", "imagenet"):
        raise ConfigError(f"{what} needs a model with a text tower: a G2D model (export, run folder or "
                          f"checkpoint) or a peer's (KIND:PATH); {path!r} is an image-only baseline")
    if text_model:
        raise ConfigError(f"--text-model is for a peer's model (KIND:PATH); the G2D model {spec!r} brings "
                          "its own text tower")
    model = load_model(path, device=device).eval()
    return ImageTower(model.image_encoder, model.decoder, model, str(path)), model


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available (use --device cpu or auto)")
    return torch.device(name)


def require_g2d(tower: ImageTower, what: str) -> G2DModel:
    """The tower's whole G2D model, or a clear error for image-only towers (baselines, peers' encoders)."""
    if tower.model is not None:
        return tower.model
    if tower.peer is not None:
        raise ConfigError(f"{what} needs G2D's attention pooling; {tower.name} (a peer's model) has none. For a "
                          "peer's image-text similarity maps use g2d eval grounding or g2d ground (docs/peers.md)")
    raise ConfigError(f"{what} needs a pre-trained G2D model (--model PATH to an export, run folder or "
                      "checkpoint); 'random' and 'imagenet' are image-only baselines")
