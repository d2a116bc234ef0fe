import json
import math

import numpy as np
import pytest
import torch
from helpers import parse_protocol_args

from g2d.downstream import features, finetune, linear_probe
from g2d.losses import masked_bce
from g2d.metrics import auroc_per_class, is_multiclass

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = ["--arch", "resnet18", "--resize", "32", "--image-size", "32", "--num-workers", "0", "--no-progress"]


def _linear_args(tmp_path, out, *extra):
    return parse_protocol_args("linear", ["--data", "synthetic:16", "--model", "random", "--out", str(out),
                                             "--feature-cache", str(tmp_path / "cache"), "--epochs", "3",
                                             *SMALL, *extra])


@pytest.mark.slow
def test_linear_probe_metrics_and_feature_cache_reuse(tmp_path, monkeypatch):
    calls = []
    real = features.extract_features

    def counting(tower, ds, *a, **k):
        calls.append(len(ds))
        return real(tower, ds, *a, **k)

    monkeypatch.setattr(features, "extract_features", counting)
    m = linear_probe.run(_linear_args(tmp_path, tmp_path / "half", "--fraction", "0.5"))
    assert calls == [8, 16, 16]  # train (half), val, test
    saved = json.loads((tmp_path / "half" / "metrics.json").read_text())
    assert saved["type"] == "multilabel" and saved["pool"] == "gap" and saved["feature_dim"] == 512
    assert set(saved["auc_per_class"]) == {"opacity", "nodule", "effusion", "pneumothorax", "cardiomegaly"}
    assert 0.0 <= saved["auc"] <= 1.0 and saved["n_train"] == 8 and saved["n_test"] == 16
    assert 1 <= saved["best_epoch"] <= saved["epochs_run"] <= 3 and "run" in saved
    assert "| linear | synthetic:16 | random | gap |" in (tmp_path / "half" / "results.md").read_text()

    calls.clear()
    full = linear_probe.run(_linear_args(tmp_path, tmp_path / "full"))
    assert calls == [8]  # only the 8 training images the half run did not extract
    calls.clear()
    again = linear_probe.run(_linear_args(tmp_path, tmp_path / "again"))
    assert calls == [] and again["auc"] == full["auc"] and m["n_train"] == 8 and full["n_train"] == 16

    # without a cache everything is extracted again
    calls.clear()
    linear_probe.run(_linear_args(tmp_path, tmp_path / "nocache", "--no-feature-cache"))
    assert calls == [16, 16, 16]


def test_nan_labels_are_ignored_in_loss_and_auroc():
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), 0.0]])
    logits = torch.tensor([[2.0, 100.0], [-1.0, 0.5], [-100.0, -0.5]])
    known = ~torch.isnan(labels)
    expect = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], labels[known])
    torch.testing.assert_close(masked_bce(logits, labels), expect)
    assert torch.isfinite(masked_bce(logits, torch.full_like(labels, float("nan"))))

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(40, 2)).astype(np.float32)
    s = rng.random((40, 2))
    with_nan = y.copy()
    with_nan[:10, 0] = np.nan
    per = auroc_per_class(s, with_nan, ["a", "b"])
    from sklearn.metrics import roc_auc_score

    assert per["a"] == pytest.approx(roc_auc_score(y[10:, 0], s[10:, 0]))
    assert per["b"] == pytest.approx(roc_auc_score(y[:, 1], s[:, 1]))
    one_value = y.copy()
    one_value[:, 1] = 1.0
    m = features.evaluate_scores(s, one_value, ["a", "b"], multiclass=False)
    assert math.isnan(m["auc_per_class"]["b"]) and m["auc"] == pytest.approx(m["auc_per_class"]["a"])

    # a head trains on labels with unknown entries
    x = torch.randn(32, 6)
    lab = (x[:, :2] > 0).float()
    lab[::3, 1] = float("nan")
    head, summary = linear_probe.train_linear_head(
        (x, lab), (x, lab), ["a", "b"], False, epochs=5, batch_size=8, lr=1e-2, weight_decay=0.0, patience=0,
        monitor="metric", seed=0, device=torch.device("cpu"))
    assert all(torch.isfinite(p).all() for p in head.parameters()) and summary["val_metric"] > 0.8


def test_single_label_sets_use_softmax_and_accuracy():
    one_hot = np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]
    assert is_multiclass(one_hot)
    assert not is_multiclass(np.array([[1, 1, 0], [0, 0, 1]], np.float32))   # multi-label
    assert not is_multiclass(np.array([[1.0], [0.0]], np.float32))             # binary RSNA
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    y = torch.arange(60) % 3
    x = centres[y] + 0.1 * torch.randn(60, 8, generator=g)
    lab = torch.nn.functional.one_hot(y, 3).float()
    head, summary = linear_probe.train_linear_head(
        (x, lab), (x, lab), ["normal", "pneumonia", "covid"], True, epochs=20, batch_size=8, lr=5e-2,
        weight_decay=0.0, patience=5, monitor="metric", seed=0, device=torch.device("cpu"))
    m = features.evaluate_scores(head(x).softmax(1).detach().numpy(), lab.numpy(), ["n", "p", "c"], True)
    assert m["acc"] == 1.0 and set(m["acc_per_class"]) == {"n", "p", "c"} and m["auc"] == 1.0


def _ft_args(out, epochs, *extra):
    return parse_protocol_args("finetune", ["--data", "synthetic:8", "--out", str(out), "--epochs", str(epochs),
                                               "--batch-size", "4", "--seed", "3", *SMALL, *extra])


@pytest.mark.slow
def test_finetune_resumes_deterministically(tmp_path):
    full = finetune.run(_ft_args(tmp_path / "full", 2))
    saved = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert saved["task"] == "finetune" and set(saved["auc_per_class"]) and 0.0 <= saved["auc"] <= 1.0
    assert saved["epochs_run"] == 2 and len(saved["history"]) == 2
    assert (tmp_path / "full" / "ckpt.pt").is_file()  # the harness's checkpoint (best state inside)

    finetune.run(_ft_args(tmp_path / "split", 1))                    # "interrupted" after one epoch
    resumed = finetune.run(_ft_args(tmp_path / "split", 2))          # picks up ckpt.pt, trains epoch 2
    assert resumed["history"] == full["history"]
    assert resumed["auc"] == full["auc"] and resumed["auc_per_class"] == full["auc_per_class"]

    with pytest.raises(ValueError, match="other settings"):
        finetune.run(_ft_args(tmp_path / "split", 2, "--lr", "1e-3"))
