"""Body-mask quality on the real sets in ../shared/data, and the cost of the pseudo masks.

For every JSRT image (lung masks left_lung + right_lung) and every covid-notes image with a lung
mask: the share of lung pixels inside the body mask and the share of the image the body mask
covers. Then the time of ``build_pseudo_masks`` at paper size (B = 128, 224 px, 3 heads, 7x7).

    PYTHONPATH=src python benchmarks/body_mask_coverage.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from g2d.pseudo_mask import PseudoMaskCfg, body_mask, build_pseudo_masks
from g2d.testing import shared_data_dir


def _load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)


def coverage(pairs: list[tuple[Path, list[Path]]]) -> tuple[list[float], list[float]]:
    lung_cov, body_share = [], []
    for img_path, mask_paths in pairs:
        img = _load(img_path)
        lungs = sum(_load(m) > 0.5 for m in mask_paths) > 0
        body = body_mask(img[None, None])[0, 0]
        lung_cov.append((body & lungs).sum().item() / max(1, lungs.sum().item()))
        body_share.append(body.float().mean().item())
    return lung_cov, body_share


def main() -> None:
    root = shared_data_dir()
    if root is None:
        raise SystemExit("../shared/data not found (set G2D_SHARED_DATA)")
    jsrt = root / "jsrt"
    jsrt_pairs = [(p, [jsrt / "masks" / side / p.name for side in ("left_lung", "right_lung")])
                  for p in sorted((jsrt / "images").glob("*.png"))]
    covid = root / "covid-notes"
    covid_pairs = [(covid / "images" / p.name, [p]) for p in sorted((covid / "masks").glob("*.png"))]
    for name, pairs in (("jsrt", jsrt_pairs), ("covid-notes", covid_pairs)):
        cov, share = coverage(pairs)
        print(f"{name}: {len(cov)} images; lung coverage mean {statistics.mean(cov):.4f} "
              f"min {min(cov):.4f}, >=0.99 for {sum(c >= 0.99 for c in cov)}; body share of image "
              f"median {statistics.median(share):.3f} min {min(share):.3f} max {max(share):.3f}")
    torch.manual_seed(0)
    attn = torch.rand(128, 3, 7, 7).softmax(-1)
    images = torch.rand(128, 1, 224, 224)
    for label, cfg in (("default", PseudoMaskCfg()), ("release-like", PseudoMaskCfg(
            upsample="nearest", body_mask=False, smoothing=False, strict=True))):
        build_pseudo_masks(attn, images, cfg)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            build_pseudo_masks(attn, images, cfg)
            times.append(time.perf_counter() - t)
        print(f"build_pseudo_masks {label}, B=128, 224 px, 3 heads, 7x7: best {min(times):.3f} s "
              f"of 3 ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
