"""What the grounding protocols share (zero-shot grounding, phrase grounding): per positive test image
the prompt, the cosine similarity map of the prompt with the dense image embeddings mapped back to the
ORIGINAL image's pixels (resize and centre crop undone; NaN outside the crop), and the ground truth at
that resolution (masks as stored; boxes filled), with the figures of the first cases.

Prompt per image: ``--prompt TEXT``, else the record's ``extra["prompt"]`` (``csv:`` sets with a
``prompt`` column, MS-CXR's sentence, a finding's prompt) or a sample's ``prompt``, else a synthetic
image's single finding, else the set's default (``rsna``: "pneumonia", ``siim``: "pneumothorax", or
the name of a set's only label).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from g2d.data.images import read_image
from g2d.data.labelled.dataset import BoxMask, LabelledCXR, labels_at
from g2d.data.transforms import ImageTransformCfg, eval_geometry
from g2d.downstream.harness import make_loader, progress_bar
from g2d.inference.grounding import dense_similarity, to_original

__all__ = ["DEFAULT_PROMPTS", "GroundingCase", "grounding_cases", "ground_truth_original", "default_prompt"]

DEFAULT_PROMPTS = {"rsna": "pneumonia", "siim": "pneumothorax"}


@dataclass
class GroundingCase:
    """One positive image and its prompt. :ivar heat: ``[H, W]`` cosine similarity on the original
    pixels (NaN outside the model's crop). :ivar truth: bool ``[1, H, W]``."""

    id: str
    prompt: str
    heat: Tensor
    truth: Tensor


def ground_truth_original(ds: Any, sample: dict[str, Any], index: int) -> np.ndarray:
    """bool ``[H, W]`` ground truth at the file's resolution (mask, else filled boxes, else empty)."""
    hw = tuple(sample["orig_hw"])
    if isinstance(ds, LabelledCXR):
        boxes, mask = labels_at(ds.records[index], hw)  # the sample was read, so its labels fit
        if mask is not None:
            return mask
        if boxes is not None and len(boxes):
            return BoxMask(tuple((float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in boxes))(hw)
        return np.zeros(hw, bool)
    # sets generated at the output size (synthetic): the sample's own mask is the original
    return sample["mask"][0].numpy() > 0.5


def record_prompt(args, ds, sample: dict[str, Any], index: int, default: str | None) -> str | None:
    if args.prompt:
        return args.prompt
    if isinstance(ds, LabelledCXR) and ds.records[index].extra.get("prompt"):
        return str(ds.records[index].extra["prompt"])
    if sample.get("prompt"):
        return str(sample["prompt"])
    if "prompt_findings" in sample:  # synthetic: the mask is the union, so only one finding has a prompt
        from g2d.data.synthetic import prompt_for

        found = sample["prompt_findings"]
        return prompt_for(*found[0]) if len(found) == 1 else None
    return default


def default_prompt(args, ds) -> str | None:
    name = args.data.split(":", 1)[0]
    if name in DEFAULT_PROMPTS:
        return DEFAULT_PROMPTS[name]
    tasks = list(getattr(ds, "tasks", []))
    return tasks[0].replace("_", " ").lower() if len(tasks) == 1 else None


def grounding_cases(args: Any, ds: Any, model: Any, geom_cfg: ImageTransformCfg, skipped: Counter,
                    figures: Path | None = None, n_figures: int = 0) -> Iterator[GroundingCase]:
    """The grounding cases of ``ds`` (``args``: ``prompt``, ``batch_size``, ``num_workers``,
    ``no_progress``, ``data``): every image with a non-empty ground truth and a prompt; the others are
    counted in ``skipped`` (``negative_image``, ``no_prompt``). The first ``n_figures`` are drawn to
    ``figures/grounding_NN.png``."""
    default = default_prompt(args, ds)
    # a set rendered at the output size has no resize/crop to undo
    out_geom = geom_cfg if isinstance(ds, LabelledCXR) else ImageTransformCfg(
        resize=geom_cfg.output_size, crop=geom_cfg.output_size, augment="none")
    panels = 0
    loader = make_loader(ds, args.batch_size, args.num_workers)
    for batch in progress_bar(loader, len(loader), "grounding", args.no_progress):
        if batch is None:
            continue
        keep, prompts, truths = [], [], []
        for j, index in enumerate(batch["index"]):
            sample = {k: v[j] for k, v in batch.items()}
            truth = ground_truth_original(ds, sample, index)
            if not truth.any():
                skipped["negative_image"] += 1
                continue
            prompt = record_prompt(args, ds, sample, index, default)
            if prompt is None:
                skipped["no_prompt"] += 1
                continue
            keep.append(j)
            prompts.append(prompt)
            truths.append(truth)
        if not keep:
            continue
        dense = dense_similarity(model, batch["image"][keep], prompts)          # [b, h, w]
        for k, j in enumerate(keep):
            geom = eval_geometry(batch["orig_hw"][j], out_geom)
            case = GroundingCase(batch["id"][j], prompts[k], to_original(dense[k], geom),
                                 torch.from_numpy(truths[k])[None])
            if figures is not None and panels < n_figures:
                from g2d.figures import grounding_panels

                index = batch["index"][j]
                img = (torch.from_numpy(read_image(ds.records[index].image)) if isinstance(ds, LabelledCXR)
                       else batch["image"][j, 0])
                grounding_panels(img[None, None], case.heat[None], case.truth.float(), [case.prompt],
                                 figures / f"grounding_{panels:02d}.png")
                panels += 1
            yield case
