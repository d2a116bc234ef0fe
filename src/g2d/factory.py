"""The one door to models: create one from a config, load initial image weights and check them,
build the run's tiny text tower, or load a trained model (with the image preprocessing it was trained
with) for inference. Nothing below this module loads weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision

from g2d.checkpoint import (
    EXPORT_CONFIG,
    EXPORT_TEXT_DIR,
    EXPORT_WEIGHTS,
    load_checkpoint,
    load_weights,
    read_state_dict,
)
from g2d.config import G2DConfig, ImageEncoderCfg, config_from_dict
from g2d.data.transforms import ImageTransformCfg, inference_geometry
from g2d.errors import ConfigError
from g2d.hub import HUB_PREFIX, resolve_hub
from g2d.model import G2DModel
from g2d.model.image_encoder import ResNetEncoder
from g2d.model.text_encoder import build_tiny_text_model, load_text_backbone

__all__ = [
    "check_image_weights",
    "create_image_encoder",
    "create_model",
    "load_image_weights",
    "load_model",
    "prepare_text_model",
    "trained_geometry",
]

log = logging.getLogger("g2d.model")

# torchvision's weight enums for `weights="imagenet"`; V1 matches the release (resnet50-19c8e357 is
# the same network as torchvision's IMAGENET1K_V1).
_TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


def load_image_weights(encoder: ResNetEncoder, weights: str, arch: str) -> None:
    """Load ``none`` / ``imagenet`` (from the local torch hub cache; never downloads) / a file (a
    full G2D state dict, or an smp/release encoder export) into ``encoder``.

    :raises FileNotFoundError: ImageNet weights not cached, or a missing file.
    :raises ValueError: a file whose keys or shapes do not fit ``arch`` (every mismatch named).
    """
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
        for prefix in ("image_encoder.", "encoder."):
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                break
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    load_weights(encoder, state, f"image weights {weights!r} do not fit {arch}")
    log.info("loaded image encoder weights from %s", weights)


def create_image_encoder(cfg: ImageEncoderCfg) -> ResNetEncoder:
    """A :class:`ResNetEncoder` for ``cfg`` with ``cfg.weights`` loaded (see :func:`load_image_weights`)."""
    encoder = ResNetEncoder(cfg)
    load_image_weights(encoder, cfg.weights, cfg.arch)
    return encoder


def check_image_weights(image_cfg: ImageEncoderCfg) -> None:
    """Fail before any data is read if ``model.image.weights`` names a file that is missing, unsafe or
    of another architecture: the file is loaded into an encoder built on the meta device (no memory,
    no compute), so the error comes before the real model is built.

    :raises g2d.errors.ConfigError: naming ``model.image.weights``.
    """
    if image_cfg.weights == "none":
        return
    with torch.device("meta"):
        encoder = ResNetEncoder(dataclasses.replace(image_cfg, weights="none"))
    try:
        with warnings.catch_warnings():  # "copying into a meta parameter is a no-op": intended
            warnings.simplefilter("ignore", UserWarning)
            load_image_weights(encoder, image_cfg.weights, image_cfg.arch)
    except (OSError, ValueError) as err:  # missing file, CheckpointError, mismatched shapes
        raise ConfigError(f"model.image.weights: {' '.join(str(err).split())}") from None


def prepare_text_model(cfg: G2DConfig, run_dir: str | Path, texts: Sequence[str], build: bool = True) -> None:
    """``model.text.model=tiny``: the small BERT the ``tiny`` preset trains, with a WordPiece
    vocabulary built from ``texts``, written once to ``RUN/text_model`` (``build=False``: only point
    the config there, for the ranks that wait for the main one). Sets ``cfg.model.text.model`` to
    that folder; any other text model is left as it is."""
    if cfg.model.text.model != "tiny":
        return
    path = Path(run_dir) / "text_model"
    if build and not (path / "config.json").is_file():
        build_tiny_text_model(path, list(texts), seed=cfg.train.seed)
    cfg.model.text.model = str(path)


def create_model(cfg: G2DConfig, *, text_weights: bool = True) -> G2DModel:
    """A new :class:`G2DModel` for ``cfg``: image weights per ``cfg.model.image.weights``, the text
    tower from ``cfg.model.text.model`` (a hub name or folder; ``text_weights=False`` builds it with
    random weights from its config).

    :raises g2d.errors.ConfigError: ``model.text.model='tiny'`` not yet built (:func:`prepare_text_model`).
    """
    if cfg.model.text.model == "tiny":
        raise ConfigError("model.text.model='tiny' must first be built with "
                          "g2d.factory.prepare_text_model (the trainer does this)")
    backbone, tokenizer = load_text_backbone(cfg.model.text.model, weights=text_weights)
    model = G2DModel(cfg.model, backbone, tokenizer, temperature=cfg.loss.temperature,
                     learnable_temperature=cfg.loss.learnable_temperature)
    load_image_weights(model.image_encoder, cfg.model.image.weights, cfg.model.image.arch)
    model.config, model.preprocess = cfg, trained_geometry(cfg)
    return model


def _resolve(path: Path) -> tuple[str, Path]:
    if path.is_dir():
        if (path / EXPORT_WEIGHTS).is_file() and (path / EXPORT_CONFIG).is_file():
            return "export", path
        if (path / "export" / EXPORT_WEIGHTS).is_file():
            return "export", path / "export"
        if (path / "checkpoints" / "last.pt").is_file():
            return "checkpoint", path / "checkpoints" / "last.pt"
        raise FileNotFoundError(f"{path} holds neither an exported model ({EXPORT_WEIGHTS} + "
                                f"{EXPORT_CONFIG}) nor checkpoints/last.pt")
    if path.suffix == ".safetensors":
        return "export", path.parent
    if path.is_file():
        return "checkpoint", path
    raise FileNotFoundError(f"model not found: {path}")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> G2DModel:
    """Load a trained G2D model for inference, in eval mode, without any training machinery.

    The full configuration it was trained with is ``model.config``; ``model.preprocess`` is the
    deterministic image geometry it was trained with (:func:`g2d.data.transforms.inference_geometry`:
    its resize rule and centre crop, no augmentation), which inference, figures and evaluation use.

    :param path: an export or hub-format folder (``model.safetensors`` + ``config.json`` + ``text/``),
        ``hf-hub:ORG/NAME[@REVISION]`` (:mod:`g2d.hub`; from the local cache, offline-safe), a run
        folder written by ``g2d pretrain``, a ``.safetensors`` file inside an export folder, or a
        training checkpoint ``.pt`` (read with ``weights_only=True``).

    Example::

        model = g2d.load_model("runs/demo/g2d/export")
        img = model.encode_image(images)                 # [B, 128]
        txt = model.encode_text(["left pleural effusion"])
        heat = model.dense_embeddings(images) @ txt[0]   # [B, 7, 7]
    """
    if str(path).startswith(HUB_PREFIX):  # hf-hub:ORG/NAME[@REVISION], through the hub's own cache
        path = resolve_hub(str(path))
    kind, where = _resolve(Path(path))
    if kind == "export":
        cfg_dict = json.loads((where / EXPORT_CONFIG).read_text(encoding="utf-8"))
        state = read_state_dict(where / EXPORT_WEIGHTS)
        text_dir = where / EXPORT_TEXT_DIR
    else:
        ckpt = load_checkpoint(where)
        if "config" not in ckpt or "model" not in ckpt:
            raise ValueError(f"{where} is not a G2D training checkpoint (no 'config'/'model' entries)")
        cfg_dict, state, text_dir = ckpt["config"], ckpt["model"], None
    cfg = config_from_dict(copy.deepcopy(cfg_dict))
    cfg.model.image.weights = "none"  # the weights come from the file below
    if text_dir is not None:
        cfg.model.text.model = str(text_dir)
    model = create_model(cfg, text_weights=False)
    load_weights(model, state, f"{where} does not match its configured architecture")
    model.config = cfg
    model.preprocess = trained_geometry(cfg)
    return model.to(device).eval()


def trained_geometry(cfg: G2DConfig) -> ImageTransformCfg:
    """The deterministic geometry of a model trained with ``cfg`` (see :func:`load_model`)."""
    return inference_geometry(cfg.data.resize, cfg.model.image_size, cfg.data.augment)
