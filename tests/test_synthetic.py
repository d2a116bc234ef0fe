"""Tests for the embedded synthetic chest-radiograph data set (g2d.data.synthetic)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from g2d.data.synthetic import (
    FINDING_LOCATIONS,
    FINDING_TERMS,
    FINDINGS,
    LOCATIONS,
    NEGATION_CUES,
    SyntheticCXR,
    SyntheticCXRCfg,
    collate_samples,
    make_report,
    prompt_for,
    render_sample,
)

SIZE = 96  # small renders keep the suite fast; geometry is resolution independent


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    ds = SyntheticCXR(num_samples=120, image_size=SIZE, seed=0)
    return [ds[i] for i in range(len(ds))]


def _render(seed: int, index: int, findings, size: int = 128) -> dict:
    return render_sample(np.random.default_rng([seed, index]), SyntheticCXRCfg(image_size=size), findings=findings)


def _sentences(text: str) -> list[str]:
    return [s.strip().lower() for s in re.split(r"(?<=\.)\s+", text) if s.strip()]


def _is_negated(sentence: str) -> bool:
    return any(cue in sentence for cue in NEGATION_CUES)


def _mentions(sentence: str, finding: str) -> bool:
    return any(term in sentence for term in FINDING_TERMS[finding])


def binary_dilation(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """3x3 binary dilation repeated ``iterations`` times (numpy bool ``[H, W]``)."""
    x = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    for _ in range(iterations):
        x = nnf.max_pool2d(x, 3, stride=1, padding=1)
    return x[0, 0].numpy() > 0


def binary_erosion(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    return ~binary_dilation(~mask, iterations)


def smooth(x: np.ndarray) -> np.ndarray:
    """3x3 binomial blur (suppresses the per-pixel detector noise)."""
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16.0)[None, None]
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    return nnf.conv2d(nnf.pad(t, (1, 1, 1, 1), mode="replicate"), k)[0, 0].numpy()


def _width(mask: np.ndarray) -> int:
    cols = np.flatnonzero(mask.any(0))
    return int(cols[-1] - cols[0] + 1)


# --------------------------------------------------------------------------- API / determinism


def test_constants_consistent() -> None:
    assert FINDINGS == ("opacity", "nodule", "effusion", "pneumothorax", "cardiomegaly")
    assert set(FINDING_LOCATIONS) == set(FINDINGS)
    for locs in FINDING_LOCATIONS.values():
        assert set(locs) <= set(LOCATIONS)
    assert set().union(*FINDING_LOCATIONS.values()) == set(LOCATIONS)


def test_determinism_and_seed_dependence() -> None:
    a = SyntheticCXR(num_samples=6, image_size=64, seed=0)
    b = SyntheticCXR(SyntheticCXRCfg(num_samples=100, image_size=64, seed=0))  # length must not matter
    c = SyntheticCXR(num_samples=6, image_size=64, seed=1)
    for i in range(6):
        x, y, z = a[i], b[i], c[i]
        assert torch.equal(x["image"], y["image"]) and x["text"] == y["text"]
        assert torch.equal(x["mask"], y["mask"]) and x["findings"] == y["findings"]
        assert not torch.equal(x["image"], z["image"])
        # the pure function behind __getitem__
        r = render_sample(np.random.default_rng([0, i]), a.cfg)
        assert torch.equal(r["image"], x["image"]) and r["text"] == x["text"]
    assert [a[i]["text"] for i in range(6)] != [c[i]["text"] for i in range(6)]
    assert not torch.equal(a[0]["image"], a[1]["image"])


def test_overrides_len_and_index_errors() -> None:
    ds = SyntheticCXR(SyntheticCXRCfg(seed=5), num_samples=3, image_size=48)
    assert ds.cfg == SyntheticCXRCfg(num_samples=3, image_size=48, seed=5)
    assert len(ds) == 3
    assert ds[-1]["index"] == 2
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError):
        SyntheticCXRCfg(normal_fraction=1.5)
    with pytest.raises(ValueError):
        _render(0, 0, [("nodule", "heart")])
    with pytest.raises(ValueError):
        _render(0, 0, [("opacity", "left upper zone"), ("opacity", "right upper zone")])


def test_shapes_dtypes_ranges(samples: list[dict]) -> None:
    S = SIZE
    for s in samples[:20]:
        assert s["image"].shape == (1, S, S) and s["image"].dtype == torch.float32
        assert float(s["image"].min()) >= 0.0 and float(s["image"].max()) <= 1.0
        assert float(s["image"].std()) > 0.05  # not blank
        for k in ("mask", "body", "lungs", "heart"):
            assert s[k].shape == (1, S, S) and s[k].dtype == torch.float32
            assert set(torch.unique(s[k]).tolist()) <= {0.0, 1.0}
        n = len(s["findings"])
        assert s["boxes"].shape == (n, 4) and s["boxes"].dtype == torch.float32
        assert s["box_labels"].shape == (n,) and s["box_labels"].dtype == torch.int64
        assert s["finding_masks"].shape == (n, S, S)
        assert s["labels"].shape == (len(FINDINGS),) and s["labels"].dtype == torch.float32
        assert isinstance(s["text"], str) and len(s["text"]) > 10
        assert isinstance(s["index"], int)
        assert 0 <= n <= 2


def test_collate_with_dataloader() -> None:
    ds = SyntheticCXR(num_samples=8, image_size=64, seed=3)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate_samples)
    batches = list(dl)
    assert len(batches) == 2
    b = batches[0]
    assert b["image"].shape == (4, 1, 64, 64)
    assert b["mask"].shape == b["body"].shape == b["lungs"].shape == (4, 1, 64, 64)
    assert b["labels"].shape == (4, len(FINDINGS))
    assert b["index"].tolist() == [0, 1, 2, 3]
    assert isinstance(b["text"], list) and len(b["text"]) == 4 and all(isinstance(t, str) for t in b["text"])
    assert isinstance(b["findings"], list) and len(b["boxes"]) == 4 and len(b["box_labels"]) == 4
    for i in range(4):
        assert b["boxes"][i].shape == (len(b["findings"][i]), 4)
        assert torch.equal(b["image"][i], ds[i]["image"])


# --------------------------------------------------------------------------- masks, boxes, labels


def test_masks_boxes_labels(samples: list[dict]) -> None:
    n_abnormal = 0
    for s in samples:
        body = s["body"][0].numpy() > 0
        lungs = s["lungs"][0].numpy() > 0
        assert lungs.sum() > 0.1 * lungs.size
        assert not (lungs & ~body).any()
        fm = s["finding_masks"].numpy() > 0
        union = fm.any(0) if len(fm) else np.zeros_like(body)
        assert np.array_equal(union, s["mask"][0].numpy() > 0)
        expected = torch.zeros(len(FINDINGS))
        for k, (finding, loc) in enumerate(s["findings"]):
            assert loc in FINDING_LOCATIONS[finding]
            m = fm[k]
            assert m.sum() > 0
            assert not (m & ~body).any(), "finding outside the body"
            if finding != "cardiomegaly":
                assert (m & lungs).sum() >= 0.99 * m.sum(), f"{finding} not inside the lungs"
            # tight box: encloses every mask pixel, and each edge touches the mask (+-1 px)
            ys, xs = np.nonzero(m)
            x1, y1, x2, y2 = s["boxes"][k].tolist()
            assert x1 <= xs.min() and y1 <= ys.min() and x2 >= xs.max() + 1 and y2 >= ys.max() + 1
            assert abs(x1 - xs.min()) <= 1 and abs(y1 - ys.min()) <= 1
            assert abs(x2 - (xs.max() + 1)) <= 1 and abs(y2 - (ys.max() + 1)) <= 1
            assert int(s["box_labels"][k]) == FINDINGS.index(finding)
            expected[FINDINGS.index(finding)] = 1.0
        assert torch.equal(s["labels"], expected)
        if s["findings"]:
            n_abnormal += 1
        else:
            assert float(s["mask"].sum()) == 0.0
            assert "no acute" in s["text"].lower()
    frac_normal = 1 - n_abnormal / len(samples)
    assert 0.15 < frac_normal < 0.45
    seen = {f for s in samples for f, _ in s["findings"]}
    assert seen == set(FINDINGS)


# --------------------------------------------------------------------------- reports


def _check_report(text: str, findings: list[tuple[str, str]]) -> None:
    sents = _sentences(text)
    present = {f for f, _ in findings}
    for finding, loc in findings:
        assert any(_mentions(s, finding) and loc in s and not _is_negated(s) for s in sents), (finding, loc, text)
    for s in sents:
        for finding in FINDINGS:
            if finding not in present and _mentions(s, finding):
                assert _is_negated(s), f"absent {finding} stated positively: {s!r}"
    if findings:
        assert "no acute" not in text.lower()
    else:
        assert "no acute" in text.lower()


def test_reports_name_findings_and_locations(samples: list[dict]) -> None:
    for s in samples:
        _check_report(s["text"], s["findings"])
    texts = [s["text"] for s in samples]
    assert len(set(texts)) > 0.6 * len(texts)  # phrasing varies


def test_make_report_all_combinations() -> None:
    rng = np.random.default_rng(0)
    for f1 in FINDINGS:
        for loc1 in FINDING_LOCATIONS[f1]:
            for f2 in (None, *FINDINGS):
                if f2 == f1:
                    continue
                findings = [(f1, loc1)]
                if f2 is not None:
                    findings.append((f2, FINDING_LOCATIONS[f2][int(rng.integers(len(FINDING_LOCATIONS[f2])))]))
                for _ in range(3):
                    _check_report(make_report(rng, findings), findings)
    for _ in range(20):
        _check_report(make_report(rng, []), [])


def test_prompt_for() -> None:
    assert prompt_for("opacity", "right lower zone") == "opacity in the right lower zone"
    assert prompt_for("effusion") == "pleural effusion"
    assert "no acute" in prompt_for("normal")
    for f in FINDINGS:
        assert any(t in prompt_for(f) for t in FINDING_TERMS[f])
        for loc in FINDING_LOCATIONS[f]:
            p = prompt_for(f, loc)
            assert any(t in p for t in FINDING_TERMS[f]) and loc in p and not _is_negated(p + " ")
    with pytest.raises(ValueError):
        prompt_for("fracture")
    with pytest.raises(ValueError):
        prompt_for("pneumothorax", "left base")


# --------------------------------------------------------------------------- image content


@pytest.mark.parametrize(
    "finding,loc,min_gain",
    [("opacity", "right lower zone", 0.06), ("opacity", "left upper zone", 0.06), ("nodule", "left mid zone", 0.08),
     ("effusion", "right base", 0.1), ("effusion", "left base", 0.1)],
)
def test_dense_findings_brighten_their_mask(finding: str, loc: str, min_gain: float) -> None:
    for i in range(4):
        ab = _render(7, i, [(finding, loc)])
        no = _render(7, i, [])
        # same anatomy seed -> identical body and lungs
        assert torch.equal(ab["body"], no["body"]) and torch.equal(ab["lungs"], no["lungs"])
        m = ab["mask"][0] > 0
        gain = float(ab["image"][0][m].mean() - no["image"][0][m].mean())
        assert gain > min_gain, (i, gain)
        # nothing changes far away from the finding
        far = ~torch.from_numpy(binary_dilation(m.numpy(), iterations=4))
        assert torch.allclose(ab["image"][0][far], no["image"][0][far], atol=1e-6)
        # and the region is brighter than the mirror region of the other lung
        img = ab["image"][0].numpy()
        mirror = m.numpy()[:, ::-1] & (ab["lungs"][0].numpy() > 0)
        if mirror.sum() > 0.5 * m.sum():
            assert img[m.numpy()].mean() > img[mirror].mean()


@pytest.mark.parametrize("side", ["right", "left"])
def test_pneumothorax_darker_and_smoother(side: str) -> None:
    for i in range(4):
        ab = _render(8, i, [("pneumothorax", f"{side} apex")], size=192)
        no = _render(8, i, [], size=192)
        m = ab["mask"][0].numpy() > 0
        a, b = ab["image"][0].numpy(), no["image"][0].numpy()
        assert a[m].mean() < b[m].mean() - 0.02
        core = binary_erosion(m, iterations=2)  # away from the bright pleural line
        assert core.sum() > 10

        def grad(x: np.ndarray) -> np.ndarray:
            return np.hypot(*np.gradient(smooth(x)))

        assert grad(a)[core].mean() < grad(b)[core].mean()
        # a visible pleural line: the mask's inner border is brighter than the gap
        ring = binary_dilation(m, iterations=1) & ~m & (ab["lungs"][0].numpy() > 0)
        assert (a - b)[ring].mean() > 0.0


def test_cardiomegaly_cardiothoracic_ratio() -> None:
    for i in range(6):
        for size in (96, 224):
            no = _render(9, i, [], size)
            ab = _render(9, i, [("cardiomegaly", "heart")], size)
            heart_n, heart_a = no["heart"][0].numpy() > 0, ab["heart"][0].numpy() > 0
            ctr_n = _width(heart_n) / _width(no["lungs"][0].numpy() > 0)
            ctr_a = _width(heart_a) / _width(ab["lungs"][0].numpy() > 0)
            assert ctr_n < 0.5 < ctr_a, (i, size, ctr_n, ctr_a)
            assert np.array_equal(ab["mask"][0].numpy() > 0, heart_a)
            assert ab["lungs"].sum() < no["lungs"].sum()  # the big heart displaces lung


def test_laterality(samples: list[dict]) -> None:
    S = SIZE
    for s in samples:
        ys, xs = np.nonzero(s["heart"][0].numpy())
        assert xs.mean() + 0.5 > S / 2 + 0.03 * S, "heart must sit right of the image midline"
        lungs = s["lungs"][0].numpy() > 0
        assert lungs[:, : S // 2].sum() > 0.35 * lungs.sum() and lungs[:, S // 2 :].sum() > 0.25 * lungs.sum()
        for k, (finding, loc) in enumerate(s["findings"]):
            if finding == "cardiomegaly":
                continue
            _, xs = np.nonzero(s["finding_masks"][k].numpy())
            cx = xs.mean() + 0.5
            if loc.startswith("right"):
                assert cx < S / 2, (finding, loc)  # patient's right = image left
            else:
                assert cx > S / 2, (finding, loc)


def test_zones_ordered_top_to_bottom() -> None:
    for side in ("right", "left"):
        ys = []
        for level in ("upper", "mid", "lower"):
            m = _render(11, 0, [("nodule", f"{side} {level} zone")])["mask"][0].numpy()
            ys.append(np.nonzero(m)[0].mean())
        assert ys[0] < ys[1] < ys[2]
        apex = _render(11, 0, [("pneumothorax", f"{side} apex")])["mask"][0].numpy()
        base = _render(11, 0, [("effusion", f"{side} base")])["mask"][0].numpy()
        assert np.nonzero(apex)[0].mean() < ys[0] and np.nonzero(base)[0].mean() > ys[1]


def test_parenchymal_findings_avoid_pleural_ones() -> None:
    cases = [[("opacity", "left upper zone"), ("pneumothorax", "left apex")],
             [("nodule", "right lower zone"), ("effusion", "right base")]]
    for findings in cases:
        for i in range(3):
            s = _render(12, i, findings)
            assert [f for f, _ in s["findings"]] == sorted((f for f, _ in findings), key=FINDINGS.index)
            fm = s["finding_masks"].numpy() > 0
            assert len(fm) == 2 and fm[0].any() and fm[1].any()
            assert not (fm[0] & fm[1]).any()
