"""``g2d eval attention``: does the model's attention map follow the findings?

Runs :func:`g2d.attention_diagnostics.diagnose_attention` on the positive images of a set with
finding masks or boxes (boxes are filled), at the model's input crop: attention collapse (Pearson r
with the set's mean map), pointing game and pseudo-mask IoU / Dice, each against the position-only
prior of the same set, for the head mean and per head, with a 95 % bootstrap interval of the head
mean's IoU ratio (``iou_ratio_low`` / ``_high``). On ``synthetic`` sets only images with exactly one
finding are scored (their mask is that finding's), and the head mean is scored per
finding too (``nodule/pointing``, ...; prior: the whole set's mean map). Writes ``metrics.json``,
``results.md`` and ``figures/attention.png`` (image, attention, pseudo mask; the finding outlined).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from g2d.attention_diagnostics import (
    POINTING_DILATION,
    collect_attention,
    diagnose_attention,
)
from g2d.data.labelled.dataset import BoxMask
from g2d.data.labelled.specs import open_dataset
from g2d.downstream.features import check_split, geometry_from_args, geometry_source
from g2d.downstream.harness import make_loader, progress_bar
from g2d.downstream.protocol import GeometryArgs, arg
from g2d.downstream.results import write_results
from g2d.errors import DataError
from g2d.pseudo_mask import build_pseudo_masks
from g2d.towers import load_image_tower, require_g2d, resolve_device

__all__ = ["run"]

log = logging.getLogger("g2d.downstream")


@dataclass(kw_only=True)
class Args(GeometryArgs):
    """``g2d eval attention``: its flags are these fields (``--name-with-dashes``)."""

    split: str = arg('test', choices=('train', 'val', 'test'))
    batch_size: int = arg(32)
    max_images: int = arg(512, help='score at most this many positive images')
    figures: int = arg(6, help='rows of the attention figure')


def _target(sample: dict[str, Any], size: tuple[int, int]) -> torch.Tensor | None:
    """bool [S, S] finding mask in the input crop, or None when the image cannot be scored."""
    found = sample.get("prompt_findings")
    if found is not None and len(found) != 1:  # synthetic: the union of two findings names neither
        return None
    if "mask" in sample:
        return sample["mask"][0] > 0.5
    boxes = sample.get("boxes")
    if boxes is not None and len(boxes):
        rects = tuple((float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in boxes.reshape(-1, 4))
        return torch.from_numpy(BoxMask(rects)(size))
    return None


def run(args: Args) -> dict[str, Any]:
    if args.max_images < 1:
        raise DataError(f"--max-images must be >= 1, got {args.max_images}")
    tower = load_image_tower(args.model, args.arch, args.trust_pickle)
    model = require_g2d(tower, "attention diagnostics")
    model.to(resolve_device(args.device)).eval()
    geom = geometry_from_args(args, tower)
    ds = open_dataset(args.data, args.split, 1.0, geom)
    check_split(ds, f"{args.data} {args.split}")
    if not (getattr(ds, "with_mask", False) or getattr(ds, "with_boxes", False)):
        raise DataError(f"{args.data}: attention diagnostics need finding masks or boxes")
    images, targets, ids, findings = [], [], [], []
    skipped: Counter[str] = Counter()
    loader = make_loader(ds, args.batch_size, args.num_workers)
    for batch in progress_bar(loader, len(loader), "attention", args.no_progress):
        if batch is None:
            continue
        for j in range(len(batch["id"])):
            sample = {k: v[j] for k, v in batch.items()}
            target = _target(sample, tuple(batch["image"].shape[-2:]))
            if target is None or not target.any():
                skipped["no_single_finding" if target is None else "negative_image"] += 1
                continue
            images.append(batch["image"][j])
            targets.append(target)
            ids.append(batch["id"][j])
            found = sample.get("prompt_findings")  # synthetic: [(finding, location)]
            findings.append(None if found is None else str(found[0][0] if isinstance(found[0], (tuple, list))
                                                          else found[0]))
        if len(images) >= args.max_images:
            break
    if not images:
        raise DataError(f"{args.data} {args.split}: no positive image to score (skipped: {dict(skipped)})")
    x, t = torch.stack(images[:args.max_images]), torch.stack(targets[:args.max_images])
    attention = collect_attention(model, x, args.batch_size)
    cfg = model.config.model.pseudo_mask
    findings = findings[:args.max_images]
    named = [f for f in findings if f is not None]
    diag = diagnose_attention(attention, x, t, cfg, named if len(named) == len(findings) else None, interval=0.95,
                              oracle=True)
    out = Path(args.out)
    if args.figures:
        from g2d.figures import attention_panels

        k = min(args.figures, x.shape[0])
        masks = build_pseudo_masks(attention[:k], x[:k], cfg)
        attention_panels(x[:k], attention[:k], masks, ids[:k], out / "figures" / "attention.png", t[:k])
    metrics: dict[str, Any] = {
        "task": "attention", "data": args.data, "split": args.split, "model": tower.name,
        **diag.as_dict(), "skipped": dict(skipped),
        "geometry": asdict(geom), "geometry_source": geometry_source(args, tower),
        "definitions": {
            "collapse_r": "mean Pearson r of each image's head-mean map with the set's mean map",
            "pointing": f"centre of the map's arg-max cell inside the finding mask dilated by "
                        f"{POINTING_DILATION:.4g} of the side",
            "prior": "the same score with every image's attention replaced by the set's mean map",
            "iou_ratio": "head-mean pseudo-mask IoU / prior IoU; _low/_high: 95 % paired BCa bootstrap "
                         "interval over images",
            "oracle_iou": "pseudo-mask IoU of maps centred on each finding (falling off with distance) "
                          "at the attention's size: what a map that points perfectly reaches",
        },
    }
    m = diag.mean
    row = {"task": "attention", "data": args.data, "model": tower.name, "collapse_r": m.collapse_r,
           "pointing": m.pointing, "pointing_prior": m.pointing_prior, "iou": m.iou, "iou_prior": m.iou_prior}
    write_results(out, metrics, row)
    return metrics
