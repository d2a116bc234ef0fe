"""Labels in the image they were drawn on: DICOM VOI windows, boxes of resized conversions, labels that
cannot fit, csv label sizes (field cases 02, 16)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from g2d.data.labelled.specs import open_dataset


def _dicom(path, arr, photometric="MONOCHROME2", wc=None, ww=None, slope=1.0, intercept=0.0):
    import pydicom  # noqa: F401
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if wc is not None:
        ds.WindowCenter, ds.WindowWidth = wc, ww
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_voi_window_spreads_the_tissue(tmp_path, photometric):
    """Tissue 1000..2000 and a burned-in marker at 4095; WindowCenter/Width 1500/1000 (field case 02)."""
    from g2d.data.images import read_image

    t = np.tile(np.linspace(1000, 2000, 64), (64, 1))
    t[:4, :4] = 4095
    if photometric == "MONOCHROME1":
        t = 4095 - t
    img = read_image(_dicom(tmp_path / "w.dcm", t, photometric, wc=1500 if photometric == "MONOCHROME2"
                            else 4095 - 1500, ww=1000))
    tissue = img[10:, :]
    assert tissue.min() == pytest.approx(0.0, abs=0.01) and tissue.max() == pytest.approx(1.0, abs=0.01)
    assert img[0, 0] == pytest.approx(1.0)           # the marker is clipped at the window's top
    assert tissue[:, -1].mean() > tissue[:, 0].mean()  # 2000 is brighter than 1000 in both encodings
    # without a window: the stored range, as before (the marker squeezes the tissue)
    plain = read_image(_dicom(tmp_path / "p.dcm", t, photometric))
    assert plain[10:, :].max() - plain[10:, :].min() < 0.35


def _rsna(root, size, box, pid=None):
    from g2d.data.labelled.splits import load_split

    t = load_split("rsna")
    pid = pid or sorted(k for k, v in t.items() if v[0] == "test")[0]
    (root / "stage_2_train_images").mkdir(parents=True)
    x, y, w, h = box                                       # 1024-px label
    img = np.full(size[::-1], 20, np.uint8)
    sx, sy = size[0] / 1024, size[1] / 1024
    img[int(y * sy):int((y + h) * sy), int(x * sx):int((x + w) * sx)] = 240
    Image.fromarray(img).save(root / "stage_2_train_images" / f"{pid}.png")
    (root / "stage_2_train_labels.csv").write_text(f"patientId,x,y,width,height,Target\n{pid},{x},{y},{w},{h},1\n")
    return root


@pytest.mark.parametrize("side", [1024, 512, 256])
def test_rsna_boxes_follow_a_resized_conversion(tmp_path, side):
    """RSNA's boxes are in 1024-px space; on a PNG converted to another size they land on the
    finding (field case 16)."""
    from g2d.data.transforms import ImageTransformCfg

    root = _rsna(tmp_path / "rsna", (side, side), (600, 300, 200, 300))
    ds = open_dataset(f"rsna:{root}", "test", geometry=ImageTransformCfg(resize=224, crop=224, augment="none",
                                                                          keep_aspect=False), max_skip_fraction=1.0)
    s = ds[0]
    bright = s["image"][0] > 0.5
    assert s["boxes"][0].tolist() == pytest.approx([v * 224 / 1024 for v in (600, 300, 800, 600)], abs=0.01)
    inter = (s["mask"][0].bool() & bright).sum() / (s["mask"][0].bool() | bright).sum()
    assert inter > 0.9
    assert ds.skipped.total == 0


def test_labels_that_cannot_fit_are_named_and_skipped(tmp_path, caplog):
    from g2d.data.transforms import ImageTransformCfg

    geom = ImageTransformCfg(resize=64, crop=64, augment="none", keep_aspect=False)
    # a 512 x 256 conversion of a 1024 x 1024 image: another aspect ratio, the boxes cannot be placed
    root = _rsna(tmp_path / "a", (512, 256), (600, 300, 200, 300))
    ds = open_dataset(f"rsna:{root}", "test", geometry=geom, max_skip_fraction=1.0)
    assert ds[0] is None and ds.skipped.counts["label_space_mismatch"] == 1
    assert "stage_2_train_labels.csv:2" in caplog.text and "another aspect ratio" in caplog.text
    # labels declared in image pixels, but a box beyond the 512-px image: never silently dropped
    root = _rsna(tmp_path / "b", (512, 512), (600, 300, 200, 300))
    ds = open_dataset(f"rsna:{root}?label_size=image", "test", geometry=geom, max_skip_fraction=1.0)
    assert ds[0] is None and ds.skipped.counts["box_outside_image"] == 1


def test_csv_label_size_rescales_boxes_and_masks(tmp_path):
    from g2d.data.transforms import ImageTransformCfg

    (tmp_path / "img").mkdir()
    img = np.zeros((100, 200), np.uint8)
    img[20:40, 100:140] = 255
    Image.fromarray(img).save(tmp_path / "img" / "a.png")
    mask = np.zeros((200, 400), np.uint8)                    # the mask drawn at twice the image size
    mask[40:80, 200:280] = 255
    Image.fromarray(mask).save(tmp_path / "img" / "a_mask.png")
    (tmp_path / "t.csv").write_text("image,mask,boxes,split,y\nimg/a.png,img/a_mask.png,\"200,40,80,40\",test,1\n")
    geom = ImageTransformCfg(resize=100, crop=100, augment="none", keep_aspect=False)
    ds = open_dataset(f"csv:{tmp_path / 't.csv'}?labels=y&label_size=400x200", "test", geometry=geom)
    s = ds[0]
    assert s["boxes"][0].tolist() == pytest.approx([50.0, 20.0, 70.0, 40.0])
    assert (s["mask"][0].bool() == (s["image"][0] > 0.5)).float().mean() > 0.99
