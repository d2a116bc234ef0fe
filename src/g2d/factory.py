"""Build a model from a config, or load a trained one for inference."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from g2d.checkpoint import (EXPORT_CONFIG, EXPORT_TEXT_DIR, EXPORT_WEIGHTS, load_checkpoint,
                            load_weights, read_state_dict)
from g2d.config import ConfigError, G2DConfig, config_from_dict
from g2d.model import G2DModel
from g2d.model.text_encoder import load_text_backbone


def create_model(cfg: G2DConfig, *, text_weights: bool = True) -> G2DModel:
    """A new :class:`G2DModel` for ``cfg`` (image weights per ``cfg.model.image.weights``)."""
    if cfg.model.text.model == "tiny":
        raise ConfigError("model.text.model='tiny' must first be built with "
                          "g2d.model.text_encoder.build_tiny_text_model (the trainer does this)")
    backbone, tokenizer = load_text_backbone(cfg.model.text.model, weights=text_weights)
    return G2DModel(cfg.model, backbone, tokenizer, temperature=cfg.loss.temperature,
                    learnable_temperature=cfg.loss.learnable_temperature)


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

    The full configuration it was trained with is available as ``model.config``.

    :param path: an export folder (``model.safetensors`` + ``config.json`` + ``text/``), a run
        folder written by ``g2d pretrain``, a ``.safetensors`` file inside an export folder, or a
        training checkpoint ``.pt`` (read with ``weights_only=True``).

    Example::

        model = g2d.load_model("runs/demo/g2d/export")
        img = model.encode_image(images)                 # [B, 128]
        txt = model.encode_text(["left pleural effusion"])
        heat = model.dense_embeddings(images) @ txt[0]   # [B, 7, 7]
    """
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
    return model.to(device).eval()
