import errno
import pickle

import pytest
import torch

from g2d.checkpoint import (
    atomic_write,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_executes_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Evil(str(marker))}, fh)
    with pytest.raises(ValueError, match="cannot load checkpoint .* safely"):
        load_checkpoint(path)
    with pytest.raises(ValueError):
        read_state_dict(path)
    assert not marker.exists()
    torch.save({"model": _Evil(str(marker))}, tmp_path / "evil2.pt")  # the zip format too
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "evil2.pt")
    assert not marker.exists()


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt  # as a kill during the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_disk_full_is_reported_and_last_good_checkpoint_survives(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("change", ["remove", "rename", "add"])
def test_an_export_with_one_key_changed_is_refused_by_name(tiny_model_dir, tmp_path, change):
    """g2d's own files: every module (encoder, decoder and head, text tower, projectors) loads strictly."""
    import shutil

    from safetensors.torch import load_file, save_file

    import g2d

    export = tmp_path / "export"
    shutil.copytree(tiny_model_dir, export)
    state = load_file(str(export / "model.safetensors"))
    key = "segmentation_head.0.bias"
    if change == "remove":
        del state[key]
    elif change == "rename":
        state["segmentation_head.0.bias_v2"] = state.pop(key)
    else:
        key = "decoder.blocks.0.extra"
        state[key] = torch.zeros(2)
    save_file(state, str(export / "model.safetensors"))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        g2d.load_model(str(export))
