"""Fault injection for pre-training: crashes, kills during checkpoint writes, full disks, non-finite
losses, a dying rank, malicious files, invalid settings, private text and bad input rows.

``docs/reliability.md`` maps each guarantee to its test here. Subprocess runs use the tiny preset at
64 px on 16 synthetic samples (4 steps per epoch) with one thread each, so two runs of the same
settings give bit-identical weights.
"""

from __future__ import annotations

import copy
import errno
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import g2d
import g2d.train.loop as loop
from g2d.checkpoint import load_checkpoint
from g2d.cli import main
from g2d.errors import CheckpointError, NonFiniteLossError
from g2d.train.loop import Pretrainer

SRC = str(Path(g2d.__file__).parents[1])


def _tiny(text_dir: Path, *extra: str) -> list[str]:
    """``g2d pretrain`` flags and overrides of a tiny deterministic CPU run (6 steps, 2 epochs)."""
    return ["--preset", "tiny", "--device", "cpu", "--no-progress", "--batch-size", "4",
            "--max-steps", "6", f"model.text.model={text_dir}", "model.text.freeze_layers=1",
            "model.image_size=64", "model.pool.width=48", "data.resize=64",
            "data.synthetic_samples=16", "train.warmup_steps=1", "train.deterministic=true",
            "train.ckpt_every=2", "train.log_every=1", *extra]


def _env(**faults: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("G2D_FAULT_")}
    return {**env, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **faults}


def _run(args: list[str], timeout: float = 120, **faults: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "g2d", *args], capture_output=True, text=True,
                          env=_env(**faults), timeout=timeout)


def _assert_same_tensors(a, b, where: str = "") -> None:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_same_run(run: Path, reference: Path) -> None:
    """Same exported weights and same final checkpoint (model, optimizer, scheduler, counters)."""
    _assert_same_tensors(load_file(run / "export" / "model.safetensors"),
                         load_file(reference / "export" / "model.safetensors"), "export")
    a, b = load_checkpoint(run / "checkpoints" / "last.pt"), load_checkpoint(reference / "checkpoints" / "last.pt")
    for key in ("model", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "skipped_steps"):
        _assert_same_tensors(a[key], b[key], key)


# ------------------------------------------------------------------------------------------ crashes


@pytest.mark.slow
def test_kills_mid_epoch_and_mid_save_then_resume_give_identical_weights(tiny_text_dir, tmp_path):
    """Killed after step 3 (mid-epoch 0; last checkpoint at step 2), then killed again while
    writing the resumed run's first checkpoint (half a temp file on disk), then resumed to the end:
    weights, optimizer state and counters equal an uninterrupted run's bit for bit."""
    ref = tmp_path / "uninterrupted"
    reference = subprocess.Popen([sys.executable, "-m", "g2d", "pretrain", "--out", str(ref),
                                  *_tiny(tiny_text_dir)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=_env())
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = ["pretrain", "--out", str(run), *_tiny(tiny_text_dir)]
    try:
        killed = _run(args, G2D_FAULT_KILL_AT_STEP="3")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        state = load_checkpoint(ckpts / "last.pt")
        assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (2, 0, 2)
        assert not (run / "export").exists()

        torn = _run([*args, "--resume", "latest"], G2D_FAULT_KILL_IN_SAVE="1")  # dies saving step 4
        assert torn.returncode == -signal.SIGKILL, torn.stderr[-3000:]
        assert "at step 2 (epoch 0, batch 2)" in torn.stderr
        stale = [p for p in ckpts.iterdir() if p.name != "last.pt"]
        assert len(stale) == 1 and stale[0].name.startswith(".last.pt.tmp-")  # the torn write
        assert load_checkpoint(ckpts / "last.pt")["step"] == 2  # the previous one, intact

        resumed = _run([*args, "--resume", "latest"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "at step 2 (epoch 0, batch 2)" in resumed.stderr
        assert [p.name for p in ckpts.iterdir()] == ["last.pt"]  # the dead writer's temp file is gone
        _, err = reference.communicate(timeout=120)
        assert reference.returncode == 0, err[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.communicate()
    _assert_same_run(run, ref)


def test_disk_full_stops_with_clear_error_and_keeps_last_checkpoint(tiny_text_dir, tmp_path, monkeypatch,
                                                                    capsys):
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) >= 2:  # the 2nd checkpoint (step 4) finds the disk full
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    rc = main(["pretrain", "--out", str(tmp_path), *_tiny(tiny_text_dir)])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(calls) == 2
    assert len(err) == 1 and err[0].startswith("g2d pretrain: error: ")
    assert str(tmp_path / "checkpoints" / "last.pt") in err[0] and "disk full" in err[0]
    assert "No space left on device" in err[0]
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["last.pt"]  # no temp file left behind
    assert load_checkpoint(ckpts / "last.pt")["step"] == 2
    assert not (tmp_path / "export").exists()  # the run stopped


# ----------------------------------------------------------------------------------------- numerics


def _snapshot(trainer: Pretrainer) -> dict:
    return {"model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "lr": trainer.optimizer.param_groups[0]["lr"], "step": trainer.step}


def _nan_from(monkeypatch, trainer: Pretrainer, bad_calls) -> list[dict]:
    """Make ``compute_losses`` return a NaN loss on the given (1-based) calls; record the trainer's
    state at the start of every call."""
    real, seen = loop.compute_losses, []

    def compute(*args, **kwargs):
        seen.append(_snapshot(trainer))
        out = real(*args, **kwargs)
        if bad_calls(len(seen)):
            out.total = out.total * float("nan")  # NaN gradients everywhere too
        return out

    monkeypatch.setattr(loop, "compute_losses", compute)
    return seen


def _cfg(tiny_cfg, **over):
    from g2d.config import apply_overrides

    apply_overrides(tiny_cfg, {"train.ckpt_every": 1, "train.log_every": 1, "train.epochs": 10,
                               "data.synthetic_samples": 16, "train.batch_size": 4, **over})
    return tiny_cfg.validate()


def test_nonfinite_loss_skips_the_step_without_any_change(tiny_cfg, tmp_path, monkeypatch, caplog):
    trainer = Pretrainer(_cfg(tiny_cfg, **{"train.max_steps": 3}), tmp_path, progress=False)
    trainer.setup()
    seen = _nan_from(monkeypatch, trainer, lambda call: call == 2)
    with caplog.at_level("INFO"):
        result = trainer.train()
    assert result.steps == 3 and result.skipped_steps == 1 and len(seen) == 4
    # parameters, BatchNorm statistics, AdamW moments, lr and step count are all as before
    _assert_same_tensors(seen[2], seen[1], "after the NaN step")
    with pytest.raises(AssertionError):  # a normal step does change them
        _assert_same_tensors(seen[1], seen[0])
    assert "non-finite loss at step 1: step skipped (1 in a row)" in caplog.text
    assert "1 skipped for a non-finite loss" in caplog.text  # end-of-run summary
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())


def test_consecutive_nonfinite_losses_stop_the_run(tiny_cfg, tmp_path, monkeypatch):
    cfg = _cfg(tiny_cfg, **{"train.max_steps": 10, "train.max_consecutive_nonfinite": 3})
    trainer = Pretrainer(cfg, tmp_path, progress=False)
    trainer.setup()
    seen = _nan_from(monkeypatch, trainer, lambda call: call >= 3)  # steps 1, 2 fine, then NaN
    last = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(NonFiniteLossError, match=rf"3 consecutive non-finite losses at step 2; "
                                                 rf"last good checkpoint: {re.escape(str(last))}"):
        trainer.train()
    state = load_checkpoint(last)
    # the epoch-end save between the NaN steps (4 batches per epoch) holds the state after step 2
    assert state["step"] == 2 and state["skipped_steps"] == 2
    _assert_same_tensors(state["model"], seen[2]["model"], "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_max_consecutive_nonfinite_is_validated():
    from g2d.config import get_config
    from g2d.errors import ConfigError

    assert get_config("paper").train.max_consecutive_nonfinite == 10
    with pytest.raises(ConfigError, match="train.max_consecutive_nonfinite"):
        get_config("paper", ["train.max_consecutive_nonfinite=0"])


# ------------------------------------------------------------------------------------- distributed


def _torchrun_tiny(tiny_text_dir: Path, out: Path, extra: list[str], timeout: float, hung: str,
                   **faults: str) -> subprocess.CompletedProcess:
    """A 2-process gloo ``g2d pretrain`` of the tiny run; a hang kills the group and fails the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "g2d", "pretrain", "--out", str(out), *_tiny(tiny_text_dir), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(**faults), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
        proc.communicate()
        pytest.fail(hung)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_dying_rank_ends_the_whole_job_and_names_the_rank(tiny_text_dir, tmp_path):
    proc = _torchrun_tiny(tiny_text_dir, tmp_path, ["train.dist_timeout_s=60"], 120,
                          "the job hung after rank 1 died",
                          G2D_FAULT_DIE_RANK="1", G2D_FAULT_DIE_AT_STEP="1")
    err = proc.stderr
    assert proc.returncode != 0
    assert "g2d pretrain: rank 1: fatal: InjectedFault: injected fault (G2D_FAULT_DIE_RANK=1) after step 1" in err
    # torchrun's summary: which rank failed first and how
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", err) and re.search(r"exitcode\s*:\s*1 ", err), err[-3000:]
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_is_skipped_on_both(tiny_text_dir, tmp_path):
    """Rank 1's loss is NaN at step 1; its gradients reach rank 0 through the all-reduce, so rank 0
    (finite loss) must skip the step too, or its weights turn NaN and the ranks fall out of step."""
    proc = _torchrun_tiny(tiny_text_dir, tmp_path, ["--max-steps", "3"], 300,
                          "the job hung after a non-finite loss on rank 1",
                          G2D_FAULT_NAN_RANK="1", G2D_FAULT_NAN_AT_STEP="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr
    assert logs.count("non-finite loss at step 1: step skipped (1 in a row)") == 2  # both ranks
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["skipped_steps"] == 1 and state["world_size"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    from g2d.train import distributed

    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: seen.update(k))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    distributed.init_distributed("cpu", timeout_s=42)
    assert seen["timeout"].total_seconds() == 42


# ------------------------------------------------------------------------------------- safe loading


class _Payload:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil_checkpoint(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"config": {}, "model": {"w": _Payload(marker)}}, fh)
    with open(path, "rb") as fh:  # the payload is live: a plain unpickler runs it
        pickle.load(fh)
    assert marker.exists()
    marker.unlink()
    return path, marker


def _no_work(monkeypatch):
    """Fail the test if pre-training reads data or builds the model."""
    def forbidden(*a, **k):
        raise AssertionError("data was read or a model was built before the error")

    monkeypatch.setattr(loop, "build_pretrain_dataset", forbidden)
    monkeypatch.setattr(loop, "create_model", forbidden)


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("g2d pretrain: error: "), err
    for needle in needles:
        assert needle in err[0], err
    return err[0]


def test_malicious_checkpoint_runs_nothing_anywhere(evil_checkpoint, tiny_text_dir, tmp_path, monkeypatch,
                                                    capsys):
    path, marker = evil_checkpoint
    with pytest.raises(CheckpointError, match="cannot load checkpoint .* safely"):
        g2d.load_model(path)
    assert not marker.exists()

    _no_work(monkeypatch)
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *_tiny(tiny_text_dir), "--resume", str(path)]) == 2
    _one_error_line(capsys, "cannot load checkpoint", str(path), "safely")
    assert main(["pretrain", "--out", str(run), *_tiny(tiny_text_dir), f"model.image.weights={path}"]) == 2
    _one_error_line(capsys, "model.image.weights", "cannot load checkpoint", "safely")
    assert not marker.exists() and not run.exists()


def test_load_image_weights_rejects_malicious_file(evil_checkpoint):
    from g2d.config import ImageEncoderCfg
    from g2d.factory import load_image_weights
    from g2d.model.image_encoder import ResNetEncoder

    path, marker = evil_checkpoint
    encoder = ResNetEncoder(ImageEncoderCfg(arch="resnet18", weights="none"))
    with pytest.raises(CheckpointError, match="safely"):
        load_image_weights(encoder, str(path), "resnet18")
    assert not marker.exists()


def test_yaml_config_with_python_tags_is_rejected(tmp_path, tiny_text_dir, monkeypatch, capsys):
    import yaml

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    yaml.unsafe_load(evil.read_text())  # the payload is live
    assert marker.exists()
    marker.unlink()

    _no_work(monkeypatch)
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "--config", str(evil), *_tiny(tiny_text_dir)]) == 2
    _one_error_line(capsys, "cannot parse config file", str(evil))
    assert not marker.exists() and not run.exists()


# ----------------------------------------------------------------------------- validation up front


@pytest.fixture
def small_csv(tmp_path) -> Path:
    """Four readable 64 px images with one-line reports in ``imgs/``."""
    (tmp_path / "imgs").mkdir()
    rows = ["image,text"]
    for i in range(4):
        Image.fromarray(np.full((64, 64), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append(f"{i}.png,Report number {i}.")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


@pytest.fixture
def resnet34_file(tmp_path) -> Path:
    import torchvision

    path = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    return path


@pytest.mark.parametrize("extra, field", [
    (["model.pool.headz=3"], "headz"),
    (["model.pool.width=50"], "model.pool.width=50"),  # 3 heads do not divide it
    (["model.pseudo_mask.percentile=100"], "percentile"),
    (["model.pseudo_mask.percentile=0"], "percentile"),
    (["data.max_skip_fraction=1.5"], "data.max_skip_fraction"),
    (["train.max_consecutive_nonfinite=0"], "train.max_consecutive_nonfinite"),
    (["--data", "csv:{dir}/nope.csv"], "data.spec"),
    (["--data", "csv:{csv}", "--image-dir", "no_such_folder"], "data.image_dir"),
    (["model.image.weights={r34}"], "model.image.weights"),  # resnet34 weights for the tiny resnet18
])
def test_invalid_settings_fail_before_any_work(extra, field, tiny_text_dir, small_csv, resnet34_file,
                                               tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    fill = {"dir": tmp_path, "csv": small_csv, "r34": resnet34_file}
    run = tmp_path / "run"
    argv = ["pretrain", "--out", str(run), *_tiny(tiny_text_dir), *[e.format(**fill) for e in extra]]
    assert main(argv) == 2
    _one_error_line(capsys, field)
    assert not run.exists()


@pytest.mark.slow
def test_invalid_setting_is_one_stderr_line_from_the_command(tiny_text_dir, tmp_path):
    proc = _run(["pretrain", "--out", str(tmp_path / "run"), *_tiny(tiny_text_dir),
                 "model.pool.heads=4", "model.pool.width=50"], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "g2d pretrain: error: model.pool.heads=4 does not divide model.pool.width=50"]
    assert not (tmp_path / "run").exists()


def test_saved_config_loads_where_its_training_data_is_absent(small_csv):
    """A model trained on csv: data loads on another machine (g2d.load_model rebuilds the saved
    config), while a new run with that data path is still rejected up front."""
    from g2d.config import config_from_dict, get_config
    from g2d.errors import ConfigError

    saved = get_config("tiny", {"data.spec": f"csv:{small_csv}", "data.image_dir": "imgs"}).to_dict()
    small_csv.unlink()
    assert config_from_dict(saved).data.spec == f"csv:{small_csv}"
    with pytest.raises(ConfigError, match="data.spec: CSV file not found"):
        get_config("tiny", {"data.spec": f"csv:{small_csv}"})


def test_fractions_and_missing_folders_of_labelled_sets_fail_first(tmp_path):
    from g2d.data.labelled.specs import open_dataset
    from g2d.data.labelled.splits import check_fraction
    from g2d.errors import DataError

    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            check_fraction(bad)
        with pytest.raises(ValueError, match="fraction"):
            open_dataset(f"siim:{tmp_path / 'absent'}", "train", fraction=bad)
    assert check_fraction(1) == 1.0
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "absent")) + " not found"):
        open_dataset(f"siim:{tmp_path / 'absent'}", "train")


# --------------------------------------------------------------------------------- privacy, bad data

MARKER = "QZXV-REPORT-7731"
PATIENT = "PID-QZXV-4242"


@pytest.mark.slow
def test_report_text_and_patient_ids_stay_out_of_the_run_folder_and_logs(tiny_text_dir, tmp_path):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    rows = ["patient_id,image,text"]
    for i in range(14):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (72, 72), np.uint8)).save(
            data / "imgs" / f"{i}.png")
        rows.append(f"{PATIENT}-{i},{i}.png,\"Finding {i} {MARKER} in the right lower lobe.\"")
    (data / "imgs" / "13.png").write_bytes((data / "imgs" / "13.png").read_bytes()[:60])  # truncated
    rows.append(f"{PATIENT}-x,missing.png,\"Missing image {MARKER}.\"")  # a bad row: logged
    rows.append(f"{PATIENT}-y,0.png,\"   \"")  # empty report: logged
    (data / "pairs.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    proc = _run(["-v", "pretrain", "--out", str(run),
                 *_tiny(tiny_text_dir, "data.max_skip_fraction=0.5", "data.num_workers=2"),
                 "--data", f"csv:{data / 'pairs.csv'}", "--image-dir", "imgs", "--max-steps", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr
    # the bad rows were logged (by file and row) and summed up at the end of the run
    assert "data row 15 skipped (missing_image)" in logs and "data row 16 skipped (empty_text)" in logs
    assert re.search(r"run summary: 4 optimizer steps, 0 skipped for a non-finite loss; data "
                     r"pairs.csv: kept 14 of 16 rows; skipped 3 \(decode_error=1, empty_text=1, "
                     r"missing_image=1\)", logs), logs[-3000:]
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"config.yaml", "last.pt", "model.safetensors"} <= {p.name for p in files}
    for secret in (MARKER, PATIENT, "QZXV"):
        assert secret not in logs
        for f in files:
            raw = f.read_bytes()
            assert secret.encode() not in raw and secret.lower().encode() not in raw, f


def test_non_utf8_table_is_a_clear_error(tiny_text_dir, small_csv, tmp_path, monkeypatch, capsys):
    small_csv.write_bytes(small_csv.read_bytes().replace(b"Report number 1", b"R\xe9sultat \xff 1"))
    monkeypatch.setattr(loop, "create_model", lambda *a, **k: pytest.fail("model built"))
    assert main(["pretrain", "--out", str(tmp_path / "run"), *_tiny(tiny_text_dir),
                 "--data", f"csv:{small_csv}"]) == 2
    _one_error_line(capsys, "data.spec", str(small_csv), "not UTF-8")


def test_too_many_unusable_rows_stop_the_run(tiny_text_dir, small_csv, tmp_path, monkeypatch, capsys):
    (small_csv.parent / "imgs" / "0.png").unlink()
    (small_csv.parent / "imgs" / "1.png").unlink()
    monkeypatch.setattr(loop, "create_model", lambda *a, **k: pytest.fail("model built"))
    assert main(["pretrain", "--out", str(tmp_path / "run"), *_tiny(tiny_text_dir),
                 "--data", f"csv:{small_csv}", "--image-dir", "imgs", "data.max_skip_fraction=0.25"]) == 2
    _one_error_line(capsys, "2 of 4 rows unusable", "max_skip_fraction", "missing_image")


@pytest.fixture(autouse=True)
def _one_thread_and_restore_determinism():
    """In-process runs use one thread (as the subprocesses do: on 2 shared cores, more threads only
    contend) and may switch deterministic algorithms on globally; restore both."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _lrs(log: str) -> list[tuple[int, int, float]]:
    return [(int(m.group(1)), int(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"step (\d+)/(\d+) .*? lr ([0-9.e+-]+)", log)]


@pytest.mark.slow
def test_a_resume_on_another_world_size_keeps_the_learning_rate_curve(tiny_text_dir, tmp_path):
    """Field case 27 (gpt-neox #1158): 2 gloo processes (global batch 4, 12 steps over 3 epochs of 16
    images), killed after step 6, resumed with ONE process (global batch 2). The resumed run continues
    at the samples consumed (step 12 of 24) and uses, at every step, the learning rate the uninterrupted
    run used after as many samples; it ends where that run ends (before: it re-planned the schedule from
    step 6 of 24, the rate climbed back and ended at 1.7e-4 instead of 2.4e-5)."""
    flags = ["--batch-size", "2", "--max-steps", "12", "--epochs", "3", "train.warmup_steps=2",
             "train.ckpt_every=1", "train.deterministic=false"]
    full = _torchrun_tiny(tiny_text_dir, tmp_path / "A", flags, 600, "the uninterrupted 2-process run hung")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _torchrun_tiny(tiny_text_dir, tmp_path / "B", flags, 600, "the 2-process run hung",
                            G2D_FAULT_KILL_AT_STEP="6")
    assert killed.returncode != 0
    resumed = _run(["pretrain", "--out", str(tmp_path / "B"), *_tiny(tiny_text_dir), *flags, "--resume", "latest"],
                   timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _lrs(full.stdout + full.stderr), _lrs(resumed.stdout + resumed.stderr)
    # the kill races the step-6 save (another rank may die first): the checkpoint is step 5 or 6
    m = re.search(r"resuming with 1 processes instead of 2: (\d+) samples done, continuing at step (\d+) of 24",
                  resumed.stderr)
    assert m and int(m.group(1)) in (20, 24) and int(m.group(2)) == int(m.group(1)) // 2, resumed.stderr[-2000:]
    assert a[-1][:2] == (12, 12) and b[0][:2] == (int(m.group(2)) + 1, 24) and b[-1][:2] == (24, 24)
    # the rate of B's step s (after 2 (s - 1) samples) is A's after as many samples, where A has a step
    # boundary there (every 4 samples: B's odd steps), and between A's neighbours elsewhere
    lr_a = {4 * (s - 1): lr for s, _, lr in a}
    for s, _, lr in b:
        done = 2 * (s - 1)
        if done in lr_a:
            assert lr == pytest.approx(lr_a[done], rel=1e-6), (s, lr, lr_a[done])
        else:
            lo, hi = sorted((lr_a[done - 2], lr_a.get(done + 2, 0.0)))  # past A's last step: the decay goes on
            assert lo <= lr <= hi, (s, lr, lo, hi)
    assert b[-1][2] <= a[-1][2]  # B's last step sits half a step of A's past A's last
