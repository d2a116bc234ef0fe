"""Learning-rate schedules as multipliers of the base rate, stepped once per optimizer step."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from g2d.config import TrainCfg


def lr_factor(step: float, total_steps: int, cfg: TrainCfg) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based; fractional after a resume with
    another world size) of a run planned as ``total_steps`` steps."""
    floor = cfg.min_lr / cfg.lr
    if cfg.scheduler == "cosine_restarts":  # release: CosineAnnealingWarmRestarts(T_0, eta_min)
        t = (step % cfg.restart_steps) / cfg.restart_steps
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer: Optimizer, total_steps: int, cfg: TrainCfg, scale: float = 1.0) -> LambdaLR:
    """The schedule of a run planned as ``total_steps`` steps of some global batch. ``scale`` = this
    run's global batch over the planned one (1 unless the run was resumed with another world size):
    this run's step ``s`` is ``s * scale`` steps of the plan, so the learning rate follows the samples
    consumed, not the step count (field case 27, gpt-neox #1158)."""
    return LambdaLR(optimizer, lambda step: lr_factor(step * scale, total_steps, cfg))
