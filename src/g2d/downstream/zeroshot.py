"""``g2d eval zeroshot``: zero-shot classification from a positive and a negative prompt per class.

For each class ``k`` the image embedding is compared with the embeddings of a positive prompt
(default ``"{finding}"``) and a negative prompt (``"no {finding}"``), both in the joint space (paper
A.4.2); the probability of the class is the softmax over the two cosine similarities times the
model's logit scale, ``p_k = softmax(s * [cos(v, l+), cos(v, l-)])[0]``. Prompt files are plain text
(``src/g2d/downstream/prompts/*.txt``; format in :func:`load_prompts`); ``--prompts FILE`` uses yours.

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

import argparse
import logging
import math
import re
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from g2d.data.sets import open_dataset
from g2d.downstream.common import load_image_tower, resolve_device, write_results
from g2d.downstream.features import (
    add_geometry_arguments,
    auroc_per_class,
    auroc_undefined,
    check_split,
    geometry_from_args,
    geometry_source,
    label_tasks,
    make_loader,
    nan_mean,
    progress_bar,
)
from g2d.errors import ConfigError, DataError
from g2d.model import G2DModel

__all__ = ["add_arguments", "run", "load_prompts", "class_prompts", "prompt_embeddings", "zero_shot_scores",
           "max_f1_threshold", "threshold_metrics", "require_g2d", "THRESHOLD_RULES"]

log = logging.getLogger("g2d.downstream")

THRESHOLD_RULES = {
    "val": "val: per-class threshold of maximal F1 on the validation split, applied to test (score >= t)",
    "test-max-f1": "test-max-f1 (MedKLIP): oracle maximal F1 over the test set's precision-recall curve; "
                   "accuracy at score > that threshold",
    "fixed": "fixed threshold (score >= t)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=None,
                   help="prompt file (CLASS<TAB>POSITIVE<TAB>NEGATIVE lines); default: the shipped default.txt")
    p.add_argument("--threshold", default="val",
                   help="'val' (max F1 on the validation split), 'test-max-f1' (MedKLIP oracle) or a number")
    p.add_argument("--batch-size", type=int, default=64)
    add_geometry_arguments(p, None, None)


def require_g2d(model: G2DModel | None, what: str) -> G2DModel:
    if model is None:
        raise ConfigError(f"{what} needs a pre-trained G2D model with its text tower (--model PATH to an "
                          "export, run folder or checkpoint); 'random' and 'imagenet' are image-only baselines")
    return model


# ------------------------------------------------------------------------------------------ prompts


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", name.strip().lower()))


def load_prompts(path: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Read a prompt file: ``CLASS<TAB>POSITIVE<TAB>NEGATIVE`` per line, ``#`` comments, blank lines.

    ``CLASS`` is ``*`` (every class without lines of its own) or a class name (case, ``_`` and ``-``
    do not matter); ``{finding}`` in a template becomes the class name. ``None``: the shipped
    ``prompts/default.txt``; a bare name like ``biovil`` picks a shipped file.

    :return: normalised class name (or ``*``) -> list of (positive, negative) templates.
    """
    if path is None or (isinstance(path, str) and re.fullmatch(r"[a-z0-9_]+", path)
                        and not Path(path).exists()):
        name = "default" if path is None else path
        text = resources.files("g2d.downstream").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")
        where = f"prompts/{name}.txt"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"prompt file not found: {p}")
        text, where = p.read_text(encoding="utf-8"), str(p)
    table: dict[str, list[tuple[str, str]]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or not all(s.strip() for s in parts):
            raise DataError(f"{where}:{n}: expected CLASS<TAB>POSITIVE<TAB>NEGATIVE, got {len(parts)} field(s)")
        cls = "*" if parts[0].strip() == "*" else _norm(parts[0])
        table.setdefault(cls, []).append((parts[1].strip(), parts[2].strip()))
    if not table:
        raise DataError(f"{where}: no prompts")
    return table


# Class names that are themselves a normal or negative statement ("No Finding", "normal"): the
# generic "{finding}" / "no {finding}" pair makes their negative prompt a double negative that means
# what the positive means, and the score's direction arbitrary (CheXzero's users saw AUC 0.07).
_NEGATIVE_CLASS = re.compile(r"^(no|not|without|normal|negative|unremarkable|clear|healthy)\b")
_DOUBLE_NEGATIVE = re.compile(r"\b(no|not|without|absence of)\s+(no|not|without|normal|negative|"
                              r"unremarkable|healthy)\b")


def check_prompt_pair(cls: str, positive: str, negative: str) -> None:
    """Refuse a pair whose two sides cannot be told apart: identical texts or a double negative.

    :raises DataError: naming the class and the pair.
    """
    pos, neg = _norm(positive), _norm(negative)
    why = ("the positive and negative prompts are the same" if pos == neg else
           "a prompt is a double negative" if _DOUBLE_NEGATIVE.search(neg) or _DOUBLE_NEGATIVE.search(pos)
           else None)
    if why:
        raise DataError(f"zero-shot prompts for class {cls!r}: {why} ({positive!r} / {negative!r}); give "
                        "the class its own line in the prompt file with a positive/negative pair of "
                        "opposite meaning (e.g. 'no acute cardiopulmonary process' / 'acute "
                        "cardiopulmonary abnormality')")


def class_prompts(tasks: Sequence[str], table: dict[str, list[tuple[str, str]]]) -> dict[str, list[tuple[str, str]]]:
    """Filled-in (positive, negative) prompt pairs for every class of ``tasks``.

    :raises DataError: a class without prompts; a class whose name is a normal/negative statement
        ("No Finding", "normal") that only the generic ``*`` template covers; any pair that
        :func:`check_prompt_pair` refuses.
    """
    out: dict[str, list[tuple[str, str]]] = {}
    for t in tasks:
        own = table.get(_norm(t))
        pairs = own or table.get("*")
        if not pairs:
            raise DataError(f"no prompt for class {t!r} and no '*' line in the prompt file")
        if own is None and _NEGATIVE_CLASS.match(_norm(t)):
            raise DataError(f"zero-shot prompts for class {t!r}: the class names a normal or negative "
                            "finding, and the generic '{finding}' / 'no {finding}' template would make its "
                            "negative prompt a double negative; give it its own line in the prompt file "
                            "(a normal study vs. any abnormality)")
        out[t] = [(pos.replace("{finding}", _norm(t)), neg.replace("{finding}", _norm(t))) for pos, neg in pairs]
        for pos, neg in out[t]:
            check_prompt_pair(t, pos, neg)
    return out


@torch.no_grad()
def prompt_embeddings(model: G2DModel, prompts: dict[str, list[tuple[str, str]]]) -> tuple[Tensor, Tensor]:
    """Positive and negative text embeddings ``[K, d]`` (ensembles averaged, then L2-normalised)."""
    pos, neg = [], []
    for pairs in prompts.values():
        e = model.encode_text([p for p, _ in pairs] + [n for _, n in pairs])  # L2-normalised [2P, d]
        pos.append(F.normalize(e[:len(pairs)].mean(0), dim=-1))
        neg.append(F.normalize(e[len(pairs):].mean(0), dim=-1))
    return torch.stack(pos), torch.stack(neg)


def zero_shot_scores(image_emb: Tensor, pos: Tensor, neg: Tensor, logit_scale: Tensor | float) -> Tensor:
    """``p = softmax(scale * [cos+, cos-])[0]`` per class.

    :param image_emb: ``[B, d]`` L2-normalised. :param pos, neg: ``[K, d]``. :return: ``[B, K]`` in (0, 1).
    """
    logits = torch.stack([image_emb @ pos.T, image_emb @ neg.T], dim=-1) * logit_scale
    return logits.softmax(-1)[..., 0]


@torch.no_grad()
def _score_split(model: G2DModel, ds, pos: Tensor, neg: Tensor, args, device, desc: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    scale = model.logit_scale.exp()
    scores, labels = [], []
    loader = make_loader(ds, args.batch_size, args.num_workers)
    for batch in progress_bar(loader, len(loader), desc, args.no_progress):
        if batch is None:
            continue
        emb = model.encode_image(batch["image"].to(device))
        scores.append(zero_shot_scores(emb, pos, neg, scale).cpu().numpy())
        labels.append(batch["labels"].numpy())
    k = pos.shape[0]
    return (np.concatenate(scores) if scores else np.zeros((0, k)),
            np.concatenate(labels) if labels else np.zeros((0, k)))


# --------------------------------------------------------------------------------------- thresholds


def max_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The score threshold ``t`` that maximises F1 of ``score >= t`` (sklearn's PR curve).

    :param scores, labels: 1-D, labels 0/1 (no NaN). :return: ``(t, max F1)``; ``(nan, nan)`` without
        any positive label.
    """
    from sklearn.metrics import precision_recall_curve

    if labels.sum() == 0:
        return math.nan, math.nan
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    p, r = precision[:-1], recall[:-1]  # the last point has no threshold
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    k = int(np.argmax(f1))
    return float(thresholds[k]), float(f1[k])


def _f1_acc(scores: np.ndarray, labels: np.ndarray, t: float, strict: bool = False) -> tuple[float, float]:
    from sklearn.metrics import f1_score

    pred = (scores > t) if strict else (scores >= t)
    return float(f1_score(labels, pred, zero_division=0.0)), float((pred == labels.astype(bool)).mean())


def threshold_metrics(scores: np.ndarray, labels: np.ndarray, tasks: Sequence[str], rule: str | float,
                      val_scores: np.ndarray | None = None, val_labels: np.ndarray | None = None
                      ) -> dict[str, Any]:
    """Per-class and mean AUROC, F1 and accuracy of test ``scores`` ``[N, K]`` against ``labels``.

    :param rule: ``"val"`` (needs ``val_scores``/``val_labels``), ``"test-max-f1"`` or a number.
        Classes with no positive validation label fall back to 0.5 (logged, and listed in
        ``threshold_fallback``).
    """
    auc = auroc_per_class(scores, labels, tasks)
    f1s, accs, thr, fallback = {}, {}, {}, []
    for k, t in enumerate(tasks):
        known = ~np.isnan(labels[:, k])
        s, y = scores[known, k], labels[known, k]
        if rule == "test-max-f1":
            thr[t], f1s[t] = max_f1_threshold(s, y)
            accs[t] = _f1_acc(s, y, thr[t], strict=True)[1] if not math.isnan(thr[t]) else math.nan
            continue
        if rule == "val":
            vk = ~np.isnan(val_labels[:, k])
            thr[t] = max_f1_threshold(val_scores[vk, k], val_labels[vk, k])[0]
            if math.isnan(thr[t]):
                log.warning("class %s has no positive validation label: threshold 0.5", t)
                thr[t] = 0.5
                fallback.append(t)
        else:
            thr[t] = float(rule)
        f1s[t], accs[t] = _f1_acc(s, y, thr[t]) if len(y) else (math.nan, math.nan)
    return {"auc": nan_mean(auc), "f1": nan_mean(f1s), "acc": nan_mean(accs), "auc_per_class": auc,
            "f1_per_class": f1s, "acc_per_class": accs, "thresholds": thr, "threshold_fallback": fallback,
            "undefined": auroc_undefined(labels, tasks)}


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    rule = parse_threshold(args.threshold)
    tower = load_image_tower(args.model, args.arch)
    model = require_g2d(tower.model, "zero-shot classification")
    device = resolve_device(args.device)
    model.to(device).eval()
    geom = geometry_from_args(args, tower)
    test_ds = open_dataset(args.data, "test", 1.0, geom)
    check_split(test_ds, f"{args.data} test")
    tasks = label_tasks(test_ds, args.data)
    prompts = class_prompts(tasks, load_prompts(args.prompts))
    pos, neg = prompt_embeddings(model, prompts)
    scores, labels = _score_split(model, test_ds, pos, neg, args, device, "test")
    val_scores = val_labels = None
    n_val = 0
    if rule == "val":
        try:
            val_ds = open_dataset(args.data, "val", 1.0, geom)
            check_split(val_ds, f"{args.data} val")
        except DataError as err:
            raise DataError(f"{err}; --threshold val needs a validation split (or use --threshold "
                            "test-max-f1 / 0.5)") from None
        val_scores, val_labels = _score_split(model, val_ds, pos, neg, args, device, "val")
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
        "geometry": asdict(geom), "geometry_source": geometry_source(args, tower),
    }
    row = {"task": "zeroshot", "data": args.data, "model": tower.name, "threshold": rule_name,
           "auc": m["auc"], "f1": m["f1"], "acc": m["acc"]}
    write_results(args.out, metrics, row)
    return metrics
