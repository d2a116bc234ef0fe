import json

import pytest

from g2d.config import (
    G2DConfig,
    config_from_dict,
    get_config,
    list_presets,
    load_config_file,
    parse_overrides,
    save_config,
)
from g2d.errors import ConfigError


def test_paper_defaults_pin_the_paper():
    cfg = get_config("paper")
    m = cfg.model
    assert (m.image.arch, m.image.weights, m.image.input_norm) == ("resnet50", "imagenet", "unit")
    assert (m.pool.heads, m.pool.width, m.pool.pool_on) == (3, 768, "features")
    assert m.embed_dim == 128 and m.image_size == 224 and cfg.data.resize == 256
    assert m.text.model == "emilyalsentzer/Bio_ClinicalBERT" and m.text.freeze_layers == 9
    pm = m.pseudo_mask
    assert (pm.aggregate_heads, pm.upsample, pm.body_mask, pm.threshold, pm.percentile, pm.strict,
            pm.smoothing) == (True, "bilinear", True, "percentile", 85.0, False, True)
    assert cfg.loss.temperature == 0.07 and not cfg.loss.learnable_temperature
    assert (cfg.loss.negatives, cfg.loss.dice_weight, cfg.loss.bce_weight, cfg.loss.dice_input) == \
        ("global", 0.5, 0.5, "probs")
    t = cfg.train
    assert (t.batch_size, t.epochs, t.lr, t.weight_decay, t.scheduler) == (128, 50, 2e-4, 1e-8, "warmup_cosine")


def test_release_preset_pins_the_release():
    cfg = get_config("release")
    m = cfg.model
    assert (m.pool.heads, m.pool.width, m.pool.pool_on, m.pool.keys_include_query) == (4, 128, "projected", True)
    assert (m.pseudo_mask.upsample, m.pseudo_mask.body_mask, m.pseudo_mask.smoothing, m.pseudo_mask.strict) \
        == ("nearest", False, False, True)
    assert (cfg.loss.negatives, cfg.loss.contrastive_reduction, cfg.loss.contrastive_only_steps) == \
        ("local", "sum", 200)
    assert (cfg.train.lr, cfg.train.scheduler, cfg.train.batch_size) == (2e-5, "cosine_restarts", 64)
    assert not m.text.freeze_embeddings and m.image.input_norm == "imagenet"


def test_presets_listed_and_valid():
    assert {"paper", "release", "tiny"} <= set(list_presets())
    for name in list_presets():
        get_config(name)


def test_overrides_are_typed():
    cfg = get_config("paper", ["model.pool.heads=4", "train.lr=1e-3", "model.decoder.channels=[8,8,8,8,8]",
                               "train.max_steps=5", "train.clip_grad=null"])
    assert cfg.model.pool.heads == 4 and cfg.train.lr == 1e-3 and cfg.train.max_steps == 5
    assert cfg.model.decoder.channels == (8, 8, 8, 8, 8) and cfg.train.clip_grad is None


@pytest.mark.parametrize("override, field", [
    (["model.pool.headz=3"], "headz"),
    (["model.pool.heads=5"], "model.pool.heads"),
    (["model.pool.heads=4", "model.pool.width=766"], "model.pool.width"),
    (["model.pseudo_mask.percentile=100"], "percentile"),
    (["model.pseudo_mask.percentile=0"], "percentile"),
    (["train.lr=abc"], "train.lr"),
    (["model.decoder.mode=magic"], "model.decoder.mode"),
    (["data.spec=csv:/does/not/exist.csv"], "data.spec"),
    (["train.batch_size=1"], "train.batch_size"),
    (["loss.attention_concentration=-1"], "loss.attention_concentration"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        get_config("paper", override)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_config("huge")


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["model.pool.heads"])


def test_round_trip_and_files(tmp_path):
    cfg = get_config("release", ["model.embed_dim=256", "model.pool.width=256"])
    back = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    save_config(cfg, tmp_path / "c.yaml")
    assert config_from_dict(__import__("yaml").safe_load((tmp_path / "c.yaml").read_text())) == cfg
    (tmp_path / "nested.yaml").write_text("model:\n  pool:\n    heads: 2\ntrain:\n  lr: 0.001\n")
    assert load_config_file(tmp_path / "nested.yaml") == {"model.pool.heads": 2, "train.lr": 0.001}
    (tmp_path / "x.json").write_text('{"loss.negatives": "local"}')
    assert get_config("paper", load_config_file(tmp_path / "x.json")).loss.negatives == "local"


def test_yaml_tags_are_not_executed(tmp_path):
    (tmp_path / "evil.yaml").write_text("train: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config_file(tmp_path / "evil.yaml")


def test_default_config_object_is_paper():
    assert G2DConfig() == get_config("paper")


def test_pretraining_specs_use_the_one_grammar(tmp_path):
    """csv: options after '?' (as labelled specs take them) are the data.* fields of the same names;
    an option a kind does not take, or one given twice with two values, is refused naming it."""
    from g2d.config import DataCfg, pretrain_source
    from g2d.errors import ConfigError

    src = pretrain_source(DataCfg(spec="csv:notes.csv?image_col=file&text_col=notes&image_dir=images"))
    assert (src.kind, src.path, src.image_col, src.text_col, src.image_dir) == ("csv", "notes.csv", "file", "notes",
                                                                                 "images")
    same = pretrain_source(DataCfg(spec="csv:notes.csv", image_col="file", text_col="notes", image_dir="images"))
    assert same == src
    assert pretrain_source(DataCfg(spec="mimic:/store")).path == "/store"
    assert pretrain_source(DataCfg()).kind == "synthetic"
    for spec, fields, message in (("csv:a.csv?labels=x", {}, "not 'labels'"),
                                  ("mimic:/s?image_col=x", {}, "a mimic spec takes no path or options"),
                                  ("synthetic:12", {}, "a synthetic spec takes no path"),
                                  ("siim:/data", {}, "use 'synthetic'"),
                                  ("csv:a.csv?image_col=file", {"image_col": "path"}, "give it once"),
                                  ("csv:a.csv?split_col=fold", {}, "split_col and split go together"),
                                  ("csv:a.csv?image_col", {}, "not key=value")):
        with pytest.raises(ConfigError, match=message):
            pretrain_source(DataCfg(spec=spec, **fields))
