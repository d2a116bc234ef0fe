"""``g2d eval segmentation``: Dice rules, loss, frozen encoder, transfer, resume/determinism, a real-mask run."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from helpers import parse_protocol_args

from g2d.downstream import segmentation as seg
from g2d.downstream.dense import square_geometry
from g2d.metrics import dice_mgca_batch_mean, dice_per_image
from g2d.towers import load_image_tower

BASE = ["--data", "synthetic:8", "--model", "random", "--arch", "resnet18", "--image-size", "64",
        "--batch-size", "8", "--lr", "1e-3", "--num-workers", "0", "--no-progress", "--figures", "2"]


def _args(out, *extra: str):
    return parse_protocol_args("segmentation", [*BASE, "--out", str(out), *extra])


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


def _with(cfg, overrides):
    import copy

    from g2d.config import apply_overrides

    cfg = copy.deepcopy(cfg)
    apply_overrides(cfg, overrides)
    return cfg


def _exported(cfg, out):
    from g2d.checkpoint import export_model
    from g2d.factory import create_model

    cfg = cfg.validate()
    model = create_model(cfg)
    export_model(model, cfg.to_dict(), out)
    return model, load_image_tower(str(out))


def test_kept_head_copies_the_pretrained_pseudo_mask_head(tiny_cfg, tmp_path):
    model, tower = _exported(tiny_cfg, tmp_path / "export")
    unet = seg.build_unet(tower, "encoder-decoder-head")
    torch.testing.assert_close(unet.head[0].weight, model.segmentation_head[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(unet.head[0].bias, model.segmentation_head[0].bias, rtol=0, atol=0)
    for k, v in model.decoder.state_dict().items():
        torch.testing.assert_close(unet.decoder.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # the new head of encoder-decoder is not the pre-trained one
    assert not torch.equal(seg.build_unet(tower, "encoder-decoder").head[0].weight, model.segmentation_head[0].weight)
    # per-head pseudo masks (one output per attention head): the kept head is their mean
    per_head = _with(tiny_cfg, {"model.pseudo_mask.aggregate_heads": False})
    model, tower = _exported(per_head, tmp_path / "per_head")
    heads = model.segmentation_head[0]
    assert heads.out_channels == per_head.model.pool.heads > 1
    unet = seg.build_unet(tower, "encoder-decoder-head")
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        feats = model.decoder(model.image_encoder(x))
        torch.testing.assert_close(unet.head(feats), heads(feats).mean(1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_frozen_decoder_trains_only_the_head(tiny_cfg, tmp_path):
    model, tower = _exported(tiny_cfg, tmp_path / "export")
    unet = seg.build_unet(tower, "frozen-decoder").train()
    before = {k: v.clone() for k, v in unet.decoder.module.state_dict().items()}
    opt = torch.optim.SGD([p for p in unet.parameters() if p.requires_grad], lr=0.1)
    unet(torch.rand(2, 1, 64, 64)).mean().backward()
    opt.step()
    assert {n.split(".")[0] for n, p in unet.named_parameters() if p.requires_grad} == {"head"}
    for k, v in unet.decoder.module.state_dict().items():  # weights and BatchNorm statistics
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert not unet.decoder.module.training
    assert seg.unet_decoder_widths(unet) == tuple(model.decoder.channels)


def test_new_decoder_widths_match_the_pretrained_decoder_with_model(tiny_cfg, tmp_path):
    """Issue 28's confound: the tiny preset's decoder is (128, 64, 32, 16, 8) and the default new
    decoder smp's (256, ..., 16); --decoder-channels model gives both arms one architecture."""
    model, tower = _exported(tiny_cfg, tmp_path / "export")
    pre = tuple(model.decoder.channels)
    assert pre != seg.SMP_DECODER_CHANNELS
    fresh = seg.build_unet(tower, "encoder", decoder_channels="model")
    transferred = seg.build_unet(tower, "encoder-decoder")
    assert seg.unet_decoder_widths(fresh) == seg.unet_decoder_widths(transferred) == pre
    assert {k: v.shape for k, v in fresh.decoder.state_dict().items()} == \
        {k: v.shape for k, v in transferred.decoder.state_dict().items()}
    assert seg.unet_decoder_widths(seg.build_unet(tower, "encoder")) == seg.SMP_DECODER_CHANNELS
    assert seg.decoder_widths(tower, "32,16,8,8,4") == (32, 16, 8, 8, 4)
    # a decoder-free G2D model still has its configured widths; a baseline has none
    _, no_decoder = _exported(_with(tiny_cfg, {"model.decoder.mode": "none"}), tmp_path / "none")
    assert no_decoder.decoder is None and seg.decoder_widths(no_decoder, "model") == pre
    with pytest.raises(ValueError, match="needs a G2D model"):
        seg.decoder_widths(load_image_tower("random", arch="resnet18"), "model")
    with pytest.raises(ValueError, match="five positive integers"):
        seg.decoder_widths(tower, "8,4")


def test_recalibrated_batchnorm_holds_the_training_images_statistics(tiny_cfg, tmp_path):
    _, tower = _exported(tiny_cfg, tmp_path / "export")
    unet = seg.build_unet(tower, "encoder-decoder").eval()
    bn = unet.decoder.blocks[0].conv1[1]
    seen = []
    hook = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    images = torch.rand(6, 1, 64, 64)
    encoder_bn = {k: v.clone() for k, v in unet.encoder.module.state_dict().items() if "running" in k}
    n = seg.recalibrate_batchnorm(unet, [{"image": images[:3]}, None, {"image": images[3:]}], torch.device("cpu"))
    hook.remove()
    assert n == 6 and not unet.training and bn.momentum == 0.1
    x = torch.cat(seen)
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    # a cumulative average of the batches' unbiased variances (BatchNorm's own rule)
    per_batch = torch.stack([t.var((0, 2, 3), unbiased=True) for t in seen])
    torch.testing.assert_close(bn.running_var, per_batch.mean(0), rtol=1e-4, atol=1e-5)
    for k, v in unet.encoder.module.state_dict().items():  # the frozen encoder's statistics stay
        if k in encoder_bn:
            torch.testing.assert_close(v, encoder_bn[k], rtol=0, atol=0, msg=k)


def test_encoder_decoder_transfer_needs_a_decoder(tmp_path):
    for transfer in ("encoder-decoder", "encoder-decoder-head", "frozen-decoder"):
        with pytest.raises(ValueError, match="has no.*decoder|has none"):
            seg.build_unet(load_image_tower("random", arch="resnet18"), transfer)
    with pytest.raises(ValueError, match="pre-trained decoder"):
        seg.run(_args(tmp_path, "--transfer", "encoder-decoder", "--epochs", "1"))
    with pytest.raises(ValueError, match="frozen means frozen"):   # refused before any data is read
        seg.run(_args(tmp_path, "--transfer", "frozen-decoder", "--recalibrate-bn", "--epochs", "1"))


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
    args = parse_protocol_args("segmentation", [
        "--data", f"csv:{table}", "--model", "random", "--arch", "resnet18", "--image-size", "64",
        "--batch-size", "7", "--lr", "3e-3", "--epochs", "4", "--patience", "4", "--num-workers", "0",
        "--no-progress", "--figures", "1", "--out", str(tmp_path / "out")])
    m = seg.run(args)
    assert (m["n_train"], m["n_val"], m["n_test"]) == (14, 2, 4)
    # trivial baselines: all background scores 0 on these non-empty masks; all foreground scores
    # 2|T| / (|T| + S^2) per image
    from g2d.data.labelled.specs import open_dataset

    test = open_dataset(f"csv:{table}", "test", 1.0, square_geometry(64))
    masks = torch.stack([test[i]["mask"] for i in range(len(test))])
    all_fg = float(dice_per_image(torch.ones_like(masks), masks).mean())
    assert m["n_test_empty_target"] == 0
    assert m["dice"] > max(all_fg, 0.5), (m["dice"], all_fg)  # about 0.57 vs 0.50
