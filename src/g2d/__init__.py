"""G2D: global and dense vision-language pre-training for chest X-rays.

The library part (this package minus ``g2d.train`` and ``g2d.cli``) needs no training machinery::

    import g2d
    model = g2d.load_model("runs/demo/g2d/export")
    emb = model.encode_text(["right lower lobe opacity"])
"""

from g2d.config import G2DConfig, get_config, list_presets
from g2d.factory import create_model, load_model
from g2d.model import G2DModel, G2DOutput, ImageOutput

__version__ = "0.1.0"

__all__ = ["G2DConfig", "G2DModel", "G2DOutput", "ImageOutput", "create_model", "get_config",
           "list_presets", "load_model", "__version__"]
