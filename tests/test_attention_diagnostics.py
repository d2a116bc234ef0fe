"""Attention diagnostics (g2d.attention_diagnostics) on hand-made maps with known answers, the
`g2d eval attention` command, and the trainer's probe."""

from __future__ import annotations

import json
import math

import pytest
import torch

from g2d.attention_diagnostics import (
    collapse_r,
    diagnose_attention,
    iou_ratio_interval,
    oracle_maps,
    pointing_hits,
    synthetic_probe,
)
from g2d.pseudo_mask import PseudoMaskCfg

PLAIN = PseudoMaskCfg(body_mask=False, smoothing=False)  # no image dependence: exact answers


def _findings(n: int = 12, side: int = 8, scale: int = 4) -> tuple[torch.Tensor, torch.Tensor, list]:
    """n images of side*scale px, each with one finding: a 3 x 3 cell block centred on its cell."""
    cells = [(1 + i * 3 % (side - 2), 1 + i * 5 % (side - 2)) for i in range(n)]
    size = side * scale
    targets = torch.zeros(n, size, size, dtype=torch.bool)
    for k, (r, c) in enumerate(cells):
        targets[k, (r - 1) * scale:(r + 2) * scale, (c - 1) * scale:(c + 2) * scale] = True
    return torch.full((n, 1, size, size), 0.5), targets, cells


def _peaks(cells, side: int = 8, heads: int = 2, shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Softmax-like maps: a Gaussian bump (sigma 0.7 cells) at each image's cell, plus a shift."""
    yy, xx = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    att = torch.stack([torch.exp(-(((yy - (r + shift[0]) % side) ** 2 + (xx - (c + shift[1]) % side) ** 2)
                                   / (2 * 0.7 ** 2))) for r, c in cells])
    att = att[:, None].expand(-1, heads, -1, -1) + 1e-3
    return att / att.sum((-1, -2), keepdim=True)


def test_collapse_r_known_values():
    x = torch.tensor([1.0, -1.0, 0.0, 0.0])
    y = torch.tensor([0.0, 0.0, 1.0, -1.0])
    assert collapse_r(torch.stack([x, x])).tolist() == pytest.approx([1.0, 1.0])
    # uncorrelated maps of equal variance: r with their mean = 1 / sqrt(2)
    assert collapse_r(torch.stack([x, y])).tolist() == pytest.approx([2 ** -0.5] * 2)
    assert math.isnan(collapse_r(torch.ones(3, 2, 2))[0])  # constant maps have no correlation


def test_pointing_dilation():
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 2] = 1.0                          # cell (1, 2) of a 16 px image: centre pixel (6, 10)
    target = torch.zeros(1, 16, 16, dtype=torch.bool)
    target[0, 6, 10] = True
    assert pointing_hits(maps, target, dilation=0).item() == 1.0
    target[0, 6, 10], target[0, 8, 10] = False, True      # two pixels below the centre
    assert pointing_hits(maps, target, dilation=0).item() == 0.0
    assert pointing_hits(maps, target, dilation=1 / 16).item() == 0.0
    assert pointing_hits(maps, target, dilation=2 / 16).item() == 1.0


def test_following_maps_beat_the_prior():
    images, targets, cells = _findings()
    d = diagnose_attention(_peaks(cells), images, targets, PLAIN)
    assert d.mean.pointing == 1.0
    assert d.mean.pointing_prior < 0.5
    assert d.mean.collapse_r < 0.5
    assert d.mean.iou > 2 * d.mean.iou_prior
    assert d.n_images == 12 and d.map_hw == (8, 8) and len(d.heads) == 2
    assert d.heads[0].pointing == 1.0 and d.heads[1].iou == pytest.approx(d.mean.iou)


def test_collapsed_maps_equal_their_prior():
    images, targets, cells = _findings()
    one = _peaks(cells[:1])
    d = diagnose_attention(one.expand(len(cells), -1, -1, -1).contiguous(), images, targets, PLAIN)
    assert d.mean.collapse_r == pytest.approx(1.0)
    assert d.mean.same_argmax == 1.0
    assert d.mean.pointing == d.mean.pointing_prior
    # equal up to percentile ties that the mean's float rounding breaks differently
    assert d.mean.iou == pytest.approx(d.mean.iou_prior, abs=0.01)
    assert d.mean.dice == pytest.approx(d.mean.dice_prior, abs=0.01)


def test_shifted_maps_miss():
    images, targets, cells = _findings()
    d = diagnose_attention(_peaks(cells, shift=(4, 4)), images, targets, PLAIN)
    assert d.mean.pointing == 0.0
    assert d.mean.iou == 0.0
    assert d.mean.collapse_r < 0.5          # not collapsed, yet wrong: collapse alone proves nothing


def test_iou_ratio_interval_holds_the_ratio_and_narrows_with_more_images():
    gen = torch.Generator().manual_seed(0)

    def draw(n):  # per-image IoUs whose true mean ratio is 2: 0.2 / 0.1
        prior = 0.1 + 0.05 * torch.rand(n, generator=gen) - 0.025
        return 2 * prior + 0.1 * torch.rand(n, generator=gen) - 0.05, prior

    few, many = iou_ratio_interval(*draw(20)), iou_ratio_interval(*draw(2000))
    for ratio, low, high in (few, many):
        assert low < ratio < high
        assert low < 2.0 < high
    assert many[2] - many[1] < (few[2] - few[1]) / 3
    # the ratio of means (not the mean of ratios), and no interval without a prior to divide by
    assert iou_ratio_interval(torch.tensor([0.3, 0.1]), torch.tensor([0.1, 0.1]))[0] == pytest.approx(2.0)
    assert all(math.isnan(v) for v in iou_ratio_interval(torch.rand(5), torch.zeros(5)))


def test_interval_is_reported_only_when_asked():
    images, targets, cells = _findings()
    assert "iou_ratio" not in diagnose_attention(_peaks(cells), images, targets, PLAIN).as_dict()
    # half followed, half shifted, so the per-image IoUs vary and the interval has a width
    att = torch.cat([_peaks(cells[:6]), _peaks(cells[6:], shift=(4, 4))])
    d = diagnose_attention(att, images, targets, PLAIN, interval=0.9).as_dict()
    assert d["iou_ratio"] == pytest.approx(d["iou"] / d["iou_prior"], rel=1e-5)
    assert d["iou_ratio_low"] < d["iou_ratio"] < d["iou_ratio_high"] and d["interval"] == 0.9


def test_oracle_maps_point_at_each_finding_and_depend_on_the_targets_only():
    images, targets, cells = _findings()
    best = oracle_maps(targets, (8, 8))
    assert best.shape == (12, 1, 8, 8)
    assert best.sum((-1, -2)).flatten().tolist() == pytest.approx([1.0] * 12)
    assert pointing_hits(best[:, 0], targets).tolist() == [1.0] * 12
    assert [divmod(int(i), 8) for i in best.flatten(1).argmax(1)] == cells
    d = diagnose_attention(_peaks(cells), images, targets, PLAIN, oracle=True).extra
    # the top 15 % of 64 cells is about the 3 x 3 block around the centroid: the finding itself
    assert d["oracle_iou"] > 0.8
    # it depends on the targets only, not on the model's maps
    shifted = diagnose_attention(_peaks(cells, shift=(4, 4)), images, targets, PLAIN, oracle=True).extra
    assert shifted["oracle_iou"] == d["oracle_iou"]
    assert "oracle_iou" not in diagnose_attention(_peaks(cells), images, targets, PLAIN).extra
    with pytest.raises(ValueError, match="empty"):
        oracle_maps(torch.zeros(1, 8, 8, dtype=torch.bool), (4, 4))


def test_per_group_scores():
    """Half the images followed, half shifted: each group gets its own hit rate, the set's prior."""
    images, targets, cells = _findings()
    att = torch.cat([_peaks(cells[:6]), _peaks(cells[6:], shift=(4, 4))])
    groups = ["nodule"] * 6 + ["effusion"] * 6
    d = diagnose_attention(att, images, targets, PLAIN, groups)
    assert d.mean.pointing == 0.5
    (n_nod, nod), (n_eff, eff) = d.per_group["nodule"], d.per_group["effusion"]
    assert (n_nod, n_eff) == (6, 6) and nod.pointing == 1.0 and eff.pointing == 0.0
    assert nod.iou > 0 and eff.iou == 0.0
    # the prior is the whole set's mean map, scored on the group's images
    assert nod.pointing_prior + eff.pointing_prior == pytest.approx(2 * d.mean.pointing_prior)
    flat = d.as_dict()
    assert flat["nodule/pointing"] == 1.0 and flat["effusion/n_images"] == 6
    with pytest.raises(ValueError, match="group names"):
        diagnose_attention(att, images, targets, PLAIN, groups[:3])


def test_uniform_and_one_hot_saturation():
    images, targets, cells = _findings()
    d = diagnose_attention(torch.full((12, 1, 8, 8), 1 / 64), images, targets, PLAIN)
    assert d.mean.peak_mass == pytest.approx(1 / 64)
    hard = torch.zeros(12, 1, 8, 8)
    hard[:, 0, 3, 3] = 1.0
    assert diagnose_attention(hard, images, targets, PLAIN).mean.peak_mass == 1.0


def test_shapes_are_checked():
    images, targets, cells = _findings()
    with pytest.raises(ValueError, match="matching sizes"):
        diagnose_attention(_peaks(cells)[:5], images, targets)
    with pytest.raises(ValueError, match="expected attention"):
        diagnose_attention(_peaks(cells)[:, 0], images, targets)


def test_default_pseudo_masks_on_synthetic_images():
    """With the paper's body mask and smoothing, maps that follow the findings still beat the prior."""
    images, targets, _ = synthetic_probe(16, 64, seed=5)
    cells = [tuple(int(v) // 8 for v in torch.nonzero(t).float().mean(0)) for t in targets]
    d = diagnose_attention(_peaks(cells), images, targets)
    assert d.mean.pointing > d.mean.pointing_prior + 0.3
    assert d.mean.iou > d.mean.iou_prior


def test_eval_attention_command(tmp_path, tiny_cfg):
    from g2d.cli import main
    from g2d.train.loop import pretrain

    tiny_cfg.train.max_steps = 2
    tiny_cfg.train.probe_every = 1
    tiny_cfg.train.probe_images = 8
    result = pretrain(tiny_cfg, tmp_path / "run", progress=False, device="cpu")
    assert [p["step"] for p in result.probes] == [1, 2]
    assert set(result.probes[0]) >= {"collapse_r", "pointing", "pointing_prior", "iou", "iou_prior"}
    out = tmp_path / "eval"
    assert main(["eval", "attention", "--data", "synthetic:32", "--model", str(tmp_path / "run" / "export"),
                 "--out", str(out), "--num-workers", "0", "--no-progress", "--figures", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] > 0 and metrics["skipped"]
    assert 0.0 <= metrics["pointing"] <= 1.0 and "head0/pointing" in metrics
    assert metrics["interval"] == 0.95 and {"iou_ratio", "iou_ratio_low", "iou_ratio_high"} <= set(metrics)
    assert sum(v for k, v in metrics.items() if k.endswith("/n_images")) == metrics["n_images"]
    assert (out / "figures" / "attention.png").is_file()
