"""``g2d prepare mimic``: report sections, filters, the store, resume, and raw files -> training batch.

The fixture writes a miniature MIMIC-CXR-JPG + reports tree with the official file names, column
names and folder layout, including corrupt, missing and odd inputs.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from g2d.data.pretraining.mimic import METADATA_FILE, SPLIT_FILE, MimicPrepareCfg, prepare_mimic
from g2d.data.pretraining.pairs import collate_pairs
from g2d.data.pretraining.text import count_tokens, extract_sections, pretrain_text
from g2d.errors import DataError

# ------------------------------------------------------------------------------------------------
# Report text
# ------------------------------------------------------------------------------------------------

STANDARD = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

IMPRESSION_ONLY = """ WET READ: ___ ___ 8:10 PM  no pneumonia
 FINAL REPORT
 HISTORY:  Shortness of breath.
 IMPRESSION:  1. Moderate right pleural effusion. 2. ___ opacity at the
 left base, likely atelectasis.
"""

COMBINED = """ FINAL REPORT
 INDICATION: Cough.
 FINDINGS AND IMPRESSION:  Lungs: clear.  Heart size normal.
"""

MIXED_CASE = """Indication: fever
Findings : Right lower lobe
consolidation.  Heart: normal size. Impression: Pneumonia. IMPRESSION: Right lower lobe pneumonia.
"""

NO_SECTIONS = """ FINAL REPORT
 INDICATION:  Line placement.
 COMPARISON:  ___.
 The tip of the right IJ line is in the SVC.
"""

TOO_SHORT = """ FINAL REPORT
 IMPRESSION:  ___.  No.
"""


def test_extract_sections_standard_report() -> None:
    s = extract_sections(STANDARD)
    assert set(s) == {"examination", "indication", "technique", "comparison", "findings", "impression"}
    assert s["impression"] == "No acute cardiopulmonary process."
    assert s["findings"].startswith("There is no focal") and "INDICATION" not in s["findings"]
    text = pretrain_text(s["findings"], s["impression"])
    # wrapped lines joined, findings before impression, one space between sentences
    assert text == ("There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular "
                    "opacities that most likely represent nipple shadows. The cardiomediastinal silhouette "
                    "is normal. No acute cardiopulmonary process.")


def test_extract_sections_variants() -> None:
    s = extract_sections(IMPRESSION_ONLY)
    assert "findings" not in s and s["history"] == "Shortness of breath."
    assert s["other"].endswith("no pneumonia") and "preamble" not in s  # "WET READ:" is a known header
    assert pretrain_text(None, s["impression"]) == (
        "Moderate right pleural effusion. opacity at the left base, likely atelectasis.")
    # combined header -> impression; a sub-label "Lungs:" stays inside the section
    assert extract_sections(COMBINED)["impression"] == "Lungs: clear.  Heart size normal."
    m = extract_sections(MIXED_CASE)
    assert m["indication"] == "fever"
    # "Findings :" at a line start in any case; "IMPRESSION:" inside a line only in capitals
    assert m["findings"].startswith("Right lower lobe\nconsolidation.") and "Impression: Pneumonia." in m["findings"]
    assert m["impression"] == "Right lower lobe pneumonia."
    n = extract_sections(NO_SECTIONS)
    assert "findings" not in n and "impression" not in n
    assert extract_sections("") == {} and extract_sections(None) == {}  # type: ignore[arg-type]
    t = extract_sections(TOO_SHORT)["impression"]
    assert count_tokens(pretrain_text(None, t)) == 1


def test_pretrain_text_release_recipe() -> None:
    # impression first, no separator, released quirks (see release_text)
    assert pretrain_text("Lungs clear.", "No acute process.", "release") == "No acute process. Lungs clear. "
    assert pretrain_text(None, "IMPRESSION: x", "release") == "IMPRESSION: x"
    with pytest.raises(ValueError, match="recipe"):
        pretrain_text("a", "b", "other")


# ------------------------------------------------------------------------------------------------
# A miniature MIMIC-CXR-JPG tree
# ------------------------------------------------------------------------------------------------

METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    arr = (rng.random((h, w)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_gz_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# (subject, study, report text or None) and its images (dicom_id, view, split, kind)
STUDIES = [
    ("10000032", "50414267", STANDARD, [("d-001", "PA", "train", "ok"), ("d-002", "LATERAL", "train", "ok")]),
    ("10000032", "53189527", IMPRESSION_ONLY, [("d-003", "AP", "train", "ok"), ("d-004", "AP", "train", "ok")]),
    ("10000764", "57375967", COMBINED, [("d-005", "PA", "train", "ok"), ("d-006", "LL", "train", "ok")]),
    ("10000764", "51234567", MIXED_CASE, [("d-007", "AP", "train", "ok"), ("d-008", "", "train", "ok")]),
    ("10000898", "50771383", NO_SECTIONS, [("d-009", "PA", "train", "ok")]),
    ("10000898", "54205396", None, [("d-010", "PA", "train", "ok")]),
    ("10000935", "50578979", TOO_SHORT, [("d-011", "AP", "train", "ok")]),
    ("10000935", "51178377", STANDARD, [("d-012", "PA", "validate", "ok"), ("d-013", "PA", "test", "ok")]),
    ("10001176", "53186264", STANDARD, [("d-014", "PA", "train", "truncated"), ("d-015", "AP", "train", "empty"),
                                        ("d-016", "PA", "train", "absent"), ("d-017", "PA", "train", "no_metadata")]),
    ("11001884", "55470018", IMPRESSION_ONLY, [(f"e-{k:03d}", "AP", "train", "ok") for k in range(8)]),
]
KEPT_TRAIN = ["d-001", "d-003", "d-004", "d-005", "d-007"] + [f"e-{k:03d}" for k in range(8)]


def write_mimic(root: Path, reports_as: str = "zip") -> tuple[Path, Path]:
    """Write the tree; returns (MIMIC-CXR-JPG root, reports zip or folder)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    split_rows, meta_rows, reports = [], [], {}
    for subject, study, report, images in STUDIES:
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        if report is not None:
            reports[f"files/p{subject[:2]}/p{subject}/s{study}.txt"] = report
        for dicom, view, split, kind in images:
            split_rows.append([dicom, study, subject, split])
            if kind != "no_metadata":
                meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, "80", "96", "21800506",
                                  "213014.531", "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
            h, w = (80, 96) if dicom < "d-005" else (96, 72)
            data = _jpeg(rng, h, w)
            if kind == "truncated":
                data = data[: len(data) // 3]
            elif kind == "empty":
                data = b""
            if kind != "absent":
                (folder / f"{dicom}.jpg").write_bytes(data)
    _write_gz_csv(root / SPLIT_FILE, ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    _write_gz_csv(root / METADATA_FILE, METADATA_COLUMNS, meta_rows)
    if reports_as == "zip":
        path = root.parent / "mimic-cxr-reports.zip"
        with zipfile.ZipFile(path, "w") as z:
            for name, text in reports.items():
                z.writestr(f"mimic-cxr-reports/{name}", text)  # folder prefix inside the zip is tolerated
    else:
        path = root.parent / "reports"
        for name, text in reports.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)
    return root, path


@pytest.fixture(scope="module")
def mimic_raw(tmp_path_factory) -> tuple[Path, Path]:
    return write_mimic(tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg")


def _cfg(raw: tuple[Path, Path], out: Path, **kw) -> MimicPrepareCfg:
    opts = {"image_size": 64, "shard_size": 4, "workers": 1, "progress": False, **kw}
    return MimicPrepareCfg(root=str(raw[0]), reports=str(raw[1]), out=str(out), **opts)


@pytest.fixture(scope="module")
def store(mimic_raw, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("store")
    return out, prepare_mimic(_cfg(mimic_raw, out))


def _manifest(out: Path) -> list[dict[str, str]]:
    with gzip.open(out / "manifest.csv.gz", "rt", newline="") as f:
        return list(csv.DictReader(f))


def test_prepare_filters_and_report(store) -> None:
    out, report = store
    assert report["rows"] == sum(len(s[3]) for s in STUDIES)
    assert report["kept"] == {"train": len(KEPT_TRAIN)}
    # d-008 has an empty ViewPosition: counted as no_view, apart from the laterals (not_frontal)
    assert report["dropped"] == {"other_split": 2, "no_metadata": 1, "not_frontal": 2, "no_view": 1, "no_report": 1,
                                 "no_findings_or_impression": 1, "too_few_tokens": 1, "missing_image": 1,
                                 "corrupt_image": 2}
    assert report["corrupt_images"] == ["files/p10/p10001176/s53186264/d-014.jpg",
                                        "files/p10/p10001176/s53186264/d-015.jpg"]
    assert json.loads((out / "report.json").read_text())["kept"] == report["kept"]
    md = (out / "report.md").read_text()
    assert "| corrupt_image | 2 |" in md and "d-015.jpg" in md
    rows = _manifest(out)
    assert [r["key"] for r in rows] == KEPT_TRAIN
    assert {r["view"] for r in rows} == {"PA", "AP"} and {r["split"] for r in rows} == {"train"}
    by_key = {r["key"]: r for r in rows}
    assert by_key["d-001"]["text"].endswith("silhouette is normal. No acute cardiopulmonary process.")
    assert by_key["d-005"]["text"] == "Lungs: clear. Heart size normal."
    assert "___" not in "".join(r["text"] for r in rows)
    assert by_key["d-001"]["image"] == "files/p10/p10000032/s50414267/d-001.jpg"
    # 13 images in shards of 4 (the two corrupt ones were in the last chunk)
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == [f"train-00000{k}.tar" for k in range(4)]


def test_store_reads_back_resized(store, mimic_raw) -> None:
    from g2d.data.pretraining.shards import ShardedPairs

    out, _ = store
    ds = ShardedPairs(out, "train")
    assert len(ds) == len(KEPT_TRAIN) and isinstance(ds.index, np.memmap)
    rows = _manifest(out)
    for i in (0, 4, 12):
        assert ds.text(i) == rows[i]["text"]
        im = ds.image(i)
        assert im.mode == "L" and min(im.size) == 64
        orig = Image.open(mimic_raw[0] / rows[i]["image"])
        assert abs(im.size[0] / im.size[1] - orig.size[0] / orig.size[1]) < 0.02
    with pytest.raises(DataError, match="validate"):
        ShardedPairs(out, "validate")


def test_reports_folder_gives_the_same_store(store, tmp_path) -> None:
    raw = write_mimic(tmp_path / "mimic-cxr-jpg", reports_as="dir")
    report = prepare_mimic(_cfg(raw, tmp_path / "out", workers=2, shard_size=3))
    assert report["kept"] == store[1]["kept"] and report["dropped"] == store[1]["dropped"]
    a, b = _manifest(store[0]), _manifest(tmp_path / "out")
    assert [(r["key"], r["text"]) for r in a] == [(r["key"], r["text"]) for r in b]


def test_resume_and_idempotence(mimic_raw, tmp_path, monkeypatch) -> None:
    import g2d.data.pretraining.mimic as mimic

    out = tmp_path / "store"
    prepare_mimic(_cfg(mimic_raw, out))
    before = {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}
    manifest = (out / "manifest.csv.gz").read_bytes()
    index = (out / "index-train.npy").read_bytes()

    built: list[str] = []
    real = mimic._build_shard
    monkeypatch.setattr(mimic, "_build_shard", lambda path, *a: built.append(Path(path).name) or real(path, *a))
    prepare_mimic(_cfg(mimic_raw, out))  # nothing to do
    assert built == []
    # an interrupted run: one shard never finished (temp file left), another lost its sidecar
    (out / "shards" / "train-000001.tar").rename(out / "shards" / "train-000001.tar.tmp")
    (out / "shards" / "train-000002.json").unlink()
    prepare_mimic(_cfg(mimic_raw, out))
    assert sorted(built) == ["train-000001.tar", "train-000002.tar"]
    after = {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir()) if not p.name.endswith(".tmp")}
    assert after == before  # byte-identical shards, sidecars, index and manifest
    assert (out / "manifest.csv.gz").read_bytes() == manifest and (out / "index-train.npy").read_bytes() == index
    # an image replaced in place (here: only its modification time moves) rebuilds its shard only
    import os

    built.clear()
    image = sorted(Path(mimic_raw[0]).rglob("*.jpg"))[0]
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    prepare_mimic(_cfg(mimic_raw, out))
    assert len(built) == 1
    with pytest.raises(DataError, match="other settings"):
        prepare_mimic(_cfg(mimic_raw, out, min_tokens=5))


def test_bad_inputs_raise_clear_errors(mimic_raw, tmp_path) -> None:
    with pytest.raises(DataError, match="reports not found"):
        prepare_mimic(MimicPrepareCfg(root=str(mimic_raw[0]), reports=str(tmp_path / "nope.zip"),
                                      out=str(tmp_path / "o1"), progress=False))
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_gz_csv(bad / SPLIT_FILE, ["dicom_id", "study_id", "split"], [["a", "1", "train"]])
    _write_gz_csv(bad / METADATA_FILE, METADATA_COLUMNS, [])
    with pytest.raises(DataError, match=r"split.csv.gz: missing columns \['subject_id'\]"):
        prepare_mimic(MimicPrepareCfg(root=str(bad), reports=str(mimic_raw[1]), out=str(tmp_path / "o2"),
                                      progress=False))


def test_cli_prepare_mimic(mimic_raw, tmp_path, capsys) -> None:
    from g2d.commands.prepare import register

    parser = argparse.ArgumentParser(prog="g2d")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prepare", "mimic", "--root", str(mimic_raw[0]), "--reports", str(mimic_raw[1]),
                              "--out", str(tmp_path / "s"), "--image-size", "48", "--format", "png",
                              "--views", "PA", "--splits", "train,validate", "--workers", "1", "--no-progress"])
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert '"train": 2' in printed and '"validate": 1' in printed and "mimic:" in printed
    from g2d.data.pretraining.shards import ShardedPairs

    im = ShardedPairs(tmp_path / "s", "validate").image(0)
    assert im.format == "PNG" and min(im.size) == 48


# ------------------------------------------------------------------------------------------------
# Raw files -> training batch
# ------------------------------------------------------------------------------------------------


def test_round_trip_to_training_batch(store, tiny_cfg) -> None:
    from g2d.config import apply_overrides
    from g2d.errors import ConfigError
    from g2d.train.data import (
        EpochSampler,
        SeededSamples,
        build_pretrain_dataset,
        dataset_texts,
    )

    out, _ = store
    apply_overrides(tiny_cfg, {"data.spec": f"mimic:{out}"})
    cfg = tiny_cfg.validate()
    ds = build_pretrain_dataset(cfg, train=True)
    assert len(ds) == len(KEPT_TRAIN)
    assert dataset_texts(ds) == [r["text"] for r in _manifest(out)]
    sampler = EpochSampler(len(ds), rank=0, world_size=1, seed=0)
    loader = DataLoader(SeededSamples(ds, 0), batch_size=4, sampler=sampler, num_workers=2,
                        collate_fn=collate_pairs, drop_last=True)
    batches = list(loader)
    assert len(batches) == 3
    b = batches[0]
    assert b["image"].shape == (4, 1, 64, 64) and b["image"].dtype == torch.float32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["text"] == [ds.text(int(i)) for i in b["index"]]
    # same seeds -> same augmented batch in a single process (workers are deterministic)
    again = next(iter(DataLoader(SeededSamples(ds, 0), batch_size=4, sampler=sampler, num_workers=0,
                                 collate_fn=collate_pairs, drop_last=True)))
    torch.testing.assert_close(again["image"], b["image"])
    # two ranks read disjoint indices
    r0 = {i for _, i in EpochSampler(len(ds), 0, 2, seed=0)}
    r1 = {i for _, i in EpochSampler(len(ds), 1, 2, seed=0)}
    assert len(r0 & r1) <= 1  # one index repeats to pad 13 samples to 2 x 7

    apply_overrides(tiny_cfg, {"data.spec": f"mimic:{out / 'missing'}"})
    with pytest.raises(ConfigError, match="data.spec"):
        tiny_cfg.validate()


@pytest.mark.slow
def test_pretrain_tiny_on_mimic_store(store, tiny_cfg, tmp_path) -> None:
    from g2d.config import apply_overrides
    from g2d.train.loop import pretrain

    out, _ = store
    apply_overrides(tiny_cfg, {"data.spec": f"mimic:{out}", "train.max_steps": 2, "train.batch_size": 4,
                               "data.num_workers": 0, "model.text.model": "tiny", "train.log_every": 1})
    result = pretrain(tiny_cfg.validate(), tmp_path, progress=False)
    assert result.steps == 2 and all(np.isfinite(h["total"]) for h in result.history)


def test_covid_notes_through_csv_spec(tiny_cfg, covid_notes_dir) -> None:
    from g2d.config import apply_overrides
    from g2d.train.data import build_pretrain_dataset

    apply_overrides(tiny_cfg, {"data.spec": f"csv:{covid_notes_dir / 'metadata.csv'}", "data.image_col": "file",
                               "data.text_col": "notes", "data.image_dir": "images"})
    ds = build_pretrain_dataset(tiny_cfg.validate(), train=False)
    assert len(ds) > 500
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_pairs)))
    assert batch["image"].shape == (4, 1, 64, 64) and all(len(t) > 20 for t in batch["text"])
