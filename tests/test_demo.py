import json

from g2d.demo import run_demo


def test_demo_writes_results_figures_and_model(tmp_path):
    results = run_demo(tmp_path, steps=3, train_samples=64, eval_samples=24, device="cpu")
    assert set(results["models"]) == {"G2D", "decoder none", "random init"}
    for metrics in results["models"].values():
        assert 0.0 <= metrics["top1_findings"] <= 1.0 and 0.0 <= metrics["grounding_dice"] <= 1.0
        assert metrics["grounding_images"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"] == results["models"]
    md = (tmp_path / "results.md").read_text()
    assert "| G2D |" in md and "| random init |" in md
    for fig in ("attention_pseudo_masks.png", "grounding.png", "training_loss.png"):
        assert (tmp_path / "figures" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "g2d" / "export" / "model.safetensors").is_file()
    # a second run resumes the finished pre-training instead of repeating it
    again = run_demo(tmp_path, steps=3, train_samples=64, eval_samples=24, device="cpu")
    assert again["models"]["G2D"] == results["models"]["G2D"]
