"""Tests for g2d.data.pretraining.pairs, g2d.data.transforms and g2d.data.text."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from g2d.data.pretraining.pairs import ImageTextPairs, PairsCfg, collate_pairs
from g2d.data.pretraining.text import clean_report, release_text
from g2d.data.transforms import (
    ImageTransformCfg,
    build_transform,
    crop_to_original,
    eval_geometry,
    to_grayscale_float,
)
from g2d.errors import DataError

SECRET = "ZQXJ-private-report-token"  # must never show up in logs


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _noise(h: int, w: int, seed: int, channels: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels is None else (h, w, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture()
def bad_table(tmp_path: Path) -> Path:
    """A CSV with five decodable images of different modes and six bad rows.

    Kept order after construction (index: file): 0 L, 1 zero-byte, 2 RGB, 3 truncated, 4 not-an-image,
    5 RGBA, 6 P, 7 I;16. Dropped at construction: data rows 3 (empty text), 5 (whitespace text) and
    9 (missing file).
    """
    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray(_noise(40, 48, 0), "L").save(img / "gray.png")
    Image.fromarray(_noise(48, 40, 1, 3), "RGB").save(img / "rgb.png")
    Image.fromarray(_noise(40, 40, 2, 4), "RGBA").save(img / "rgba.png")
    Image.fromarray(_noise(40, 40, 3, 3), "RGB").convert("P").save(img / "pal.png")
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 3 + 1000).astype(np.uint16)).save(img / "deep.png")
    (img / "zero.png").write_bytes(b"")
    Image.fromarray(_noise(128, 128, 4), "L").save(img / "full.png")
    data = (img / "full.png").read_bytes()
    (img / "trunc.png").write_bytes(data[: len(data) * 6 // 10])
    (img / "full.png").unlink()
    (img / "notes.png").write_text("this is not an image\n")
    rows = [
        ["imgs/gray.png", f"FINDINGS: Lungs clear. {SECRET}"],  # data row 1
        ["imgs/zero.png", "Zero-byte file."],  # 2
        ["imgs/gray.png", ""],  # 3: empty text
        ["imgs/rgb.png", "Heart size normal at 10\u00b0 tilt."],  # 4 (non-ASCII text)
        ["imgs/rgb.png", "   \n  "],  # 5: whitespace only
        ["imgs/trunc.png", "Truncated file."],  # 6
        ["imgs/notes.png", "Not an image."],  # 7
        ["imgs/rgba.png", "1. Small effusion. 2. No pneumothorax."],  # 8
        ["imgs/missing.png", "Missing file."],  # 9: missing
        ["imgs/pal.png", "Palette image."],  # 10
        [str(img / "deep.png"), "Sixteen bit, absolute path."],  # 11
    ]
    path = tmp_path / "pairs.csv"
    _write_csv(path, ["image", "text"], rows)
    return path


def _eval_tf(size: int = 32) -> object:
    return build_transform(ImageTransformCfg(resize=size, crop=size, augment="none"), train=False)


# --------------------------------------------------------------------------------------------------
# ImageTextPairs
# --------------------------------------------------------------------------------------------------


def test_construction_skips_and_logs(bad_table: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="g2d.data")
    ds = ImageTextPairs(PairsCfg(str(bad_table), max_skip_fraction=0.3), _eval_tf())
    assert len(ds) == 8
    assert ds.skipped == {"empty_text": 2, "missing_image": 1}
    assert ds.rows.tolist() == [1, 2, 4, 6, 7, 8, 10, 11]
    log = caplog.text
    assert "pairs.csv: data row 3 skipped (empty_text)" in log
    assert "pairs.csv: data row 5 skipped (empty_text)" in log
    assert "data row 9 skipped (missing_image)" in log and "missing.png" in log
    assert "kept 8 of 11 rows; skipped 3 (empty_text=2, missing_image=1)" in ds.summary()
    assert SECRET not in log
    # Text is cleaned by default and non-ASCII survives the packed storage.
    assert ds.text(0) == f"Lungs clear. {SECRET}."
    assert ds.text(2) == "Heart size normal at 10\u00b0 tilt."
    assert ds.text(5) == "Small effusion. No pneumothorax."


def test_decode_errors_replaced_deterministically(bad_table: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="g2d.data")
    ds = ImageTextPairs(PairsCfg(str(bad_table), max_skip_fraction=0.3), _eval_tf())
    assert ds[1]["index"] == 2  # zero-byte -> next
    assert ds[3]["index"] == 5  # truncated -> not an image -> RGBA
    assert ds[4]["index"] == 5
    s = ds[3]
    assert s["text"] == ds.text(5) and s["image"].shape == (1, 32, 32)
    assert ds.skipped["decode_error"] == 3
    log = caplog.text
    for name, row in (("zero.png", 2), ("trunc.png", 6), ("notes.png", 7)):
        assert f"data row {row}: image failed to decode" in log and name in log
    assert SECRET not in log
    # Asking again does not re-count the known-bad images.
    ds[1]
    assert ds.skipped["decode_error"] == 3


def test_worker_decode_errors_reach_the_main_process(bad_table: Path) -> None:
    """Workers count on their own copies; the batch's requested/served indices carry the news back."""
    ds = ImageTextPairs(PairsCfg(str(bad_table), max_skip_fraction=0.3), _eval_tf())
    loader = DataLoader(ds, batch_size=2, shuffle=False, num_workers=2, collate_fn=collate_pairs)
    for batch in loader:
        ds.note_served(batch["requested"], batch["index"])
    assert ds.skipped["decode_error"] == 3
    assert ds.bad_indices() == {1, 3, 4}
    ds.mark_bad(ds.bad_indices())  # merging the same set (e.g. from another rank) counts nothing new
    assert ds.skipped["decode_error"] == 3
    assert "skipped 6 (decode_error=3, empty_text=2, missing_image=1)" in ds.summary()


def test_loader_batches_stay_full(bad_table: Path) -> None:
    ds = ImageTextPairs(PairsCfg(str(bad_table), max_skip_fraction=0.3), _eval_tf())
    batches = list(DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_pairs))
    assert [b["image"].shape for b in batches] == [torch.Size([4, 1, 32, 32])] * 2
    idx = torch.cat([b["index"] for b in batches]).tolist()
    assert idx == [0, 2, 2, 5, 5, 5, 6, 7]
    assert all(isinstance(t, str) and t for b in batches for t in b["text"])
    assert batches[0]["index"].dtype == torch.long


def test_all_following_images_bad_raises(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"\x89PNG")
    _write_csv(tmp_path / "t.csv", ["image", "text"], [["a.png", "x"], ["b.png", "y"]])
    ds = ImageTextPairs(PairsCfg(str(tmp_path / "t.csv")), _eval_tf())
    with pytest.raises(DataError, match="failed to decode"):
        ds[0]


def test_too_many_bad_rows(bad_table: Path) -> None:
    with pytest.raises(DataError) as e:
        ImageTextPairs(PairsCfg(str(bad_table)), _eval_tf())  # default max_skip_fraction 0.1
    msg = str(e.value)
    assert "pairs.csv" in msg and "'empty_text': 2" in msg and "'missing_image': 1" in msg


def test_missing_column(bad_table: Path) -> None:
    with pytest.raises(ValueError) as e:
        ImageTextPairs(PairsCfg(str(bad_table), text_col="report"), _eval_tf())
    msg = str(e.value)
    assert "pairs.csv" in msg and "'report'" in msg and "['image', 'text']" in msg


def test_malformed_csv(tmp_path: Path) -> None:
    p = tmp_path / "ragged.csv"
    p.write_text("image,text\na.png,fine\nb.png,too,many\n")
    with pytest.raises(ValueError, match="data row 2"):
        ImageTextPairs(PairsCfg(str(p)), _eval_tf())
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="no header"):
        ImageTextPairs(PairsCfg(str(empty)), _eval_tf())


def test_nan_text_cleaning_and_split_filter(tmp_path: Path) -> None:
    Image.fromarray(_noise(20, 20, 5), "L").save(tmp_path / "a.png")
    rows = [["a.png", "nan", "train"], ["a.png", "___", "train"], ["a.png", "IMPRESSION: ok", "train"],
            ["a.png", "x", "test"]]
    rows += [["a.png", f"report {i}", "train"] for i in range(17)]
    _write_csv(tmp_path / "s.csv", ["image", "text", "split"], rows)
    ds = ImageTextPairs(PairsCfg(str(tmp_path / "s.csv"), split_col="split", split="train"), _eval_tf())
    assert ds.skipped == {"nan_text": 1, "empty_after_cleaning": 1}
    assert ds.n_other_split == 1 and len(ds) == 18 and ds.text(0) == "ok."
    raw = ImageTextPairs(PairsCfg(str(tmp_path / "s.csv"), split_col="split", split="train",
                                  clean_text=False), _eval_tf())
    assert raw.text(1) == "IMPRESSION: ok" and raw.skipped == {"nan_text": 1}
    with pytest.raises(ValueError, match="together"):
        PairsCfg(str(tmp_path / "s.csv"), split_col="split")
    with pytest.raises(ValueError, match="'fold'"):
        ImageTextPairs(PairsCfg(str(tmp_path / "s.csv"), split_col="fold", split="1"), _eval_tf())


@pytest.mark.parametrize("workers", [0, 2])
def test_covid_notes_loader(covid_notes_dir: Path, workers: int) -> None:
    cfg = PairsCfg(str(covid_notes_dir / "metadata.csv"), image_col="file", text_col="notes", image_dir="images")
    ds = ImageTextPairs(cfg, build_transform(ImageTransformCfg(), train=True))
    assert len(ds) == 585 and sum(ds.skipped.values()) == 0
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers, collate_fn=collate_pairs,
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    for _ in range(2):
        b = next(it)
        assert b["image"].shape == (8, 1, 224, 224) and b["image"].dtype == torch.float32
        assert float(b["image"].min()) >= 0.0 and float(b["image"].max()) <= 1.0
        assert float(b["image"].std()) > 0.01
        assert len(b["text"]) == 8 and all(t.endswith((".", "?", "!")) for t in b["text"])
        assert b["index"].shape == (8,)
    del it


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------


def test_modes_to_grayscale() -> None:
    assert torch.allclose(to_grayscale_float(Image.new("L", (3, 2), 128)), torch.full((1, 2, 3), 128 / 255))
    red = to_grayscale_float(Image.new("RGB", (3, 2), (255, 0, 0)))
    assert red.shape == (1, 2, 3) and torch.allclose(red, torch.full_like(red, 0.299))
    # RGBA composited over black: alpha 0 gives black, alpha 255 the luma.
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, :, 3] = 255
    g = to_grayscale_float(Image.fromarray(rgba, "RGBA"))
    assert torch.allclose(g[0, 0], torch.full((2,), 200 / 255), atol=1e-5) and g[0, 1].abs().max() == 0
    pal = Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")
    assert torch.allclose(to_grayscale_float(pal), torch.full((1, 4, 4), 0.114), atol=1e-5)
    # Arrays are channels-last, tensors channels-first.
    arr = np.full((5, 6, 3), 255, np.uint8)
    assert to_grayscale_float(arr).shape == (1, 5, 6)
    assert to_grayscale_float(torch.ones(3, 5, 6)).shape == (1, 5, 6)


def test_sixteen_bit_scaled_by_range(tmp_path: Path) -> None:
    a = np.linspace(1000, 5000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as im:
        assert im.mode.startswith("I")
        g = to_grayscale_float(im)
    assert g.dtype == torch.float32
    assert float(g.min()) == 0.0 and float(g.max()) == 1.0
    expected = torch.from_numpy((a.astype(np.float64) - 1000) / 4000).float()
    assert torch.allclose(g[0], expected, atol=1e-6)
    # Not divided by 65535: the brightest pixel is white.
    assert float(to_grayscale_float(a).max()) == 1.0
    assert to_grayscale_float(np.full((4, 4), 7, np.uint16)).abs().max() == 0  # constant -> zeros


def test_eval_transform_deterministic_and_same_geometry_as_train() -> None:
    img = Image.fromarray(_noise(300, 380, 7), "L")
    ev = build_transform(ImageTransformCfg(), train=False)
    a, b = ev(img), ev(img)
    assert a.shape == (1, 224, 224) and torch.equal(a, b)
    # Training with the random parts switched off is exactly the eval output.
    quiet = ImageTransformCfg(perspective_p=0.0, autocontrast_p=0.0)
    assert torch.equal(build_transform(quiet, train=True)(img), a)
    # Same for the release recipe: its geometry is shared between train and eval.
    rel = ImageTransformCfg(augment="release")
    torch.manual_seed(0)
    tr_out = build_transform(rel, train=True)(img)
    ev_out = build_transform(rel, train=False)(img)
    assert tr_out.shape == ev_out.shape == (1, 256, 256)
    assert not torch.equal(tr_out, ev_out)


def test_release_and_paper_augment_differ() -> None:
    img = Image.fromarray(_noise(256, 256, 8), "L")
    paper, release = ImageTransformCfg(augment="paper", crop=256), ImageTransformCfg(augment="release")
    assert paper.keep_aspect and not release.keep_aspect and release.crop == 256
    torch.manual_seed(1)
    p = build_transform(paper, train=True)(img)
    torch.manual_seed(1)
    r = build_transform(release, train=True)(img)
    assert p.shape == r.shape == (1, 256, 256)
    assert not torch.allclose(p, r)
    assert float(p.min()) >= 0 and float(p.max()) <= 1 and float(r.min()) >= 0 and float(r.max()) <= 1
    # Release geometry squashes a non-square image into a square; paper keeps the aspect ratio.
    assert eval_geometry((300, 400), release)["resized_hw"] == (256, 256)
    assert eval_geometry((300, 400), ImageTransformCfg())["resized_hw"] == (256, 341)


def test_cfg_validation() -> None:
    assert ImageTransformCfg().crop == 224 and ImageTransformCfg().output_size == 224
    with pytest.raises(ValueError):
        ImageTransformCfg(crop=300)
    with pytest.raises(ValueError):
        ImageTransformCfg(augment="heavy")


def test_eval_geometry_maps_marked_pixel_exactly() -> None:
    # Short side already 256: no resampling, so the mapping is a pure crop offset.
    cfg = ImageTransformCfg()
    img = np.zeros((256, 300), np.uint8)
    img[100, 150] = 255
    g = eval_geometry((256, 300), cfg)
    assert g["resized_hw"] == (256, 300) and (g["crop_top"], g["crop_left"]) == (16, 38)
    out = build_transform(cfg, train=False)(img)
    y, x = divmod(int(out.flatten().argmax()), out.shape[-1])
    assert (y, x) == (84, 112) and float(out.max()) == 1.0
    assert crop_to_original(y, x, g) == (100.0, 150.0)
    x1, y1, x2, y2 = g["crop_box_orig"]
    assert (x1, y1, x2, y2) == (38.0, 16.0, 262.0, 240.0)


@pytest.mark.parametrize("augment", ["paper", "release"])
def test_eval_geometry_maps_blob_back_after_resize(augment: str) -> None:
    cfg = ImageTransformCfg(augment=augment)
    h, w, cy, cx = 420, 330, 260.0, 140.0
    img = np.zeros((h, w), np.float32)
    img[int(cy) - 4: int(cy) + 5, int(cx) - 4: int(cx) + 5] = 1.0
    out = build_transform(cfg, train=False)(img)[0].double()
    yy, xx = torch.meshgrid(torch.arange(out.shape[0]).double(), torch.arange(out.shape[1]).double(),
                            indexing="ij")
    mass = out.sum()
    oy, ox = crop_to_original(float((yy * out).sum() / mass), float((xx * out).sum() / mass),
                              eval_geometry((h, w), cfg))
    assert math.hypot(oy - cy, ox - cx) < 0.5


# --------------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("FINDINGS: Lungs clear.", "Lungs clear."),
    ("Findings :  Lungs clear", "Lungs clear."),
    ("FINDINGS\nThe lungs are clear. IMPRESSION:\nNormal", "The lungs are clear. Normal."),
    ("IMPRESSIONS: No acute findings.", "No acute findings."),
    ("EXAMINATION: CHEST PA\nCOMPARISON: ___\nFINDINGS: Clear", "CHEST PA. Clear."),
    ("Seen by Dr. ___ at ___ am.", "Seen by Dr. at am."),
    ("1. Small effusion. 2. No pneumothorax. 3.", "Small effusion. No pneumothorax."),
    ("IMPRESSION:\n1) Cardiomegaly 2) Edema", "Cardiomegaly. Edema."),
    ("Nodule measures 2.5 cm.", "Nodule measures 2.5 cm."),
    ("The heart is\nnormal in\n\nsize", "The heart is normal in size."),
    ("Is there a pneumothorax? None seen.", "Is there a pneumothorax? None seen."),
    ("___", ""),
    ("  \n ", ""),
    ("FINDINGS:", ""),
])
def test_clean_report(raw: str, expected: str) -> None:
    assert clean_report(raw) == expected


def test_clean_report_missing() -> None:
    assert clean_report(None) == "" and clean_report(float("nan")) == "" and clean_report("NaN") == ""


def test_release_text_quirks() -> None:
    # Impression first, no separator between the two sections.
    assert release_text("Lungs clear.", "No acute process") == "No acute processLungs clear. "
    # The release's "IMPRESSSION" typo leaves the real header; FINDINGS is removed; digits dropped.
    assert (release_text("FINDINGS: 1. Lungs clear. 2. No effusion.", "IMPRESSION: Normal.")
            == "IMPRESSION: Normal. Lungs clear. No effusion. ")
    # Decimals are split too (the release splits on every period).
    assert release_text("Nodule 2.5 cm.", "") == "Nodule 2. 5 cm. "
    # "dumb" or missing findings: raw impression, uncleaned.
    assert release_text("dumb", " IMPRESSION: x. 1. ") == " IMPRESSION: x. 1. "
    assert release_text(None, "FINDINGS: y") == "FINDINGS: y"
    assert release_text(float("nan"), "z") == "z"
    # No period at all: replacements only, no rejoin.
    assert release_text("COMPARISON:  ___ none", "") == " none"


def test_pairs_read_images_through_the_one_reader_dicom_included(tmp_path: Path) -> None:
    """Pre-training pairs and labelled sets share g2d.data.images.read_image: a DICOM pair reads as its
    labelled twin does (MONOCHROME1 inverted), and a PNG pair exactly as before."""
    from helpers import write_dicom

    from g2d.data.images import read_image

    arr = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    write_dicom(tmp_path / "a.dcm", arr, photometric="MONOCHROME1")
    Image.fromarray(_noise(64, 64, 0)).save(tmp_path / "b.png")
    _write_csv(tmp_path / "t.csv", ["image", "text"], [["a.dcm", "no effusion"], ["b.png", "small nodule"]])
    ds = ImageTextPairs(PairsCfg(path=str(tmp_path / "t.csv")), _eval_tf(64))
    tf = _eval_tf(64)
    torch.testing.assert_close(ds[0]["image"], tf(read_image(tmp_path / "a.dcm")))
    assert ds[0]["image"][0, 0, 0] > ds[0]["image"][0, -1, -1]  # inverted: the first pixel (0) is brightest
    torch.testing.assert_close(ds[1]["image"], tf(Image.open(tmp_path / "b.png")))


@pytest.mark.parametrize("hw", [(40, 100), (100, 40)])
def test_pad_square_keeps_the_whole_image_and_maps_back(hw) -> None:
    # MGCA / GLoRIA resize_img: longer side -> 50, zero padding to 50 x 50 (centred), centre crop 44
    cfg = ImageTransformCfg(resize=50, crop=44, augment="none", pad_square=True)
    h, w = hw
    g = eval_geometry(hw, cfg)
    assert g["resized_hw"] == ((20, 50) if h < w else (50, 20))
    # canvas padding 15 before the image on the short axis, crop offset 3 on the canvas: -12 in the image
    assert (g["crop_top"], g["crop_left"]) == ((-12, 3) if h < w else (3, -12))
    out = build_transform(cfg, train=False)(np.ones(hw, np.float32))[0]
    assert out.shape == (44, 44)
    band = out.sum(1 if h < w else 0)                      # rows (wide image) / columns (tall) that hold image
    assert (band[:12] == 0).all() and (band[32:] == 0).all() and (band[12:32] > 0).all()
    img = np.zeros(hw, np.float32)
    img[h // 2 - 2:h // 2 + 3, w // 2 - 2:w // 2 + 3] = 1.0   # a blob, mapped back by its centre of mass
    out = build_transform(cfg, train=False)(img)[0].double()
    yy, xx = torch.meshgrid(torch.arange(44).double(), torch.arange(44).double(), indexing="ij")
    oy, ox = crop_to_original(float((yy * out).sum() / out.sum()), float((xx * out).sum() / out.sum()), g)
    assert math.hypot(oy - h // 2, ox - w // 2) < 0.5


def test_an_unbalanced_quote_is_named_not_swallowing_rows(tmp_path: Path) -> None:
    """A labelled table's quote left open reads the rows after it into one cell: refused with its
    lines; report tables (pre-training pairs) may hold line breaks in quoted text."""
    from g2d.data.tables import read_table

    p = tmp_path / "t.csv"
    p.write_text('image,split\na.png,train\n"b.png,train\nc.png,test\nd.png,test\n', encoding="utf-8")
    _, rows = read_table(p)
    with pytest.raises(DataError, match=r"data row 2 runs over lines 3-5.*unbalanced quote"):
        list(rows)
    q = tmp_path / "reports.csv"
    q.write_text('file,text\na.png,"line one\nline two"\n', encoding="utf-8")
    _, rows = read_table(q, line_breaks=True)
    assert [r.cells["text"] for r in rows] == ["line one\nline two"]
