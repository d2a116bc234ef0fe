"""What a transferred decoder brings to a downstream set, before any training (issue 28, item 5).

For a G2D model's pre-trained decoder and a new decoder of the same widths (smp initialisation), on
the training images of a downstream set, at the segmentation protocol's geometry:

- BatchNorm: each layer's stored running statistics against the statistics of its input on these
  images (train mode normalises with the latter; eval mode, used for validation and test, with the
  former). ``var ratio`` is the images' variance over the stored one (median over channels),
  ``mean shift`` the difference of means in units of the stored standard deviation (median |.|).
- Feature scale: the standard deviation of the decoder's last features (eval mode and train mode),
  and of the logits a new head (Xavier, as ``g2d eval segmentation`` builds it) gives on them.
- The pre-trained pseudo-mask head: the share of pixels it calls positive on these images.

    python benchmarks/decoder_features.py --model runs/jsrt/pretrain/<key>/export \\
        --data csv:/tmp/jsrt-tables/jsrt-lungs.csv --image-size 128 --n 32
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch import nn

from g2d.downstream.dense import open_splits
from g2d.downstream.harness import make_loader
from g2d.model.decoder import SegmentationHead, UNetDecoder
from g2d.towers import load_image_tower


def bn_report(decoder: nn.Module, images: torch.Tensor, encoder: nn.Module) -> list[tuple[str, float, float]]:
    """(layer, median var ratio, median |mean shift|) per BatchNorm layer of ``decoder``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach()))
             for n, m in decoder.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        decoder.eval()(encoder(images))
    for h in hooks:
        h.remove()
    rows = []
    for n, m in decoder.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            x = seen[n]
            var, mean = x.var((0, 2, 3)), x.mean((0, 2, 3))
            sd = m.running_var.clamp(min=1e-8).sqrt()
            rows.append((n, float((var / m.running_var.clamp(min=1e-8)).median()),
                         float(((mean - m.running_mean) / sd).abs().median())))
    return rows


def feature_scale(decoder: nn.Module, images: torch.Tensor, encoder: nn.Module) -> dict[str, float]:
    torch.manual_seed(0)
    head = SegmentationHead(decoder.channels[-1], 1)
    out = {}
    with torch.no_grad():
        for mode in ("eval", "train"):
            d = copy.deepcopy(decoder).train(mode == "train")
            f = d(encoder(images))
            out[f"features std ({mode})"] = float(f.std())
            out[f"new-head logit std ({mode})"] = float(head(f).std())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--n", type=int, default=32, help="training images used")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    tower = load_image_tower(a.model)
    if tower.decoder is None:
        raise SystemExit(f"{a.model} has no pre-trained decoder")
    args = argparse.Namespace(data=a.data, image_size=a.image_size, fraction=1.0, subset=0, siim_train="all")
    train = open_splits(args)["train"]
    images = torch.cat([b["image"] for b in make_loader(train, 8, 0) if b is not None])[: a.n]
    encoder = tower.encoder.eval()
    torch.manual_seed(0)
    fresh = UNetDecoder(tuple(encoder.channels), tuple(tower.decoder.channels))
    print(f"# Decoder statistics on {len(images)} training images of {a.data} at {a.image_size} px\n")
    print("| decoder | BatchNorm var ratio (median over layers) | |mean shift| / sd (median over layers) | "
          "worst layer var ratio |")
    print("|---|---|---|---|")
    for name, dec in (("pre-trained", tower.decoder), ("new (same widths)", fresh)):
        rows = bn_report(dec, images, encoder)
        ratios = [r[1] for r in rows]
        worst = max(rows, key=lambda r: abs(torch.log(torch.tensor(r[1])).item()))
        print(f"| {name} | {statistics.median(ratios):.3g} | {statistics.median(r[2] for r in rows):.3g} | "
              f"{worst[1]:.3g} ({worst[0]}) |")
    print("\n| decoder | " + " | ".join(feature_scale(fresh, images, encoder)) + " |")
    print("|---|" + "---|" * 4)
    for name, dec in (("pre-trained", tower.decoder), ("new (same widths)", fresh)):
        print(f"| {name} | " + " | ".join(f"{v:.3g}" for v in feature_scale(dec, images, encoder).values()) + " |")
    if tower.head is not None:
        logits = tower.head(tower.decoder.eval()(encoder(images)))
        print(f"\nPre-trained pseudo-mask head on these images: {float((logits > 0).float().mean()):.3f} of pixels "
              f"positive (logit mean {float(logits.mean()):.2f}, std {float(logits.std()):.2f}).")


if __name__ == "__main__":
    main()
