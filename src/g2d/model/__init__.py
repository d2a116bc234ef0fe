"""Model components: image encoder, attention pooling, projectors, text encoder, U-Net decoder."""

from g2d.model.g2d import G2DModel, G2DOutput, ImageOutput

__all__ = ["G2DModel", "G2DOutput", "ImageOutput"]
