"""``g2d eval phrase-grounding``: phrase grounding and pixel localisation scored as the field scores them
(MS-CXR: BioViL, Boecking et al. ECCV 2022, and BioViL-T, Bannur et al. CVPR 2023; CheXlocalize:
Saporta et al., Nature Machine Intelligence 2022).

Each image-phrase pair (MS-CXR's sentence, a CheXlocalize or VinDr finding's words, a ``csv:`` table's
``prompt``, a synthetic report's sentence of one finding) gives the cosine similarity of the phrase with
every dense image embedding, smoothed and resampled as the chosen pipeline does to the LABEL's resolution
(the boxes' or masks' own pixel space; NaN outside the model's crop), and is scored against the
ground truth there (the union of the phrase's boxes, or its mask):

- ``cnr``: contrast-to-noise ratio of the raw similarities inside vs outside the ground truth
  (BioViL; :func:`g2d.metrics.cnr`);
- ``miou``: IoU of ``similarity > t`` averaged over raw-cosine thresholds ``t`` (``--iou-thresholds``,
  default 0.1 ... 0.5; BioViL-T's mIoU, :func:`g2d.metrics.mean_iou_over_thresholds`);
- ``iou``, ``dice``: of the Otsu segmentation of the min-max normalised map (CheXlocalize's default,
  :func:`g2d.metrics.otsu_binarize`); CheXlocalize's mIoU is ``iou`` averaged per finding;
- ``hit``: the hit rate / pointing game, the arg-max pixel inside the ground truth (CheXlocalize
  ``get_hitrates``; :func:`g2d.metrics.pointing_game`).

Pipelines (``--pipeline``; ``auto``: ``chexlocalize`` for ``chexlocalize:`` sets, else ``biovil``):

- ``biovil``: hi-ml's ``get_similarity_map_from_raw_data``: Gaussian smoothing, sigma 1.5 grid cells,
  then nearest-neighbour upsampling;
- ``chexlocalize``: no smoothing, bilinear resizing (``heatmap_to_segmentation.py``).

Every mean comes with a 95 % percentile bootstrap interval over images (1,000 replicates, the pairs of
one image resampled together; CheXlocalize's intervals), overall and per finding; the macro mean over
findings (``macro_iou``, ...) is CheXlocalize's summary. Per-pair scores go to ``per_pair.csv`` and, for
paired comparisons between models, to ``metrics.json``'s ``per_image``.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from g2d.data.labelled.specs import open_dataset
from g2d.data.labelled.splits import SPLITS
from g2d.downstream.features import check_split, geometry_from_args, geometry_source
from g2d.downstream.heatmaps import grounding_cases
from g2d.downstream.protocol import TextImageArgs, arg
from g2d.downstream.results import write_results
from g2d.errors import ConfigError, DataError
from g2d.fingerprint import digest
from g2d.metrics import (
    PHRASE_IOU_THRESHOLDS,
    bootstrap_interval,
    cnr,
    dice_per_image,
    iou_per_image,
    mean_iou_over_thresholds,
    otsu_binarize,
    pointing_game,
)
from g2d.towers import load_text_image_model, resolve_device

__all__ = ["run", "PIPELINES", "METRICS"]

log = logging.getLogger("g2d.downstream")

METRICS = ("cnr", "miou", "iou", "dice", "hit")  # per pair; the summaries' keys


@dataclass(frozen=True)
class Pipeline:
    """How a dense similarity grid becomes a map at the label's resolution."""

    sigma: float   # Gaussian smoothing on the dense grid, in cells (0: none)
    mode: str      # resampling to the label's pixels: nearest or bilinear
    source: str


PIPELINES = {
    "biovil": Pipeline(1.5, "nearest", "hi-ml health_multimodal/vlp/inference_engine.py "
                                       "get_similarity_map_from_raw_data (sigma 1.5 cells, nearest upsampling)"),
    "chexlocalize": Pipeline(0.0, "bilinear", "cheXlocalize heatmap_to_segmentation.py (bilinear resize, "
                                              "min-max, Otsu)"),
}


@dataclass(kw_only=True)
class Args(TextImageArgs):
    """``g2d eval phrase-grounding``: its flags are these fields (``--name-with-dashes``)."""

    prompt: str | None = arg(None, help="one phrase for every pair (default: each pair's own)")
    split: str = arg("test", choices=(*SPLITS, "all"),
                     help="all: every split of the set (BioViL scores MS-CXR's 1,162 pairs whole)")
    pipeline: str = arg("auto", choices=("auto", *PIPELINES),
                        help="smoothing and resampling of the maps (auto: chexlocalize for chexlocalize: sets, "
                             "else biovil)")
    iou_thresholds: str = arg(",".join(str(t) for t in PHRASE_IOU_THRESHOLDS),
                              help="raw cosine thresholds averaged by miou")
    bootstrap: int = arg(1000, help="bootstrap replicates of the intervals (over images; at least 1)")
    batch_size: int = arg(16)
    figures: int = arg(8, help="heat-map panels of the first N pairs")


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--iou-thresholds {text!r}: expected numbers such as 0.1,0.2,0.3") from None
    if not values or not all(-1.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"--iou-thresholds {text!r}: expected cosine values in [-1, 1]")
    return values


def _open(args: Args, geom_cfg: Any) -> dict[str, Any]:
    """``{split: set}``: the split's set, or with ``--split all`` every non-empty split's."""
    if args.split != "all":
        ds = open_dataset(args.data, args.split, 1.0, geom_cfg)
        check_split(ds, f"{args.data} {args.split}")
        return {args.split: ds}
    parts = {}
    for split in SPLITS:
        try:
            parts[split] = open_dataset(args.data, split, 1.0, geom_cfg)
        except DataError as err:
            if "split is empty" not in str(err):
                raise
    if not parts:
        raise DataError(f"{args.data}: every split is empty")
    return parts


def run(args: Args) -> dict[str, Any]:
    thresholds = _thresholds(args.iou_thresholds)
    if args.bootstrap < 1:  # checked before the maps are computed, not after
        raise ConfigError(f"--bootstrap {args.bootstrap}: at least 1 replicate (CheXlocalize uses 1000)")
    if args.prompt is not None and not args.prompt.strip():
        raise DataError("--prompt is empty; leave it out for each pair's own phrase")
    name = "chexlocalize" if args.data.split(":", 1)[0] == "chexlocalize" else "biovil"
    pipeline_name = name if args.pipeline == "auto" else args.pipeline
    pipeline = PIPELINES[pipeline_name]
    device = resolve_device(args.device)
    tower, model = load_text_image_model(args.model, "phrase grounding", args.trust_pickle, args.text_model, device)
    geom_cfg = geometry_from_args(args, tower)
    by_split = _open(args, geom_cfg)
    sets = list(by_split.values())
    if not (getattr(sets[0], "with_mask", False) or getattr(sets[0], "with_boxes", False)):
        raise DataError(f"{args.data}: phrase grounding needs masks or boxes")
    out = Path(args.out)
    skipped: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    cases = (case for k, ds in enumerate(sets)  # figures from the first split only (one numbering)
             for case in grounding_cases(args, ds, model, geom_cfg, skipped, out / "figures",
                                         args.figures if k == 0 else 0, sigma=pipeline.sigma, mode=pipeline.mode,
                                         phrases=True))
    for case in cases:
        heat, truth = case.heat[None], case.truth
        seg = otsu_binarize(heat)
        rows.append({"id": case.id, "image_id": case.image_id, "finding": case.finding, "prompt": case.prompt,
                     "cnr": float(cnr(heat, truth)[0]),
                     "miou": float(mean_iou_over_thresholds(heat, truth, thresholds)[0]),
                     "iou": float(iou_per_image(seg, truth)[0]), "dice": float(dice_per_image(seg, truth)[0]),
                     "hit": float(pointing_game(heat, truth)[0])})
    if not rows:
        hint = (" (a csv: table gives each row's phrase in a 'prompt' column), or pass --prompt TEXT"
                if skipped["no_prompt"] else "")
        raise DataError(f"{args.data} {args.split}: no image-phrase pair with a ground truth and a phrase "
                        f"(skipped: {dict(skipped)}){hint}")

    def summary(part: list[dict[str, Any]]) -> dict[str, Any]:
        groups = [r["image_id"] for r in part]
        return {m: bootstrap_interval(np.array([r[m] for r in part]), groups, args.bootstrap) for m in METRICS} | {
            "pairs": len(part), "images": len(set(groups))}

    by_finding: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_finding[r["finding"]].append(r)
    per_finding = {f: summary(part) for f, part in sorted(by_finding.items())}
    overall = summary(rows)
    macro = {m: float(np.nanmean([s[m]["mean"] for s in per_finding.values()])) for m in METRICS}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "per_pair.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "image_id", "finding", "prompt", *METRICS])
        w.writeheader()
        w.writerows(rows)
    metrics: dict[str, Any] = {
        "task": "phrase-grounding", "data": args.data, "split": args.split, "model": tower.name,
        **{m: overall[m]["mean"] for m in METRICS}, "pairs": overall["pairs"], "images": overall["images"],
        "intervals": {m: overall[m] for m in METRICS},
        # CheXlocalize's summary: the mean per finding, then over findings
        **{f"macro_{m}": v for m, v in macro.items()},
        # per pair, for paired comparisons between models (g2d reproduce differences); a metric undefined
        # on some pair (CNR without valid pixels outside the box) is left out
        "per_image": {**{m: [round(r[m], 6) for r in rows] for m in METRICS
                         if all(np.isfinite(r[m]) for r in rows)},
                      "ids_digest": digest([r["id"] for r in rows])},
        "per_finding": per_finding, "skipped": dict(skipped),
        # what the readers dropped (bad rows, missing files) and the run (unreadable images), per split
        "skipped_rows": {s: dict(ds.skipped.counts) for s, ds in by_split.items() if hasattr(ds, "skipped")},
        "pipeline": {"name": pipeline_name, "smoothing_sigma_cells": pipeline.sigma, "resampling": pipeline.mode,
                     "source": pipeline.source,
                     "scored_at": "the label's resolution (the boxes' or masks' pixel space; NaN outside the crop)"},
        "definitions": {
            "cnr": "|mean_in - mean_out| / sqrt(var_in + var_out) of raw cosine similarities (BioViL)",
            "miou": f"IoU of similarity > t averaged over t in {list(thresholds)} (BioViL-T)",
            "iou": "IoU of the Otsu segmentation of the min-max normalised map (CheXlocalize)",
            "dice": "Dice of the same Otsu segmentation",
            "hit": "arg-max pixel inside the ground truth (CheXlocalize hit rate, pointing game)",
            "intervals": f"95% percentile bootstrap over images, {args.bootstrap} replicates"},
        "geometry": asdict(geom_cfg), "geometry_source": geometry_source(args, tower),
        **tower.provenance(),
    }
    row = {"task": "phrase-grounding", "data": args.data, "model": tower.name, "pipeline": pipeline_name,
           **{m: overall[m]["mean"] for m in METRICS}, "pairs": overall["pairs"]}
    write_results(out, metrics, row)
    return metrics
