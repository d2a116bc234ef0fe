from __future__ import annotations

import os
from pathlib import Path

import pytest

from g2d.testing import shared_data_dir


def _dataset_dir(name: str) -> Path:
    root = shared_data_dir()
    path = root / name if root is not None else None
    if path is None or not path.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"shared data set {name!r} not found (set G2D_SHARED_DATA)")
        pytest.skip(f"shared data set {name!r} not found")
    return path


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Caches the suite writes (the text prefix store, pooled features) in a folder of its own, never
    the user's ~/.cache/g2d."""
    old = os.environ.get("G2D_CACHE")
    os.environ["G2D_CACHE"] = str(tmp_path_factory.mktemp("g2d_cache"))
    yield
    if old is None:
        os.environ.pop("G2D_CACHE", None)
    else:
        os.environ["G2D_CACHE"] = old


@pytest.fixture(scope="session")
def jsrt_dir() -> Path:
    return _dataset_dir("jsrt")


@pytest.fixture(scope="session")
def covid_notes_dir() -> Path:
    return _dataset_dir("covid-notes")


CORPUS = [
    "There is an opacity in the right lower lobe.",
    "No acute cardiopulmonary process.",
    "Small left pleural effusion. Heart size is normal.",
    "Right apical pneumothorax. No pleural effusion.",
    "The heart is enlarged. Lungs are clear.",
    "A nodule is seen in the left upper lobe.",
]


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    """A small random BERT with a WordPiece vocabulary trained on a few report sentences."""
    from g2d.model.text_encoder import build_tiny_text_model

    return build_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"), CORPUS * 4, vocab_size=200,
                                 hidden=32, layers=2, heads=2)


@pytest.fixture
def tiny_cfg(tiny_text_dir):
    """The ``tiny`` preset at 64 px with the local tiny BERT."""
    from g2d.config import get_config

    return get_config("tiny", {
        "model.text.model": str(tiny_text_dir),
        "model.text.freeze_layers": 1,
        "model.image_size": 64,
        "model.pool.width": 48,
        "data.resize": 64,
        "data.synthetic_samples": 32,
        "train.batch_size": 8,
        "train.warmup_steps": 2,
    })


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_text_dir, tmp_path_factory) -> Path:
    """An exported tiny G2D model (64 px, 4 pre-training steps on synthetic data), built once."""
    from g2d.config import get_config
    from g2d.train.loop import pretrain

    cfg = get_config("tiny", {
        "model.text.model": str(tiny_text_dir), "model.text.freeze_layers": 1, "model.image_size": 64,
        "model.pool.width": 48, "data.resize": 64, "data.synthetic_samples": 16, "train.batch_size": 8,
        "train.warmup_steps": 1, "train.max_steps": 4, "train.epochs": 10,
    })
    out = tmp_path_factory.mktemp("tiny_model")
    return pretrain(cfg, out, progress=False).export_dir


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many small models: on a shared 2-core machine two
    threads are far slower than one."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
