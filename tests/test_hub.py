"""The Hugging Face Hub format: save_pretrained, a model card with YAML metadata and eval results,
loading from a local folder and as hf-hub:ORG/NAME from a cache laid out as huggingface_hub lays it
out (HF_HUB_OFFLINE=1, no network), a clear error naming the cache when a name is missing, and
g2d push through the hub's file API (a recording stand-in, no network)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from g2d.factory import load_model
from g2d.hub import CARD_FILE, PREPROCESS_FILE

REPO = "g2d-org/g2d-tiny"


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    model = load_model(tiny_model_dir)
    run = tmp_path_factory.mktemp("run")
    (run / "seg").mkdir()
    (run / "seg" / "metrics.json").write_text(json.dumps({"task": "segmentation", "data": "synthetic:16",
                                                          "fraction": 0.1, "seed": 0, "dice": 0.4321}))
    out = model.save_pretrained(tmp_path_factory.mktemp("hub") / "g2d-tiny", run_dir=run)
    return model, out


def test_save_pretrained_writes_the_hub_folder_and_a_model_card(saved):
    model, out = saved
    for name in ("model.safetensors", "config.json", PREPROCESS_FILE, CARD_FILE, "text/config.json",
                 "text/tokenizer_config.json"):
        assert (out / name).is_file(), name
    card = (out / CARD_FILE).read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "apache-2.0" and "chest-x-ray" in meta["tags"] and meta["library_name"] == "g2d"
    assert "| segmentation | synthetic:16 | 0.1 | 0 | 0.4321 |" in card
    assert "not a medical device" in card and "synthetic set" in card
    assert json.loads((out / PREPROCESS_FILE).read_text())["crop"] == model.preprocess.crop


def test_a_saved_folder_loads_back_the_same_model(saved):
    model, out = saved
    again = load_model(out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)
    assert again.preprocess == model.preprocess
    a, b = again.config.to_dict(), model.config.to_dict()
    assert a["model"]["text"].pop("model") == str(out / "text")  # the text tower is read from the folder
    b["model"]["text"].pop("model")
    assert a == b


def _hub_cache(out: Path, cache: Path) -> None:
    """A cache as huggingface_hub writes it: models--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(out, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


def _load_in_child(spec: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent)}
    code = (f"import g2d, torch; m = g2d.load_model({spec!r}); "
            "print(sum(p.double().sum().item() for p in m.parameters()))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_hf_hub_names_load_from_the_local_cache_offline(saved, tmp_path):
    model, out = saved
    _hub_cache(out, tmp_path / "cache")
    done = _load_in_child(f"hf-hub:{REPO}", tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) == pytest.approx(sum(p.double().sum().item() for p in model.parameters()))


def test_a_hub_name_missing_from_the_cache_fails_at_once_naming_the_cache(tmp_path):
    (tmp_path / "cache").mkdir()
    done = _load_in_child("hf-hub:g2d-org/not-there", tmp_path / "cache")
    assert done.returncode != 0
    assert "not in the local Hugging Face cache" in done.stderr and str(tmp_path / "cache") in done.stderr


def test_push_saves_the_hub_folder_and_uploads_it_through_the_file_api(tiny_model_dir, tmp_path):
    from g2d.commands.push import push

    calls = []

    class RecordingApi:  # stands in for huggingface_hub.HfApi (no network in tests)
        def create_repo(self, repo, private, exist_ok):
            calls.append(("create", repo, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    url = push(str(tiny_model_dir), REPO, private=True, out=str(tmp_path / "folder"), api=RecordingApi())
    assert calls[0] == ("create", REPO, True, True)
    assert calls[1][0] == "upload" and {"model.safetensors", "config.json", CARD_FILE, PREPROCESS_FILE,
                                        "text"} <= set(calls[1][2])
    assert url.endswith("/commit/abc") and (tmp_path / "folder" / CARD_FILE).is_file()


def test_commands_and_result_keys_take_hub_names(saved, tmp_path):
    # `hf-hub:` was read as a peer's KIND: every command taking --model refused hub names
    from PIL import Image

    _, out = saved
    cache = tmp_path / "cache"
    _hub_cache(out, cache)
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "a.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "g2d", "ground", str(tmp_path / "a.png"), "--model", f"hf-hub:{REPO}",
                           "--text", "effusion", "--out", str(tmp_path / "h.png"), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    code = ("from g2d.fingerprint import model_identity as m; import sys; "
            f"print(m('hf-hub:{REPO}') == m(sys.argv[1]), m('hf-hub:g2d-org/not-there'))")
    snapshot = next((cache / f"models--{REPO.replace('/', '--')}" / "snapshots").iterdir())
    done = subprocess.run([sys.executable, "-c", code, str(snapshot)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.split() == ["True", "hf-hub:g2d-org/not-there"], done.stderr[-2000:]
