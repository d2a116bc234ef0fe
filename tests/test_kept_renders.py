"""Rendered synthetic samples kept in memory (issue 31: data.synthetic_cache_mb for pre-training, the
labelled synthetic splits): the same samples and the same training as rendering on every access,
within a stated memory bound."""

import copy

import pytest
import torch

import g2d
from g2d.config import ConfigError, apply_overrides, get_config
from g2d.data.labelled.specs import SyntheticLabelled
from g2d.data.synthetic import KeptRenders, SyntheticCXR, SyntheticCXRCfg
from g2d.downstream.harness import make_loader
from g2d.fingerprint import dataset_identity
from g2d.train.data import build_pretrain_dataset, dataset_texts
from g2d.train.loop import pretrain


class CountingRenders(SyntheticCXR):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.renders = 0

    def __getitem__(self, index):
        self.renders += 1
        return super().__getitem__(index)


def fresh_image(i):
    return SyntheticCXR(SyntheticCXRCfg(num_samples=6, image_size=32, seed=3))[i]["image"]


def test_kept_pairs_equal_new_renders_and_stop_rendering():
    synthetic = CountingRenders(SyntheticCXRCfg(num_samples=6, image_size=32, seed=3))
    kept = KeptRenders(synthetic, ("image", "text", "index"), budget_mb=1)
    texts = dataset_texts(kept)  # the report pass renders each sample once ...
    assert synthetic.renders == 6
    for i in range(6):  # ... and later epochs read the kept pairs
        item = kept[i]
        fresh = SyntheticCXR(SyntheticCXRCfg(num_samples=6, image_size=32, seed=3))[i]
        assert torch.equal(item["image"], fresh["image"]) and item["text"] == fresh["text"] == texts[i]
        assert item["index"] == i and set(item) == {"image", "text", "index"}
    assert synthetic.renders == 6
    item = kept[0]  # a caller's change to a returned sample does not reach the kept one
    item["extra"] = 1
    item["image"].mul_(0)
    assert "extra" not in kept[0] and torch.equal(kept[0]["image"], fresh_image(0))


def test_budget_bounds_what_is_kept(caplog):
    caplog.set_level("INFO")
    synthetic = CountingRenders(SyntheticCXRCfg(num_samples=6, image_size=512, seed=0))
    kept = KeptRenders(synthetic, ("image", "text"), budget_mb=2)  # 1 MiB an image at 512 px: two fit
    for _ in range(2):
        for i in range(6):
            kept[i]
    assert sorted(kept.kept) == [0, 1] and kept.used == 2 * 2**20
    assert "2 kept in 2 MiB" in caplog.text  # said once, when the budget is full
    assert caplog.text.count("kept in") == 1
    assert synthetic.renders == 6 + 4  # the four beyond the budget render again


def test_labelled_synthetic_split_is_the_same_kept_or_not():
    kept, rendered = SyntheticLabelled("train", n_train=8), SyntheticLabelled("train", n_train=8, keep_mb=0)
    assert isinstance(kept.source, KeptRenders) and isinstance(rendered.source, SyntheticCXR)
    assert (kept.labels() == rendered.labels()).all()
    for _ in range(2):  # the second pass reads kept samples
        for i in range(len(kept)):
            a, b = kept[i], rendered[i]
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
    assert len(kept.source.kept) == 8
    s = kept.source[0]  # what heatmaps' phrase units read
    assert {"text", "finding_masks", "findings", "image"} <= set(s)
    first = next(i for i in range(len(kept)) if kept[i]["prompt_findings"])  # lists are copies too
    kept[first]["prompt_findings"].clear()
    assert kept[first]["prompt_findings"] == rendered[first]["prompt_findings"] != []
    # the same data identity (stored results stay valid), another one for another split
    assert dataset_identity(kept) == dataset_identity(rendered) != dataset_identity(SyntheticLabelled("val", n_train=8))


def test_labelled_split_is_rendered_before_loader_workers_start():
    kept, rendered = SyntheticLabelled("val", n_train=8), SyntheticLabelled("val", n_train=8, keep_mb=0)
    loaders = [make_loader(ds, batch_size=4, num_workers=2) for ds in (kept, rendered)]
    assert len(kept.source.kept) == len(kept)  # in this process, so every epoch's new workers share them
    for a, b in zip(*loaders, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


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
