
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
    assert "g2d figure attention: error: got 1 images but 2 reports" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_heat_overlay_keeps_the_pixel_grid_and_adds_prompt_and_colour_bar():
    import numpy as np

    from g2d.figures import heat_overlay

    img = np.linspace(0, 1, 64 * 200, dtype=np.float32).reshape(64, 200)
    heat = np.linspace(-0.2, 0.6, 64 * 200).reshape(64, 200)
    heat[:, :10] = np.nan
    plain = heat_overlay(img, heat)
    assert plain.shape == (64, 200, 3) and (plain[:, :10, 0] == np.round(img[:, :10] * 255)).all()
    with_legend = heat_overlay(img, heat, legend="left pleural effusion " * 10)  # longer than the image
    assert with_legend.shape[0] > 64 and with_legend.shape[1] == 200
    assert (with_legend[:64] == plain).all()
    strip = with_legend[64:].astype(int)
    # a jet colour bar: saturated blue and red pixels somewhere in the strip, text in black
    assert ((strip[..., 2] > 200) & (strip[..., 0] < 60)).any() and ((strip[..., 0] > 200) & (strip[..., 2] < 60)).any()
    assert (strip.sum(-1) < 100).any()


def test_heat_overlay_of_a_tiny_image_ends():
    """An image narrower than the ellipsis (a field case: an 8 x 8 PNG) used to loop for ever while
    cutting the prompt to its width."""
    import numpy as np

    from g2d.figures import heat_overlay

    for w in (1, 4, 8, 30):
        out = heat_overlay(np.zeros((8, w)), np.ones((8, w)), legend="pleural effusion at the left base")
        assert out.shape[1] == w and out.shape[0] > 8


def test_grounding_panels_carry_a_colour_bar_of_the_cosine_scale(tmp_path, monkeypatch):
    import matplotlib.figure
    import torch

    from g2d.figures import grounding_panels

    labels = []
    real = matplotlib.figure.Figure.colorbar

    def colorbar(self, *args, **kwargs):
        bar = real(self, *args, **kwargs)
        labels.append(bar)
        return bar

    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", colorbar)
    grounding_panels(torch.rand(2, 1, 32, 32), torch.rand(2, 32, 32), torch.zeros(2, 32, 32),
                     ["left effusion", "right nodule"], tmp_path / "g.png")
    assert [b.ax.get_ylabel() for b in labels] == ["cosine similarity"] * 2


def test_figure_grounding_draws_the_maps_g2d_ground_writes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import g2d.figures

    img = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(1).random((70, 90)) * 255).astype(np.uint8)).save(img)
    assert main(["ground", str(img), "--model", str(tiny_model_dir), "--text", "left pleural effusion",
                 "--out", str(tmp_path / "h.png"), "--npy", str(tmp_path / "h.npy"), "--device", "cpu"]) == 0
    drawn = []
    real = g2d.figures.prompt_panels
    monkeypatch.setattr(g2d.figures, "prompt_panels", lambda *a, **k: drawn.append(a) or real(*a, **k))
    Image.open(img).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "flipped.png")
    rc = main(["figure", "grounding", "--model", str(tiny_model_dir), "--images", str(img),
               str(tmp_path / "flipped.png"), "--prompts", "left pleural effusion", "no finding",
               "--out", str(tmp_path / "g"), "--device", "cpu"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    originals, heats, prompts = drawn[0][:3]
    assert len(heats) == 2 and len(heats[0]) == 2 and heats[0][0].shape == (70, 90)
    np.testing.assert_allclose(heats[0][0], np.load(tmp_path / "h.npy"), atol=1e-5, equal_nan=True)
    assert not np.allclose(heats[0][0], heats[0][1], equal_nan=True)     # another prompt, another map
    assert (tmp_path / "g" / "grounding_panels.png").is_file() and (tmp_path / "g" / "wide.png").is_file()


def test_figure_grounding_needs_a_text_tower(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(img)
    assert main(["figure", "grounding", "--model", "imagenet", "--images", str(img), "--prompts", "x",
                 "--out", str(tmp_path / "o")]) != 0
    assert "text tower" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_figure_refuses_bad_input_in_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / sub / "x.png")
    (tmp_path / "file").write_text("")
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    cases = [
        # two images with one stem: the second panel would replace the first
        (["--images", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), "--prompts", "x"], "x.png"),
        (["--images", str(tmp_path / "a" / "x.png"), "--prompts", "  "], "every prompt must have words"),
        (["--images", str(tmp_path / "a" / "x.png"), "--prompts", "x", "--resize", "64", "--image-size", "96"],
         "--resize 64 is smaller than the 96-px crop"),
        (["--images", str(tmp_path / "a" / "x.png"), "--prompts", "x", "--image-size", "0"], "positive"),
    ]
    for extra, words in cases:
        assert main(["figure", "grounding", *model, *extra, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("g2d figure grounding: error: ") and words in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()
    # an --out that is a file: one line, not a traceback
    assert main(["figure", "grounding", *model, "--images", str(tmp_path / "a" / "x.png"), "--prompts", "x",
                 "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.startswith("g2d figure grounding: error: ")
