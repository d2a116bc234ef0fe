"""One way to seed a run (pre-training, every downstream protocol, the demo)."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything", "seed_worker"]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's ``random``, NumPy and torch (every device). ``deterministic``: cuDNN picks
    deterministic kernels and no benchmarked ones (the downstream protocols, whose results are
    compared across models; pre-training has ``train.deterministic`` for the full switch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: NumPy in each worker from torch's per-worker seed."""
    np.random.seed(torch.initial_seed() % 2**32)
