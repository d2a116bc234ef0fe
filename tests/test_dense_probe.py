"""The dense linear probe (``g2d eval dense-probe``): the fit on features whose separability is known,
determinism, every feature choice, and the per-image scores paired comparisons read."""

import json

import pytest
import torch
import torch.nn.functional as F

from g2d.downstream import dense_probe as dp
from g2d.downstream import protocol
from g2d.errors import ConfigError
from g2d.metrics import dice_per_image
from g2d.towers import load_image_tower


def _blocks(n: int, grid: int = 4, scale: int = 4, seed: int = 0) -> torch.Tensor:
    """Masks ``[n, grid*scale, grid*scale]`` made of whole feature-grid cells (about a third on)."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.rand(n, grid, grid, generator=g) < 0.35
    return cells.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def _dice(feats, masks, w, b, threshold=0.5):
    prob = torch.sigmoid(dp._logits(feats, w, b, tuple(masks.shape[-2:])))
    return float(dice_per_image(prob > threshold, masks).mean())


def test_features_that_separate_the_mask_linearly_reach_dice_near_one():
    torch.manual_seed(0)
    train, test = _blocks(24, seed=1), _blocks(12, seed=2)

    def feats(masks):
        cells = F.avg_pool2d(masks[:, None].float(), 4)  # the mask on the 4 x 4 grid: one channel separates it
        noise = torch.randn(len(masks), 7, 4, 4)
        return torch.cat([2 * cells - 1, noise], 1)

    w, b = dp.fit_logistic(feats(train), train, l2=1e-4, iterations=100)
    # bilinear upsampling blurs the cell borders a little; the cells themselves are all right
    assert _dice(feats(test), test, w, b) > 0.9
    assert w[0].abs() > 10 * w[1:].abs().max()


def test_random_features_stay_near_chance():
    torch.manual_seed(0)
    train, test = _blocks(24, seed=1), _blocks(12, seed=2)
    w, b = dp.fit_logistic(torch.randn(24, 16, 4, 4), train, l2=1e-2, iterations=100)
    got = max(_dice(torch.randn(12, 16, 4, 4), test, w, b, t) for t in dp.THRESHOLDS)
    # chance: predicting every pixel positive scores 2p / (1 + p) for a mask share p
    p = float(test.float().mean())
    assert got < 2 * p / (1 + p) + 0.08


def test_the_fit_is_deterministic():
    x, m = torch.randn(8, 5, 4, 4), _blocks(8)
    w1, b1 = dp.fit_logistic(x, m, 1e-3, 30)
    w2, b2 = dp.fit_logistic(x.clone(), m.clone(), 1e-3, 30)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)


def test_feature_choices_shapes_and_errors(tiny_model_dir):
    x = torch.rand(2, 1, 64, 64)
    random = load_image_tower("random", arch="resnet18")
    random.encoder.eval()
    assert dp.dense_features(random, x, "encoder").shape == (2, 512, 2, 2)
    # strides 4, 8, 16, 32 on the stride-8 grid: 64 + 128 + 256 + 512 channels
    assert dp.dense_features(random, x, "multiscale").shape == (2, 960, 8, 8)
    with pytest.raises(ConfigError, match="pre-trained decoder"):
        dp.dense_features(random, x, "decoder")
    with pytest.raises(ConfigError, match="--features"):
        dp.dense_features(random, x, "pixels")
    g2d = load_image_tower(str(tiny_model_dir))
    g2d.encoder.eval(), g2d.decoder.eval()
    out = dp.dense_features(g2d, x, "decoder")
    assert out.shape == (2, g2d.decoder.channels[-1], 64, 64)


def _args(out, **kw):
    values = dict(data="synthetic:48", model="random", arch="resnet18", out=str(out), fraction=0.25, image_size=64,
                  no_progress=True, num_workers=0, figures=1, iterations=20, l2="1e-3,1e-1")
    return protocol.make("dense-probe", **{**values, **kw})


@pytest.mark.slow
def test_run_writes_per_image_scores_and_is_reproducible(tmp_path, tiny_model_dir, one_thread):
    first = protocol.run("dense-probe", _args(tmp_path / "a"))
    again = protocol.run("dense-probe", _args(tmp_path / "b"))
    assert first["dice"] == again["dice"] and first["per_image"] == again["per_image"]
    stored = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert len(stored["per_image"]["dice"]) == stored["n_test_scored"] == 16
    assert stored["l2"] in (1e-3, 1e-1) and stored["threshold"] in dp.THRESHOLDS
    assert stored["feature_grid"] == [8, 8] and stored["mask_size"] == [64, 64]
    assert len(stored["selection"]) == 2 * len(dp.THRESHOLDS)
    assert (tmp_path / "a" / "figures" / "seg_000.png").is_file()
    # another label subset: as many training images, other ones, and the same test images
    other = protocol.run("dense-probe", _args(tmp_path / "c", subset=1))
    assert other["n_train"] == first["n_train"] and other["per_image"]["ids_digest"] == first["per_image"]["ids_digest"]
    assert other["args"]["data_id"] != first["args"]["data_id"]
    # decoder features of a G2D model
    dec = protocol.run("dense-probe", _args(tmp_path / "d", model=str(tiny_model_dir), features="decoder"))
    assert dec["feature_grid"] == [64, 64] and 0 <= dec["dice"] <= 1


def test_bad_l2_and_memory_limit_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--l2"):
        protocol.run("dense-probe", _args(tmp_path / "x", l2="small"))
    with pytest.raises(ConfigError, match="max-memory-gb"):
        protocol.run("dense-probe", _args(tmp_path / "y", max_memory_gb=1e-6))
