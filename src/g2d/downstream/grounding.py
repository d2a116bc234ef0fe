"""``g2d eval grounding``: zero-shot grounding (paper A.4.2, BioViL pipeline; MedKLIP's metrics).

For every positive test image (non-empty mask, or at least one box), the cosine similarity between
the prompt's embedding and every dense pixel embedding (:meth:`G2DModel.dense_embeddings`) is mapped
back to the ORIGINAL image's pixels (resize and centre crop undone with
:func:`g2d.data.transforms.eval_geometry`; pixels outside the crop are NaN and never foreground),
binarised (``--binarize``/``--level``, :func:`g2d.inference.grounding.binarize`), and compared with the
ground truth at the original resolution (masks as stored; boxes filled with
:class:`g2d.data.labelled.BoxMask`).

Metrics (means over positive images, and per prompt):

- ``recall``: pixel recall ``|P and G| / |G|``. MedKLIP reports recall but never released its code;
  pixel recall is our reading (consistent with its high recall next to low IoU);
- ``iou`` = ``|P and G| / |P or G|`` and ``dice`` = ``2 |P and G| / (|P| + |G|)`` per image (MedKLIP);
- ``pointing``: MedKLIP's point score (an arg-max pixel inside G).

Prompt per image: as :mod:`g2d.downstream.heatmaps` says (``--prompt``, the record's, the set's).
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from g2d.data.labelled.specs import open_dataset
from g2d.downstream.features import check_split, geometry_from_args, geometry_source
from g2d.downstream.heatmaps import grounding_cases
from g2d.downstream.protocol import TextImageArgs, arg
from g2d.downstream.results import write_results
from g2d.errors import DataError
from g2d.inference.grounding import RESAMPLING, binarize
from g2d.metrics import dice_per_image, iou_per_image, pointing_game, recall_per_image
from g2d.towers import load_text_image_model, resolve_device

__all__ = ["run"]

log = logging.getLogger("g2d.downstream")


@dataclass(kw_only=True)
class Args(TextImageArgs):
    """``g2d eval grounding``: its flags are these fields (``--name-with-dashes``)."""

    prompt: str | None = arg(None, help='one prompt for every image (default: per record / per set)')
    binarize: str = arg('minmax', choices=('minmax', 'fixed', 'quantile'),
                        help='minmax: normalise each map to [0, 1] and keep >= level; fixed: raw cosine > level; '
                             'quantile: keep the top (1 - level) of pixels')
    level: float = arg(0.5)
    split: str = arg('test', choices=('train', 'val', 'test'))
    batch_size: int = arg(16)
    figures: int = arg(8, help='heat-map panels of the first N positive images')


def run(args: Args) -> dict[str, Any]:
    device = resolve_device(args.device)
    tower, model = load_text_image_model(args.model, "zero-shot grounding", args.trust_pickle, args.text_model,
                                         device)
    geom_cfg = geometry_from_args(args, tower)
    ds = open_dataset(args.data, args.split, 1.0, geom_cfg)
    check_split(ds, f"{args.data} {args.split}")
    if not (getattr(ds, "with_mask", False) or getattr(ds, "with_boxes", False)):
        raise DataError(f"{args.data}: zero-shot grounding needs masks or boxes")
    if args.prompt is not None and not args.prompt.strip():
        raise DataError("--prompt is empty; leave it out for the per-record / per-set prompts")
    out = Path(args.out)
    skipped: Counter[str] = Counter()
    per_image: list[dict[str, Any]] = []
    for case in grounding_cases(args, ds, model, geom_cfg, skipped, out / "figures", args.figures):
        pred = binarize(case.heat[None], args.level, args.binarize)
        per_image.append({"id": case.id, "prompt": case.prompt,
                          "recall": float(recall_per_image(pred, case.truth)[0]),
                          "iou": float(iou_per_image(pred, case.truth)[0]),
                          "dice": float(dice_per_image(pred, case.truth)[0]),
                          "pointing": float(pointing_game(case.heat[None], case.truth)[0])})
    if not per_image:
        raise DataError(f"{args.data} {args.split}: no positive image with a prompt to ground "
                        f"(skipped: {dict(skipped)}); pass --prompt TEXT")
    names = ("recall", "iou", "dice", "pointing")
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in per_image:
        by_prompt[r["prompt"]].append(r)

    def means(rows: list[dict[str, Any]]) -> dict[str, float]:
        return {n: float(np.nanmean([r[n] for r in rows])) for n in names} | {"images": len(rows)}

    overall = means(per_image)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "per_image.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "prompt", *names])
        w.writeheader()
        w.writerows(per_image)
    metrics: dict[str, Any] = {
        "task": "grounding", "data": args.data, "split": args.split, "model": tower.name,
        **{n: overall[n] for n in names}, "images": len(per_image),
        "per_prompt": {p: means(rows) for p, rows in by_prompt.items()},
        "skipped": dict(skipped),
        "binarize": {"rule": args.binarize, "level": args.level, "resampling": RESAMPLING},
        "recall_definition": "pixel recall |P and G| / |G| per positive image, mean (MedKLIP's code unreleased)",
        "coordinates": "original image pixels; outside the centre crop the map is NaN (never foreground)",
        "geometry": asdict(geom_cfg), "geometry_source": geometry_source(args, tower),
        **tower.provenance(),
    }
    if any(math.isnan(v) for v in (overall["iou"], overall["dice"])):
        log.warning("grounding metrics contain NaN")
    row = {"task": "grounding", "data": args.data, "model": tower.name, "binarize": f"{args.binarize}@{args.level}",
           "recall": overall["recall"], "iou": overall["iou"], "dice": overall["dice"]}
    write_results(out, metrics, row)
    return metrics
