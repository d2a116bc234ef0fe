"""Inference sees the pixels training saw: the deterministic geometry of every augmentation recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from g2d.data.labelled.specs import open_dataset


@pytest.mark.parametrize("augment", ["paper", "release", "none"])
def test_inference_sees_the_pixels_of_training(tmp_path, augment):
    """For each augmentation recipe, the eval/inference geometry of a model gives the pixels its
    training transform gives without the random augmentation (the release resizes to a square)."""
    from types import SimpleNamespace

    from g2d.config import get_config
    from g2d.data.images import read_image
    from g2d.data.transforms import (
        ImageTransformCfg,
        build_transform,
        inference_geometry,
    )
    from g2d.downstream.features import geometry_from_args, geometry_source

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 64)).astype(np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text("image,split\na.png,test\n")
    size = 64 if augment != "release" else 96    # the release trains on the whole square (no crop)
    cfg = get_config("tiny", {"data.augment": augment, "data.resize": 96 if augment == "release" else 72,
                              "model.image_size": size})
    train_tf = build_transform(ImageTransformCfg(resize=cfg.data.resize, crop=cfg.model.image_size,
                                                 augment=cfg.data.augment), train=False)
    expected = train_tf(read_image(tmp_path / "a.png"))
    # g2d zero-shot / g2d ground / g2d figure
    infer = build_transform(inference_geometry(cfg.data.resize, cfg.model.image_size, cfg.data.augment), False)
    torch.testing.assert_close(infer(read_image(tmp_path / "a.png")), expected)
    # g2d eval defaults (linear, zero-shot, grounding, attention)
    tower = SimpleNamespace(model=SimpleNamespace(config=cfg))
    from g2d.downstream.linear_probe import Args

    args = Args(data="synthetic", out="x")
    geom = geometry_from_args(args, tower)
    sample = open_dataset(f"csv:{tmp_path / 't.csv'}", "test", geometry=geom)[0]
    torch.testing.assert_close(sample["image"], expected, atol=1e-6, rtol=0)
    assert geometry_source(args, tower) == "model"
    # an override stays possible and is named as such
    args = Args(data="synthetic", out="x", resize=96, square=True)
    assert geometry_from_args(args, tower).resize == 96 and not geometry_from_args(args, tower).keep_aspect
    assert geometry_source(args, tower) == "flags"
