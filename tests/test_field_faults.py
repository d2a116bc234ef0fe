"""Faults users of chest X-ray tools reported (issue 17, shared/field-cases), each as a test of g2d."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from g2d.cli import main
from g2d.data.labelled.specs import open_dataset, parse_spec
from g2d.errors import DataError


def _strict(path):
    """Parse as standard JSON: NaN / Infinity are not JSON and fail here."""
    def reject(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture
def one_class_table(tmp_path):
    """Class "b" is all 0 in the test split (field case 13)."""
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(36):
        split = "train" if i < 20 else ("val" if i < 28 else "test")
        a, b = i % 2, int(i % 3 == 0) if split != "test" else 0
        img = rng.integers(0, 80, (48, 48)).astype(np.uint8)
        if a:
            img[10:30, 10:30] = 220
        Image.fromarray(img).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "split": split, "a": a, "b": b})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "split", "a", "b"])
        w.writeheader()
        w.writerows(rows)
    return tmp_path / "labels.csv"


LINEAR = ["--model", "random", "--arch", "resnet18", "--epochs", "2", "--image-size", "64", "--resize", "64",
          "--no-progress", "--num-workers", "0", "--no-feature-cache"]


@pytest.mark.parametrize("how", ["flag", "spec"])
def test_csv_labels_from_the_command_line_and_strict_json(one_class_table, tmp_path, how):
    data = ["--data", f"csv:{one_class_table}", "--labels", "a,b"] if how == "flag" \
        else ["--data", f"csv:{one_class_table}?labels=a,b"]
    out = tmp_path / f"out_{how}"
    assert main(["eval", "linear", *data, *LINEAR, "--out", str(out)]) == 0
    m = _strict(out / "metrics.json")
    assert m["auc_per_class"]["a"] is not None and m["auc_per_class"]["b"] is None
    assert m["undefined"] == {"auc_per_class/b": "one class in test (all 0)"}
    assert m["auc"] == m["auc_per_class"]["a"]  # the mean leaves the undefined class out


def test_csv_without_labels_names_the_way_out(one_class_table, tmp_path, capsys):
    assert main(["eval", "linear", "--data", f"csv:{one_class_table}", *LINEAR, "--out", str(tmp_path / "o")]) == 2
    assert "--labels a,b,c" in capsys.readouterr().err


def test_spec_options_are_checked(one_class_table):
    assert parse_spec("csv:x.csv?labels=a,b&image_col=file") == ("csv", "x.csv", {"labels": "a,b",
                                                                                  "image_col": "file"})
    with pytest.raises(DataError, match="takes no option 'colour'"):
        open_dataset(f"csv:{one_class_table}?colour=red")
    with pytest.raises(DataError, match="not key=value"):
        parse_spec("csv:x.csv?labels")


def test_write_json_replaces_every_non_finite_value(tmp_path):
    from g2d.downstream.results import write_json

    write_json(tmp_path / "m.json", {"a": math.nan, "b": [1.0, math.inf], "c": {"d": math.nan},
                                     "undefined": {"c/d": "no positive image"}})
    m = _strict(tmp_path / "m.json")
    assert m["a"] is None and m["b"] == [1.0, None] and m["c"] == {"d": None}
    assert m["undefined"] == {"a": "undefined for this run", "b/1": "not a finite number",
                              "c/d": "no positive image"}


@pytest.mark.parametrize("prompts", [None, "biovil"])
def test_normal_classes_get_a_normal_vs_abnormal_pair(prompts):
    from g2d.inference.zeroshot import class_prompts, load_prompts

    pr = class_prompts(["No Finding", "normal", "Support Devices", "Pneumonia"], load_prompts(prompts))
    for cls in ("No Finding", "normal"):
        for pos, neg in pr[cls]:
            assert "no no" not in neg and "no normal" not in neg and pos != neg
            assert "abnormal" in neg or "acute" in neg
    assert pr["Pneumonia"][0][1].endswith("pneumonia")


def test_prompt_builder_refuses_double_negatives(tmp_path):
    from g2d.inference.zeroshot import class_prompts, load_prompts

    generic = {"*": [("{finding}", "no {finding}")]}
    for cls in ("No Finding", "normal", "no_acute_disease"):
        with pytest.raises(DataError, match=f"class '{cls}'.*double negative"):
            class_prompts([cls], generic)
    own = tmp_path / "p.txt"
    own.write_text("*\t{finding}\tno {finding}\nclear\tclear lungs\tclear lungs\n")
    with pytest.raises(DataError, match="class 'clear'.*the same"):
        class_prompts(["clear"], load_prompts(own))
    own.write_text("*\t{finding}\tno {finding}\nedema\tedema\tnot without edema\n")
    with pytest.raises(DataError, match="class 'edema'.*double negative"):
        class_prompts(["edema"], load_prompts(own))


def _tiny_siim(root, n_train=8, n_pos=2):
    """A SIIM folder of ids from the shipped split table: train n_pos positives + the rest negative,
    val and test 2 each (one positive), 64 px PNGs with RLE masks (field case 04)."""
    from g2d.data.labelled.splits import load_split

    t = load_split("siim")

    def pick(s, n):
        return sorted([k for k, v in t.items() if v[0] == s], key=lambda k: t[k][1])[:n]

    ids = {"train": pick("train", n_train), "val": pick("val", 2), "test": pick("test", 2)}
    (root / "png").mkdir(parents=True)
    rows = ["ImageId, EncodedPixels"]
    rng = np.random.default_rng(0)
    for s, lst in ids.items():
        for n, iid in enumerate(lst):
            img = rng.integers(0, 60, (64, 64)).astype(np.uint8)
            if n < (n_pos if s == "train" else 1):
                img[10:30, 5:20] = 230
                m = np.zeros((64, 64), bool)
                m[10:30, 5:20] = True
                idx = np.flatnonzero(np.diff(np.r_[0, m.T.flatten().astype(int), 0]))
                runs, last = [], 0
                for a, b in zip(idx[0::2], idx[1::2]):
                    runs += [a - last, b - a]
                    last = b
                rows.append(f"{iid}, " + " ".join(map(str, runs)))
            else:
                rows.append(f"{iid}, -1")
            Image.fromarray(img).save(root / "png" / f"{iid}.png")
    (root / "train-rle.csv").write_text("\n".join(rows) + "\n")
    return ids


@pytest.mark.parametrize("mode, n_train, n_pos", [("balanced", 4, 2), ("all", 8, 2)])
def test_siim_segmentation_trains_on_the_balanced_set(tmp_path, monkeypatch, mode, n_train, n_pos):
    import functools

    import g2d.downstream.dense as dense

    _tiny_siim(tmp_path / "siim")
    # the folder holds 12 of the table's 12,047 ids: lift the missing-ids guard for this test only
    monkeypatch.setattr(dense, "open_dataset", functools.partial(open_dataset, max_skip_fraction=1.0))
    out = tmp_path / f"out_{mode}"
    spec = f"siim:{tmp_path / 'siim'}?label_size=image"  # the fixture's RLE is in its 64-px images
    assert main(["eval", "segmentation", "--data", spec, "--model", "random", "--arch", "resnet18",
                 "--epochs", "1", "--batch-size", "4", "--image-size", "64", "--out", str(out),
                 "--no-progress", "--figures", "0", "--num-workers", "0",
                 "--siim-train", mode]) == 0
    m = _strict(out / "metrics.json")
    assert (m["n_train"], m["n_train_pos"], m["n_val"], m["n_test"]) == (n_train, n_pos, 2, 2)


def test_siim_balanced_fraction_is_taken_from_the_balanced_set(tmp_path):
    from g2d.data.labelled.siim import balance_train

    _tiny_siim(tmp_path / "siim", n_train=8, n_pos=4)
    full = open_dataset(f"siim:{tmp_path / 'siim'}?label_size=image", "train", max_skip_fraction=1.0)
    whole = balance_train(full)
    half = balance_train(full, 0.5)
    assert len(whole) == 8 and len(half) == 4
    assert set(half.ids) <= set(whole.ids)  # nested across fractions


def _dicom(path, arr, photometric="MONOCHROME2", wc=None, ww=None, slope=1.0, intercept=0.0):
    import pydicom  # noqa: F401
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if wc is not None:
        ds.WindowCenter, ds.WindowWidth = wc, ww
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_voi_window_spreads_the_tissue(tmp_path, photometric):
    """Tissue 1000..2000 and a burned-in marker at 4095; WindowCenter/Width 1500/1000 (field case 02)."""
    from g2d.data.images import read_image

    t = np.tile(np.linspace(1000, 2000, 64), (64, 1))
    t[:4, :4] = 4095
    if photometric == "MONOCHROME1":
        t = 4095 - t
    img = read_image(_dicom(tmp_path / "w.dcm", t, photometric, wc=1500 if photometric == "MONOCHROME2"
                            else 4095 - 1500, ww=1000))
    tissue = img[10:, :]
    assert tissue.min() == pytest.approx(0.0, abs=0.01) and tissue.max() == pytest.approx(1.0, abs=0.01)
    assert img[0, 0] == pytest.approx(1.0)           # the marker is clipped at the window's top
    assert tissue[:, -1].mean() > tissue[:, 0].mean()  # 2000 is brighter than 1000 in both encodings
    # without a window: the stored range, as before (the marker squeezes the tissue)
    plain = read_image(_dicom(tmp_path / "p.dcm", t, photometric))
    assert plain[10:, :].max() - plain[10:, :].min() < 0.35


def _rsna(root, size, box, pid=None):
    from g2d.data.labelled.splits import load_split

    t = load_split("rsna")
    pid = pid or sorted(k for k, v in t.items() if v[0] == "test")[0]
    (root / "stage_2_train_images").mkdir(parents=True)
    x, y, w, h = box                                       # 1024-px label
    img = np.full(size[::-1], 20, np.uint8)
    sx, sy = size[0] / 1024, size[1] / 1024
    img[int(y * sy):int((y + h) * sy), int(x * sx):int((x + w) * sx)] = 240
    Image.fromarray(img).save(root / "stage_2_train_images" / f"{pid}.png")
    (root / "stage_2_train_labels.csv").write_text(f"patientId,x,y,width,height,Target\n{pid},{x},{y},{w},{h},1\n")
    return root


@pytest.mark.parametrize("side", [1024, 512, 256])
def test_rsna_boxes_follow_a_resized_conversion(tmp_path, side):
    """RSNA's boxes are in 1024-px space; on a PNG converted to another size they land on the
    finding (field case 16)."""
    from g2d.data.transforms import ImageTransformCfg

    root = _rsna(tmp_path / "rsna", (side, side), (600, 300, 200, 300))
    ds = open_dataset(f"rsna:{root}", "test", geometry=ImageTransformCfg(resize=224, crop=224, augment="none",
                                                                          keep_aspect=False), max_skip_fraction=1.0)
    s = ds[0]
    bright = s["image"][0] > 0.5
    assert s["boxes"][0].tolist() == pytest.approx([v * 224 / 1024 for v in (600, 300, 800, 600)], abs=0.01)
    inter = (s["mask"][0].bool() & bright).sum() / (s["mask"][0].bool() | bright).sum()
    assert inter > 0.9
    assert ds.skipped.total == 0


def test_labels_that_cannot_fit_are_named_and_skipped(tmp_path, caplog):
    from g2d.data.transforms import ImageTransformCfg

    geom = ImageTransformCfg(resize=64, crop=64, augment="none", keep_aspect=False)
    # a 512 x 256 conversion of a 1024 x 1024 image: another aspect ratio, the boxes cannot be placed
    root = _rsna(tmp_path / "a", (512, 256), (600, 300, 200, 300))
    ds = open_dataset(f"rsna:{root}", "test", geometry=geom, max_skip_fraction=1.0)
    assert ds[0] is None and ds.skipped.counts["label_space_mismatch"] == 1
    assert "stage_2_train_labels.csv:2" in caplog.text and "another aspect ratio" in caplog.text
    # labels declared in image pixels, but a box beyond the 512-px image: never silently dropped
    root = _rsna(tmp_path / "b", (512, 512), (600, 300, 200, 300))
    ds = open_dataset(f"rsna:{root}?label_size=image", "test", geometry=geom, max_skip_fraction=1.0)
    assert ds[0] is None and ds.skipped.counts["box_outside_image"] == 1


def test_csv_label_size_rescales_boxes_and_masks(tmp_path):
    from g2d.data.transforms import ImageTransformCfg

    (tmp_path / "img").mkdir()
    img = np.zeros((100, 200), np.uint8)
    img[20:40, 100:140] = 255
    Image.fromarray(img).save(tmp_path / "img" / "a.png")
    mask = np.zeros((200, 400), np.uint8)                    # the mask drawn at twice the image size
    mask[40:80, 200:280] = 255
    Image.fromarray(mask).save(tmp_path / "img" / "a_mask.png")
    (tmp_path / "t.csv").write_text("image,mask,boxes,split,y\nimg/a.png,img/a_mask.png,\"200,40,80,40\",test,1\n")
    geom = ImageTransformCfg(resize=100, crop=100, augment="none", keep_aspect=False)
    ds = open_dataset(f"csv:{tmp_path / 't.csv'}?labels=y&label_size=400x200", "test", geometry=geom)
    s = ds[0]
    assert s["boxes"][0].tolist() == pytest.approx([50.0, 20.0, 70.0, 40.0])
    assert (s["mask"][0].bool() == (s["image"][0] > 0.5)).float().mean() > 0.99


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


@pytest.mark.parametrize("augment", ["paper", "release", "none"])
def test_inference_sees_the_pixels_of_training(tmp_path, augment):
    """For each augmentation recipe, the eval/inference geometry of a model gives the pixels its
    training transform gives without the random augmentation (the release resizes to a square)."""
    from types import SimpleNamespace

    from g2d.config import get_config
    from g2d.data.images import read_image
    from g2d.data.transforms import (
        ImageTransformCfg,
        build_transform,
        inference_geometry,
    )
    from g2d.downstream.features import geometry_from_args, geometry_source

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 64)).astype(np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text("image,split\na.png,test\n")
    size = 64 if augment != "release" else 96    # the release trains on the whole square (no crop)
    cfg = get_config("tiny", {"data.augment": augment, "data.resize": 96 if augment == "release" else 72,
                              "model.image_size": size})
    train_tf = build_transform(ImageTransformCfg(resize=cfg.data.resize, crop=cfg.model.image_size,
                                                 augment=cfg.data.augment), train=False)
    expected = train_tf(read_image(tmp_path / "a.png"))
    # g2d zero-shot / g2d ground / g2d figure
    infer = build_transform(inference_geometry(cfg.data.resize, cfg.model.image_size, cfg.data.augment), False)
    torch.testing.assert_close(infer(read_image(tmp_path / "a.png")), expected)
    # g2d eval defaults (linear, zero-shot, grounding, attention)
    tower = SimpleNamespace(model=SimpleNamespace(config=cfg))
    from g2d.downstream.linear_probe import Args

    args = Args(data="synthetic", out="x")
    geom = geometry_from_args(args, tower)
    sample = open_dataset(f"csv:{tmp_path / 't.csv'}", "test", geometry=geom)[0]
    torch.testing.assert_close(sample["image"], expected, atol=1e-6, rtol=0)
    assert geometry_source(args, tower) == "model"
    # an override stays possible and is named as such
    args = Args(data="synthetic", out="x", resize=96, square=True)
    assert geometry_from_args(args, tower).resize == 96 and not geometry_from_args(args, tower).keep_aspect
    assert geometry_source(args, tower) == "flags"


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
