"""How saturated is each preset's attention softmax before any training? For `paper`, `release`
and `tiny` with random image weights (no ImageNet weights offline) and the offline MiniLM text tower
(the text side does not enter the attention), on 16 held-out synthetic one-finding images: the mean
norm of the pixel tokens the pooling attends over, the positional embedding's norm, and the mean
attention weight on each head's arg-max cell (1 = one-hot, 1/(h*w) = uniform).

    python benchmarks/attention_at_init.py
"""

from __future__ import annotations

import json

import torch

from g2d.attention_diagnostics import collect_attention, synthetic_probe
from g2d.config import get_config
from g2d.factory import create_model


def main() -> None:
    torch.manual_seed(0)
    for preset in ("paper", "release", "tiny"):
        cfg = get_config(preset, {"model.image.weights": "none",
                                  "model.text.model": "sentence-transformers/all-MiniLM-L6-v2",
                                  "model.text.freeze_layers": 4})
        model = create_model(cfg).eval()
        images, _, _ = synthetic_probe(16, cfg.model.image_size, 1)
        with torch.no_grad():
            dense = model._dense_for_pool(model.image_encoder(images)[-1])
        attention = collect_attention(model, images)
        print(json.dumps({
            "preset": preset, "map": list(attention.shape[-2:]),
            "token_norm": round(dense.flatten(2).norm(dim=1).mean().item(), 2),
            "pos_norm": round(model.pool.pos.norm(dim=-1).mean().item(), 2),
            "peak_mass": round(attention.flatten(2).max(-1).values.mean().item(), 3),
            "uniform": round(1 / attention[0, 0].numel(), 3)}))


if __name__ == "__main__":
    main()
