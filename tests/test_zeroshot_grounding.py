import json
import math

import numpy as np
import pytest
import torch
from helpers import parse_protocol_args
from PIL import Image

from g2d import metrics
from g2d.data.labelled.dataset import LabelledCXR, Record
from g2d.data.transforms import ImageTransformCfg, crop_to_original, eval_geometry
from g2d.downstream import grounding, heatmaps, zeroshot
from g2d.errors import ConfigError, DataError
from g2d.inference import zeroshot as zs
from g2d.inference.grounding import RESAMPLING, binarize, to_original
from g2d.metrics import dice_per_image, iou_per_image, pointing_game, recall_per_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tiny_text_dir, tmp_path_factory):
    """An untrained tiny G2D model at 64 px, exported once for the module."""
    from g2d.checkpoint import export_model
    from g2d.config import get_config
    from g2d.factory import create_model

    cfg = get_config("tiny", {"model.text.model": str(tiny_text_dir), "model.text.freeze_layers": 1,
                              "model.image_size": 64,
                              "model.pool.width": 48, "data.resize": 64})
    torch.manual_seed(0)
    return export_model(create_model(cfg).eval(), cfg.to_dict(), tmp_path_factory.mktemp("tiny_g2d"))


COMMON = ["--num-workers", "0", "--no-progress"]


def test_threshold_rules_on_hand_made_scores():
    val_s, val_y = np.array([[0.9], [0.6], [0.4], [0.2]]), np.array([[1.0], [1.0], [0.0], [0.0]])
    s, y = np.array([[0.7], [0.5], [0.55], [0.1]]), np.array([[1.0], [1.0], [0.0], [0.0]])
    v = metrics.threshold_metrics(s, y, ["x"], "val", val_s, val_y)
    assert v["thresholds"]["x"] == pytest.approx(0.6)           # max F1 on validation
    assert v["f1"] == pytest.approx(2 / 3) and v["acc"] == pytest.approx(0.75) and v["auc"] == pytest.approx(0.75)
    t = metrics.threshold_metrics(s, y, ["x"], "test-max-f1")
    assert t["thresholds"]["x"] == pytest.approx(0.5)           # oracle on the test set
    assert t["f1"] == pytest.approx(0.8) and t["acc"] == pytest.approx(0.5)  # MedKLIP: ACC at score > t
    f = metrics.threshold_metrics(s, y, ["x"], 0.5)
    assert f["f1"] == pytest.approx(0.8) and f["acc"] == pytest.approx(0.75)
    # unknown labels are left out; a class without validation positives falls back to 0.5
    s2 = np.concatenate([s, s], 1)
    y2 = np.concatenate([y, [[np.nan], [1.0], [0.0], [np.nan]]], 1)
    m = metrics.threshold_metrics(s2, y2, ["x", "z"], "val", np.concatenate([val_s] * 2, 1),
                                   np.concatenate([val_y, np.zeros_like(val_y)], 1))
    assert m["thresholds"]["z"] == 0.5 and m["threshold_fallback"] == ["z"]
    assert m["acc_per_class"]["z"] == pytest.approx(0.5) and m["auc_per_class"]["z"] == pytest.approx(0.0)
    assert math.isnan(metrics.max_f1_threshold(np.array([0.1, 0.2]), np.array([0.0, 0.0]))[0])


def test_prompt_files(tmp_path):
    shipped = zs.class_prompts(["Pleural_Effusion", "Effusion", "Nodule"], zs.load_prompts())
    assert shipped["Pleural_Effusion"] == [("pleural effusion", "no pleural effusion")]
    assert shipped["Effusion"] == [("pleural effusion", "no pleural effusion")]
    assert shipped["Nodule"] == [("nodule", "no nodule")]
    assert zs.class_prompts(["x"], zs.load_prompts("biovil"))["x"][0][1] == "there is no x"
    f = tmp_path / "p.txt"
    f.write_text("# mine\n*\tsigns of {finding}\tno signs of {finding}\nNodule\tnodule\tno nodule\n"
                 "nodule\tlung nodule\tno lung nodule\n")
    mine = zs.class_prompts(["nodule", "mass"], zs.load_prompts(str(f)))
    assert mine["nodule"] == [("nodule", "no nodule"), ("lung nodule", "no lung nodule")]
    assert mine["mass"] == [("signs of mass", "no signs of mass")]
    f.write_text("nodule only one field\n")
    with pytest.raises(DataError, match="p.txt:1"):
        zs.load_prompts(str(f))


def test_zero_shot_scores_are_a_two_way_softmax():
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    pos, neg = (torch.nn.functional.normalize(torch.randn(2, 8), dim=-1) for _ in range(2))
    p = zs.zero_shot_scores(img, pos, neg, 10.0)
    torch.testing.assert_close(p, torch.sigmoid(10.0 * (img @ pos.T - img @ neg.T)))


@pytest.mark.slow
def test_zeroshot_run_with_tiny_model(tiny_model, tmp_path):
    args = parse_protocol_args("zeroshot", ["--data", "synthetic:16", "--model", str(tiny_model),
                                               "--out", str(tmp_path / "val"), *COMMON])
    m = zeroshot.run(args)
    saved = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert saved["threshold_rule"] == "val" and saved["n_test"] == 16 and saved["n_val"] == 16
    for key in ("auc", "f1", "acc"):
        assert 0.0 <= saved[key] <= 1.0
        assert set(saved[f"{key}_per_class"]) == {"opacity", "nodule", "effusion", "pneumothorax", "cardiomegaly"}
    assert saved["prompts"]["effusion"] == [["pleural effusion", "no pleural effusion"]]
    oracle = zeroshot.run(parse_protocol_args("zeroshot",
        ["--data", "synthetic:16", "--model", str(tiny_model), "--out", str(tmp_path / "oracle"),
         "--threshold", "test-max-f1", *COMMON]))
    assert "MedKLIP" in oracle["threshold_rule_description"] and oracle["auc"] == pytest.approx(m["auc"])
    assert oracle["f1"] >= m["f1"] - 1e-9  # the oracle threshold maximises test F1
    with pytest.raises(ConfigError, match="G2D model"):
        zeroshot.run(parse_protocol_args("zeroshot", ["--data", "synthetic:16", "--model", "random",
                                                         "--out", str(tmp_path / "r"), *COMMON]))


def test_to_original_undoes_resize_and_crop_on_a_non_square_image():
    cfg = ImageTransformCfg(resize=32, crop=32, augment="none")          # shorter side 48 -> 32
    geom = eval_geometry((48, 80), cfg)
    assert geom["resized_hw"] == (32, 53) and geom["crop_left"] == 10 and geom["crop_top"] == 0
    heat = torch.zeros(32, 32)
    heat[4:12, 20:26] = 1.0                                           # a block in crop pixels
    out = to_original(heat, geom)
    assert out.shape == (48, 80)
    # columns whose centre is outside the crop are NaN (crop spans x in [15.1, 63.4) of the original)
    x1, _, x2, _ = geom["crop_box_orig"]
    cols = (torch.arange(80) + 0.5)
    outside = (cols < x1) | (cols > x2)
    assert torch.isnan(out[:, outside]).all() and not torch.isnan(out[:, ~outside]).any()
    # the block lands where crop_to_original says it should
    oy, ox = crop_to_original(torch.tensor([4.0, 11.0]), torch.tensor([20.0, 25.0]), geom)
    pred = binarize(out, 0.5, "fixed")
    rows, cols_ = torch.nonzero(pred, as_tuple=True)
    assert abs(rows.min().item() - oy[0].item()) <= 1 and abs(rows.max().item() - oy[1].item()) <= 1
    assert abs(cols_.min().item() - ox[0].item()) <= 1 and abs(cols_.max().item() - ox[1].item()) <= 1


def test_grounding_metrics_by_hand():
    t = torch.zeros(1, 4, 4, dtype=torch.bool)
    t[0, :2, :2] = True
    p = torch.zeros(1, 4, 4, dtype=torch.bool)
    p[0, :2, :] = True
    assert recall_per_image(p, t).item() == 1.0 and iou_per_image(p, t).item() == 0.5
    assert dice_per_image(p, t).item() == pytest.approx(2 * 4 / 12)
    heat = torch.full((1, 4, 4), float("nan"))
    heat[0, 3, 3], heat[0, 0, 1] = 0.2, 0.9
    assert pointing_game(heat, t).item() == 1.0
    assert binarize(heat, 0.5).sum() == 1 and not binarize(heat, 0.5)[0, 0, 0]  # NaN is background
    assert binarize(heat, 0.5, "quantile").sum() == 1


def _box_set(tmp_path):
    """One 48 x 80 image with a box at x 20..56, y 8..40 (original pixels)."""
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 80)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    box = np.array([[20.0, 8.0, 56.0, 40.0]], np.float32)
    return [Record("a", str(tmp_path / "a.png"), labels=np.array([1.0], np.float32), boxes=box,
                   extra={"prompt": "opacity"})], box


@pytest.mark.slow
def test_grounding_maps_back_to_the_original_boxes(tiny_model, tmp_path, monkeypatch):
    records, box = _box_set(tmp_path)
    seen = {}

    def fake_open(spec, split, fraction, geometry, **kw):
        seen["geometry"] = geometry
        return LabelledCXR("boxes", records, ["opacity"], geometry)

    def fake_similarity(model, images, prompts):
        # 1 exactly on the crop pixels whose centres map inside the box, 0 elsewhere
        geom = eval_geometry((48, 80), seen["geometry"])
        s = images.shape[-1]
        yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                                indexing="ij")
        oy, ox = crop_to_original(yy, xx, geom)
        inside = (ox + 0.5 >= box[0, 0]) & (ox + 0.5 < box[0, 2]) & (oy + 0.5 >= box[0, 1]) & (oy + 0.5 < box[0, 3])
        seen["prompts"] = prompts
        return inside.float()[None].repeat(len(prompts), 1, 1)

    monkeypatch.setattr(grounding, "open_dataset", fake_open)
    monkeypatch.setattr(heatmaps, "dense_similarity", fake_similarity)
    args = parse_protocol_args("grounding", ["--data", "csv:boxes.csv", "--model", str(tiny_model),
                                                "--out", str(tmp_path / "g"), "--resize", "32",
                                                "--image-size", "32", *COMMON])
    m = grounding.run(args)
    assert seen["prompts"] == ["opacity"] and m["images"] == 1
    assert m["dice"] > 0.9 and m["iou"] > 0.85 and m["recall"] > 0.9 and m["pointing"] == 1.0
    saved = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert set(saved["per_prompt"]) == {"opacity"}
    assert saved["binarize"] == {"rule": "minmax", "level": 0.5, "resampling": RESAMPLING}
    assert (tmp_path / "g" / "figures" / "grounding_00.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "g" / "per_image.csv").read_text().startswith("id,prompt,recall")

    # --prompt overrides the record's prompt; random models are refused
    grounding.run(parse_protocol_args("grounding",
        ["--data", "csv:boxes.csv", "--model", str(tiny_model), "--out", str(tmp_path / "g2"),
         "--prompt", "consolidation", "--resize", "32", "--image-size", "32", *COMMON]))
    assert seen["prompts"] == ["consolidation"]
    with pytest.raises(ConfigError, match="G2D model"):
        grounding.run(parse_protocol_args("grounding", ["--data", "synthetic:8", "--model", "random",
                                                           "--out", str(tmp_path / "r"), *COMMON]))


@pytest.mark.slow
def test_grounding_on_synthetic_with_the_real_model(tiny_model, tmp_path):
    m = grounding.run(parse_protocol_args("grounding",
        ["--data", "synthetic:16", "--model", str(tiny_model), "--out", str(tmp_path), "--figures", "2", *COMMON]))
    assert m["images"] > 0 and all(0.0 <= m[k] <= 1.0 for k in ("recall", "iou", "dice", "pointing"))
    assert m["skipped"].get("negative_image", 0) > 0
    assert len(list((tmp_path / "figures").glob("grounding_*.png"))) == 2


@pytest.mark.slow
def test_infer_commands_write_their_outputs(tiny_model, tmp_path, capsys):
    import argparse

    from g2d.commands import infer
    from g2d.commands.infer import run_ground, run_zero_shot

    parser = argparse.ArgumentParser()
    infer.register(parser.add_subparsers(dest="command"))
    _box_set(tmp_path)
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(tmp_path / "b.png")
    args = parser.parse_args(["zero-shot", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model",
                              str(tiny_model), "--findings", "pneumonia, pleural effusion",
                              "--csv", str(tmp_path / "p.csv"), "--device", "cpu"])
    assert args.run is run_zero_shot and args.run(args) == 0
    printed = capsys.readouterr().out
    assert "pneumonia" in printed and "a.png" in printed and "b.png" in printed
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "image,pneumonia,pleural effusion" and len(rows) == 3
    assert all(0.0 < float(v) < 1.0 for r in rows[1:] for v in r.split(",")[1:])

    args = parser.parse_args(["ground", str(tmp_path / "a.png"), "--model", str(tiny_model), "--text",
                              "right lower lobe opacity", "--out", str(tmp_path / "heat.png"),
                              "--npy", str(tmp_path / "heat.npy"), "--device", "cpu"])
    assert args.run is run_ground and args.run(args) == 0
    legend = np.asarray(Image.open(tmp_path / "heat.png"))
    assert legend.shape[1] == 80 and legend.shape[0] > 48  # the image's pixels, then the prompt and colour bar
    args = parser.parse_args(["ground", str(tmp_path / "a.png"), "--model", str(tiny_model), "--text",
                              "right lower lobe opacity", "--out", str(tmp_path / "heat.png"), "--no-legend",
                              "--npy", str(tmp_path / "heat.npy"), "--device", "cpu"])
    assert args.run(args) == 0
    assert Image.open(tmp_path / "heat.png").size == (80, 48)          # original resolution (W, H)
    assert (np.asarray(Image.open(tmp_path / "heat.png")) == legend[:48]).all()  # the same overlay above
    heat = np.load(tmp_path / "heat.npy")
    assert heat.shape == (48, 80) and np.isnan(heat[:, 0]).all() and np.isfinite(heat[:, 40]).all()
    assert np.nanmin(heat) >= -1 - 1e-5 and np.nanmax(heat) <= 1 + 1e-5
    assert not math.isnan(float(np.nanmean(heat)))


def test_to_original_with_pad_square_covers_the_whole_image():
    # a padded geometry (MGCA/GLoRIA/MedCLIP) cuts nothing off the short axis: no NaN there
    cfg = ImageTransformCfg(resize=32, crop=32, augment="none", pad_square=True)
    geom = eval_geometry((16, 64), cfg)                               # longer side 64 -> 32: image 8 x 32
    heat = torch.zeros(32, 32)
    heat[12:20, :] = 1.0                                              # exactly the image's rows of the crop
    out = to_original(heat, geom)
    assert out.shape == (16, 64) and not torch.isnan(out).any()
    assert out.min() > 0.45                                           # every original row is image, none padding
