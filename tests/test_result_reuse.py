"""Caches and finished results are keyed on content: replaced images, retrained weights and the same
set spelled another way (feature cache, segmentation and fine-tuning runs, reproduce stores)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from g2d.cli import main
from g2d.data.labelled.specs import open_dataset


def _images_table(root, n=24):
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        img = rng.integers(0, 80, (48, 48)).astype(np.uint8)
        mask = np.zeros((48, 48), np.uint8)
        if i % 2:
            img[8:24, 8:24] = 220
            mask[8:24, 8:24] = 255
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        Image.fromarray(mask).save(root / "img" / f"{i}_m.png")
        rows.append(f"img/{i}.png,img/{i}_m.png,{'train' if i < 12 else 'val' if i < 18 else 'test'},{i % 2}")
    (root / "t.csv").write_text("image,mask,split,y\n" + "\n".join(rows) + "\n")
    return root / "t.csv"


def _replace_image(path):
    import os
    import time

    img = np.asarray(Image.open(path))
    Image.fromarray((255 - img).astype(np.uint8)).save(path)
    later = time.time() + 5
    os.utime(path, (later, later))


def test_feature_cache_sees_an_image_replaced_in_place(tmp_path):
    from g2d.data.transforms import ImageTransformCfg
    from g2d.downstream.features import cached_features, extract_features
    from g2d.towers import load_image_tower

    table = _images_table(tmp_path / "set")
    geom = ImageTransformCfg(resize=32, crop=32, augment="none", keep_aspect=False)
    tower = load_image_tower("random", "resnet18")
    ds = open_dataset(f"csv:{table}?labels=y", "train", geometry=geom)
    key = {"model": "random", "data": "csv", "split": "train"}
    cache = tmp_path / "cache"
    ids, first = cached_features(tower, ds, key=key, cache_dir=cache, pooling="gap", device=torch.device("cpu"))
    _replace_image(tmp_path / "set" / "img" / "0.png")
    ds = open_dataset(f"csv:{table}?labels=y", "train", geometry=geom)
    ids2, second = cached_features(tower, ds, key=key, cache_dir=cache, pooling="gap", device=torch.device("cpu"))
    fresh_ids, fresh = extract_features(tower, ds, "gap", torch.device("cpu"))
    assert ids == ids2 == fresh_ids
    torch.testing.assert_close(second, fresh)
    k = ids.index("img/0.png")
    assert not torch.allclose(first[k], second[k])
    others = [j for j in range(len(ids)) if j != k]
    assert torch.equal(first[others], second[others])


def test_finished_segmentation_run_is_not_reused_for_other_images(tmp_path, caplog):
    import logging

    table = _images_table(tmp_path / "set")
    argv = ["eval", "segmentation", "--data", f"csv:{table}", "--model", "random", "--arch", "resnet18",
            "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--out", str(tmp_path / "out"),
            "--no-progress", "--figures", "0", "--num-workers", "0"]
    assert main(argv) == 0
    caplog.set_level(logging.INFO, logger="g2d.downstream")
    assert main(argv) == 0
    assert "already holds the finished run" in caplog.text
    caplog.clear()
    _replace_image(tmp_path / "set" / "img" / "13.png")      # a validation image
    assert main(argv) == 0
    assert "already holds the finished run" not in caplog.text
    assert "other inputs" in caplog.text                      # the checkpoint is not resumed either


def test_finished_segmentation_run_is_reused_however_its_data_path_is_spelled(tmp_path, caplog, monkeypatch):
    """The same set named by a relative and an absolute path is the same run (the resume and
    "finished" signatures key on absolute paths, g2d.fingerprint.absolute_paths)."""
    import logging

    table = _images_table(tmp_path / "set")
    argv = ["eval", "segmentation", "--model", "random", "--arch", "resnet18", "--epochs", "1", "--batch-size",
            "4", "--image-size", "32", "--out", str(tmp_path / "out"), "--no-progress", "--figures", "0",
            "--num-workers", "0"]
    assert main([*argv, "--data", f"csv:{table}"]) == 0
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="g2d.downstream")
    assert main([*argv, "--data", f"csv:{table.relative_to(tmp_path)}"]) == 0
    assert "already holds the finished run" in caplog.text


def test_a_set_is_the_same_set_however_its_path_is_spelled(tmp_path, monkeypatch):
    """dataset_identity leaves out the mask paths as spelled (their files' stamps stay in); a
    reproduce store that kept the identity of before (mask paths as spelled) is still accepted."""
    from g2d.fingerprint import dataset_identity, digest
    from g2d.reproduce import Column, Experiment, Row, Runner, Scale
    from g2d.reproduce.spec import _LazyFill

    table = _images_table(tmp_path / "set")
    monkeypatch.chdir(tmp_path)
    absolute, relative = (open_dataset(f"csv:{t}", "train") for t in (table, table.relative_to(tmp_path)))
    assert dataset_identity(absolute) == dataset_identity(relative)
    assert dataset_identity(absolute, mask_form=repr) != dataset_identity(relative, mask_form=repr)

    spec = f"csv:{table}"
    exp = Experiment("s", "S", [Column("Seg", "segmentation", "own", "dice")], [Row("R", model="random")])
    scale = Scale("t", "tiny", {}, _LazyFill({"own": spec}, lambda v: v), {}, 1)

    def task(name, args):
        Path(args.out).mkdir(parents=True)
        (Path(args.out) / "metrics.json").write_text(json.dumps({"dice": 0.5}))
        return {}

    Runner(exp, scale, tmp_path / "store", run_task=task).run()
    inputs_file = next((tmp_path / "store" / "cells").glob("*/inputs.json"))
    inputs = json.loads(inputs_file.read_text())
    old = digest([dataset_identity(open_dataset(spec, s, max_skip_fraction=1.0), mask_form=repr)
                  for s in ("train", "val", "test")])
    for data_id, found in ((old, [50.0]), ("another set", [])):
        inputs_file.write_text(json.dumps({**inputs, "data_id": data_id}))
        res = Runner(exp, scale, tmp_path / "store", run_task=task, collect_only=True).run()[0]
        assert res.values == found and bool(res.errors) == (not found)


def test_model_identity_follows_the_weight_files(tmp_path):
    from g2d.fingerprint import model_identity

    (tmp_path / "export").mkdir()
    w = tmp_path / "export" / "model.safetensors"
    w.write_bytes(b"a" * 10)
    before = model_identity(str(tmp_path / "export"))
    w.write_bytes(b"b" * 11)
    assert model_identity(str(tmp_path / "export")) != before
    assert model_identity("random") == "random"


def test_finetune_checkpoint_is_not_resumed_for_other_images(tmp_path, caplog):
    import logging

    table = _images_table(tmp_path / "set")
    argv = ["eval", "finetune", "--data", f"csv:{table}?labels=y", "--model", "random", "--arch", "resnet18",
            "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--resize", "32",
            "--out", str(tmp_path / "out"), "--no-progress", "--num-workers", "0"]
    assert main(argv) == 0
    caplog.set_level(logging.INFO, logger="g2d.downstream")
    assert main(argv) == 0
    assert "resumed" in caplog.text and "other images" not in caplog.text
    caplog.clear()
    _replace_image(tmp_path / "set" / "img" / "2.png")
    assert main(argv) == 0
    assert "other images or weights: starting anew" in caplog.text and "resumed" not in caplog.text
