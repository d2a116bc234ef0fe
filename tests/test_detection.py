"""``g2d eval detection``: YOLOv3 targets/decoding, mAP two ways, frozen encoder, resume/determinism."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import parse_protocol_args

from g2d.downstream import detection as det
from g2d.downstream.yolo import (
    COCO_ANCHORS,
    STRIDES,
    YOLOv3Head,
    build_targets,
    decode,
    postprocess,
    scaled_anchors,
    yolo_loss,
)
from g2d.metrics import MAP_IOU_THRESHOLDS, DetectionScores, mean_average_precision
from g2d.towers import load_image_tower

BASE = ["--data", "synthetic:8", "--model", "random", "--arch", "resnet18", "--image-size", "64",
        "--batch-size", "8", "--lr", "1e-3", "--head-width", "64", "--num-workers", "0", "--no-progress",
        "--figures", "2"]


def _args(out, *extra: str):
    return parse_protocol_args("detection", [*BASE, "--out", str(out), *extra])


# ----------------------------------------------------------------------------------------- mAP


def _scores(items):
    s = DetectionScores()
    for pred, score, gt in items:
        s.add(torch.tensor(pred, dtype=torch.float32).reshape(-1, 4), torch.tensor(score, dtype=torch.float32),
              torch.tensor(gt, dtype=torch.float32).reshape(-1, 4))
    return s


def test_map_all_images_and_mgca_skipping():
    s = _scores([
        ([[0, 0, 10, 10]], [0.9], [[0, 0, 10, 10]]),   # hit
        ([], [], [[20, 20, 30, 30]]),                    # missed: no detection at all
        ([[5, 5, 15, 15]], [0.8], []),                   # false positive on an image without boxes
    ])
    m = mean_average_precision(s)
    # all images: recall 1/2 at precision 1, then a false positive -> 101-point AP = 51/101
    assert m["map"] == pytest.approx(51 / 101, abs=1e-6)
    # MGCA skips the image without detections and the one without ground truth -> only the hit
    assert m["map_mgca"] == pytest.approx(1.0)
    assert (m["map_images"], m["map_mgca_images"], m["mgca_skipped_no_gt"], m["mgca_skipped_no_pred"]) == (3, 1, 1, 1)
    # the same numbers as torchmetrics called directly
    from torchmetrics.detection import MeanAveragePrecision

    ref = MeanAveragePrecision(iou_thresholds=list(MAP_IOU_THRESHOLDS))
    ref.update(s.preds, s.targets)
    assert m["map"] == pytest.approx(float(ref.compute()["map"]))


def test_map_averages_over_iou_040_to_075():
    assert MAP_IOU_THRESHOLDS == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)
    # IoU 0.625: a hit at 0.40 ... 0.60 (5 of 8 thresholds), a miss above
    m = mean_average_precision(_scores([([[0, 0, 10, 6.25]], [0.7], [[0, 0, 10, 10]])]))
    assert m["map"] == pytest.approx(5 / 8) and m["map_mgca"] == pytest.approx(5 / 8)
    # no ground truth anywhere: undefined, reported as None (not torchmetrics' -1)
    m = mean_average_precision(_scores([([[0, 0, 5, 5]], [0.9], [])]))
    assert m["map"] is None and m["map_mgca"] is None and m["map_mgca_images"] == 0


# ---------------------------------------------------------------------------------------- YOLO


def test_anchors_are_coco_scaled_to_input():
    a = scaled_anchors(224)
    assert a.shape == (3, 3, 2) and STRIDES == (32, 16, 8)
    torch.testing.assert_close(a[0, 0], torch.tensor([116.0, 90.0]) * 224 / 416)
    torch.testing.assert_close(a[2, 0], torch.tensor(COCO_ANCHORS[2][0], dtype=torch.float32) * 224 / 416)


def test_head_output_shapes():
    head = YOLOv3Head((128, 256, 512), num_classes=1, width=64)
    feats = [torch.rand(2, 128, 8, 8), torch.rand(2, 256, 4, 4), torch.rand(2, 512, 2, 2)]
    outs = head(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 18, 2, 2), (2, 18, 4, 4), (2, 18, 8, 8)]


def _perfect_outputs(boxes, size):
    """Raw head outputs that encode exactly the targets built from ``boxes``."""
    anchors = scaled_anchors(size)
    outs = []
    for anc, stride in zip(anchors, STRIDES):
        g = size // stride
        t = build_targets(boxes, None, anc, (g, g), stride)
        eps = 1e-6
        raw = torch.zeros(len(boxes), 3, g, g, 6)
        raw[..., 0] = torch.logit(t.tx.clamp(eps, 1 - eps))
        raw[..., 1] = torch.logit(t.ty.clamp(eps, 1 - eps))
        raw[..., 2], raw[..., 3] = t.tw, t.th
        raw[..., 4] = torch.where(t.mask.bool(), 12.0, -12.0)
        raw[..., 5] = 12.0
        outs.append(raw.permute(0, 1, 4, 2, 3).reshape(len(boxes), 18, g, g))
    return outs, anchors


def test_targets_decode_back_to_boxes():
    size = 224
    boxes = [torch.tensor([[20.0, 30.0, 60.0, 100.0], [130.0, 40.0, 210.0, 190.0]]),
             torch.zeros(0, 4),
             torch.tensor([[100.5, 100.5, 110.0, 118.0]])]
    outs, anchors = _perfect_outputs(boxes, size)
    dets = postprocess(decode(outs, anchors, size), conf_threshold=0.5, nms_threshold=0.5)
    for (got, scores, labels), want in zip(dets, boxes):
        assert len(got) == len(want)  # one box per object: the three scales' copies merge in NMS
        order = lambda b: b[torch.argsort(b[:, 0])]  # noqa: E731
        torch.testing.assert_close(order(got), order(want), atol=1e-3, rtol=0)
        assert (scores > 0.99).all() and (labels == 0).all()
    # the loss prefers the encoded targets to random outputs
    rand = [torch.randn_like(o) for o in outs]
    assert yolo_loss(outs, boxes, anchors, size) < yolo_loss(rand, boxes, anchors, size)


def test_targets_mark_best_anchor_per_scale_and_ignore_overlapping_anchors():
    anc = scaled_anchors(224)[2]  # stride 8 anchors ~ (5.4, 7), (8.6, 16.2), (17.8, 12.4) px
    t = build_targets([torch.tensor([[40.0, 40.0, 49.0, 56.0]])], None, anc, (28, 28), 8)
    # centre (44.5, 48) -> cell (x 5, y 6); box 9 x 16 matches the second anchor best
    assert t.mask.sum() == 1 and t.mask[0, 1, 6, 5] == 1
    assert t.noobj[0, 1, 6, 5] == 0 and t.noobj.sum() == t.noobj.numel() - 1
    torch.testing.assert_close(t.tx[0, 1, 6, 5], torch.tensor(44.5 / 8 - 5))
    torch.testing.assert_close(t.tw[0, 1, 6, 5], torch.log(torch.tensor(9.0) / anc[1, 0]))


def test_defaults_follow_the_paper():
    a = parse_protocol_args("detection", ["--data", "synthetic", "--out", "x", "--fraction", "0.01"])
    assert det._defaults(a) == (8, 2e-4)
    a = parse_protocol_args("detection", ["--data", "synthetic", "--out", "x", "--fraction", "0.1"])
    assert det._defaults(a) == (16, 5e-4)
    assert (a.weight_decay, a.epochs, a.patience, a.conf_threshold, a.nms_threshold, a.image_size,
            a.head_width) == (1e-6, 50, 10, 0.5, 0.5, 224, 1024)


# --------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    full, model = det.fit_and_test(_args(root / "full", "--epochs", "2"))
    first = det.run(_args(root / "split", "--epochs", "1", "--figures", "0"))
    resumed = det.run(_args(root / "split", "--epochs", "2", "--figures", "0"))
    return {"root": root, "full": full, "model": model, "first": first, "resumed": resumed}


@pytest.mark.slow
def test_metrics_file_keys_and_ranges(runs):
    m = json.loads((runs["root"] / "full" / "metrics.json").read_text())
    for key in ("map", "map_mgca", "n_train", "n_val", "n_test", "epochs_run", "best_epoch",
                "mgca_skipped_no_gt", "mgca_skipped_no_pred", "map_mgca_images", "skipped_unreadable_test"):
        assert key in m, key
    assert 0 <= m["map"] <= 1
    assert m["map_mgca"] is None or 0 <= m["map_mgca"] <= 1
    assert (m["n_train"], m["n_val"], m["n_test"]) == (8, 16, 16) and m["epochs_run"] == 2
    assert m["map_mgca_images"] + m["mgca_skipped_no_gt"] + m["mgca_skipped_no_pred"] == m["map_images"] == 16
    assert m["mgca_skipped_no_gt"] > 0  # the synthetic test split has normal images
    assert m["iou_thresholds"] == list(MAP_IOU_THRESHOLDS)
    assert len(list((runs["root"] / "full" / "figures").glob("det_*.png"))) == 2
    assert "map_mgca" in (runs["root"] / "full" / "results.md").read_text()


@pytest.mark.slow
def test_resume_continues_and_matches_uninterrupted_run(runs):
    first, resumed, full = runs["first"], runs["resumed"], runs["full"]
    assert first["epochs_run"] == 1 and resumed["resumed_from_epoch"] == 1 and resumed["epochs_run"] == 2
    assert first["history"][0] == full["history"][0]  # same seed, same epoch
    assert resumed["history"] == full["history"]
    assert (resumed["map"], resumed["map_mgca"], resumed["test_loss"]) == (full["map"], full["map_mgca"],
                                                                           full["test_loss"])


@pytest.mark.slow
def test_frozen_encoder_keeps_weights_and_bn_statistics(runs):
    torch.manual_seed(0)
    initial = load_image_tower("random", arch="resnet18").encoder.state_dict()
    trained = runs["model"].encoder.module.state_dict()
    for k, v in initial.items():
        torch.testing.assert_close(trained[k], v, rtol=0, atol=0, msg=k)
    assert not any(p.requires_grad for p in runs["model"].encoder.parameters())
    assert all(p.requires_grad for p in runs["model"].head.parameters())
