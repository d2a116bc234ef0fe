"""Result files: strict JSON everywhere (NaN is not JSON), csv: labels reachable from the command line,
and spec options checked (field cases 13)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from helpers import strict_json
from PIL import Image

from g2d.cli import main
from g2d.data.labelled.specs import open_dataset, parse_spec
from g2d.errors import DataError


@pytest.fixture
def one_class_table(tmp_path):
    """Class "b" is all 0 in the test split (field case 13)."""
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(36):
        split = "train" if i < 20 else ("val" if i < 28 else "test")
        a, b = i % 2, int(i % 3 == 0) if split != "test" else 0
        img = rng.integers(0, 80, (48, 48)).astype(np.uint8)
        if a:
            img[10:30, 10:30] = 220
        Image.fromarray(img).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "split": split, "a": a, "b": b})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "split", "a", "b"])
        w.writeheader()
        w.writerows(rows)
    return tmp_path / "labels.csv"


LINEAR = ["--model", "random", "--arch", "resnet18", "--epochs", "2", "--image-size", "64", "--resize", "64",
          "--no-progress", "--num-workers", "0", "--no-feature-cache"]


@pytest.mark.parametrize("how", ["flag", "spec"])
def test_csv_labels_from_the_command_line_and_strict_json(one_class_table, tmp_path, how):
    data = ["--data", f"csv:{one_class_table}", "--labels", "a,b"] if how == "flag" \
        else ["--data", f"csv:{one_class_table}?labels=a,b"]
    out = tmp_path / f"out_{how}"
    assert main(["eval", "linear", *data, *LINEAR, "--out", str(out)]) == 0
    m = strict_json(out / "metrics.json")
    assert m["auc_per_class"]["a"] is not None and m["auc_per_class"]["b"] is None
    assert m["undefined"] == {"auc_per_class/b": "one class in test (all 0)"}
    assert m["auc"] == m["auc_per_class"]["a"]  # the mean leaves the undefined class out


def test_csv_without_labels_names_the_way_out(one_class_table, tmp_path, capsys):
    assert main(["eval", "linear", "--data", f"csv:{one_class_table}", *LINEAR, "--out", str(tmp_path / "o")]) == 2
    assert "--labels a,b,c" in capsys.readouterr().err


def test_spec_options_are_checked(one_class_table):
    assert parse_spec("csv:x.csv?labels=a,b&image_col=file") == ("csv", "x.csv", {"labels": "a,b",
                                                                                  "image_col": "file"})
    with pytest.raises(DataError, match="takes no option 'colour'"):
        open_dataset(f"csv:{one_class_table}?colour=red")
    with pytest.raises(DataError, match="not key=value"):
        parse_spec("csv:x.csv?labels")


def test_write_json_replaces_every_non_finite_value(tmp_path):
    from g2d.downstream.results import write_json

    write_json(tmp_path / "m.json", {"a": math.nan, "b": [1.0, math.inf], "c": {"d": math.nan},
                                     "undefined": {"c/d": "no positive image"}})
    m = strict_json(tmp_path / "m.json")
    assert m["a"] is None and m["b"] == [1.0, None] and m["c"] == {"d": None}
    assert m["undefined"] == {"a": "undefined for this run", "b/1": "not a finite number",
                              "c/d": "no positive image"}
