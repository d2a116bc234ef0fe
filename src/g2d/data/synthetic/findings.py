"""The synthetic findings: names, locations, report terms, frequencies, the generator's config, and
which findings a sample gets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FINDINGS: tuple[str, ...] = ("opacity", "nodule", "effusion", "pneumothorax", "cardiomegaly")

_ZONES = tuple(f"{side} {level} zone" for side in ("right", "left") for level in ("upper", "mid", "lower"))
LOCATIONS: tuple[str, ...] = (*_ZONES, "right apex", "left apex", "right base", "left base", "heart")

# Which locations each finding may occur at.
FINDING_LOCATIONS: dict[str, tuple[str, ...]] = {
    "opacity": _ZONES,
    "nodule": _ZONES,
    "effusion": ("right base", "left base"),
    "pneumothorax": ("right apex", "left apex"),
    "cardiomegaly": ("heart",),
}

# Lower-case substrings by which a report sentence refers to a finding (positively or
# negatively).  Every report sentence that contains one of them and also a NEGATION_CUE is a
# negative statement; positive statements never contain a negation cue.
FINDING_TERMS: dict[str, tuple[str, ...]] = {
    "opacity": ("opacity", "consolidation"),
    "nodule": ("nodule", "nodular"),
    "effusion": ("effusion",),
    "pneumothorax": ("pneumothorax",),
    "cardiomegaly": ("cardiomegaly", "enlarged"),
}
NEGATION_CUES: tuple[str, ...] = ("no ", "not ", "normal", "without")

# Relative frequency of each finding type among abnormal samples.
_FINDING_WEIGHTS = np.array([0.30, 0.20, 0.20, 0.15, 0.15])


@dataclass(frozen=True)
class SyntheticCXRCfg:
    """Configuration of :class:`SyntheticCXR`.

    Attributes:
        num_samples: data set length.
        image_size: side ``S`` of the square images, rendered directly at this size.
        seed: data set seed; sample ``i`` depends only on ``(seed, i)``.
        normal_fraction: probability that a sample has no finding.
        max_findings: maximum number of (distinct-type) findings per abnormal sample.
    """

    num_samples: int = 512
    image_size: int = 224
    seed: int = 0
    normal_fraction: float = 0.3
    max_findings: int = 2

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ValueError("num_samples must be >= 0")
        if self.image_size < 32:
            raise ValueError("image_size must be >= 32")
        if not 0.0 <= self.normal_fraction <= 1.0:
            raise ValueError("normal_fraction must be in [0, 1]")
        if not 0 <= self.max_findings <= len(FINDINGS):
            raise ValueError(f"max_findings must be in [0, {len(FINDINGS)}]")


# --------------------------------------------------------------------------- findings


def choose_findings(rng: np.random.Generator, cfg: SyntheticCXRCfg) -> list[tuple[str, str]]:
    if cfg.max_findings == 0 or rng.random() < cfg.normal_fraction:
        return []
    n = 1 if cfg.max_findings == 1 or rng.random() < 0.6 else int(rng.integers(2, cfg.max_findings + 1))
    # Weighted sampling of n distinct types (rng.choice with p= is needlessly slow here).
    weights = _FINDING_WEIGHTS.copy()
    types = []
    for _ in range(n):
        t = int(np.searchsorted(np.cumsum(weights), rng.random() * weights.sum(), side="right"))
        t = min(t, len(FINDINGS) - 1)
        types.append(t)
        weights[t] = 0.0
    out = []
    for t in sorted(types):
        f = FINDINGS[t]
        locs = FINDING_LOCATIONS[f]
        out.append((f, locs[int(rng.integers(len(locs)))]))
    return out


def validate_findings(findings: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for f, loc in findings:
        if f not in FINDINGS:
            raise ValueError(f"unknown finding {f!r}; expected one of {FINDINGS}")
        if loc not in FINDING_LOCATIONS[f]:
            raise ValueError(f"location {loc!r} invalid for {f!r}; expected one of {FINDING_LOCATIONS[f]}")
        out.append((str(f), str(loc)))
    if len({f for f, _ in out}) != len(out):
        raise ValueError("findings must have distinct types")
    return out
