"""Rendered synthetic pairs kept in memory (issue 31, data.synthetic_cache_mb): the same pairs and
the same training as rendering on every access, within a stated memory bound."""

import copy

import pytest
import torch

import g2d
from g2d.config import ConfigError, apply_overrides, get_config
from g2d.data.synthetic import SyntheticCXR, SyntheticCXRCfg
from g2d.train.data import KeptRenders, build_pretrain_dataset, dataset_texts
from g2d.train.loop import pretrain


class CountingRenders(SyntheticCXR):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.renders = 0

    def __getitem__(self, index):
        self.renders += 1
        return super().__getitem__(index)


def test_kept_pairs_equal_new_renders_and_stop_rendering():
    synthetic = CountingRenders(SyntheticCXRCfg(num_samples=6, image_size=32, seed=3))
    kept = KeptRenders(synthetic, budget_mb=1)
    texts = dataset_texts(kept)  # the report pass renders each sample once ...
    assert synthetic.renders == 6
    for i in range(6):  # ... and later epochs read the kept pairs
        item = kept[i]
        fresh = SyntheticCXR(SyntheticCXRCfg(num_samples=6, image_size=32, seed=3))[i]
        assert torch.equal(item["image"], fresh["image"]) and item["text"] == fresh["text"] == texts[i]
        assert item["index"] == i and set(item) == {"image", "text", "index"}
    assert synthetic.renders == 6
    kept[0]["extra"] = 1  # a caller's change to the returned dict does not reach the kept pair
    assert "extra" not in kept[0]


def test_budget_bounds_what_is_kept():
    synthetic = CountingRenders(SyntheticCXRCfg(num_samples=6, image_size=512, seed=0))
    kept = KeptRenders(synthetic, budget_mb=2)  # 1 MiB an image at 512 px: two are kept
    assert kept.capacity == 2
    for _ in range(2):
        for i in range(6):
            kept[i]
    assert sorted(kept.kept) == [0, 1]
    assert synthetic.renders == 6 + 4  # the four beyond the budget render again


def test_config_default_zero_and_negative():
    cfg = get_config("tiny", {"model.text.model": "tiny", "data.synthetic_samples": 4})
    assert cfg.data.synthetic_cache_mb == 1024
    assert isinstance(build_pretrain_dataset(cfg), KeptRenders)
    apply_overrides(cfg, {"data.synthetic_cache_mb": 0})
    assert isinstance(build_pretrain_dataset(cfg), SyntheticCXR)
    apply_overrides(cfg, {"data.synthetic_cache_mb": -1})
    with pytest.raises(ConfigError, match="data.synthetic_cache_mb"):
        cfg.validate()


def test_training_is_the_same_with_and_without_kept_renders(tiny_cfg, tmp_path):
    over = {"data.synthetic_samples": 8, "train.batch_size": 4, "train.max_steps": 4, "train.epochs": 10,
            "train.deterministic": True}  # two epochs: the second reads kept pairs
    runs = {}
    for mb in (0, 64):
        cfg = copy.deepcopy(tiny_cfg)
        apply_overrides(cfg, {**over, "data.synthetic_cache_mb": mb})
        result = pretrain(cfg.validate(), tmp_path / str(mb), progress=False)
        runs[mb] = ([h["total"] for h in result.history], g2d.load_model(result.export_dir).state_dict())
    assert runs[0][0] == runs[64][0]
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[64][1][k], v, rtol=0, atol=1e-6, msg=k)
