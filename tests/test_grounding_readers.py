"""The grounding sets' readers (MS-CXR, CheXlocalize, VinDr-CXR) on small fixtures written in the
released formats: MS-CXR's local-alignment CSV (its JSON converter's columns, v1.1.0 ``split``),
CheXlocalize's ``gt_segmentations_*.json`` (pycocotools RLE of a Fortran-ordered uint8 mask, counts as
text, every finding listed per image), VinDr-CXR's per-radiologist annotation and image-label CSVs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_dicom
from PIL import Image

from g2d.data.labelled.chexlocalize import TASKS as CHEXLOCALIZE_TASKS
from g2d.data.labelled.dataset import labels_at
from g2d.data.labelled.ms_cxr import read_ms_cxr
from g2d.data.labelled.specs import open_dataset, parse_spec
from g2d.data.transforms import ImageTransformCfg
from g2d.errors import DataError

GEOM = ImageTransformCfg(resize=32, crop=32, augment="none", keep_aspect=False)

MS_CXR_HEADER = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width",
                 "image_height", "split"]


def _jpg(path: Path, hw: tuple[int, int], seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random(hw) * 255).astype(np.uint8)).save(path)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------- MS-CXR


def _ms_cxr(root: Path, *, split_col: bool = True, extra_rows: list[list] = ()) -> Path:
    """Two images, three phrases (one with two boxes). Image a is stored at half its DICOM size."""
    mimic = root / "mimic-cxr-jpg"
    pa = "files/p10/p10000032/s50414267/aaa.jpg"
    pb = "files/p11/p11000011/s51000011/bbb.jpg"
    _jpg(mimic / pa, (80, 100))        # the DICOM is 200 x 160 (W x H): a half-size copy
    _jpg(mimic / pb, (120, 120), 1)
    rows = [
        ["aaa", "Pneumonia", "Patchy opacity in the right lower lobe", pa, 20, 40, 60, 50, 200, 160, "test"],
        ["aaa", "Pneumonia", "Patchy opacity in the right lower lobe", pa, 120, 40, 40, 40, 200, 160, "test"],
        ["aaa", "Cardiomegaly", "Cardiomegaly", pa, 60, 60, 80, 60, 200, 160, "test"],
        ["bbb", "Pleural Effusion", "Small left pleural effusion", pb, 70, 80, 40, 30, 120, 120, "train"],
        *extra_rows,
    ]
    header = MS_CXR_HEADER if split_col else MS_CXR_HEADER[:-1]
    _write_csv(root / "ms-cxr" / "MS_CXR_Local_Alignment_v1.1.0.csv", header,
               [r if split_col else r[:-1] for r in rows])
    return mimic


def test_ms_cxr_pairs_boxes_and_label_space(tmp_path):
    mimic = _ms_cxr(tmp_path)
    spec = f"ms-cxr:{tmp_path / 'ms-cxr'}?images={mimic}"
    test = open_dataset(spec, "test", geometry=GEOM)
    assert [r.id for r in test.records] == ["aaa#0", "aaa#1"]
    pneu, cardio = test.records
    assert pneu.extra == {"prompt": "Patchy opacity in the right lower lobe", "finding": "Pneumonia", "image_id": "aaa"}
    np.testing.assert_array_equal(pneu.boxes, [[20, 40, 80, 90], [120, 40, 160, 80]])  # x, y, w, h -> x1 y1 x2 y2
    assert pneu.label_hw == (160, 200) and pneu.patient == "p10000032"
    assert pneu.labels.tolist() == [float(t == "Pneumonia") for t in test.tasks] and len(test.tasks) == 8
    boxes, _ = labels_at(pneu, (80, 100))                                   # rescaled to the half-size copy
    np.testing.assert_allclose(boxes[0], [10, 20, 40, 45])
    train = open_dataset(spec, "train", geometry=GEOM)
    assert [r.id for r in train.records] == ["bbb#0"] and train.records[0].extra["finding"] == "Pleural Effusion"


def test_ms_cxr_without_split_column_is_all_test_and_bad_rows_drop_the_phrase(tmp_path, caplog):
    bad = ["aaa", "Edema", "Mild edema", "files/p10/p10000032/s50414267/aaa.jpg", 190, 10, 30, 10, 200, 160]
    mimic = _ms_cxr(tmp_path, split_col=False, extra_rows=[bad + ["test"]])
    records, _, skipped = read_ms_cxr(tmp_path / "ms-cxr", images=str(mimic))
    assert {r.split for r in records} == {"test"} and len(records) == 3
    # the box leaves the image: the row is named, the phrase counted once (units, not rows and units)
    assert skipped.counts == {"phrase_with_bad_row": 1}
    assert any("bad row" in r.getMessage() and "leaves the" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="MS_CXR_Local_Alignment"):
        open_dataset(f"ms-cxr:{tmp_path}", "test")
    with pytest.raises(DataError, match="takes no option 'image'"):
        parse_spec(f"ms-cxr:{tmp_path}?image=x")


def test_ms_cxr_missing_images_are_named_and_counted(tmp_path):
    mimic = _ms_cxr(tmp_path)
    (mimic / "files/p11/p11000011/s51000011/bbb.jpg").unlink()
    records, _, skipped = read_ms_cxr(tmp_path / "ms-cxr", images=str(mimic))
    assert skipped.counts["missing_image"] == 1 and len(records) == 2


# ---------------------------------------------------------------------------------- CheXlocalize


def _rle(mask: np.ndarray) -> dict:
    """CheXlocalize's encode_segmentation: pycocotools on a Fortran-ordered uint8 array, counts as text."""
    from pycocotools import mask as coco_mask

    enc = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in enc["size"]], "counts": enc["counts"].decode()}


def _chexlocalize(root: Path) -> tuple[Path, np.ndarray]:
    """One validation image (stored at half size, as CheXpert-v1.0-small) with two positive findings,
    and one test image."""
    chexpert = root / "CheXpert"
    _jpg(chexpert / "valid/patient64541/study1/view1_frontal.jpg", (60, 50))
    _jpg(chexpert / "test/patient64741/study1/view1_frontal.jpg", (40, 40), 1)
    effusion = np.zeros((120, 100), bool)
    effusion[80:110, 10:40] = True
    cardio = np.zeros((120, 100), bool)
    cardio[50:90, 40:80] = True
    val = {"patient64541_study1_view1_frontal": {
        t: _rle(effusion if t == "Pleural Effusion" else cardio if t == "Cardiomegaly" else np.zeros((120, 100)))
        for t in CHEXLOCALIZE_TASKS}}
    small = np.zeros((40, 40), bool)
    small[5:15, 5:15] = True
    test = {"patient64741_study1_view1_frontal": {t: _rle(small if t == "Airspace Opacity" else np.zeros((40, 40)))
                                                  for t in CHEXLOCALIZE_TASKS}}
    (root / "cheXlocalize").mkdir()
    (root / "cheXlocalize/gt_segmentations_val.json").write_text(json.dumps(val))
    (root / "cheXlocalize/gt_segmentations_test.json").write_text(json.dumps(test))
    return chexpert, effusion


def test_chexlocalize_positive_pairs_with_decoded_masks(tmp_path):
    chexpert, effusion = _chexlocalize(tmp_path)
    spec = f"chexlocalize:{tmp_path / 'cheXlocalize'}?images={chexpert}"
    val = open_dataset(spec, "val", geometry=GEOM)
    assert sorted(r.id for r in val.records) == ["patient64541_study1_view1_frontal/Cardiomegaly",
                                                 "patient64541_study1_view1_frontal/Pleural Effusion"]
    rec = next(r for r in val.records if r.extra["finding"] == "Pleural Effusion")
    assert rec.extra["prompt"] == "pleural effusion" and rec.label_hw == (120, 100) and rec.patient == "patient64541"
    np.testing.assert_array_equal(rec.mask((120, 100)), effusion)          # decoded exactly, at the label size
    _, mask = labels_at(rec, (60, 50))                                     # nearest-resized to the small copy
    assert mask.shape == (60, 50) and mask[40:55, 5:20].all() and not mask[:35].any()
    test = open_dataset(spec, "test", geometry=GEOM)
    assert [r.extra["finding"] for r in test.records] == ["Airspace Opacity"]
    with pytest.raises(DataError, match="split is empty"):
        open_dataset(spec, "train", geometry=GEOM)


def test_chexlocalize_bad_entries_are_counted(tmp_path):
    chexpert, _ = _chexlocalize(tmp_path)
    path = tmp_path / "cheXlocalize/gt_segmentations_val.json"
    data = json.loads(path.read_text())
    entry = data["patient64541_study1_view1_frontal"]
    entry["Lung Opacity"] = entry.pop("Airspace Opacity")          # CheXpert's name, not CheXlocalize's key
    entry["Edema"] = {"size": [120, 100]}                          # no counts
    data["not-an-id"] = {}
    data["patient99999_study1_view1_frontal"] = {"Edema": entry["Cardiomegaly"]}   # no image file
    path.write_text(json.dumps(data))
    from g2d.data.labelled.chexlocalize import read_chexlocalize

    records, _, skipped = read_chexlocalize(path.parent, images=str(chexpert))
    assert skipped.counts["unknown_finding"] == 1 and skipped.counts["bad_mask"] == 1
    assert skipped.counts["bad_id"] == 1 and skipped.counts["missing_image"] == 1 and len(records) == 3
    with pytest.raises(DataError, match="gt_segmentations"):
        read_chexlocalize(tmp_path)


# ---------------------------------------------------------------------------------- VinDr-CXR

VINDR_LABELS = ["Aortic enlargement", "Cardiomegaly", "Nodule/Mass", "Lung tumor", "Pneumonia", "Other diseases",
                "No finding"]


def _vindr(root: Path) -> Path:
    """Train image t1 read by three radiologists (cardiomegaly by all three, a nodule by one), t2 normal
    for all; test image s1 with the consensus (no rad_id column)."""
    for split, iid in (("train", "t1"), ("train", "t2"), ("test", "s1")):
        write_dicom(root / "vindr" / split / f"{iid}.dicom", np.full((64, 80), 500 + 10 * len(iid), np.uint16))
    ann = root / "vindr" / "annotations"
    box_cols = ["class_name", "x_min", "y_min", "x_max", "y_max"]
    _write_csv(ann / "annotations_train.csv", ["image_id", "rad_id", *box_cols], [
        ["t1", "R8", "Cardiomegaly", 20, 30, 60, 50], ["t1", "R9", "Cardiomegaly", 22, 31, 58, 52],
        ["t1", "R10", "Cardiomegaly", 21, 29, 61, 51], ["t1", "R8", "Nodule/Mass", 5, 5, 12, 12],
        ["t2", "R8", "No finding", "", "", "", ""], ["t2", "R9", "No finding", "", "", "", ""],
        ["t2", "R10", "No finding", "", "", "", ""]])
    _write_csv(ann / "annotations_test.csv", ["image_id", *box_cols],
               [["s1", "Aortic enlargement", 40, 10, 50, 20]])
    _write_csv(ann / "image_labels_train.csv", ["image_id", "rad_id", *VINDR_LABELS], [
        ["t1", "R8", 0, 1, 1, 1, 0, 0, 0], ["t1", "R9", 0, 1, 0, 0, 0, 0, 0], ["t1", "R10", 0, 1, 0, 1, 0, 0, 0],
        ["t2", "R8", 0, 0, 0, 0, 0, 0, 1], ["t2", "R9", 0, 0, 0, 0, 0, 0, 1], ["t2", "R10", 0, 0, 0, 0, 0, 0, 1]])
    test_labels = [("Other disease" if n == "Other diseases" else n) for n in VINDR_LABELS]
    _write_csv(ann / "image_labels_test.csv", ["image_id", *reversed(test_labels)],
               [["s1", *reversed([1, 0, 0, 0, 0, 1, 0])]])
    return root / "vindr"


def test_vindr_findings_readers_all_and_majority(tmp_path):
    root = _vindr(tmp_path)
    train = open_dataset(f"vindr:{root}", "train", geometry=GEOM)
    assert [r.id for r in train.records] == ["t1/Cardiomegaly", "t1/Nodule/Mass"]
    cardio, nodule = train.records
    assert len(cardio.boxes) == 3 and nodule.extra["prompt"] == "nodule or mass"
    np.testing.assert_array_equal(nodule.boxes, [[5, 5, 12, 12]])
    majority = open_dataset(f"vindr:{root}?readers=majority", "train", geometry=GEOM)
    assert [r.id for r in majority.records] == ["t1/Cardiomegaly"]                # one reader of three: dropped
    test = open_dataset(f"vindr:{root}?readers=majority", "test", geometry=GEOM)
    assert [r.id for r in test.records] == ["s1/Aortic enlargement"]               # the consensus is one reader
    with pytest.raises(DataError, match="readers='any'"):
        open_dataset(f"vindr:{root}?readers=any", "train")


def test_vindr_image_unit_merges_labels_by_the_rule(tmp_path):
    root = _vindr(tmp_path)
    ds = open_dataset(f"vindr:{root}?unit=image", "train", geometry=GEOM)
    assert ds.tasks == VINDR_LABELS
    t1 = next(r for r in ds.records if r.id == "t1")
    assert t1.labels.tolist() == [0, 1, 1, 1, 0, 0, 0] and len(t1.boxes) == 4
    maj = open_dataset(f"vindr:{root}?unit=image&readers=majority", "train", geometry=GEOM)
    assert next(r for r in maj.records if r.id == "t1").labels.tolist() == [0, 1, 0, 1, 0, 0, 0]
    test = open_dataset(f"vindr:{root}?unit=image", "test", geometry=GEOM)  # reordered, "Other disease" renamed
    assert test.records[0].labels.tolist() == [1, 0, 0, 0, 0, 1, 0]
    sample = test[0]
    assert sample["boxes"].shape == (1, 4) and sample["image"].shape == (1, 32, 32)


def test_vindr_bad_rows_drop_the_whole_image(tmp_path):
    root = _vindr(tmp_path)
    path = root / "annotations" / "annotations_train.csv"
    rows = path.read_text().splitlines()
    rows.append("t1,R9,Nodule/Mass,30,5,10,12")          # x_min > x_max
    rows.append("t2,R11,No finding,1,2,3,4")             # a box on No finding
    path.write_text("\n".join(rows) + "\n")
    from g2d.data.labelled.vindr import read_vindr

    records, _, skipped = read_vindr(root)
    assert skipped.counts == {"image_with_bad_row": 2}  # each image counted once, its bad row named in the log
    assert {r.id for r in records} == {"s1/Aortic enlargement"}


# ---------------------------------------------------------------------------------- csv: phrases


def test_csv_table_with_ids_lists_several_phrases_per_image(tmp_path):
    rows = []
    for k in range(12):
        _jpg(tmp_path / f"{k}.png", (32, 32), k)
        for part in ("heart", "left_lung"):
            Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 12)).save(tmp_path / f"{k}_{part}.png")
            rows.append([f"{k}/{part}", f"{k}.png", f"{k}_{part}.png", f"the {part.replace('_', ' ')}", part])
    table = _write_csv(tmp_path / "phrases.csv", ["id", "image", "mask", "prompt", "finding"], rows)
    from g2d.data.labelled.csv_table import read_labelled_csv

    records, _, _ = read_labelled_csv(table)
    assert len(records) == 24 and records[1].id == "0/left_lung"
    assert records[1].extra == {"prompt": "the left lung", "finding": "left_lung"}
    assert records[0].patient == records[1].patient == "image:0.png"
    split_of: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):                  # the seeded split keeps an image's phrases together
        for r in open_dataset(f"csv:{table}", split).records:
            split_of.setdefault(r.image, set()).add(split)
    assert len(split_of) == 12 and all(len(v) == 1 for v in split_of.values())
    _write_csv(tmp_path / "dup.csv", ["id", "image", "prompt"], [["x", "0.png", "a"], ["x", "1.png", "b"]])
    records, _, skipped = read_labelled_csv(tmp_path / "dup.csv")
    assert [r.id for r in records] == ["x"] and skipped.counts["duplicated_id"] == 1
