"""The training harness every downstream protocol uses: seeded loaders, progress, frozen modules
(:class:`Frozen`), and one epoch loop (:class:`Fit`: early stopping on a validation score,
best-state tracking, an atomic per-epoch checkpoint and resume) for segmentation, detection,
fine-tuning and the linear probe."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from g2d.checkpoint import load_checkpoint, save_checkpoint
from g2d.data.labelled import collate_labelled
from g2d.seeding import seed_worker

__all__ = ["make_loader", "shuffled_loader", "batches", "progress_bar", "Frozen", "Fit", "finished_metrics",
           "INPUT_KEYS"]

log = logging.getLogger("g2d.downstream")


def make_loader(ds: Dataset, batch_size: int, num_workers: int, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A loader with :func:`collate_labelled` (drops unreadable images) and a seeded order."""
    if num_workers and hasattr(ds, "render_now"):  # synthetic splits: kept in this process, not the workers
        ds.render_now()
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_labelled, generator=gen, worker_init_fn=seed_worker,
                      drop_last=drop_last, persistent_workers=False)


def progress_bar(it: Any, total: int | None, desc: str, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


def shuffled_loader(ds: Any, batch_size: int, num_workers: int, seed: int) -> Callable[[int], Iterable]:
    """Epoch -> training loader; epoch ``e``'s shuffle order depends only on ``(seed, e)``, so a resumed
    run sees the same batches as an uninterrupted one."""
    return lambda epoch: make_loader(ds, batch_size, num_workers, shuffle=True, seed=seed * 100_003 + epoch)


def batches(loader: Iterable, progress: bool, desc: str) -> Iterable[dict[str, Any]]:
    """Non-empty batches of ``loader`` (``collate_labelled`` gives ``None`` when all were unreadable)."""
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for b in loader:
        if b is not None:
            yield b


class Frozen(nn.Module):
    """A module that stays frozen: no gradients, and eval mode (BatchNorm statistics included)
    whatever ``.train()`` is called on a parent. Peers set ``requires_grad=False`` only, so their
    "frozen" encoders still update BatchNorm running statistics; ``update_bn=True`` reproduces that.
    """

    def __init__(self, module: nn.Module, update_bn: bool = False) -> None:
        super().__init__()
        self.module, self.update_bn = module, update_bn
        for p in module.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Frozen:
        super().train(mode)
        self.module.train(mode and self.update_bn)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)


@dataclass
class Fit:
    """Epoch loop with early stopping, best-state tracking and an atomic per-epoch ``ckpt.pt``.

    ``signature`` holds the arguments a checkpoint must match to be resumed (not ``--epochs`` or
    ``--patience``, so a finished or stopped run can be continued with more epochs). The shuffle
    order of epoch ``e`` is seeded by ``(seed, e)``, so a resumed run equals an uninterrupted one.
    Only state that training can change is saved (a frozen encoder is rebuilt from ``--model``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    out: Path | None  # None: no checkpoint (in-memory fits such as the linear probe's)
    signature: dict[str, Any]
    epochs: int
    patience: int
    progress: bool = True

    def __post_init__(self) -> None:
        self.epoch = 0
        self.best_score = -math.inf
        self.best_loss = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped_early = False
        self.history: list[dict[str, float]] = []
        self.best_state = self._mutable_state()
        self.resumed_from = 0

    @property
    def ckpt_path(self) -> Path:
        return Path(self.out or ".") / "ckpt.pt"

    def _frozen_prefixes(self) -> tuple[str, ...]:
        return ("encoder.",) if not getattr(self.model, "encoder_changes", True) else ()

    def _mutable_state(self) -> dict[str, Tensor]:
        skip = self._frozen_prefixes()
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                if not (skip and k.startswith(skip))}

    def _load_mutable(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        skip = self._frozen_prefixes()
        bad = [k for k in missing if not (skip and k.startswith(skip))] + list(unexpected)
        if bad:
            raise ValueError(f"{self.ckpt_path} does not match the model: {bad[:5]}")

    def resume(self) -> bool:
        """Load ``ckpt.pt`` when present; it must have been written with the same signature."""
        if self.out is None or not self.ckpt_path.is_file():
            return False
        ck = load_checkpoint(self.ckpt_path)
        if ck.get("signature") != self.signature:
            diff = sorted(k for k in set(ck.get("signature", {})) | set(self.signature)
                          if ck.get("signature", {}).get(k) != self.signature.get(k))
            if set(diff) <= set(INPUT_KEYS):  # same arguments, other images or weights: start over
                log.warning("%s was written for other inputs (%s changed since), other images or weights: "
                            "starting anew", self.ckpt_path, ", ".join(diff))
                return False
            raise ValueError(f"{self.ckpt_path} was written with different arguments ({', '.join(diff)}), a run "
                             f"with other settings; use another --out or delete it")
        self._load_mutable(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.best_state = ck["best_state"]
        if "rng" in ck:  # random augmentation continues where it stopped
            torch.set_rng_state(ck["rng"])
        for k in ("epoch", "best_score", "best_loss", "best_epoch", "bad_epochs", "stopped_early", "history"):
            setattr(self, k, ck[k])
        self.resumed_from = self.epoch
        log.info("resumed %s at epoch %d", self.ckpt_path, self.epoch)
        return True

    def _save(self) -> None:
        if self.out is None:
            return
        save_checkpoint({"signature": self.signature, "model": self._mutable_state(),
                         "optimizer": self.optimizer.state_dict(), "best_state": self.best_state,
                         "epoch": self.epoch, "best_score": self.best_score, "best_loss": self.best_loss,
                         "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                         "stopped_early": self.stopped_early, "history": self.history,
                         "rng": torch.get_rng_state()}, self.ckpt_path)

    def fit(self, train_loader: Callable[[int], Iterable], batch_loss: Callable[[dict[str, Any]], Tensor],
            validate: Callable[[], tuple[float, float]], desc: str) -> None:
        """``train_loader(epoch)``: that epoch's loader; ``batch_loss(batch)``: the batch's mean loss (one
        optimizer step per batch); ``validate() -> (score, loss)`` (higher score is better; equal scores
        are broken by the lower validation loss)."""
        while self.epoch < self.epochs and not self.stopped_early:
            self.model.train()
            train_loss = self._train_epoch(train_loader(self.epoch), batch_loss, f"{desc} epoch {self.epoch + 1}")
            self.model.eval()
            score, val_loss = validate()
            self.epoch += 1
            self.history.append({"epoch": self.epoch, "train_loss": train_loss, "val_loss": val_loss,
                                 "val_score": score})
            better = (self.best_epoch == 0 or score > self.best_score
                      or (score == self.best_score and val_loss < self.best_loss))
            if better:
                self.best_score, self.best_loss, self.best_epoch = score, val_loss, self.epoch
                self.best_state, self.bad_epochs = self._mutable_state(), 0
            else:
                self.bad_epochs += 1
                self.stopped_early = 0 < self.patience <= self.bad_epochs
            log.info("epoch %d: train loss %.4f, val loss %.4f, val score %.4f%s", self.epoch, train_loss,
                     val_loss, score, " (best)" if better else "")
            self._save()

    def _train_epoch(self, loader: Iterable, batch_loss: Callable[[dict[str, Any]], Tensor], desc: str) -> float:
        """Mean per-image training loss of one pass."""
        total, n = 0.0, 0
        for b in batches(loader, self.progress, desc):
            loss = batch_loss(b)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total, n = total + float(loss.detach()) * len(b["image"]), n + len(b["image"])
        return total / max(n, 1)

    def load_best(self) -> None:
        self._load_mutable(self.best_state)
        self.model.eval()


def finished_metrics(out: Path, signature: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a finished run with these exact arguments, if ``out/metrics.json`` holds one."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("args") == signature else None


#: Signature keys that identify the inputs' content rather than the arguments (g2d.fingerprint).
INPUT_KEYS = ("data_id", "model_id")
