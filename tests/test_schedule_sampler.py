import math

import pytest

from g2d.config import TrainCfg
from g2d.train.data import EpochSampler
from g2d.train.scheduler import lr_factor


def test_warmup_then_cosine_to_min_lr():
    cfg = TrainCfg(lr=1e-3, min_lr=1e-5, warmup_steps=10, scheduler="warmup_cosine")
    assert [lr_factor(s, 110, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, 110, cfg) == pytest.approx(1.0)
    floor = 1e-5 / 1e-3
    assert lr_factor(60, 110, cfg) == pytest.approx(floor + (1 - floor) * 0.5)  # half-way
    assert lr_factor(110, 110, cfg) == pytest.approx(floor)
    factors = [lr_factor(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_release_cosine_restarts():
    cfg = TrainCfg(lr=2e-5, min_lr=1e-8, scheduler="cosine_restarts", restart_steps=200, warmup_steps=0)
    assert lr_factor(0, 10_000, cfg) == pytest.approx(1.0)
    assert lr_factor(200, 10_000, cfg) == pytest.approx(1.0)  # restart
    floor = 1e-8 / 2e-5
    assert lr_factor(100, 10_000, cfg) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 2)))


def test_sampler_shards_are_disjoint_and_reshuffled_per_epoch():
    ranks = [EpochSampler(10, r, 3, seed=0) for r in range(3)]
    for s in ranks:
        s.set_epoch(0)
    shards = [[i for _, i in s] for s in ranks]
    assert all(len(sh) == 4 for sh in shards)  # padded to equal length
    assert set().union(*map(set, shards)) == set(range(10))
    assert sum(len(set(a) & set(b)) for a in shards for b in shards if a is not b) <= 2 * 2  # only padding repeats
    ranks[0].set_epoch(1)
    assert [i for _, i in ranks[0]] != shards[0] and all(e == 1 for e, _ in ranks[0])


def test_sampler_resumes_mid_epoch():
    full = EpochSampler(20, 0, 1, seed=3)
    full.set_epoch(2)
    part = EpochSampler(20, 0, 1, seed=3)
    part.set_epoch(2, start=8)
    assert list(part) == list(full)[8:] and len(part) == 12
