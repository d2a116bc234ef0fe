"""The synthetic data set: sample i renders from (seed, i) alone; batching."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from g2d.data.synthetic.findings import SyntheticCXRCfg
from g2d.data.synthetic.rendering import render_sample

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- dataset


class SyntheticCXR(torch.utils.data.Dataset):
    """Deterministic synthetic image-report data set; see the module docstring.

    ``SyntheticCXR(cfg, **overrides)`` replaces fields of ``cfg`` (default
    :class:`SyntheticCXRCfg`) by ``overrides``, e.g. ``SyntheticCXR(num_samples=64, seed=1)``.
    Items are the dicts of :func:`render_sample` plus ``"index"``; batch them with
    :func:`collate_samples`.
    """

    def __init__(self, cfg: SyntheticCXRCfg | None = None, **overrides: Any) -> None:
        cfg = cfg if cfg is not None else SyntheticCXRCfg()
        self.cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg

    def __len__(self) -> int:
        return self.cfg.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        out = render_sample(np.random.default_rng([self.cfg.seed, int(index)]), self.cfg)
        out["index"] = int(index)
        return out


class KeptRenders(torch.utils.data.Dataset):
    """A :class:`SyntheticCXR` whose samples (the ``keys`` asked for) are kept in memory after their
    first render. Sample i renders from (seed, i) alone, so a kept sample is the sample a new render
    would give, and every access after the first skips rendering (2.6 ms a sample at 128 px on a
    2-core EPYC: 8 % of the demo's pre-training step, benchmarks/RESULTS.md). Samples are kept while
    their tensors fit in ``budget_mb`` MiB (logged once when it is full); later ones render on every
    access. Each access returns a deep copy, so a caller changing a sample in place (a tensor, the
    findings list) cannot change what the next epoch reads. The kept samples live in the process that
    rendered them: DataLoader workers forked after :meth:`fill` share them, workers that render keep
    their own. Used by pre-training (``data.synthetic_cache_mb``) and the labelled synthetic splits.
    """

    def __init__(self, dataset: SyntheticCXR, keys: Sequence[str], budget_mb: float):
        self.dataset, self.keys = dataset, tuple(keys)
        self.budget, self.used, self.full = int(budget_mb * 2**20), 0, False
        self.kept: dict[int, dict[str, Any]] = {}

    @property
    def cfg(self) -> SyntheticCXRCfg:
        """The wrapped set's configuration (read by :func:`g2d.fingerprint.dataset_identity`)."""
        return self.dataset.cfg

    def __len__(self) -> int:
        return len(self.dataset)

    def _item(self, index: int) -> dict[str, Any]:
        """Sample ``index``'s kept dict (not a copy: callers inside this class only read it)."""
        item = self.kept.get(index)
        if item is None:
            sample = self.dataset[index]
            item = {k: sample[k] for k in self.keys}
            size = sum(v.nbytes for v in item.values() if isinstance(v, torch.Tensor))
            if self.used + size <= self.budget:
                self.kept[index], self.used = item, self.used + size
            elif not self.full:
                self.full = True
                log.info("synthetic samples: %d kept in %.0f MiB, the budget; the other %d render on every "
                         "access", len(self.kept), self.budget / 2**20, len(self) - len(self.kept))
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        return copy.deepcopy(self._item(index))

    def fill(self, indices: Iterable[int]) -> None:
        """Render and keep these samples now (until the budget is full)."""
        for i in indices:
            if self.full:
                break
            self._item(i)

    def text(self, index: int) -> str:
        """The report of sample ``index`` (rendered once: the report needs the whole sample)."""
        return self._item(index)["text"]


_LIST_KEYS = ("text", "findings", "boxes", "box_labels", "finding_masks")


def collate_samples(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of :class:`SyntheticCXR`.

    Stacks tensors (``image``/``mask``/``body``/``lungs``/``heart`` -> ``[B, 1, S, S]``,
    ``labels`` -> ``[B, len(FINDINGS)]``, ``index`` -> ``[B]`` int64) and keeps per-sample
    lists for ``text``, ``findings``, ``boxes`` (``[N_i, 4]``), ``box_labels`` (``[N_i]``)
    and ``finding_masks`` (``[N_i, S, S]``).
    """
    out: dict[str, Any] = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        if key in _LIST_KEYS:
            out[key] = vals
        elif key == "index":
            out[key] = torch.tensor(vals, dtype=torch.int64)
        elif isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        else:
            out[key] = vals
    return out
