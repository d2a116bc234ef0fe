"""The one image-text inference engine behind ``g2d zero-shot``, ``g2d ground``, ``g2d figure grounding``
and ``g2d app`` (cf. hi-ml's ``ImageTextInferenceEngine``): a text-image model (G2D's, or a peer's with
an image-text cosine) with the geometry its images get and its device; it takes images as read from
files (``[H, W]`` in [0, 1], :func:`g2d.data.images.read_image`) and gives zero-shot probabilities and
prompt similarity maps on the image's own pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from g2d.data.transforms import (
    ImageTransformCfg,
    build_transform,
    check_sizes,
    eval_geometry,
    inference_geometry,
    with_overrides,
)
from g2d.inference.grounding import dense_similarity, to_original
from g2d.inference.zeroshot import ZeroShotScorer, class_prompts, load_prompts
from g2d.model import G2DModel
from g2d.model.interface import TextImageModel
from g2d.towers import load_text_image_model, resolve_device

__all__ = ["ImageTextInferenceEngine", "check_prompts"]


def check_prompts(prompts: Sequence[str], what: str) -> None:
    """A blank prompt embeds as [CLS][SEP] alone, a map of nothing: refuse it.

    :raises ValueError: naming ``what`` (a flag or argument)."""
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError(f"{what}: every prompt must have words, got {list(prompts)!r}")


class ImageTextInferenceEngine:
    """A text-image model, the geometry its inputs get and the device it runs on.

    :ivar model: G2D's model or a peer's (:class:`g2d.model.interface.TextImageModel`).
    :ivar geometry: the deterministic resize and crop of its inputs (the model's pre-training geometry
        unless overridden, a peer's own evaluation pipeline).
    """

    def __init__(self, model: TextImageModel, geometry: ImageTransformCfg, device: torch.device | str = "cpu"):
        self.model, self.geometry, self.device = model, geometry, torch.device(device)
        self._transform = build_transform(geometry, train=False)

    @classmethod
    def load(cls, spec: str, what: str, *, text_model: str | None = None, trust_pickle: bool = False,
             device: str = "auto", resize: int | None = None, image_size: int | None = None
             ) -> ImageTextInferenceEngine:
        """From a model spec (G2D export / run folder / checkpoint / ``hf-hub:NAME``, or a cosine peer's
        ``KIND:PATH`` with ``text_model``); ``resize`` / ``image_size`` override the geometry.

        :raises g2d.errors.ConfigError: a model without a text tower (the reason is named)."""
        dev = resolve_device(device)
        tower, model = load_text_image_model(spec, what, trust_pickle, text_model, dev)
        if tower.model is not None:
            cfg = tower.model.config
            check_sizes(resize, image_size, image_size or cfg.model.image_size)
            geom = inference_geometry(resize or cfg.data.resize, image_size or cfg.model.image_size, cfg.data.augment)
        else:  # a peer's own evaluation pipeline
            geom = with_overrides(tower.preprocess or ImageTransformCfg(), resize, image_size)
        return cls(model, geom, dev)

    @classmethod
    def for_model(cls, model: G2DModel) -> ImageTextInferenceEngine:
        """A loaded G2D model with its own geometry, on its device."""
        return cls(model, model.preprocess, model.logit_scale.device)

    def prepare(self, image: np.ndarray) -> Tensor:
        """``[H, W]`` in [0, 1] -> the model's input ``[1, 1, S, S]`` on its device."""
        return self._transform(image)[None].to(self.device)

    @torch.no_grad()
    def zero_shot(self, images: Sequence[np.ndarray], findings: Sequence[str], prompts: str | None = None
                  ) -> np.ndarray:
        """Zero-shot probability of each finding for each image ``[N, K]`` (positive vs negative prompts,
        as ``g2d eval zeroshot``; ``prompts``: a prompt file or shipped name, default ``default``)."""
        scorer = ZeroShotScorer(self.model, class_prompts(list(findings), load_prompts(prompts)))
        return np.stack([scorer(self.prepare(img))[0].float().cpu().numpy() for img in images])

    @torch.no_grad()
    def similarity_maps(self, image: np.ndarray, prompts: Sequence[str]) -> list[np.ndarray]:
        """Each prompt's cosine similarity map on the original image's pixels ``[H, W]`` (NaN outside
        the model's crop): the dense map, mapped back through resize and crop bilinearly
        (:func:`g2d.inference.grounding.to_original`).

        :raises ValueError: a blank prompt."""
        check_prompts(prompts, "prompts")
        x = self.prepare(image).expand(len(prompts), -1, -1, -1)
        dense = dense_similarity(self.model, x, list(prompts))                  # [P, h, w]
        geom = eval_geometry(image.shape, self.geometry)
        return [to_original(d, geom).numpy() for d in dense]
