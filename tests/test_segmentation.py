"""``g2d eval segmentation``: Dice rules, loss, frozen encoder, transfer, resume/determinism, a real-mask run."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from g2d.downstream import protocol
from g2d.downstream import segmentation as seg
from g2d.downstream.towers import load_image_tower
from g2d.metrics import dice_mgca_batch_mean, dice_per_image

BASE = ["--data", "synthetic:8", "--model", "random", "--arch", "resnet18", "--image-size", "64",
        "--batch-size", "8", "--lr", "1e-3", "--num-workers", "0", "--no-progress", "--figures", "2"]


def _args(out, *extra: str):
    return protocol.parse("segmentation", [*BASE, "--out", str(out), *extra])


# ------------------------------------------------------------------------------------- metrics


def test_dice_per_image_empty_mask_rule():
    t = torch.zeros(4, 1, 2, 2)
    p = torch.zeros(4, 1, 2, 2)
    t[0, 0, 0] = 1                  # target 2 px, prediction 1 of them + 1 wrong: 2*1 / (2+2)
    p[0, 0, 0, 0] = p[0, 0, 1, 1] = 1
    # image 1: empty target, empty prediction -> 1
    p[2, 0, 1, 1] = 1               # image 2: empty target, non-empty prediction -> 0
    t[3] = 1                        # image 3: full target, empty prediction -> 0
    torch.testing.assert_close(dice_per_image(p, t), torch.tensor([0.5, 1.0, 0.0, 0.0], dtype=torch.float64))


def test_dice_mgca_batch_mean_weights_last_partial_batch_like_a_full_one():
    per_image = [1.0, 0.0, 1.0, 1.0, 0.0]
    # batches of 2: [1, 0] [1, 1] [0] -> means 0.5, 1, 0 -> 0.5; per-image mean is 0.6
    assert dice_mgca_batch_mean(per_image, 2) == pytest.approx(0.5)
    assert dice_mgca_batch_mean(per_image, 5) == pytest.approx(0.6)
    assert dice_mgca_batch_mean(per_image, 8) == pytest.approx(0.6)
    assert math.isnan(dice_mgca_batch_mean([], 4))


def test_mixed_loss_matches_mgca_formula():
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 5, 5), (torch.rand(2, 1, 5, 5) > 0.6).float()
    # MGCA's FocalLoss(gamma=2) written out as in mgca/models/.../losses
    max_val = (-x).clamp(min=0)
    bce = x - x * t + max_val + ((-max_val).exp() + (-x - max_val).exp()).log()
    focal = ((torch.nn.functional.logsigmoid(-x * (t * 2 - 1)) * 2).exp() * bce).mean()
    p = torch.sigmoid(x)
    dice = (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    torch.testing.assert_close(seg.mixed_loss(x, t), 10 * focal - torch.log(dice))
    bce_mean = torch.nn.functional.binary_cross_entropy_with_logits(x, t)
    torch.testing.assert_close(seg.dice_bce_loss(x, t), bce_mean + 1 - dice)


# ------------------------------------------------------------------------------------ transfer


def test_encoder_decoder_transfer_copies_pretrained_decoder(tiny_cfg, tmp_path):
    from g2d.checkpoint import export_model
    from g2d.factory import create_model

    cfg = tiny_cfg.validate()
    model = create_model(cfg)
    export_model(model, cfg.to_dict(), tmp_path / "export")
    tower = load_image_tower(str(tmp_path / "export"))
    unet = seg.build_unet(tower, "encoder-decoder")
    pre = model.decoder.state_dict()
    got = unet.decoder.state_dict()
    assert pre.keys() == got.keys()
    for k in pre:
        torch.testing.assert_close(got[k], pre[k], rtol=0, atol=0, msg=k)
    assert unet.head[0].out_channels == 1
    assert unet(torch.rand(2, 1, 64, 64)).shape == (2, 1, 64, 64)
    # the transfer copies: training the U-Net leaves the loaded model untouched
    assert unet.decoder.blocks[0].conv1[0].weight is not tower.decoder.blocks[0].conv1[0].weight
    # --transfer encoder gets a new smp-layout decoder instead
    fresh = seg.build_unet(tower, "encoder")
    assert [b.conv2[0].out_channels for b in fresh.decoder.blocks] == list(seg.SMP_DECODER_CHANNELS)


def test_encoder_decoder_transfer_needs_a_decoder(tmp_path):
    with pytest.raises(ValueError, match="has no.*decoder|has none"):
        seg.build_unet(load_image_tower("random", arch="resnet18"), "encoder-decoder")
    with pytest.raises(ValueError, match="pre-trained decoder"):
        seg.run(_args(tmp_path, "--transfer", "encoder-decoder", "--epochs", "1"))


# --------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-epoch run, and the same run split into 1 + 1 epochs (resumed from ckpt.pt)."""
    root = tmp_path_factory.mktemp("seg")
    full, full_model = seg.fit_and_test(_args(root / "full", "--epochs", "2"))
    first = seg.run(_args(root / "split", "--epochs", "1", "--figures", "0"))
    resumed = seg.run(_args(root / "split", "--epochs", "2", "--figures", "0"))
    return {"root": root, "full": full, "full_model": full_model, "first": first, "resumed": resumed}


@pytest.mark.slow
def test_metrics_file_keys_and_ranges(runs):
    m = json.loads((runs["root"] / "full" / "metrics.json").read_text())
    for key in ("dice", "dice_mgca_batch_mean", "n_train", "n_val", "n_test", "epochs_run", "best_epoch",
                "skipped_unreadable_test", "n_test_empty_target", "run"):
        assert key in m, key
    assert 0 <= m["dice"] <= 1 and 0 <= m["dice_mgca_batch_mean"] <= 1
    assert (m["n_train"], m["n_val"], m["n_test"]) == (8, 16, 16) and m["n_test_scored"] == 16
    assert m["epochs_run"] == 2 and m["best_epoch"] in (1, 2) and m["mgca_batch_size"] == 8
    # 16 test images in batches of 8: equal batches, so both aggregations agree
    assert m["dice_mgca_batch_mean"] == pytest.approx(m["dice"])
    assert len(m["history"]) == 2
    assert (runs["root"] / "full" / "results.md").read_text().startswith("| task | data |")
    figs = sorted((runs["root"] / "full" / "figures").glob("*.png"))
    assert len(figs) == 2 and all(f.stat().st_size > 1000 for f in figs)


@pytest.mark.slow
def test_resume_continues_and_matches_uninterrupted_run(runs):
    first, resumed, full = runs["first"], runs["resumed"], runs["full"]
    assert first["epochs_run"] == 1 and resumed["resumed_from_epoch"] == 1 and resumed["epochs_run"] == 2
    # determinism: same seed, same first epoch; resumption: same final result as the 2-epoch run
    assert first["history"][0] == full["history"][0]
    assert resumed["history"] == full["history"]
    assert resumed["dice"] == full["dice"]


@pytest.mark.slow
def test_finished_run_is_reported_not_rerun(runs):
    before = (runs["root"] / "full" / "ckpt.pt").stat().st_mtime_ns
    metrics, model = seg.fit_and_test(_args(runs["root"] / "full", "--epochs", "2"))
    assert model is None and metrics["dice"] == runs["full"]["dice"]
    assert (runs["root"] / "full" / "ckpt.pt").stat().st_mtime_ns == before


@pytest.mark.slow
def test_checkpoint_with_other_arguments_is_refused(runs):
    with pytest.raises(ValueError, match="different arguments.*lr"):
        seg.run(_args(runs["root"] / "split", "--epochs", "3", "--lr", "5e-4", "--figures", "0"))


def _encoder_state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_frozen_encoder_keeps_weights_and_bn_statistics(runs):
    torch.manual_seed(0)  # run() seeds before building the random baseline
    initial = _encoder_state(load_image_tower("random", arch="resnet18").encoder)
    trained = runs["full_model"].encoder.module.state_dict()
    assert any("running_mean" in k for k in initial)
    for k, v in initial.items():
        torch.testing.assert_close(trained[k], v, rtol=0, atol=0, msg=k)
    # the decoder did train
    assert runs["full"]["history"][0]["train_loss"] != runs["full"]["history"][1]["train_loss"]



def test_update_bn_lets_frozen_encoder_statistics_move():
    """--update-bn (MGCA's behaviour): weights stay, BatchNorm running statistics move in train mode."""
    x = torch.rand(4, 1, 64, 64)
    for update_bn in (False, True):
        torch.manual_seed(0)
        tower = load_image_tower("random", arch="resnet18")
        unet = seg.build_unet(tower, "encoder", update_bn=update_bn).train()
        before = _encoder_state(unet.encoder.module)
        unet(x).mean().backward()
        after = unet.encoder.module.state_dict()
        torch.testing.assert_close(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"], rtol=0, atol=0)
        assert torch.equal(after["bn1.running_mean"], before["bn1.running_mean"]) is not update_bn
        assert unet.encoder.module.training is update_bn and unet.decoder.training
        assert all(p.grad is None for p in unet.encoder.parameters())
    with pytest.raises(ValueError, match="update-bn"):
        seg.run(_args("unused", "--update-bn", "--train-encoder"))


def test_train_encoder_trains_it():
    unet = seg.build_unet(load_image_tower("random", arch="resnet18"), "encoder", train_encoder=True).train()
    unet(torch.rand(2, 1, 64, 64)).mean().backward()
    assert unet.encoder.layer1[0].conv1.weight.grad is not None and unet.encoder.training


# ------------------------------------------------------------------------------ real masks


@pytest.mark.slow
def test_jsrt_lungs_beat_trivial_predictions(jsrt_dir, tmp_path):
    pytest.importorskip("g2d.data.labelled.csv_table")
    cases = sorted(p.name for p in (jsrt_dir / "images").glob("*.png"))[:20]
    assert len(cases) == 20
    # paths relative to the CSV (the reader's convention): link the set's folders next to it
    for sub in ("images", "masks"):
        (tmp_path / sub).symlink_to(jsrt_dir / sub, target_is_directory=True)
    table = tmp_path / "jsrt_lungs.csv"
    with table.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask", "split"])
        for i, c in enumerate(cases):
            split = "train" if i < 14 else "val" if i < 16 else "test"
            w.writerow([f"images/{c}", f"masks/left_lung/{c};masks/right_lung/{c}", split])
    args = protocol.parse("segmentation", [
        "--data", f"csv:{table}", "--model", "random", "--arch", "resnet18", "--image-size", "64",
        "--batch-size", "7", "--lr", "3e-3", "--epochs", "4", "--patience", "4", "--num-workers", "0",
        "--no-progress", "--figures", "1", "--out", str(tmp_path / "out")])
    m = seg.run(args)
    assert (m["n_train"], m["n_val"], m["n_test"]) == (14, 2, 4)
    # trivial baselines: all background scores 0 on these non-empty masks; all foreground scores
    # 2|T| / (|T| + S^2) per image
    from g2d.data.labelled.specs import open_dataset

    test = open_dataset(f"csv:{table}", "test", 1.0, seg.square_geometry(64))
    masks = torch.stack([test[i]["mask"] for i in range(len(test))])
    all_fg = float(dice_per_image(torch.ones_like(masks), masks).mean())
    assert m["n_test_empty_target"] == 0
    assert m["dice"] > max(all_fg, 0.5), (m["dice"], all_fg)  # about 0.57 vs 0.50
