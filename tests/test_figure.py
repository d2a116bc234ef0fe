
import numpy as np
from PIL import Image

from g2d.cli import main


def test_figure_attention_writes_panels(tiny_model_dir, jsrt_dir, tmp_path, capsys):
    images = sorted((jsrt_dir / "images").glob("*.png"))[:2]
    report = tmp_path / "r.txt"
    report.write_text("Small right pleural effusion.")
    out = tmp_path / "fig"
    rc = main(["figure", "attention", "--model", str(tiny_model_dir), "--images", *map(str, images),
               "--reports", str(report), "No acute cardiopulmonary process.", "--out", str(out)])
    assert rc == 0
    combined = out / "attention_panels.png"
    assert combined.is_file()
    for p in images:
        assert (out / f"{p.stem}.png").is_file()
    # two rows are taller than one
    assert Image.open(combined).height > Image.open(out / f"{images[0].stem}.png").height
    assert "wrote" in capsys.readouterr().out


def test_figure_attention_rejects_report_count_mismatch(tiny_model_dir, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((80, 64)) * 255).astype(np.uint8)).save(img)
    rc = main(["figure", "attention", "--model", str(tiny_model_dir), "--images", str(img),
               "--reports", "a", "b", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "g2d figure: error: got 1 images but 2 reports" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
