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
