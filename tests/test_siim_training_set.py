"""SIIM segmentation's training set: MGCA's balanced set, the fraction taken from it (field case 04)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import strict_json
from PIL import Image

from g2d.cli import main
from g2d.data.labelled.specs import open_dataset


def _tiny_siim(root, n_train=8, n_pos=2):
    """A SIIM folder of ids from the shipped split table: train n_pos positives + the rest negative,
    val and test 2 each (one positive), 64 px PNGs with RLE masks (field case 04)."""
    from g2d.data.labelled.splits import load_split

    t = load_split("siim")

    def pick(s, n):
        return sorted([k for k, v in t.items() if v[0] == s], key=lambda k: t[k][1])[:n]

    ids = {"train": pick("train", n_train), "val": pick("val", 2), "test": pick("test", 2)}
    (root / "png").mkdir(parents=True)
    rows = ["ImageId, EncodedPixels"]
    rng = np.random.default_rng(0)
    for s, lst in ids.items():
        for n, iid in enumerate(lst):
            img = rng.integers(0, 60, (64, 64)).astype(np.uint8)
            if n < (n_pos if s == "train" else 1):
                img[10:30, 5:20] = 230
                m = np.zeros((64, 64), bool)
                m[10:30, 5:20] = True
                idx = np.flatnonzero(np.diff(np.r_[0, m.T.flatten().astype(int), 0]))
                runs, last = [], 0
                for a, b in zip(idx[0::2], idx[1::2]):
                    runs += [a - last, b - a]
                    last = b
                rows.append(f"{iid}, " + " ".join(map(str, runs)))
            else:
                rows.append(f"{iid}, -1")
            Image.fromarray(img).save(root / "png" / f"{iid}.png")
    (root / "train-rle.csv").write_text("\n".join(rows) + "\n")
    return ids


@pytest.mark.parametrize("mode, n_train, n_pos", [("balanced", 4, 2), ("all", 8, 2)])
def test_siim_segmentation_trains_on_the_balanced_set(tmp_path, monkeypatch, mode, n_train, n_pos):
    import functools

    import g2d.downstream.dense as dense

    _tiny_siim(tmp_path / "siim")
    # the folder holds 12 of the table's 12,047 ids: lift the missing-ids guard for this test only
    monkeypatch.setattr(dense, "open_dataset", functools.partial(open_dataset, max_skip_fraction=1.0))
    out = tmp_path / f"out_{mode}"
    spec = f"siim:{tmp_path / 'siim'}?label_size=image"  # the fixture's RLE is in its 64-px images
    assert main(["eval", "segmentation", "--data", spec, "--model", "random", "--arch", "resnet18",
                 "--epochs", "1", "--batch-size", "4", "--image-size", "64", "--out", str(out),
                 "--no-progress", "--figures", "0", "--num-workers", "0",
                 "--siim-train", mode]) == 0
    m = strict_json(out / "metrics.json")
    assert (m["n_train"], m["n_train_pos"], m["n_val"], m["n_test"]) == (n_train, n_pos, 2, 2)


def test_siim_balanced_fraction_is_taken_from_the_balanced_set(tmp_path):
    from g2d.data.labelled.siim import balance_train

    _tiny_siim(tmp_path / "siim", n_train=8, n_pos=4)
    full = open_dataset(f"siim:{tmp_path / 'siim'}?label_size=image", "train", max_skip_fraction=1.0)
    whole = balance_train(full)
    half = balance_train(full, 0.5)
    assert len(whole) == 8 and len(half) == 4
    assert set(half.ids) <= set(whole.ids)  # nested across fractions
