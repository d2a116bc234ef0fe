"""``g2d eval zeroshot``: zero-shot classification from a positive and a negative prompt per class.

For each class ``k`` the image embedding is compared with the embeddings of a positive prompt
(default ``"{finding}"``) and a negative prompt (``"no {finding}"``), both in the joint space (paper
A.4.2); the probability of the class is the softmax over the two cosine similarities times the
model's logit scale, ``p_k = softmax(s * [cos(v, l+), cos(v, l-)])[0]``. Prompt files are plain text
(``src/g2d/inference/prompts/*.txt``; format in :func:`g2d.inference.zeroshot.load_prompts`);
``--prompts FILE`` uses yours.

Metrics on the test split, per class and their mean: AUROC (threshold-free), F1 and accuracy at a
per-class threshold chosen by ``--threshold``:

- ``val`` (default): the threshold of maximal F1 on the validation split, applied to the test split
  (``score >= threshold``); no test label is looked at.
- ``test-max-f1``: MedKLIP's rule, the maximal F1 over the test set's precision-recall curve (an
  oracle threshold) and the accuracy at ``score > threshold``; labelled as such in metrics.json.
- a number, e.g. ``0.5``: a fixed threshold (``score >= t``).

Unknown (NaN) labels are left out per class.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from g2d.data.labelled.specs import open_dataset
from g2d.downstream.features import check_split, geometry_from_args, geometry_source, label_tasks
from g2d.downstream.harness import make_loader, progress_bar
from g2d.downstream.protocol import TextImageArgs, arg
from g2d.downstream.results import write_results
from g2d.errors import ConfigError, DataError
from g2d.inference.zeroshot import ZeroShotScorer, class_prompts, load_prompts
from g2d.metrics import threshold_metrics
from g2d.towers import load_text_image_model, resolve_device

__all__ = ["run", "THRESHOLD_RULES"]

log = logging.getLogger("g2d.downstream")

THRESHOLD_RULES = {
    "val": "val: per-class threshold of maximal F1 on the validation split, applied to test (score >= t)",
    "test-max-f1": "test-max-f1 (MedKLIP): oracle maximal F1 over the test set's precision-recall curve; "
                   "accuracy at score > that threshold",
    "fixed": "fixed threshold (score >= t)",
}


@dataclass(kw_only=True)
class Args(TextImageArgs):
    """``g2d eval zeroshot``: its flags are these fields (``--name-with-dashes``)."""

    prompts: str | None = arg(None,
                              help='prompt file (CLASS<TAB>POSITIVE<TAB>NEGATIVE lines); default: the shipped '
                                   'default.txt')
    threshold: str = arg('val',
                         help="'val' (max F1 on the validation split), 'test-max-f1' (MedKLIP oracle) or a number")
    batch_size: int = arg(64)


# ------------------------------------------------------------------------------------------ prompts


@torch.no_grad()
def _score_split(scorer: ZeroShotScorer, ds, args, device, desc: str) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = [], []
    loader = make_loader(ds, args.batch_size, args.num_workers)
    for batch in progress_bar(loader, len(loader), desc, args.no_progress):
        if batch is None:
            continue
        scores.append(scorer(batch["image"].to(device)).cpu().numpy())
        labels.append(batch["labels"].numpy())
    k = len(scorer.prompts)
    return (np.concatenate(scores) if scores else np.zeros((0, k)),
            np.concatenate(labels) if labels else np.zeros((0, k)))


# --------------------------------------------------------------------------------------- thresholds


def parse_threshold(value: str) -> str | float:
    if value in ("val", "test-max-f1"):
        return value
    try:
        t = float(value)
    except ValueError:
        raise ConfigError(f"--threshold must be 'val', 'test-max-f1' or a number, got {value!r}") from None
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"--threshold {t} is not a probability in [0, 1]")
    return t


# ---------------------------------------------------------------------------------------------- run


def run(args: Args) -> dict[str, Any]:
    rule = parse_threshold(args.threshold)
    device = resolve_device(args.device)
    tower, model = load_text_image_model(args.model, "zero-shot classification", args.trust_pickle,
                                         args.text_model, device)
    geom = geometry_from_args(args, tower)
    test_ds = open_dataset(args.data, "test", 1.0, geom)
    check_split(test_ds, f"{args.data} test")
    tasks = label_tasks(test_ds, args.data)
    prompts = class_prompts(tasks, load_prompts(args.prompts))
    scorer = ZeroShotScorer(model, prompts)
    scores, labels = _score_split(scorer, test_ds, args, device, "test")
    val_scores = val_labels = None
    n_val = 0
    if rule == "val":
        try:
            val_ds = open_dataset(args.data, "val", 1.0, geom)
            check_split(val_ds, f"{args.data} val")
        except DataError as err:
            raise DataError(f"{err}; --threshold val needs a validation split (or use --threshold "
                            "test-max-f1 / 0.5)") from None
        val_scores, val_labels = _score_split(scorer, val_ds, args, device, "val")
        n_val = len(val_labels)
    m = threshold_metrics(scores, labels, tasks, rule, val_scores, val_labels)
    rule_name = rule if isinstance(rule, str) else "fixed"
    metrics: dict[str, Any] = {
        "task": "zeroshot", "data": args.data, "model": tower.name, "seed": args.seed, **m,
        "threshold_rule": rule_name, "threshold_rule_description": THRESHOLD_RULES[rule_name]
        + ("" if isinstance(rule, str) else f" = {rule}"),
        "prompts": {t: [list(pr) for pr in pairs] for t, pairs in prompts.items()},
        "prompt_file": args.prompts or "default",
        "logit_scale": float(model.logit_scale.exp()), "n_test": int(len(labels)), "n_val": n_val,
        **tower.provenance(),
        "geometry": asdict(geom), "geometry_source": geometry_source(args, tower),
    }
    row = {"task": "zeroshot", "data": args.data, "model": tower.name, "threshold": rule_name,
           "auc": m["auc"], "f1": m["f1"], "acc": m["acc"]}
    write_results(args.out, metrics, row)
    return metrics
