"""Shared parts of the recognition tasks (linear probe, fine-tuning, zero-shot classification).

- geometry flags (``--resize``/``--image-size``) and loaders over :class:`g2d.data.labelled.LabelledCXR`;
- a per-image feature cache for frozen encoders, keyed by model + data + split + geometry + pooling,
  so that probes at 1 %, 10 % and 100 % extract each image once;
- classification metrics that ignore unknown (NaN) labels per class.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from g2d.checkpoint import atomic_write
from g2d.data.transforms import ImageTransformCfg, check_sizes, inference_geometry, with_overrides
from g2d.downstream.harness import Frozen, make_loader, progress_bar
from g2d.downstream.protocol import GeometryArgs
from g2d.errors import DataError
from g2d.fingerprint import digest, file_stamp
from g2d.metrics import auroc_per_class, auroc_undefined, nan_mean
from g2d.peers import global_input
from g2d.towers import ImageTower

__all__ = ["geometry_from_args", "POOLINGS", "extract_features", "cached_features", "model_key",
           "default_cache_dir", "label_tasks", "geometry_source", "evaluate_scores", "train_positives",
           "leave_out_classes_without_positives"]

log = logging.getLogger("g2d.downstream")

POOLINGS = ("gap", "embedding")


def geometry_from_args(args: GeometryArgs, tower: ImageTower | None = None) -> ImageTransformCfg:
    """The deterministic evaluation geometry: flags first, then the loaded model's pre-training
    geometry (:func:`g2d.data.transforms.inference_geometry`: its resize, crop and resize rule),
    else 256 / 224 with the shorter side resized. :func:`geometry_source` says which."""
    cfg = getattr(tower.model, "config", None) if tower is not None and tower.model is not None else None
    if cfg is None and tower is not None and tower.preprocess is not None:  # a peer's own pipeline
        return with_overrides(tower.preprocess, args.resize, args.image_size, args.square)
    size = args.image_size or (cfg.model.image_size if cfg is not None else 224)
    check_sizes(args.resize, args.image_size, size)
    resize = args.resize or (cfg.data.resize if cfg is not None else 256)
    keep = None if args.square is None else not args.square
    return inference_geometry(resize, size, cfg.data.augment if cfg is not None else "none", keep)


def geometry_source(args: GeometryArgs, tower: ImageTower | None = None) -> str:
    """For ``metrics.json``: ``"flags"`` (a user override, all or in part), ``"protocol"`` (the
    protocol's own geometry, e.g. fine-tuning's 256 x 256), ``"model"`` (the loaded model's
    pre-training geometry) or ``"default"`` (a baseline without a recorded geometry)."""
    defaults = args.geometry_defaults()
    if (args.resize, args.image_size, args.square) != defaults:
        return "flags"
    if any(v is not None for v in defaults):
        return "protocol"
    return "model" if tower is not None and (tower.model is not None or tower.preprocess is not None) else "default"


# --------------------------------------------------------------------------------------- features


@torch.no_grad()
def extract_features(tower: ImageTower, ds: Dataset, pooling: str, device: torch.device,
                     batch_size: int = 64, num_workers: int = 0, progress: bool = False
                     ) -> tuple[list[str], Tensor]:
    """Features of every readable image of ``ds`` from the frozen image tower.

    :param pooling: ``gap``: global average of the last ResNet stage (``[N, 2048]`` for ResNet-50,
        the input of MGCA's linear probe, before any projection); ``embedding``: the G2D model's
        attention-pooled, projected image embedding (``[N, d]``, not L2-normalised).
    :return: ids of the readable images and float32 features ``[N, D]`` (CPU), in ``ds`` order.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "embedding" and tower.model is None:
        raise ValueError("--pool embedding needs a G2D model (--model PATH); 'random'/'imagenet' have none")
    encoder = Frozen(tower.encoder).to(device)  # eval mode: BatchNorm statistics are not touched
    model = tower.model.to(device).eval() if pooling == "embedding" and tower.model is not None else None
    ids: list[str] = []
    feats: list[Tensor] = []
    loader = make_loader(ds, batch_size, num_workers)
    for batch in progress_bar(loader, len(loader), "features", not progress):
        if batch is None:
            continue
        x = batch["image"].to(device)
        if model is not None:
            f = model.image_forward(x, decode=False, normalize=False).embedding
        else:
            f = encoder(global_input(x, tower.global_input))[-1].mean(dim=(2, 3))
        ids.extend(batch["id"])
        feats.append(f.float().cpu())
    width = feats[0].shape[1] if feats else 0
    return ids, torch.cat(feats) if feats else torch.zeros(0, width)


def model_key(tower: ImageTower, seed: int) -> str:
    """Identity of the weights: the files' paths, sizes and mtimes (:func:`g2d.fingerprint.model_identity`)
    and a peer's own input size, or the baseline + arch (+ seed)."""
    if tower.name == "random":
        return f"random-{type(tower.encoder.layer4[0]).__name__}-{tower.encoder.channels[-1]}-seed{seed}"
    if tower.name == "imagenet":
        return f"imagenet-{tower.encoder.channels[-1]}-{sum(p.numel() for p in tower.encoder.parameters())}"
    return tower.identity


def _entry_keys(ds: Any) -> list[str]:
    """One cache key per image: its id plus the image file's absolute path, size and mtime, so a
    file replaced in place (or the same relative path elsewhere) is extracted anew."""
    records = getattr(ds, "records", None)
    if records is None:  # generated sets: the id names the sample
        return list(ds.ids)
    return [f"{r.id}|{json.dumps(file_stamp(r.image))}" for r in records]


def default_cache_dir() -> Path:
    return Path(os.environ.get("G2D_CACHE", Path.home() / ".cache" / "g2d")) / "features"


def cached_features(tower: ImageTower, ds: Any, *, key: dict[str, Any], cache_dir: str | Path | None,
                    pooling: str, device: torch.device, batch_size: int = 64, num_workers: int = 0,
                    progress: bool = False) -> tuple[list[str], Tensor]:
    """Features of ``ds`` (ids + ``[N, D]``), extracting only images not in the cache yet.

    The cache file ``cache_dir/features_<split>_<hash>.pt`` holds per-image features keyed by id and
    image file stamp (:func:`_entry_keys`); ``key`` (model weights' identity, data spec, split,
    geometry, pooling) names it. A 1 % probe extracts 1 % of the
    training images; a later 10 % probe adds the missing 9 %. ``cache_dir=None`` disables caching.
    Unreadable images are never cached (they are retried, and dropped again, next time).
    """
    if cache_dir is None:
        return extract_features(tower, ds, pooling, device, batch_size, num_workers, progress)
    ids = list(ds.ids)
    wanted = _entry_keys(ds)
    id_of = dict(zip(wanted, ids))
    path = Path(cache_dir) / f"features_{key.get('split', 'all')}_{digest(key)}.pt"
    cache: dict[str, Any] = {"ids": [], "features": torch.zeros(0, 0), "key": key}
    if path.is_file():
        cache = torch.load(path, map_location="cpu", weights_only=True)
    index = {i: k for k, i in enumerate(cache["ids"])}
    missing = [k for k, i in enumerate(wanted) if i not in index]
    if missing:
        log.info("extracting features of %d images (%d cached) into %s", len(missing), len(index), path)
        new_ids, new = extract_features(tower, Subset(ds, missing), pooling, device, batch_size,
                                        num_workers, progress)
        key_of = {ids[k]: wanted[k] for k in missing}
        new_ids = [key_of[i] for i in new_ids]
        if new_ids:
            old = cache["features"]
            feats = torch.cat([old, new]) if old.numel() else new
            cache = {"ids": [*cache["ids"], *new_ids], "features": feats, "key": key}
            atomic_write(path, lambda tmp: torch.save(cache, tmp))
            index = {i: k for k, i in enumerate(cache["ids"])}
    else:
        log.info("all %d features cached in %s", len(wanted), path)
    have = [i for i in wanted if i in index]
    rows = torch.tensor([index[i] for i in have], dtype=torch.long)
    feats = cache["features"][rows] if have else torch.zeros(0, cache["features"].shape[-1])
    return [id_of[i] for i in have], feats


# ---------------------------------------------------------------------------------------- metrics


def label_tasks(ds: Any, spec: str) -> list[str]:
    """The set's label names; a set without any (a ``csv:`` table read without ``labels``) is an
    error that says how to name them."""
    tasks = list(getattr(ds, "tasks", []))
    if not tasks:
        raise DataError(f"{spec}: the set has no label columns to classify; name them with "
                        "--labels a,b,c or csv:FILE?labels=a,b,c")
    return tasks


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, tasks: list[str], multiclass: bool
                    ) -> dict[str, Any]:
    """Metrics of class scores ``[N, K]`` (probabilities) against labels ``[N, K]`` (NaN = unknown).

    Multi-label: ``auc`` (macro over classes with both label values) and ``auc_per_class``.
    Multi-class: also ``acc`` (top-1, micro) and ``acc_per_class`` (recall of each class).
    """
    per = auroc_per_class(scores, labels, tasks)
    out: dict[str, Any] = {"auc": nan_mean(per), "auc_per_class": per,
                           "undefined": auroc_undefined(labels, tasks)}
    if multiclass:
        pred, true = scores.argmax(1), labels.argmax(1)
        out["acc"] = float((pred == true).mean()) if len(true) else math.nan
        out["acc_per_class"] = {t: float((pred[true == k] == k).mean()) if (true == k).any() else math.nan
                                for k, t in enumerate(tasks)}
    return out


def train_positives(labels: np.ndarray, tasks: list[str]) -> dict[str, int]:
    """Training images with a positive label, per class (``labels`` ``[N, K]``, NaN unknown)."""
    y = np.asarray(labels, dtype=np.float64).reshape(len(labels), len(tasks))
    return {t: int(np.sum(y[:, k] == 1)) for k, t in enumerate(tasks)}


def leave_out_classes_without_positives(test: dict[str, Any], positives: dict[str, int], what: str
                                        ) -> dict[str, Any]:
    """``test`` (:func:`evaluate_scores`) with ``auc`` the mean over the
    classes that had a positive training image only (a head that never saw a positive of a class
    scores it by chance, MGCA #39), saying so: ``train_positives`` per class, ``classes_without_train_positives``
    and ``auc_all_classes`` (the mean over every class with a defined AUROC); a warning names them.
    ``auc`` is NaN (null, with its reason) when no class had a positive."""
    missing = [t for t, n in positives.items() if n == 0]
    out = {**test, "train_positives": positives, "classes_without_train_positives": missing}
    if missing:
        log.warning("%s: no positive training image for %s: left out of the mean AUROC (per class still "
                    "reported)", what, ", ".join(missing))
        out["auc_all_classes"] = test["auc"]
        kept = {t: v for t, v in test["auc_per_class"].items() if t not in missing}
        out["auc"] = nan_mean(kept) if kept else math.nan
        if not kept:
            out["undefined"] = {**test.get("undefined", {}), "auc": "no class has a positive training image"}
    return out


def check_split(ds: Any, what: str) -> None:
    if len(ds) == 0:
        raise DataError(f"{what}: the split is empty")
