"""Readers of the raw public formats (SIIM, RSNA, Object-CXR), the generic ``csv:`` reader and the
shipped split tables, opened through :func:`g2d.data.sets.open_dataset`."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_dicom
from PIL import Image

from g2d.data.labelled import object_cxr, rsna, siim
from g2d.data.labelled.dataset import collate_labelled
from g2d.data.labelled.specs import open_dataset
from g2d.data.labelled.splits import load_split, split_ids, write_split
from g2d.data.transforms import ImageTransformCfg
from g2d.errors import DataError

GEOM32 = ImageTransformCfg(resize=32, crop=32, augment="none", keep_aspect=False)


# ----------------------------------------------------------------------------- file writers
def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def kaggle_mask2rle(mask: np.ndarray) -> str:
    """Kaggle's relative, column-major RLE of a bool [H, W] mask (written independently of the reader)."""
    flat = np.concatenate([[0], mask.T.reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    out, prev_end = [], 0
    for s, e in zip(starts, ends):
        out += [int(s - prev_end), int(e - s)]
        prev_end = e
    return " ".join(map(str, out))


def half_image(h: int, w: int) -> np.ndarray:
    """Left half 0, right half 1000: bright right side after MONOCHROME2 reading."""
    a = np.zeros((h, w), np.uint16)
    a[:, w // 2:] = 1000
    return a


def use_table(monkeypatch, module, tmp_path: Path, assignment: dict[str, str], seed: int = 0) -> Path:
    p = write_split(tmp_path / f"{module.__name__.rsplit('.', 1)[-1]}_split.csv.gz", assignment, seed)
    monkeypatch.setattr(module, "SPLIT_TABLE", str(p))
    return p


# ----------------------------------------------------------------------------- SIIM
H, W = 40, 48  # non-square so a W/H mix-up in the RLE decoding shows


def _siim_masks() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((H, W), bool)
    a[5:12, 30:44] = True  # upper right: asymmetric
    b = np.zeros((H, W), bool)
    b[25:37, 3:9] = True
    b[20, 0] = True  # single pixel on the first column
    return a, b


@pytest.fixture
def siim_dir(tmp_path: Path) -> Path:
    d = tmp_path / "siim"
    deep = d / "dicom-images-train" / "1.2.study" / "1.2.series"
    write_dicom(deep / "pos1.dcm", half_image(H, W))
    write_dicom(deep / "neg_m1.dcm", half_image(H, W), "MONOCHROME1")
    write_png(d / "png" / "neg_png.png", np.full((H, W), 100))
    for name in ("bad_odd", "bad_int", "past_end"):
        write_dicom(deep / f"{name}.dcm", half_image(H, W))
    (deep / "broken.dcm").write_bytes(b"not a dicom file at all" * 10)
    a, b = _siim_masks()
    rows = [("pos1", " " + kaggle_mask2rle(a)), ("neg_m1", " -1"), ("neg_png", "-1"),
            ("pos1", kaggle_mask2rle(b)),  # second row of the same image: union
            ("bad_odd", "3 4 5"), ("bad_int", "3 4.5"), ("past_end", f"{H * W - 2} 5"),
            ("broken", "-1"), ("missing", "-1")]
    with open(d / "train-rle.csv", "w", newline="") as f:
        f.write("ImageId, EncodedPixels\n")  # Kaggle's header, with the leading space
        for r in rows:
            f.write(f"{r[0]},{r[1]}\n")
    return d


def test_rle_round_trip() -> None:
    a, b = _siim_masks()
    for m in (a, b, a | b, np.zeros((H, W), bool), np.ones((H, W), bool)):
        runs = tuple(int(v) for v in kaggle_mask2rle(m).split())
        assert np.array_equal(siim.decode_rle(runs, (H, W)), m)
    # Kaggle's rle2mask on a 1024 image: "5 3" sets flat[5:8] of the column-major vector = column 0.
    m = siim.decode_rle((5, 3), (1024, 1024))
    assert m[5:8, 0].all() and m.sum() == 3


def test_siim_reader_through_open_dataset(siim_dir: Path, monkeypatch, tmp_path: Path, caplog) -> None:
    ids = ["pos1", "neg_m1", "neg_png", "bad_odd", "bad_int", "past_end", "broken", "missing"]
    use_table(monkeypatch, siim, tmp_path, {i: "train" for i in ids})
    records, tasks, skipped = siim.read_siim(siim_dir)
    assert tasks == ["pneumothorax"]
    assert {r.id for r in records} == {"pos1", "neg_m1", "neg_png", "past_end", "broken"}
    assert skipped.counts == {"malformed_rle": 2, "missing_image": 1}
    assert "train-rle.csv:6" in caplog.text and "train-rle.csv:7" in caplog.text  # file:row named

    a, b = _siim_masks()
    by_id = {r.id: r for r in records}
    assert np.array_equal(by_id["pos1"].mask((H, W)), a | b)
    assert by_id["pos1"].labels.tolist() == [1.0] and by_id["neg_png"].labels.tolist() == [0.0]
    assert by_id["neg_png"].image.endswith(".png") and by_id["pos1"].image.endswith(".dcm")

    ds = open_dataset(f"siim:{siim_dir}?label_size=image", split="train", geometry=GEOM32, max_skip_fraction=0.9)
    assert len(ds) == 5 and ds.with_mask and not ds.with_boxes
    samples = {s["id"]: s for s in (ds[i] for i in range(len(ds))) if s is not None}
    # RLE past the image end and the unreadable DICOM fail at decode time and are named + counted
    assert set(samples) == {"pos1", "neg_m1", "neg_png"}
    assert ds.skipped.counts["unreadable_image"] == 2
    s = samples["pos1"]
    assert s["image"].shape == (1, 32, 32) and s["mask"].shape == (1, 32, 32) and s["orig_hw"] == (H, W)
    assert set(s["mask"].unique().tolist()) == {0.0, 1.0}
    assert abs(s["mask"].mean().item() - (a | b).mean()) < 0.03
    # the upper-right blob stays upper right after the resize
    assert s["mask"][0, :10, 20:].sum() > 0 and s["mask"][0, :10, :10].sum() == 0
    # MONOCHROME2: right half bright; MONOCHROME1: inverted, left half bright
    assert s["image"][0, :, 24:].mean() > 0.9 and s["image"][0, :, :8].mean() < 0.1
    m1 = samples["neg_m1"]["image"][0]
    assert m1[:, :8].mean() > 0.9 and m1[:, 24:].mean() < 0.1
    assert samples["neg_m1"]["mask"].sum() == 0
    batch = collate_labelled([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (3, 1, 32, 32) and batch["labels"].shape == (3, 1)


def test_siim_balanced_train(siim_dir: Path, monkeypatch, tmp_path: Path) -> None:
    write_dicom(siim_dir / "more" / "neg2.dcm", half_image(H, W))
    with open(siim_dir / "train-rle.csv", "a") as f:
        f.write("neg2, -1\n")
    use_table(monkeypatch, siim, tmp_path, {"pos1": "train", "neg_m1": "train", "neg_png": "train",
                                            "neg2": "train", "past_end": "test", "broken": "val"})
    ds = open_dataset(f"siim:{siim_dir}?label_size=image", split="train", geometry=GEOM32, max_skip_fraction=0.9)
    bal = siim.balance_train(ds)
    lab = bal.labels()[:, 0]
    assert len(bal) == 2 and lab.sum() == 1
    table = load_split(siim.SPLIT_TABLE)
    negs = sorted(["neg_m1", "neg_png", "neg2"], key=lambda i: table[i][1])
    assert [i for i in bal.ids if i != "pos1"] == negs[:1]  # lowest-ranked negative: fixed, seeded


def test_siim_missing_label_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train-rle.csv"):
        siim.read_siim(tmp_path)


# ----------------------------------------------------------------------------- RSNA
def _rsna_fixture(d: Path) -> None:
    img = d / "stage_2_train_images"
    for pid in ("pA", "pB", "pC", "pD", "pE", "pF"):
        write_dicom(img / f"{pid}.dcm", half_image(64, 64))
    write_png(img / "pP.png", np.full((64, 64), 50))
    rows = [
        ["pA", "8", "16", "20", "10", "1"],
        ["pA", "40", "40", "12", "16", "1"],   # second box of pA
        ["pB", "", "", "", "", "0"],
        ["pC", "", "", "", "", "0"],
        ["pC", "", "", "", "", "0"],           # identical duplicate: merged
        ["pD", "", "", "", "", "1"],           # Target 1 without box
        ["pE", "10", "10", "-5", "10", "1"],   # negative width
        ["pF", "abc", "10", "5", "10", "1"],   # not a number
        ["pG", "", "", "", "", "0"],           # no image file
        ["pP", "", "", "", "", "0"],           # PNG conversion
    ]
    with open(d / "stage_2_train_labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        w.writerows(rows)


def test_rsna_reader_through_open_dataset(tmp_path: Path, monkeypatch, caplog) -> None:
    d = tmp_path / "rsna"
    _rsna_fixture(d)
    use_table(monkeypatch, rsna, tmp_path, {"pA": "test", "pB": "test", "pC": "test", "pD": "train",
                                            "pE": "train", "pF": "train", "pG": "val", "pP": "train"})
    records, tasks, skipped = rsna.read_rsna(d)
    assert tasks == ["pneumonia"]
    assert sorted(r.id for r in records) == ["pA", "pB", "pC", "pP"]
    assert skipped.counts == {"duplicated_row": 1, "malformed_row": 3, "missing_image": 1}
    for row in (6, 7, 8, 9):
        assert f"stage_2_train_labels.csv:{row}" in caplog.text
    assert "pD" not in caplog.text  # patient ids never logged

    ds = open_dataset(f"rsna:{d}?label_size=image", split="test", geometry=GEOM32, max_skip_fraction=0.6)
    assert ds.ids == ["pA", "pB", "pC"] and ds.with_mask and ds.with_boxes
    s = ds[0]
    assert s["image"].shape == (1, 32, 32) and s["mask"].shape == (1, 32, 32)
    assert s["labels"].tolist() == [1.0]
    expected = torch.tensor([[8, 16, 28, 26], [40, 40, 52, 56]], dtype=torch.float32) / 2
    assert torch.allclose(s["boxes"], expected)
    assert s["mask"].sum().item() == (20 * 10 + 12 * 16) / 4  # box-filled mask, resized by 2
    assert s["mask"][0, 8:13, 4:14].all()
    neg = ds[1]
    assert neg["boxes"].shape == (0, 4) and neg["mask"].sum() == 0 and neg["labels"].tolist() == [0.0]
    # the bad rows (5 of 9) exceed the default 10 %
    with pytest.raises(DataError, match="unusable"):
        open_dataset(f"rsna:{d}?label_size=image", split="test", geometry=GEOM32)
    # malformed patients listed in the split: 3 of its 4 ids unusable
    with pytest.raises(DataError, match="3 of 4 ids unusable"):
        open_dataset(f"rsna:{d}?label_size=image", split="train", geometry=GEOM32, max_skip_fraction=0.6)


def test_rsna_make_split_groups_patients(tmp_path: Path) -> None:
    d = tmp_path / "r"
    d.mkdir()
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        for k in range(50):
            w.writerow([f"p{k:03d}", "1", "1", "2", "2", "1"])
            w.writerow([f"p{k:03d}", "5", "5", "2", "2", "1"])
    a = rsna.make_split(d / "labels.csv")
    assert len(a) == 50
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 30, "val": 10, "test": 10}
    assert a == rsna.make_split(d / "labels.csv")


# ----------------------------------------------------------------------------- Object-CXR
RECT = "0 10 12 30 40"
ELLIPSE = "1 50 20 60 26"
POLY = "2 10 10 40 12 38 30 12 50"


def _object_cxr_fixture(d: Path) -> None:
    train = [("t00.jpg", RECT), ("t01.jpg", f"{ELLIPSE};{POLY}"), ("t02.jpg", ""), ("t03.jpg", "3 1 2 3 4"),
             ("t04.jpg", "0 1 2 3"), ("t05.jpg", "2 1 2 x 4 5 6"), ("t06.jpg", "0 5 5 5 9"),
             ("t01.jpg", RECT)]  # duplicated name
    train += [(f"t{k:02d}.jpg", "" if k % 2 else RECT) for k in range(7, 20)]
    dev = [("d00.jpg", POLY), ("d01.jpg", ""), ("d02.jpg", RECT)]
    d.mkdir()
    for folder, rows in (("train", train), ("dev", dev)):
        with open(d / f"{folder}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_name", "annotation"])
            w.writerows(rows)
        for name, _ in rows:
            if name != "d02.jpg":  # one missing image
                write_png(d / folder / name, np.full((64, 80), 120))


def test_parse_annotation_rules() -> None:
    b = object_cxr.parse_annotation(f"{RECT};{ELLIPSE};{POLY}")
    assert b.tolist() == [[10, 12, 30, 40], [50, 20, 60, 26], [10, 10, 40, 50]]
    for bad in ("", "0 1 2 3", "4 1 2 3 4", "0 1 2 a 4", "2 1 1 2 2", "0 5 5 5 9", "0 1 2 3 4;"):
        with pytest.raises(ValueError):
            object_cxr.parse_annotation(bad)
    pytest.importorskip("shapely")
    m = object_cxr.parse_annotation(POLY, polygon_rule="mgca")[0]
    # MGCA's box is centred on the pole of inaccessibility and holds the polygon's bounds
    assert m[0] <= 10 and m[1] <= 10 and m[2] >= 40 and m[3] >= 50
    assert not np.allclose(m, [10, 10, 40, 50])
    with pytest.raises(DataError):
        object_cxr.parse_annotation(POLY, polygon_rule="square")


def test_object_cxr_reader_and_split(tmp_path: Path, caplog) -> None:
    d = tmp_path / "object-cxr"
    _object_cxr_fixture(d)
    assert object_cxr.SPLIT_TABLE is None
    a = object_cxr.make_split(d / "train.csv")
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    # 21 train.csv rows -> 3 held out by test_size=0.1 (ceil); t01 is listed twice
    assert counts["test"] == 3 and counts["train"] + counts["val"] == 20 and counts["val"] >= 2
    records, tasks, skipped = object_cxr.read_object_cxr(d)
    assert tasks == ["foreign_object"]
    assert skipped.counts == {"malformed_annotation": 4, "duplicated_image": 1, "missing_image": 1}
    assert "train.csv:5" in caplog.text and "dev.csv:4" in caplog.text
    assert all(r.split == a[r.id] for r in records)
    assert object_cxr.read_object_cxr(d)[0][0].split == records[0].split  # deterministic

    test = open_dataset(f"object-cxr:{d}", split="test", geometry=GEOM32, max_skip_fraction=0.3)
    assert sorted(test.ids) == ["d00.jpg", "d01.jpg"] and test.with_boxes and not test.with_mask
    s = next(test[i] for i in range(2) if test[i]["id"] == "d00.jpg")
    assert s["image"].shape == (1, 32, 32) and "mask" not in s
    # 64x80 -> 32x32: x scaled by 0.4, y by 0.5
    assert torch.allclose(s["boxes"], torch.tensor([[4.0, 5.0, 16.0, 25.0]]))
    tr = open_dataset(f"object-cxr:{d}", split="train", geometry=GEOM32, max_skip_fraction=0.3)
    va = open_dataset(f"object-cxr:{d}", split="val", geometry=GEOM32, max_skip_fraction=0.3)
    assert not set(tr.ids) & set(va.ids) and len(tr) + len(va) == 16
    lab = {r.id: r.labels[0] for r in records}
    assert lab["t00.jpg"] == 1 and lab["t02.jpg"] == 0 and lab["t01.jpg"] == 1
    if importlib.util.find_spec("shapely") is not None:
        rec = {r.id: r for r in object_cxr.read_object_cxr(d, polygon_rule="mgca")[0]}
        assert rec["t01.jpg"].boxes.shape == (2, 4) and rec["t01.jpg"].boxes[1, 2] >= 40


# ----------------------------------------------------------------------------- csv:
def test_labelled_csv(tmp_path: Path, caplog) -> None:
    d = tmp_path / "tab"
    for k in range(8):
        write_png(d / "img" / f"i{k}.png", np.full((40, 40), 30 * k))
    m = np.zeros((40, 40), np.uint8)
    m[:20, :10] = 255
    write_png(d / "m" / "left.png", m)
    write_png(d / "m" / "right.png", m[:, ::-1])
    rows = [
        ["img/i0.png", "1", "0", "m/left.png;m/right.png", "4,8,10,6", "train", "P1", "a small opacity"],
        ["img/i1.png", "", "-1", "", "", "train", "P1", ""],
        ["img/i2.png", "nan", "1.0", "m/left.png", "1,1,2,2;5,5,3,3", "test", "P2", ""],
        ["img/i3.png", "yes", "0", "", "", "train", "P3", ""],                  # bad label
        ["img/missing.png", "1", "0", "", "", "train", "P3", ""],               # missing image
        ["img/i4.png", "1", "0", "", "4,8,-1,6", "train", "P3", ""],            # malformed box
        ["img/i5.png", "1", "0", "m/nope.png", "", "train", "P3", ""],          # missing mask
        ["img/i0.png", "1", "0", "", "", "val", "P3", ""],                      # duplicated image
        ["img/i6.png", "0", "0", "", "", "valid", "P4", ""],
        ["img/i7.png", "0", "0", "", "", "holdout", "P4", ""],                  # unknown split
    ]
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "a", "b", "mask", "boxes", "split", "patient", "prompt"])
        w.writerows(rows)
    tr = open_dataset(f"csv:{d / 'labels.csv'}", split="train", geometry=GEOM32, max_skip_fraction=0.7,
                      labels="a,b")
    assert sorted(tr.ids) == ["img/i0.png", "img/i1.png"]
    assert tr.skipped.counts == {"bad_label": 1, "missing_image": 1, "bad_boxes": 1, "missing_mask": 1,
                                 "duplicated_image": 1, "bad_split": 1}
    for row in (5, 6, 7, 8, 9, 11):
        assert f"labels.csv:{row}" in caplog.text
    recs = {r.id: r for r in tr.records}
    assert recs["img/i0.png"].extra["prompt"] == "a small opacity" and recs["img/i0.png"].patient == "P1"
    lab = tr.labels()
    assert lab[tr.ids.index("img/i0.png")].tolist() == [1.0, 0.0]
    assert np.isnan(lab[tr.ids.index("img/i1.png")]).all()
    s = tr[tr.ids.index("img/i0.png")]
    assert s["mask"].shape == (1, 32, 32) and s["mask"].mean().item() == pytest.approx(2 * 200 / 1600, abs=0.02)
    assert torch.allclose(s["boxes"], torch.tensor([[3.2, 6.4, 11.2, 11.2]]))
    assert tr[tr.ids.index("img/i1.png")]["mask"].sum() == 0  # blank mask cell -> empty mask
    te = open_dataset(f"csv:{d / 'labels.csv'}", split="test", geometry=GEOM32, max_skip_fraction=0.7,
                      labels=["a", "b"])
    assert te.ids == ["img/i2.png"] and np.isnan(te.labels()[0, 0]) and te[0]["boxes"].shape == (2, 4)
    va = open_dataset(f"csv:{d / 'labels.csv'}", split="val", geometry=GEOM32, max_skip_fraction=0.7)
    assert va.ids == ["img/i6.png"] and va.tasks == []
    with pytest.raises(DataError, match="missing column"):
        open_dataset(f"csv:{d / 'labels.csv'}", split="train", labels="a,zzz")


def test_labelled_csv_seeded_split_by_patient(tmp_path: Path) -> None:
    d = tmp_path / "t"
    rows = []
    for k in range(40):
        write_png(d / f"{k}.png", np.full((8, 8), k))
        rows.append([f"{k}.png", f"P{k // 2}", str(k % 2)])
    with open(d / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "patient", "y"])
        w.writerows(rows)
    parts = {s: open_dataset(f"csv:{d / 't.csv'}", split=s, geometry=GEOM32, labels="y") for s in
             ("train", "val", "test")}
    pats = {s: {r.patient for r in ds.records} for s, ds in parts.items()}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    assert sum(len(ds) for ds in parts.values()) == 40 and len(parts["train"]) == 28


def test_labelled_csv_jsrt_lungs(jsrt_dir: Path, tmp_path: Path) -> None:
    """Real masks: JSRT left + right lung joined with ';' and opened through csv:."""
    cases = sorted(p.name for p in (jsrt_dir / "images").glob("*.png"))[:6]
    with open(tmp_path / "jsrt.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "split"])
        for c in cases:
            w.writerow([str(jsrt_dir / "images" / c),
                        f"{jsrt_dir / 'masks' / 'left_lung' / c};{jsrt_dir / 'masks' / 'right_lung' / c}", "test"])
    ds = open_dataset(f"csv:{tmp_path / 'jsrt.csv'}", split="test",
                      geometry=ImageTransformCfg(resize=64, crop=64, augment="none", keep_aspect=False))
    assert len(ds) == len(cases)
    for i in range(len(ds)):
        s = ds[i]
        assert s["mask"].shape == s["image"].shape == (1, 64, 64)
        cover = s["mask"].mean().item()
        assert 0.15 < cover < 0.6, cover  # two lungs cover roughly a third of a chest radiograph
        inside = s["image"][s["mask"] > 0].mean()
        outside = s["image"][s["mask"] == 0].mean()
        assert inside < outside  # lungs are dark: the mask lies on the lungs, not shifted off them
        left, right = s["mask"][0, :, :32].sum(), s["mask"][0, :, 32:].sum()
        assert min(left, right) > 0.5 * max(left, right)  # both lungs present


# ----------------------------------------------------------------------------- shipped tables
@pytest.mark.parametrize("name,counts", [("siim", (8432, 1808, 1807)), ("rsna", (16010, 5337, 5337))])
def test_shipped_split_tables(name: str, counts: tuple[int, int, int]) -> None:
    table = load_split(name)
    got = tuple(sum(s == k for s, _ in table.values()) for k in ("train", "val", "test"))
    assert got == counts
    ids = {k: set(split_ids(table, k)) for k in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    one, ten, full = (split_ids(table, "train", f) for f in (0.01, 0.1, 1.0))
    assert len(one) == math.ceil(0.01 * counts[0]) and len(ten) == math.ceil(0.1 * counts[0])
    assert set(one) <= set(ten) <= set(full) and len(full) == counts[0]
    ranks = sorted(r for s, r in table.values() if s == "train")
    assert ranks == list(range(counts[0]))


def test_pad_square_geometry_keeps_image_mask_and_boxes_together(tmp_path: Path) -> None:
    # a peer's padded pipeline (MGCA / GLoRIA / MedCLIP): image, mask and boxes go through one geometry
    from g2d.data.labelled.dataset import BoxMask, LabelledCXR, Record

    img = np.zeros((40, 100), np.uint8)
    img[10:30, 60:80] = 255
    Image.fromarray(img).save(tmp_path / "wide.png")
    box = (60.0, 10.0, 80.0, 30.0)
    rec = Record("wide", str(tmp_path / "wide.png"), labels=np.ones(1, np.float32), boxes=np.array([box]),
                 mask=BoxMask((box,)))
    geometry = ImageTransformCfg(resize=50, crop=50, augment="none", pad_square=True)
    s = LabelledCXR("t", [rec], ["finding"], geometry)[0]
    bright = s["image"][0] > 0.5
    assert s["image"].shape == (1, 50, 50) and s["mask"].shape == (1, 50, 50)
    assert torch.equal(bright, s["mask"][0].bool())                  # long side /2, 15 rows of padding on top
    assert s["boxes"].tolist() == [[30.0, 20.0, 40.0, 30.0]]
    assert (s["image"][0, :15] == 0).all() and (s["image"][0, 35:] == 0).all()
