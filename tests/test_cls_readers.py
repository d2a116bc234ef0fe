"""Classification readers (CheXpert, ChestX-ray14, COVIDx) on raw-format fixtures, and the shipped table."""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g2d.data.labelled import chexpert, covidx, cxr14
from g2d.data.labelled.dataset import collate_labelled
from g2d.data.labelled.specs import open_dataset
from g2d.data.labelled.splits import (
    load_order,
    load_split,
    order_ranks,
    split_ids,
    write_order,
    write_split,
)
from g2d.data.transforms import ImageTransformCfg
from g2d.errors import DataError

GEOM = ImageTransformCfg(resize=32, crop=32, augment="none", keep_aspect=False)


def _open(spec: str, split: str, fraction: float = 1.0, geometry: ImageTransformCfg = GEOM):
    # The fixtures hold many deliberate bad rows relative to their size.
    return open_dataset(spec, split=split, fraction=fraction, geometry=geometry, max_skip_fraction=0.5)


def _img(path: Path, value: int = 128, size: tuple[int, int] = (24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


# ----------------------------------------------------------------------------------------- CheXpert
HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *chexpert.OBSERVATIONS]


def _cx_row(path: str, view: str = "Frontal", **labels: str) -> list[str]:
    return [path, "Female", "60", view, "AP" if view == "Frontal" else "",
            *[labels.get(c.replace(" ", "_"), "") for c in chexpert.OBSERVATIONS]]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture()
def chexpert_dir(tmp_path: Path) -> Path:
    """``tmp/CheXpert-v1.0-small/{train,valid}.csv`` + JPEGs; 12 train patients, 10 valid patients."""
    root = tmp_path / "data"
    ver = root / "CheXpert-v1.0-small"
    rows = []
    for p in range(1, 13):
        for s in (1, 2):
            rows.append(_cx_row(f"CheXpert-v1.0-small/train/patient{p:05d}/study{s}/view1_frontal.jpg",
                                Atelectasis="-1.0", Cardiomegaly="-1.0", Consolidation="1.0",
                                Pleural_Effusion="0.0", Edema=""))
        rows.append(_cx_row(f"CheXpert-v1.0-small/train/patient{p:05d}/study1/view2_lateral.jpg", "Lateral",
                            Edema="1.0"))
    bad = [
        _cx_row("CheXpert-v1.0-small/train/patient00013/study1/view1_frontal.jpg", Edema="2.0"),  # row 38
        _cx_row("CheXpert-v1.0-small/train/patient00014/study1/view1_frontal.jpg", "Oblique"),  # row 39
        rows[0],  # duplicated id, row 40
        _cx_row("CheXpert-v1.0-small/train/patient00015/study1/view1_frontal.jpg"),  # image missing, row 41
    ]
    _write_csv(ver / "train.csv", HEADER, rows + bad)
    for r in rows + bad[:2]:
        _img(root / r[0])
    valid = [_cx_row(f"CheXpert-v1.0-small/valid/patient{64540 + p}/study1/view1_frontal.jpg",
                     Cardiomegaly="1.0", Edema="0.0", Atelectasis="0.0", Consolidation="0.0",
                     Pleural_Effusion="1.0") for p in range(1, 11)]
    valid.append(_cx_row("CheXpert-v1.0-small/valid/patient64541/study1/view2_lateral.jpg", "Lateral"))
    _write_csv(ver / "valid.csv", HEADER, valid)
    for r in valid:
        _img(root / r[0])
    return root


@pytest.fixture()
def chexpert_table(chexpert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(chexpert, "VAL_IMAGES", 4)
    split = chexpert.make_split(chexpert_dir / "CheXpert-v1.0-small" / "train.csv")
    table = write_split(tmp_path / "chexpert.csv.gz", split, chexpert.SPLIT_SEED)
    monkeypatch.setattr(chexpert, "SPLIT_TABLE", str(table))
    return table


def test_chexpert_labels_policy_and_frontal_filter(chexpert_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "g2d.data"):
        records, tasks, skipped = chexpert.read_chexpert(chexpert_dir)
    assert tasks == list(chexpert.COMPETITION)
    assert len(records) == 24 + 10  # frontal train images + frontal valid images
    assert all("lateral" not in r.id for r in records)
    r = next(x for x in records if x.id == "train/patient00001/study1/view1_frontal.jpg")
    # Atelectasis U-ones, Cardiomegaly U-zeros, Consolidation 1, Edema blank -> 0, Effusion 0
    assert r.labels.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert r.patient == "patient00001" and r.split is None and Path(r.image).is_file()
    assert {x.split for x in records if "valid/" in x.id} == {"test"}
    assert dict(skipped.counts) == {"bad_label": 1, "bad_view": 1, "duplicated_id": 1, "missing_image": 1}
    assert "train.csv:38" in caplog.text and "train.csv:41" in caplog.text
    assert "patient000" not in caplog.text  # patient ids never logged


def test_chexpert_options(chexpert_dir: Path) -> None:
    ver = chexpert_dir / "CheXpert-v1.0-small"
    recs, tasks, _ = chexpert.read_chexpert(ver, classes="all", uncertain="ignore", blank="nan")  # version folder
    assert tasks == list(chexpert.OBSERVATIONS)
    r = next(x for x in recs if x.id == "train/patient00002/study2/view1_frontal.jpg")
    lab = dict(zip(tasks, r.labels.tolist()))
    assert math.isnan(lab["Atelectasis"]) and math.isnan(lab["Edema"]) and math.isnan(lab["No Finding"])
    assert lab["Consolidation"] == 1.0 and lab["Pleural Effusion"] == 0.0
    recs, tasks, _ = chexpert.read_chexpert(chexpert_dir, classes=["Cardiomegaly"], uncertain={"Cardiomegaly": "ones"})
    assert tasks == ["Cardiomegaly"] and all(x.labels[0] == 1.0 for x in recs)
    recs, _, _ = chexpert.read_chexpert(chexpert_dir, frontal_only=False)
    assert sum("lateral" in x.id for x in recs) == 12 + 1
    with pytest.raises(DataError, match="unknown classes"):
        chexpert.read_chexpert(chexpert_dir, classes=["Opacity"])
    with pytest.raises(DataError, match="uncertain"):
        chexpert.read_chexpert(chexpert_dir, uncertain="maybe")


def test_chexpert_flat_layout_resolves_from_csv_folder(chexpert_dir: Path, tmp_path: Path) -> None:
    flat = tmp_path / "renamed"
    (chexpert_dir / "CheXpert-v1.0-small").rename(flat)  # user renamed the version folder
    recs, _, skipped = chexpert.read_chexpert(flat)
    assert len(recs) == 34 and skipped.counts["missing_image"] == 1
    assert all(Path(r.image).is_file() and str(flat) in r.image for r in recs)


def test_chexpert_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        chexpert.read_chexpert(tmp_path / "nope")
    with pytest.raises(DataError, match="no train.csv"):
        chexpert.read_chexpert(tmp_path)
    _write_csv(tmp_path / "train.csv", ["Path", "Frontal/Lateral", "Edema"], [["a/patient1/x.jpg", "Frontal", ""]])
    with pytest.raises(DataError, match="lacks columns"):
        chexpert.read_chexpert(tmp_path)
    with pytest.raises(DataError, match="not found"):
        open_dataset(f"chexpert:{tmp_path / 'missing'}")


def test_chexpert_splits_through_open_dataset(chexpert_dir: Path, chexpert_table: Path) -> None:
    table = load_split(chexpert_table)
    assert {s for s, _ in table.values()} == {"train", "val", "test"}
    assert all("lateral" not in i for i in table)
    spec = f"chexpert:{chexpert_dir}"
    sets = {s: _open(spec, split=s, geometry=GEOM) for s in ("train", "val", "test")}
    pat = {s: {r.patient for r in d.records} for s, d in sets.items()}
    assert not (pat["train"] & pat["val"]) and not (pat["train"] & pat["test"]) and not (pat["val"] & pat["test"])
    assert len(sets["val"]) == 4 and len(sets["test"]) == 10
    # patient00015's missing image is listed in the table (the published split) and counted, not hidden
    assert sets["train"].skipped.counts["missing_image"] == 1
    assert sorted(sets["test"].ids) == [f"valid/patient{64540 + p}/study1/view1_frontal.jpg" for p in range(1, 11)]
    small = _open(spec, split="train", fraction=0.1, geometry=GEOM).ids
    mid = _open(spec, split="train", fraction=0.5, geometry=GEOM).ids
    assert 1 <= len(small) < len(mid) < len(sets["train"]) and set(small) <= set(mid) <= set(sets["train"].ids)
    batch = collate_labelled([sets["test"][0], sets["test"][1]])
    assert batch["image"].shape == (2, 1, 32, 32) and batch["labels"].tolist()[0] == [0.0, 1.0, 0.0, 0.0, 1.0]


def test_shipped_chexpert_table() -> None:
    table = load_split("chexpert")
    n = {s: sum(v == s for v, _ in table.values()) for s in ("train", "val", "test")}
    assert n["train"] + n["val"] == 191_027  # frontal train.csv images
    assert 5_000 <= n["val"] < 5_100
    assert n["test"] in (0, 202)  # 202 once built with the official valid.csv next to train.csv
    patients = {s: {re.search(r"patient\d+", i).group(0) for i, (v, _) in table.items() if v == s}
                for s in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"]) and not (patients["test"] & (patients["train"] | patients["val"]))
    one, ten = split_ids(table, "train", 0.01), split_ids(table, "train", 0.1)
    assert len(one) == math.ceil(0.01 * n["train"]) and set(one) <= set(ten)
    assert all(not i.startswith("CheXpert") for i in table)  # version-free ids


# ----------------------------------------------------------------------------------------- ChestX-ray14
CXR_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]


@pytest.fixture()
def cxr14_dir(tmp_path: Path) -> Path:
    """NIH layout: 20 train_val patients x 2 images, 4 test patients x 2; images in images_00{1,2}/images."""
    root = tmp_path / "nih"
    rows, trainval, test = [], [], []
    findings = ["No Finding", "Cardiomegaly|Effusion", "Hernia", "Pleural_Thickening|Mass|Nodule"]
    for p in range(1, 25):
        for f in range(2):
            name = f"{p:08d}_{f:03d}.png"
            rows.append([name, findings[(p + f) % 4], str(f), str(p), "50", "M", "PA", "24", "20", "0.1", "0.1"])
            (test if p > 20 else trainval).append(name)
            _img(root / f"images_00{1 + p % 2}" / "images" / name)
    rows.append(["00000099_000.png", "Cardiomegaly|Sarcoidosis", "0", "99", "50", "F", "PA", "1", "1", ".1", ".1"])
    rows.append(rows[0])  # duplicated image index
    (root / "images_002" / "images" / "00000003_001.png").unlink()  # missing file
    trainval += ["00000099_000.png", "00000077_000.png"]  # bad-label row; listed without a label row
    _write_csv(root / "Data_Entry_2017_v2020.csv", CXR_HEADER, rows)
    (root / "train_val_list.txt").write_text("\n".join(trainval) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def test_cxr14_labels_and_bad_rows(cxr14_dir: Path) -> None:
    records, tasks, skipped = cxr14.read_cxr14(cxr14_dir)
    assert tasks == list(cxr14.CLASSES) and len(tasks) == 14
    by_id = {r.id: r for r in records}
    assert by_id["00000001_000.png"].labels.tolist() == [0, 1, 1] + [0] * 11  # Cardiomegaly|Effusion
    assert by_id["00000002_000.png"].labels.sum() == 1 and by_id["00000002_000.png"].labels[13] == 1  # Hernia
    assert not by_id["00000004_000.png"].labels.any()  # No Finding
    assert dict(skipped.counts) == {"bad_label": 1, "duplicated_id": 1, "missing_image": 1,
                                    "listed_but_no_label_row": 2}  # the bad-label row is unlisted too
    assert len(records) == 47


def test_cxr14_splits(cxr14_dir: Path) -> None:
    spec = f"cxr14:{cxr14_dir}"
    sets = {s: _open(spec, split=s, geometry=GEOM) for s in ("train", "val", "test")}
    assert len(sets["test"]) == 8 and {r.patient for r in sets["test"].records} == {"21", "22", "23", "24"}
    assert len(sets["val"]) == 4  # 10 % of 40 train_val images = whole patients
    pat = {s: {r.patient for r in d.records} for s, d in sets.items()}
    assert not (pat["train"] & pat["val"]) and not ((pat["train"] | pat["val"]) & pat["test"])
    split = cxr14.make_split(cxr14_dir / "Data_Entry_2017_v2020.csv")
    assert sorted(i for i, s in split.items() if s == "val") == sorted(sets["val"].ids)
    assert split == cxr14.make_split(cxr14_dir / "Data_Entry_2017_v2020.csv")  # deterministic
    ten = _open(spec, split="train", fraction=0.1, geometry=GEOM).ids
    half = _open(spec, split="train", fraction=0.5, geometry=GEOM).ids
    assert set(ten) <= set(half) < set(sets["train"].ids)
    assert sets["test"][0]["image"].shape == (1, 32, 32)


def test_cxr14_carve_and_fractions_follow_the_shipped_order(cxr14_dir: Path) -> None:
    """Val patients and training fractions come from ``splits/cxr14_order.csv.gz``, not from an RNG."""
    order = load_order(cxr14.ORDER_TABLE)
    assert len(order) == 112_120 and sorted(order.values()) == list(range(112_120))  # every NIH image
    spec = f"cxr14:{cxr14_dir}"
    train = _open(spec, split="train", geometry=GEOM).records
    val = _open(spec, split="val", geometry=GEOM).records
    assert "00000001_000.png" in order and "00000009_001.png" not in order  # NIH has one image of patient 9
    rank = order_ranks([r.id for r in train + val], order, cxr14.SPLIT_SEED)  # ids NIH lacks rank last
    best = {}  # patient -> best rank of its train_val images
    for r in train + val:
        best[r.patient] = min(best.get(r.patient, 1 << 30), rank[r.id])
    val_patients = {r.patient for r in val}
    assert max(best[p] for p in val_patients) < min(best[p] for p in set(best) - val_patients)
    ten = _open(spec, split="train", fraction=0.1, geometry=GEOM).ids
    assert sorted(ten) == sorted(sorted((r.id for r in train), key=rank.get)[:len(ten)])


def test_order_ranks_put_unlisted_ids_last_without_moving_listed_ones(tmp_path: Path) -> None:
    table = write_order(tmp_path / "o.csv.gz", ["c", "a", "b"], seed=0)
    order = load_order(table)
    assert sorted(order) == ["a", "b", "c"] and sorted(order.values()) == [0, 1, 2]
    assert table.read_bytes() == write_order(tmp_path / "again" / "o.csv.gz", ["b", "c", "a"], seed=0).read_bytes()
    ranks = order_ranks(["a", "x", "c", "y"], order, seed=0)
    assert ranks["a"] == order["a"] and ranks["c"] == order["c"]
    assert sorted((ranks["x"], ranks["y"])) == [3, 4]
    with pytest.raises(ValueError, match="id,rank"):
        load_order(write_split(tmp_path / "s.csv.gz", {"a": "train"}, seed=0))


def test_cxr14_missing_files(cxr14_dir: Path) -> None:
    (cxr14_dir / "test_list.txt").unlink()
    with pytest.raises(DataError, match="test_list.txt not found"):
        cxr14.read_cxr14(cxr14_dir)
    (cxr14_dir / "Data_Entry_2017_v2020.csv").unlink()
    with pytest.raises(DataError, match="Data_Entry"):
        cxr14.read_cxr14(cxr14_dir)
    with pytest.raises(DataError, match="not found"):
        cxr14.read_cxr14(cxr14_dir / "nope")


# ----------------------------------------------------------------------------------------- COVIDx
@pytest.fixture()
def covidx_dir(tmp_path: Path) -> Path:
    root = tmp_path / "covidx"
    labels = ["normal", "pneumonia", "COVID-19"]
    train = [f"P{p} tr{p}_{k}.png {labels[p % 3]} src" for p in range(30) for k in range(2)]
    test = [f"T{p} te{p}.png {labels[p % 3]} src" for p in range(10)]
    for line in train + test:
        part = "test" if line.startswith("T") else "train"
        _img(root / part / line.split()[1])
    train += ["P99 tr99.png normal src",  # image missing
              "P98 tr98.png covid src",  # unknown label
              "P97 tr97.png",  # two fields
              "P0 tr0_0.png normal src"]  # duplicated
    (root / "train_COVIDx9A.txt").write_text("\n".join(train) + "\n\n")
    (root / "test_COVIDx9A.txt").write_text("\n".join(test) + "\n")
    return root


def test_covidx_labels_and_splits(covidx_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "g2d.data"):
        records, tasks, skipped = covidx.read_covidx(covidx_dir)
    assert tasks == ["normal", "pneumonia", "COVID-19"]
    by_id = {r.id: r for r in records}
    assert by_id["tr2_0.png"].labels.tolist() == [0, 0, 1] and by_id["te1.png"].labels.tolist() == [0, 1, 0]
    assert dict(skipped.counts) == {"missing_image": 1, "bad_label": 1, "malformed_line": 1, "duplicated_id": 1}
    assert "train_COVIDx9A.txt:62" in caplog.text and "P98" not in caplog.text
    spec = f"covidx:{covidx_dir}"
    sets = {s: _open(spec, split=s, geometry=GEOM) for s in ("train", "val", "test")}
    assert len(sets["test"]) == 10 and len(sets["val"]) == 12 and len(sets["train"]) == 48
    pat = {s: {r.patient for r in d.records} for s, d in sets.items()}
    assert not (pat["train"] & pat["val"])
    small = _open(spec, split="train", fraction=0.1, geometry=GEOM).records
    # by patient (issue 29): 10 % of the 24 training patients = 3 patients, with both their images
    assert len({r.patient for r in small}) == 3 and len(small) == 6 and {r.id for r in small} <= set(sets["train"].ids)
    assert sets["val"][0]["labels"].sum() == 1


def test_covidx_formats(covidx_dir: Path) -> None:
    (covidx_dir / "train_COVIDx8A.txt").write_text("P1 a.png normal src\n")
    with pytest.raises(DataError, match="several train label files"):
        covidx.read_covidx(covidx_dir)
    recs, _, _ = covidx.read_covidx(covidx_dir, train_file="train_COVIDx9A.txt")
    assert len(recs) == 70
    (covidx_dir / "train.txt").write_text("P1 tr1_0.png positive rsna\n")
    (covidx_dir / "test.txt").write_text("T1 te1.png negative rsna\n")
    with pytest.raises(DataError, match="binary COVIDx"):
        covidx.read_covidx(covidx_dir)
    with pytest.raises(DataError, match="no train label file"):
        covidx.read_covidx(covidx_dir / "train")
