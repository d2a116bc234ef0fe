"""Phrase grounding (``g2d eval phrase-grounding``): the field's metrics on hand-made maps (CNR, mIoU over
thresholds, Otsu IoU/Dice, hit rate, clustered bootstrap), maps resampled to the labels' resolution,
and the protocol on MS-CXR-format data, the synthetic set's report sentences and a csv: phrase table."""

from __future__ import annotations

import csv
import math
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import parse_protocol_args, strict_json
from PIL import Image
from test_grounding_readers import _jpg, _ms_cxr, _write_csv

from g2d.data.transforms import ImageTransformCfg, crop_to_original, eval_geometry
from g2d.downstream import heatmaps, phrase_grounding
from g2d.errors import ConfigError, DataError
from g2d.inference.grounding import smooth, to_original
from g2d.metrics import bootstrap_interval, cnr, mean_iou_over_thresholds, otsu_binarize

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--num-workers", "0", "--no-progress"]


def test_cnr_on_a_hand_made_map():
    heat = torch.zeros(1, 4, 4)
    heat[0, :2, :2] = torch.tensor([[0.8, 0.6], [0.6, 0.8]])              # inside: mean 0.7, var 0.01
    heat[0, 3, 3] = 0.2                                                   # outside: 11 zeros and 0.2
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, :2, :2] = True
    out_vals = np.array([0.0] * 11 + [0.2])
    expected = abs(0.7 - out_vals.mean()) / math.sqrt(0.01 + out_vals.var())
    assert float(cnr(heat, target)[0]) == pytest.approx(expected)
    heat[0, 3, 3] = float("nan")                                          # NaN pixels are left out
    assert float(cnr(heat, target)[0]) == pytest.approx(0.7 / math.sqrt(0.01))
    assert math.isnan(float(cnr(heat, torch.ones(1, 4, 4, dtype=torch.bool))[0]))   # no outside


def test_mean_iou_over_thresholds_and_otsu():
    heat = torch.tensor([[[0.05, 0.15, 0.25, 0.35, 0.45, 0.55]]])
    target = torch.tensor([[[False, False, False, True, True, True]]])
    # t=0.1: 5 > t, IoU 3/5; 0.2: 4 -> 3/4; 0.3: 3 -> 1; 0.4: 2 -> 2/3; 0.5: 1 -> 1/3
    assert float(mean_iou_over_thresholds(heat, target)[0]) == pytest.approx((0.6 + 0.75 + 1 + 2 / 3 + 1 / 3) / 5)
    assert float(mean_iou_over_thresholds(heat, target, (0.3,))[0]) == pytest.approx(1.0)
    bimodal = torch.tensor([[[0.1, 0.12, 0.11, 0.9, 0.92, float("nan")]]])
    assert otsu_binarize(bimodal).tolist() == [[[False, False, False, True, True, False]]]
    assert not otsu_binarize(torch.full((1, 2, 2), 0.3)).any()           # a constant map: nothing


def test_bootstrap_resamples_images_together():
    values = np.array([1.0, 1.0, 0.0, 0.0, np.nan])
    same = bootstrap_interval(values, ["a", "a", "b", "b", "c"], n_boot=2000)
    assert same["mean"] == 0.5 and same["n"] == 4
    # two images, each with one value: replicates are 0, 0.5 or 1 -> a wide interval
    assert same["low"] == 0.0 and same["high"] == 1.0
    tight = bootstrap_interval(np.full(50, 0.3), None, n_boot=200)
    assert tight["low"] == pytest.approx(0.3) and tight["high"] == pytest.approx(0.3)
    assert math.isnan(bootstrap_interval(np.array([np.nan]))["mean"])
    with pytest.raises(ValueError, match="group keys"):
        bootstrap_interval(np.ones(3), ["a"])


def test_maps_reach_the_labels_resolution():
    """A map on the crop, sent to a label grid twice the file's size, equals it sent to the file's grid and
    upsampled (nearest) where each label pixel's centre falls."""
    geom = eval_geometry((40, 60), ImageTransformCfg(resize=32, crop=32, augment="none"))
    heat = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    at_file = to_original(heat, geom, mode="nearest")
    at_labels = to_original(heat, geom, (80, 120), mode="nearest")
    assert at_labels.shape == (80, 120)
    yy, xx = torch.meshgrid(torch.arange(80), torch.arange(120), indexing="ij")
    ref = at_file[yy // 2, xx // 2]
    both = ~torch.isnan(ref) & ~torch.isnan(at_labels)
    assert (at_labels[both] == ref[both]).float().mean() > 0.97   # only cells cut by a label pixel's centre differ
    assert torch.isnan(at_labels[:, :10]).all()                   # outside the centre crop


def test_smoothing_is_scipys_gaussian():
    from scipy.ndimage import gaussian_filter

    grid = torch.zeros(2, 7, 7)
    grid[0, 3, 3] = 1.0
    out = smooth(grid, 1.5)
    np.testing.assert_allclose(out[0].numpy(), gaussian_filter(grid[0].double().numpy(), 1.5), rtol=1e-6)
    assert smooth(grid, 0.0) is grid


@pytest.mark.slow
def test_phrase_grounding_on_ms_cxr_scores_at_the_labels_resolution(tiny_model_dir, tmp_path, monkeypatch):
    mimic = _ms_cxr(tmp_path)
    seen = {}

    def boxes_similarity(model, images, prompts):
        """1 on the crop cells whose centre maps inside the phrase's first box (file pixels), 0 elsewhere."""
        seen.setdefault("prompts", []).extend(prompts)
        s = images.shape[-1]
        out = []
        for p in prompts:
            hw, box = ((80, 100), [10, 20, 40, 45]) if "opacity" in p else ((80, 100), [30, 30, 70, 60]) \
                if p == "Cardiomegaly" else ((120, 120), [70, 80, 110, 110])
            geom = eval_geometry(hw, ImageTransformCfg(resize=32, crop=32, augment="none"))
            yy, xx = torch.meshgrid(torch.arange(s) + 0.0, torch.arange(s) + 0.0, indexing="ij")
            oy, ox = crop_to_original(yy, xx, geom)
            out.append(((ox + 0.5 >= box[0]) & (ox + 0.5 < box[2]) & (oy + 0.5 >= box[1]) & (oy + 0.5 < box[3])
                        ).float())
        return torch.stack(out)

    monkeypatch.setattr(heatmaps, "dense_similarity", boxes_similarity)
    spec = f"ms-cxr:{tmp_path / 'ms-cxr'}?images={mimic}"
    m = phrase_grounding.run(parse_protocol_args("phrase-grounding", [
        "--data", spec, "--model", str(tiny_model_dir), "--out", str(tmp_path / "pg"), "--split", "all",
        "--resize", "32", "--image-size", "32", "--bootstrap", "200", "--figures", "1", *COMMON]))
    assert m["pairs"] == 3 and m["images"] == 2 and m["split"] == "all"
    assert sorted(set(seen["prompts"])) == ["Cardiomegaly", "Patchy opacity in the right lower lobe",
                                            "Small left pleural effusion"]
    assert m["hit"] == 1.0 and m["cnr"] > 1.0
    assert set(m["per_finding"]) == {"Pneumonia", "Cardiomegaly", "Pleural Effusion"}
    assert m["pipeline"]["name"] == "biovil" and m["pipeline"]["resampling"] == "nearest"
    assert m["intervals"]["hit"]["low"] == 1.0
    saved = strict_json(tmp_path / "pg" / "metrics.json")
    assert saved["definitions"]["miou"].startswith("IoU of similarity > t")
    with open(tmp_path / "pg" / "per_pair.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["image_id"] for r in rows].count("aaa") == 2 and rows[0]["finding"]
    assert (tmp_path / "pg" / "figures" / "grounding_00.png").read_bytes()[:4] == b"\x89PNG"
    # the two-box phrase: its ground truth is both boxes at the DICOM's 200 x 160, the map scored there
    cases = list(heatmaps.grounding_cases(
        parse_protocol_args("phrase-grounding", ["--data", spec, "--model", "random", "--out", str(tmp_path),
                                                 *COMMON]),
        phrase_grounding._open(parse_protocol_args("phrase-grounding", ["--data", spec, "--model", "random",
                                                                        "--out", str(tmp_path), *COMMON]),
                               ImageTransformCfg(resize=32, crop=32, augment="none"))["test"],
        None, ImageTransformCfg(resize=32, crop=32, augment="none"), Counter()))
    pneu = next(c for c in cases if c.finding == "Pneumonia")
    assert pneu.truth.shape == (1, 160, 200) and int(pneu.truth.sum()) == 60 * 50 + 40 * 40
    assert pneu.heat.shape == (160, 200)


@pytest.mark.slow
def test_phrase_grounding_on_synthetic_report_sentences(tiny_model_dir, tmp_path):
    m = phrase_grounding.run(parse_protocol_args("phrase-grounding", [
        "--data", "synthetic:16", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--figures", "2",
        "--bootstrap", "100", *COMMON]))
    assert m["pairs"] > m["images"] > 0 and all(0.0 <= m[k] <= 1.0 for k in ("miou", "iou", "dice", "hit"))
    assert m["skipped"]["negative_image"] > 0 and set(m["per_finding"]) <= {
        "opacity", "nodule", "effusion", "pneumothorax", "cardiomegaly"}
    with open(tmp_path / "per_pair.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["prompt"].endswith(".") and r["prompt"][0].isupper() for r in rows)   # report sentences
    assert all(r["id"].startswith(r["image_id"] + "/") for r in rows)
    assert len(list((tmp_path / "figures").glob("grounding_*.png"))) == 2


def test_bad_flags_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="iou-thresholds"):
        phrase_grounding.run(parse_protocol_args("phrase-grounding", [
            "--data", "synthetic:8", "--out", str(tmp_path), "--iou-thresholds", "0.1,x", *COMMON]))
    with pytest.raises(SystemExit):
        parse_protocol_args("phrase-grounding", ["--data", "synthetic:8", "--out", str(tmp_path),
                                                 "--pipeline", "gradcam"])


def _phrase_table(root, header=("id", "image", "mask", "prompt", "finding", "split"), images=4):
    """``images`` test images with two phrases each (the heart, the left lung) and their masks."""
    rows = []
    for k in range(images):
        _jpg(root / f"{k}.png", (32, 32), k)
        for part in ("heart", "left_lung"):
            Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 12)).save(root / f"{k}_{part}.png")
            cells = {"id": f"{k}/{part}", "image": f"{k}.png", "mask": f"{k}_{part}.png",
                     "prompt": f"the {part.replace('_', ' ')}", "promt": f"the {part}", "finding": part,
                     "split": "test"}
            rows.append([cells[h] for h in header])
    return _write_csv(root / "phrases.csv", list(header), rows)


def test_csv_phrase_tables_are_bootstrapped_by_image_and_say_what_was_dropped(tiny_model_dir, tmp_path):
    table = _phrase_table(tmp_path, images=6)
    (tmp_path / "3_heart.png").unlink()                   # one row's mask is missing: dropped by the reader
    args = ["--data", f"csv:{table}", "--model", str(tiny_model_dir), "--resize", "32", "--image-size", "32",
            "--bootstrap", "50", "--figures", "0", *COMMON]
    m = phrase_grounding.run(parse_protocol_args("phrase-grounding", [*args, "--out", str(tmp_path / "pg")]))
    assert m["pairs"] == 11 and m["images"] == 6         # pairs of one image file are one cluster
    assert m["skipped_rows"] == {"test": {"missing_mask": 1}}
    with open(tmp_path / "pg" / "per_pair.csv") as f:
        rows = list(csv.DictReader(f))
    assert len({r["image_id"] for r in rows}) == 6 and rows[0]["image_id"] == rows[1]["image_id"]
    with pytest.raises(ConfigError, match="at least 1 replicate"):   # refused before any map is computed
        phrase_grounding.run(parse_protocol_args("phrase-grounding", [*args, "--bootstrap", "0",
                                                                      "--out", str(tmp_path / "b0")]))
    assert not (tmp_path / "b0").exists()


def test_a_phrase_table_without_its_prompt_column_names_it(tiny_model_dir, tmp_path, caplog):
    table = _phrase_table(tmp_path, header=("id", "image", "mask", "promt", "finding", "split"), images=2)
    with pytest.raises(DataError, match="'prompt' column"):
        phrase_grounding.run(parse_protocol_args("phrase-grounding", [
            "--data", f"csv:{table}", "--model", str(tiny_model_dir), "--out", str(tmp_path / "pg"),
            "--resize", "32", "--image-size", "32", "--figures", "0", *COMMON]))
    assert "phrases.csv:2" in caplog.text               # the first rows without a phrase are named
