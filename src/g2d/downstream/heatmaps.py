"""What the grounding protocols share (zero-shot grounding, phrase grounding): per image-phrase pair the
prompt, the cosine similarity map of the prompt with the dense image embeddings mapped back to the
image's pixels (resize and centre crop undone; NaN outside the crop) at the LABEL's resolution, and the
ground truth there (masks as stored; boxes filled), with the figures of the first cases.

A pair is a record of a labelled set (MS-CXR, CheXlocalize and VinDr records are pairs already; a
``csv:`` table may list several phrases per image with an ``id`` column) or, on the synthetic set, an
image (zero-shot grounding) or one of its findings (``phrases=True``: the report's sentence of that
finding with that finding's own mask).

Prompt per pair: ``--prompt TEXT``, else the record's ``extra["prompt"]`` (``csv:`` sets with a
``prompt`` column, MS-CXR's sentence, a finding's words), else a synthetic image's single finding,
else the set's default (``rsna``: "pneumonia", ``siim``: "pneumothorax", or the name of a set's only
label).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from g2d.data.images import read_image
from g2d.data.labelled.dataset import BoxMask, LabelledCXR, labels_at
from g2d.data.transforms import ImageTransformCfg, eval_geometry
from g2d.downstream.harness import make_loader, progress_bar
from g2d.inference.grounding import dense_similarity, smooth, to_original

__all__ = ["DEFAULT_PROMPTS", "GroundingCase", "grounding_cases", "ground_truth", "default_prompt"]

log = logging.getLogger("g2d.downstream")

DEFAULT_PROMPTS = {"rsna": "pneumonia", "siim": "pneumothorax"}


@dataclass
class GroundingCase:
    """One image-phrase pair with a non-empty ground truth.

    :ivar heat: ``[H, W]`` cosine similarity at the label's resolution (NaN outside the model's crop).
    :ivar truth: bool ``[1, H, W]``. :ivar image_id: the image (pairs of one image share it: the
        bootstrap resamples images). :ivar finding: what the phrase names (the record's ``finding``,
        else the prompt), for per-finding summaries.
    """

    id: str
    prompt: str
    heat: Tensor
    truth: Tensor
    image_id: str = ""
    finding: str = ""


@dataclass
class _Unit:
    id: str
    image_id: str
    finding: str
    prompt: str
    image: Tensor                 # the model's input [1, S, S]
    orig_hw: tuple[int, int]
    truth: np.ndarray             # bool [H, W] at the label's resolution
    picture: Callable[[], Tensor]  # the image for figures [H, W] in [0, 1]


def ground_truth(ds: Any, sample: dict[str, Any], index: int) -> np.ndarray:
    """bool ``[H, W]`` ground truth at the LABEL's resolution: the pixel space the set gives its labels
    in (:attr:`Record.label_hw`, e.g. MS-CXR's and CheXlocalize's original image sizes), else the
    file's. A mask, else the boxes filled, else empty."""
    if isinstance(ds, LabelledCXR):
        rec = ds.records[index]
        space = rec.label_hw or sample["orig_hw"]
        hw = (int(space[0]), int(space[1]))
        # the aspect and box checks (they pass: the sample was read)
        labels_at(rec, (int(sample["orig_hw"][0]), int(sample["orig_hw"][1])))
        if rec.mask is not None:
            return np.asarray(rec.mask(hw)).astype(bool)
        if rec.boxes is not None and len(rec.boxes):
            return BoxMask(tuple((float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in rec.boxes))(hw)
        return np.zeros(hw, bool)
    # sets generated at the output size (synthetic): the sample's own mask is the original
    return sample["mask"][0].numpy() > 0.5


def _record_prompt(args: Any, ds: Any, sample: dict[str, Any], index: int, default: str | None) -> str | None:
    if args.prompt:
        return args.prompt
    if isinstance(ds, LabelledCXR) and ds.records[index].extra.get("prompt"):
        return str(ds.records[index].extra["prompt"])
    if "prompt_findings" in sample:  # synthetic: the mask is the union, so only one finding has a prompt
        from g2d.data.synthetic import prompt_for

        found = sample["prompt_findings"]
        return prompt_for(*found[0]) if len(found) == 1 else None
    return default


def default_prompt(args: Any, ds: Any) -> str | None:
    name = args.data.split(":", 1)[0]
    if name in DEFAULT_PROMPTS:
        return DEFAULT_PROMPTS[name]
    tasks = list(getattr(ds, "tasks", []))
    return tasks[0].replace("_", " ").lower() if len(tasks) == 1 else None


def _read_picture(path: str) -> Tensor:
    return torch.from_numpy(read_image(path))


def _same(image: Tensor) -> Tensor:
    return image


def _loader_units(args: Any, ds: Any, skipped: Counter) -> Iterator[_Unit]:
    """One unit per sample of ``ds`` with a non-empty ground truth and a prompt."""
    default = default_prompt(args, ds)
    loader = make_loader(ds, args.batch_size, args.num_workers)
    for batch in progress_bar(loader, len(loader), "grounding", args.no_progress):
        if batch is None:
            continue
        for j, index in enumerate(batch["index"]):
            sample = {k: v[j] for k, v in batch.items()}
            truth = ground_truth(ds, sample, index)
            if not truth.any():
                skipped["negative_image"] += 1
                continue
            prompt = _record_prompt(args, ds, sample, index, default)
            record = ds.records[index] if isinstance(ds, LabelledCXR) else None
            if prompt is None:
                skipped["no_prompt"] += 1
                if record is not None and skipped["no_prompt"] <= 5:  # name the first rows, not every one
                    log.warning("%s: no phrase for %s (a blank 'prompt' cell, or no such column)",
                                args.data, record.source or record.image)
                continue
            extra = record.extra if record is not None else {}
            picture = (partial(_read_picture, record.image) if record is not None
                       else partial(_same, sample["image"][0]))
            # pairs of one image file are one bootstrap cluster, whatever ids the reader gave them
            yield _Unit(sample["id"], str(extra.get("image_id") or (record.image if record else sample["id"])),
                        str(extra.get("finding", prompt)), prompt, sample["image"], tuple(sample["orig_hw"]),
                        truth, picture)


def _synthetic_phrase_units(args: Any, ds: Any, skipped: Counter) -> Iterator[_Unit]:
    """One unit per finding of each synthetic image: the report's sentence of that finding
    (:func:`g2d.data.synthetic.reports.finding_sentence`, or ``--prompt``) and that finding's mask."""
    from g2d.data.synthetic.reports import finding_sentence

    for i in progress_bar(range(len(ds)), len(ds), "grounding", args.no_progress):
        s = ds.source[ds.indices[i]]
        if not s["findings"]:
            skipped["negative_image"] += 1
            continue
        image_id = f"{ds.name}/{ds.indices[i]}"
        for k, (finding, location) in enumerate(s["findings"]):
            truth = s["finding_masks"][k].numpy() > 0.5
            phrase = args.prompt or finding_sentence(s["text"], finding, location)
            yield _Unit(f"{image_id}/{finding}", image_id, finding, phrase, s["image"],
                        tuple(s["image"].shape[-2:]), truth, partial(_same, s["image"][0]))


def grounding_cases(args: Any, ds: Any, model: Any, geom_cfg: ImageTransformCfg, skipped: Counter,
                    figures: Path | None = None, n_figures: int = 0, sigma: float = 0.0,
                    mode: str = "bilinear", phrases: bool = False) -> Iterator[GroundingCase]:
    """The grounding cases of ``ds`` (``args``: ``prompt``, ``batch_size``, ``num_workers``,
    ``no_progress``, ``data``): every image-phrase pair with a non-empty ground truth and a prompt; the
    others are counted in ``skipped`` (``negative_image``, ``no_prompt``). On the synthetic set,
    ``phrases`` makes each finding its own pair (see the module docstring).

    Maps are smoothed on the dense grid (``sigma`` cells, :func:`~g2d.inference.grounding.smooth`) and
    resampled (``mode``) to the ground truth's resolution (:func:`ground_truth`). The first
    ``n_figures`` are drawn to ``figures/grounding_NN.png``."""
    # a set rendered at the output size has no resize/crop to undo
    out_geom = geom_cfg if isinstance(ds, LabelledCXR) else ImageTransformCfg(
        resize=geom_cfg.output_size, crop=geom_cfg.output_size, augment="none")
    units = (_synthetic_phrase_units(args, ds, skipped) if phrases and not isinstance(ds, LabelledCXR)
             else _loader_units(args, ds, skipped))
    panels = 0
    pending: list[_Unit] = []

    def flush() -> Iterator[GroundingCase]:
        nonlocal panels
        dense = smooth(dense_similarity(model, torch.stack([u.image for u in pending]),
                                        [u.prompt for u in pending]), sigma)  # [b, h, w]
        for u, d in zip(pending, dense):
            geom = eval_geometry(u.orig_hw, out_geom)
            case = GroundingCase(u.id, u.prompt, to_original(d, geom, u.truth.shape, mode),
                                 torch.from_numpy(u.truth)[None], u.image_id, u.finding)
            if figures is not None and panels < n_figures:
                from g2d.figures import grounding_panels

                img = u.picture().float()[None, None]
                if img.shape[-2:] != case.heat.shape:  # labels at another resolution: draw at theirs
                    img = torch.nn.functional.interpolate(img, size=case.heat.shape, mode="bilinear")
                grounding_panels(img, case.heat[None], case.truth.float(), [case.prompt],
                                 figures / f"grounding_{panels:02d}.png")
                panels += 1
            yield case
        pending.clear()

    for unit in units:
        pending.append(unit)
        if len(pending) == args.batch_size:
            yield from flush()
    if pending:
        yield from flush()
