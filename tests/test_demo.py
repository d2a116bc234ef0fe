import json

from g2d.demo import run_demo, run_downstream


def test_demo_writes_results_figures_and_model(tmp_path):
    # the downstream part has its own test below
    results = run_demo(tmp_path, steps=3, train_samples=64, eval_samples=24, device="cpu", downstream_train=0)
    assert set(results["models"]) == {"G2D", "decoder none", "random init"}
    for metrics in results["models"].values():
        assert 0.0 <= metrics["top1_findings"] <= 1.0 and 0.0 <= metrics["grounding_dice"] <= 1.0
        assert metrics["grounding_images"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"] == results["models"]
    md = (tmp_path / "results.md").read_text()
    assert "| G2D |" in md and "| random init |" in md
    assert "| model | collapse r | pointing | pointing prior |" in md
    for metrics in results["models"].values():
        assert -1.0 <= metrics["attention_collapse_r"] <= 1.0 and 0.0 <= metrics["attention_pointing"] <= 1.0
    for fig in ("attention_pseudo_masks.png", "grounding.png", "training_loss.png"):
        assert (tmp_path / "figures" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "g2d" / "export" / "model.safetensors").is_file()
    # a second run resumes the finished pre-training instead of repeating it
    again = run_demo(tmp_path, steps=3, train_samples=64, eval_samples=24, device="cpu", downstream_train=0)
    assert again["models"]["G2D"] == results["models"]["G2D"]


def test_demo_downstream_runs_every_protocol_and_reuses_cells(tiny_model_dir, tmp_path, monkeypatch):
    models = {"G2D": str(tiny_model_dir), "random init": "random"}
    table = run_downstream(models, tmp_path, size=64, n_train=24, epochs=1, seed=0, device="cpu")
    assert table["seg Dice 10% enc-dec"]["random init"] is None  # no decoder to transfer
    assert table["zero-shot AUC"]["random init"] is None  # needs a text side
    for label, row in table.items():
        assert row["G2D"] is not None and 0.0 <= row["G2D"] <= 1.0, label
    for label in ("seg Dice 10% enc", "det mAP 100%", "linear AUC 10%"):
        assert row_ok(table[label]["random init"])
    assert (tmp_path / "downstream" / "segmentation" / "G2D" / "fraction_0.1_transfer_encoder-decoder"
            / "metrics.json").is_file()

    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "downstream").rglob("metrics.json")}
    assert len(written) == 9  # zero-shot AUC and F1 share one run
    assert run_downstream(models, tmp_path, size=64, n_train=24, epochs=1, seed=0, device="cpu") == table
    assert {p: p.stat().st_mtime_ns for p in written} == written  # finished cells are not recomputed
    monkeypatch.chdir(tiny_model_dir.parent)  # the same model named by a relative path is the same model
    relative = {"G2D": tiny_model_dir.name, "random init": "random"}
    assert run_downstream(relative, tmp_path, size=64, n_train=24, epochs=1, seed=0, device="cpu") == table
    assert {p: p.stat().st_mtime_ns for p in written} == written
    # cells recorded before a protocol flag existed (here: two flags dropped from the records of tasks
    # that do not reuse their own runs) are reused: the flag takes its default, the old behaviour
    dropped = 0
    for done in (tmp_path / "downstream").rglob("demo_args.json"):
        key = json.loads(done.read_text())
        dropped += sum(key["args"].pop(f, None) is not None for f in ("monitor", "threshold"))  # linear, zero-shot
        done.write_text(json.dumps(key))
    assert dropped
    assert run_downstream(models, tmp_path, size=64, n_train=24, epochs=1, seed=0, device="cpu") == table
    assert {p: p.stat().st_mtime_ns for p in written} == written

    # the same model folder with other weights (here: only the file's stamp moves) is another model
    import os

    weights = tiny_model_dir / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    run_downstream(models, tmp_path, size=64, n_train=24, epochs=1, seed=0, device="cpu")
    g2d_cells = {p for p in written if "/G2D/" in str(p)}
    assert g2d_cells and all(p.stat().st_mtime_ns != written[p] for p in g2d_cells)
    assert all(p.stat().st_mtime_ns == written[p] for p in written if p not in g2d_cells)


def row_ok(v) -> bool:
    return v is not None and 0.0 <= v <= 1.0
