"""Label subsets (``--subset k``): the published nested fractions (k = 0) and seeded re-draws of the
same size (k >= 1) that paired comparisons run over (issue 28)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g2d.data.labelled.siim import balance_train
from g2d.data.labelled.specs import open_dataset
from g2d.data.labelled.splits import fraction_count


def test_synthetic_subsets_have_the_published_size_and_stay_nested():
    published = open_dataset("synthetic:40", "train", 0.25)
    assert published.ids == [f"synthetic/train/{i}" for i in range(10)]  # subset 0: as before
    one, two = (open_dataset("synthetic:40", "train", 0.25, subset=k) for k in (1, 2))
    assert len(one) == len(two) == 10 and set(one.ids) != set(two.ids) != set(published.ids)
    assert open_dataset("synthetic:40", "train", 0.25, subset=1).ids == one.ids  # seeded
    assert set(one.ids) <= set(open_dataset("synthetic:40", "train", 0.5, subset=1).ids)  # nested
    # a sample is the same image whichever subset holds it
    whole = open_dataset("synthetic:40", "train")
    k = int(one.ids[3].rsplit("/", 1)[1])
    assert (one[3]["image"] == whole[k]["image"]).all() and one[3]["id"] == whole[k]["id"]
    # validation and test do not depend on the subset
    assert open_dataset("synthetic:40", "test", subset=3).ids == open_dataset("synthetic:40", "test").ids


def _csv_set(root: Path, n: int = 30) -> Path:
    (root / "img").mkdir(parents=True)
    lines = ["image,label,split"]
    for i in range(n):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(root / "img" / f"{i:03d}.png")
        lines.append(f"img/{i:03d}.png,{i % 3 == 0:d},{'train' if i < 20 else 'val' if i < 25 else 'test'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_table_subsets_redraw_the_training_ids_only(tmp_path):
    spec = f"csv:{_csv_set(tmp_path)}?labels=label"
    published = open_dataset(spec, "train", 0.2)
    redrawn = [open_dataset(spec, "train", 0.2, subset=k) for k in (1, 2, 3)]
    assert all(len(r) == len(published) == fraction_count(20, 0.2) for r in redrawn)
    assert len({tuple(sorted(r.ids)) for r in [published, *redrawn]}) == 4
    assert set(redrawn[0].ids) <= set(open_dataset(spec, "train", 0.5, subset=1).ids)
    assert open_dataset(spec, "val", subset=2).ids == open_dataset(spec, "val").ids
    with pytest.raises(ValueError, match="subset"):
        open_dataset(spec, "train", 0.2, subset=-1)


def test_siim_balanced_subsets_keep_every_positive_at_full_fraction_and_redraw_negatives(tmp_path):
    ds = open_dataset(f"csv:{_csv_set(tmp_path)}?labels=label", "train")
    positives = {i for i, y in zip(ds.ids, ds.labels()[:, 0]) if y == 1}
    picks = [balance_train(ds, 1.0, subset=k) for k in (1, 2, 3)]
    for bal in picks:
        assert positives <= set(bal.ids) and len(bal) == 2 * len(positives)
    assert len({tuple(sorted(b.ids)) for b in picks}) > 1  # the negatives differ between subsets
    half = balance_train(ds, 0.5, subset=2)
    assert set(half.ids) <= set(picks[1].ids) and len(half) == fraction_count(len(picks[1]), 0.5)


def _patient_csv(root: Path) -> Path:
    """Field case 25's table: 400 images of 100 patients (4 each), no split column, one rare label (5
    positive patients, every image of a positive patient positive)."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    positive = set(rng.choice(100, 5, replace=False).tolist())
    lines = ["image,patient,a"]
    for p in range(100):
        for k in range(4):
            i = 4 * p + k
            Image.fromarray(rng.integers(0, 60, (8, 8)).astype(np.uint8)).save(root / "img" / f"{i}.png")
            lines.append(f"img/{i}.png,P{p:03d},{int(p in positive)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_subsets_of_a_set_with_patients_are_drawn_by_patient_and_nested(tmp_path):
    spec = f"csv:{_patient_csv(tmp_path)}?labels=a"
    full = open_dataset(spec, "train")
    images_of = {}
    for r in full.records:
        images_of.setdefault(r.patient, set()).add(r.id)
    for subset in (0, 1, 2):
        chosen = [open_dataset(spec, "train", f, subset=subset) for f in (0.01, 0.1, 1.0)]
        ids = [{r.id for r in c.records} for c in chosen]
        assert ids[0] <= ids[1] <= ids[2]  # nested
        for c in chosen:
            patients = {r.patient for r in c.records}
            assert all(images_of[p] <= {r.id for r in c.records} for p in patients)  # whole patients
        assert len({r.patient for r in chosen[1].records}) == fraction_count(len(images_of), 0.1)
    assert ({r.id for r in open_dataset(spec, "train", 0.1, subset=1).records}
            != {r.id for r in open_dataset(spec, "train", 0.1, subset=2).records})


def test_a_class_without_training_positives_is_left_out_of_the_mean_and_said(caplog):
    import logging

    from g2d.downstream.features import leave_out_classes_without_positives, train_positives

    labels = np.array([[1, 0, 0], [0, 0, 1], [1, 0, np.nan]])
    positives = train_positives(labels, ["a", "b", "c"])
    assert positives == {"a": 2, "b": 0, "c": 1}
    test = {"auc": 0.6, "auc_per_class": {"a": 0.9, "b": 0.3, "c": 0.6}, "undefined": {}}
    with caplog.at_level(logging.WARNING, "g2d.downstream"):
        out = leave_out_classes_without_positives(test, positives, "csv:x linear")
    assert "no positive training image for b" in caplog.text
    assert out["auc"] == pytest.approx(0.75) and out["auc_all_classes"] == 0.6
    assert out["classes_without_train_positives"] == ["b"] and out["train_positives"] == positives
    none = leave_out_classes_without_positives(test, {"a": 0, "b": 0, "c": 0}, "x")
    assert np.isnan(none["auc"]) and "no class" in none["undefined"]["auc"]


@pytest.mark.slow
def test_the_linear_probe_records_positives_per_class_of_its_subset(tmp_path, caplog):
    """Field case 25: a 1 % subset without any positive of the rare class: metrics.json says so and
    the AUROC mean leaves it out (null: no class left), with a warning."""
    import json
    import logging

    from g2d.cli import main

    spec = f"csv:{_patient_csv(tmp_path)}"
    with caplog.at_level(logging.WARNING):
        assert main(["eval", "linear", "--data", spec, "--labels", "a", "--fraction", "0.01", "--model", "random",
                     "--arch", "resnet18", "--epochs", "2", "--image-size", "32", "--resize", "32", "--out",
                     str(tmp_path / "lin"), "--no-progress", "--num-workers", "0", "--no-feature-cache"]) == 0
    m = json.loads((tmp_path / "lin" / "metrics.json").read_text())
    assert m["train_positives"] == {"a": 0} and m["classes_without_train_positives"] == ["a"]
    assert m["auc"] is None and "no class" in m["undefined"]["auc"]
    assert "no positive training image for a" in caplog.text
