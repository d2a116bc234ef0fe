import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import g2d
from g2d.cli import main
from g2d.train.loop import Pretrainer, pretrain


def _cfg(tiny_cfg, **over):
    from g2d.config import apply_overrides

    apply_overrides(tiny_cfg, {"train.ckpt_every": 3, "train.log_every": 1, **over})
    return tiny_cfg.validate()


def test_pretrain_on_synthetic_loss_falls(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, **{"data.synthetic_samples": 8, "train.batch_size": 8, "train.max_steps": 30,
                            "train.epochs": 100, "train.log_every": 3, "train.warmup_steps": 3,
                            "train.lr": 3e-3})
    result = pretrain(cfg, tmp_path, progress=False)
    assert result.steps == 30 and len(result.history) == 10
    total = [h["total"] for h in result.history]
    pa = [h["pa"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(total)))
    assert sum(total[-3:]) < 0.95 * sum(total[:3])
    # the decoder learns the pseudo masks: 0.62 of the start with 2 threads, 0.71 with 1 (30 steps
    # amplify the thread count's rounding; 0.57-0.69 over other tiny vocabularies): a constant decoder
    # stays near 1
    assert pa[-1] < 0.8 * pa[0]
    assert 0.02 < result.history[-1]["fg"] < 0.3  # ~15 % of the body area is foreground
    for name in ("config.yaml", "checkpoints/last.pt", "export/model.safetensors", "export/config.json"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").iterdir())


@pytest.mark.parametrize("mode", ["pseudo", "shuffled"])  # the modes that draw random numbers
def test_resume_matches_uninterrupted_run(tiny_cfg, tmp_path, mode):
    over = {"train.max_steps": 6, "train.epochs": 10, "model.decoder.mode": mode,
            "train.deterministic": True}
    full = pretrain(_cfg(tiny_cfg, **over), tmp_path / "full", progress=False)
    assert full.steps == 6

    first = Pretrainer(_cfg(tiny_cfg, **over), tmp_path / "split", progress=False)
    first.setup()
    first.train(interrupt_after=3)
    del first
    resumed = pretrain(_cfg(tiny_cfg, **over), tmp_path / "split", resume="latest", progress=False)
    assert resumed.steps == 6

    a = g2d.load_model(tmp_path / "full" / "export").state_dict()
    b = g2d.load_model(tmp_path / "split" / "export").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_persistent_workers_match_in_process_loading(tiny_cfg, tmp_path):
    """Two persistent workers over two epochs: the same weights as loading in the main process."""
    over = {"train.max_steps": 6, "train.epochs": 10, "train.deterministic": True}
    ref = pretrain(_cfg(tiny_cfg, **over), tmp_path / "w0", progress=False)
    trainer = Pretrainer(_cfg(tiny_cfg, **over, **{"data.num_workers": 2}), tmp_path / "w2", progress=False)
    trainer.setup()
    trainer.train()
    assert trainer.epoch >= 1 and trainer._loader().persistent_workers
    assert trainer._loader() is trainer._loader()  # one loader (and one set of workers) per run
    a = g2d.load_model(tmp_path / "w0" / "export").state_dict()
    b = trainer.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert ref.steps == 6


def test_export_and_load_give_identical_embeddings(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, **{"train.max_steps": 2})
    before = cfg.to_dict()
    trainer = Pretrainer(cfg, tmp_path, progress=False)
    trainer.setup()
    trainer.train()
    assert cfg.to_dict() == before  # the trainer works on its own copy of the config
    # frozen text layers stay out of the optimizer
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert not in_opt & {id(p) for p in trainer.model.text_encoder.backbone.encoder.layer[0].parameters()}
    model = trainer.model.eval()
    loaded = g2d.load_model(tmp_path)  # the run folder resolves to its export
    images = torch.rand(3, 1, 64, 64)
    texts = ["opacity in the right lower zone", "no acute cardiopulmonary process", "cardiomegaly"]
    torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
    torch.testing.assert_close(loaded.encode_text(texts), model.encode_text(texts))
    torch.testing.assert_close(loaded.dense_embeddings(images), model.dense_embeddings(images))
    out = loaded.image_forward(images)
    side = 64 // loaded.cfg.image.output_stride  # the tiny preset: stride 16, a 4 x 4 map at 64 px
    assert out.attention.shape == (3, 3, side, side) and out.decoder_logits.shape == (3, 1, 64, 64)
    assert not loaded.training
    # the training checkpoint loads too (weights_only)
    ckpt_model = g2d.load_model(tmp_path / "checkpoints" / "last.pt")
    torch.testing.assert_close(ckpt_model.encode_image(images), model.encode_image(images))


def test_load_model_rejects_wrong_architecture(tiny_cfg, tmp_path):
    pretrain(_cfg(tiny_cfg, **{"train.max_steps": 1}), tmp_path, progress=False)
    import json

    cfg_file = tmp_path / "export" / "config.json"
    data = json.loads(cfg_file.read_text())
    data["model"]["embed_dim"] = 64
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match its configured architecture"):
        g2d.load_model(tmp_path / "export")


def test_pretrain_on_real_covid_notes(tiny_cfg, tmp_path, covid_notes_dir):
    csv = covid_notes_dir / "metadata.csv"
    # the columns and image folder as spec options (g2d.data_spec's grammar, as labelled specs)
    cfg = _cfg(tiny_cfg, **{"data.spec": f"csv:{csv}?image_col=file&text_col=notes&image_dir=images",
                            "train.max_steps": 3, "train.batch_size": 8, "model.text.model": "tiny"})
    result = pretrain(cfg, tmp_path, progress=False)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor([h["total"] for h in result.history])))
    model = g2d.load_model(tmp_path / "export")
    emb = model.encode_text(["Chest radiographs showed an infiltrate in the upper lobe of the left lung"])
    assert emb.shape == (1, 128)


def test_cli_pretrain_resume_and_overrides(tiny_text_dir, tmp_path):
    args = ["pretrain", "--preset", "tiny", "--out", str(tmp_path), "--max-steps", "2", "--no-progress",
            "--batch-size", "4", f"model.text.model={tiny_text_dir}", "model.text.freeze_layers=1",
            "model.image_size=64",
            "model.pool.width=48", "data.resize=64", "data.synthetic_samples=16", "train.warmup_steps=1"]
    assert main(args) == 0
    saved = (tmp_path / "config.yaml").read_text()
    assert "image_size: 64" in saved and "batch_size: 4" in saved
    assert main(args[:6] + ["4"] + args[7:] + ["--resume", "latest"]) == 0
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4
    assert main(["pretrain", "--out", str(tmp_path), "model.pool.heads=7"]) == 2


def test_cli_epochs_and_config_file(tiny_text_dir, tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  pool:\n    heads: 2\ntrain:\n  lr: 0.002\n")
    args = ["pretrain", "--preset", "tiny", "--out", str(tmp_path / "run"), "--epochs", "1",
            "--config", str(tmp_path / "c.yaml"), "--no-progress", "--batch-size", "4",
            f"model.text.model={tiny_text_dir}", "model.text.freeze_layers=1", "model.image_size=64",
            "model.pool.width=48", "data.resize=64", "data.synthetic_samples=12", "train.warmup_steps=1"]
    assert main(args) == 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["epoch"] == 1  # one epoch of 12 / 4 batches
    assert state["config"]["model"]["pool"]["heads"] == 2 and state["config"]["train"]["lr"] == 0.002


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "g2d", "pretrain", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(g2d.__file__).parents[1])})
    assert out.returncode == 0 and "--resume" in out.stdout


@pytest.mark.slow
def test_torchrun_two_processes(tiny_text_dir, tmp_path):
    """Two gloo ranks train on an image-text table whose undecodable images land on both ranks'
    shards (and in DataLoader workers): rank 0's end-of-run summary counts all of them."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rows = ["image,text"]
    for i in range(16):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (72, 72), np.uint8)).save(data / f"{i}.png")
        rows.append(f"{i}.png,Finding number {i} in the right lower lobe.")
    for bad in (3, 10):
        (data / f"{bad}.png").write_bytes((data / f"{bad}.png").read_bytes()[:60])  # truncated
    (data / "pairs.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(g2d.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "g2d", "-v", "pretrain", "--preset", "tiny", "--out", str(run), "--max-steps", "2",
           "--device", "cpu", "--no-progress", "--batch-size", "4", f"model.text.model={tiny_text_dir}",
           "model.text.freeze_layers=1", "--data", f"csv:{data / 'pairs.csv'}", "data.num_workers=1",
           "model.image_size=64", "model.pool.width=48", "data.resize=64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # torchrun's workers too
        raise
    assert proc.returncode == 0, err[-3000:]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2
    assert (run / "export" / "model.safetensors").is_file()
    assert "kept 16 of 16 rows; skipped 2 (decode_error=2)" in out + err, (out + err)[-3000:]


def test_release_choices_and_accumulation_train(tiny_cfg, tmp_path):
    """The release's variants (projected 4-head pooling, nearest/strict masks without body mask or
    smoothing, local negatives, summed InfoNCE, contrastive-only warm-up, cosine restarts) run
    end to end, with gradient accumulation."""
    from g2d.config import PRESET_OVERRIDES

    release = {k: v for k, v in PRESET_OVERRIDES["release"].items()
               if k.startswith(("model.pool", "model.pseudo_mask", "loss.", "train.scheduler"))}
    cfg = _cfg(tiny_cfg, **{**release, "model.pool.width": 128, "loss.contrastive_only_steps": 2,
                                       "train.restart_steps": 2, "train.max_steps": 4,
                                       "train.grad_accum": 2, "train.batch_size": 4,
                                       "train.clip_grad": 1.0})
    assert cfg.model.pool.pool_on == "projected" and cfg.loss.negatives == "local"
    result = pretrain(cfg, tmp_path, progress=False)
    assert result.steps == 4
    assert all(torch.isfinite(torch.tensor([h["total"] for h in result.history])))
    warm, after = result.history[0], result.history[-1]
    assert warm["total"] == pytest.approx(warm["vla"], rel=1e-6)  # PA weighted 0 during warm-up
    assert after["total"] == pytest.approx(after["vla"] + after["pa"], rel=1e-5)


def test_accumulating_trainer_caches_the_whole_batch_as_negatives(tiny_cfg, tmp_path, monkeypatch):
    """train.grad_accum=2 with batch 4: with accum_negatives=batch the trainer's first pass caches every
    micro-batch's embeddings once per step, and the logged contrastive loss is the step's batch of 8's
    (chance ln 8); with accum_negatives=micro it never caches and logs batches of 4 (chance ln 4)."""
    import copy
    import math

    import g2d.train.loop as loop

    calls = []
    real = loop.cache_embeddings
    monkeypatch.setattr(loop, "cache_embeddings", lambda model, micro: calls.append(len(micro)) or real(model, micro))
    first = {}
    for negatives in ("batch", "micro"):
        calls.clear()
        cfg = _cfg(copy.deepcopy(tiny_cfg), **{"train.max_steps": 3, "train.grad_accum": 2, "train.batch_size": 4,
                                               "train.accum_negatives": negatives})
        first[negatives] = pretrain(cfg, tmp_path / negatives, progress=False).history[0]["vla"]
        assert calls == ([2, 2, 2] if negatives == "batch" else [])
    # the same model and images at step 1: only the number of negatives differs
    assert first["batch"] - first["micro"] == pytest.approx(math.log(2), abs=0.25)


@pytest.mark.filterwarnings("ignore::UserWarning")  # "CUDA is not available" on CPU machines
def test_precision_selects_autocast_dtype_on_cuda_only(tiny_cfg):
    from g2d.train.loop import _autocast

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _autocast(tiny_cfg, cpu).__class__.__name__ == "nullcontext"
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        tiny_cfg.train.precision = precision
        ctx = _autocast(tiny_cfg, cuda)
        assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == dtype and ctx.device == "cuda"
        assert _autocast(tiny_cfg, cpu).__class__.__name__ == "nullcontext"
    tiny_cfg.train.precision = "fp32"
    assert _autocast(tiny_cfg, cuda).__class__.__name__ == "nullcontext"


def test_logged_lr_is_the_rate_the_step_used(tiny_cfg, tmp_path):
    """Step N's log shows step N's rate (the scheduler moves on only after the step)."""
    cfg = _cfg(tiny_cfg, **{"train.max_steps": 4, "train.warmup_steps": 4, "train.lr": 1e-3,
                            "train.probe_every": 0})
    result = pretrain(cfg, tmp_path, progress=False)
    assert [h["lr"] for h in result.history] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])


def test_text_backbone_learning_rate_scale(tiny_cfg, tmp_path):
    trainer = Pretrainer(_cfg(tiny_cfg, **{"train.text_lr_scale": 0.05, "train.lr": 1e-3}), tmp_path,
                         progress=False)
    trainer.setup()
    groups = trainer.optimizer.param_groups
    text = {id(p) for p in trainer.model.text_encoder.backbone.parameters() if p.requires_grad}
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-3, 1e-3 * 0.05])
    assert {id(p) for p in groups[1]["params"]} == text and text
    assert not text & {id(p) for p in groups[0]["params"]}


def test_the_trainer_logs_every_term_the_objective_names(tiny_cfg, tmp_path):
    """Loss terms are declared once (g2d.objective.StepLosses.terms): a term the objective adds, here the
    attention concentration, reaches the history and TensorBoard without a change to the trainer."""
    cfg = _cfg(tiny_cfg, **{"train.max_steps": 2, "loss.attention_concentration": 0.5})
    result = pretrain(cfg, tmp_path, progress=False)
    assert {"total", "vla", "pa", "acc", "fg", "concentration"} <= set(result.history[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "train/concentration" in events.Tags()["scalars"]
