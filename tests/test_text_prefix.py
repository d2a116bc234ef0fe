"""The frozen text prefix computed once per report (issue 31, train.text_prefix_store): the same losses
and gradients as computing it every step, keyed on everything its output depends on, reused across
runs, and used by the trainer's loader."""

import copy

import pytest
import torch

from g2d.config import apply_overrides
from g2d.factory import create_model
from g2d.model.text_encoder import PREFIX_STATES, ReportTokenizer
from g2d.train.loop import pretrain
from g2d.train.text_prefix import PrefixCollate, TextPrefixStore, prefix_identity

TEXTS = ["Small left pleural effusion.", "No acute cardiopulmonary process. Heart size is normal.",
         "Right apical pneumothorax. No pleural effusion.", "Small left pleural effusion."]


def _cfg(tiny_cfg, **over):
    cfg = copy.deepcopy(tiny_cfg)
    apply_overrides(cfg, {"train.log_every": 1, **over})
    return cfg.validate()


def test_stored_states_give_the_text_embeddings_and_gradients_of_the_full_tower(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    model = create_model(tiny_cfg).train()
    encoder = model.text_encoder
    store = TextPrefixStore(tmp_path / prefix_identity(encoder, "float32"))
    assert store.add(encoder, TEXTS, "float32") == 3  # a repeated report is stored once
    tokens = ReportTokenizer(encoder.tokenizer, encoder.cfg)(TEXTS)
    stored = {**tokens, PREFIX_STATES: store.batch_states(tokens)}
    results = []
    for t in (tokens, stored):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout in the trainable layers
        emb = model.text_forward(t)
        emb.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((emb.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys()
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_training_with_the_store_matches_training_without_it(tiny_cfg, tmp_path):
    """float32 states: the same losses and weights over a few steps within float rounding. float16
    states: the first step's loss within half precision's rounding; later steps drift a little further
    (AdamW's first updates magnify any difference), so the whole curve is measured on a real run in
    docs/benchmarks.md rather than pinned here."""
    runs = {}
    store = str(tmp_path / "store")
    for name, over in (("off", {"train.text_prefix_store": "off"}),
                       ("float32", {"train.text_prefix_store": store, "train.text_prefix_dtype": "float32"}),
                       ("float16", {"train.text_prefix_store": store})):
        cfg = _cfg(tiny_cfg, **{"train.max_steps": 4, **over})
        result = pretrain(cfg, tmp_path / name, progress=False)
        runs[name] = ([h["total"] for h in result.history],
                      torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"])
    assert runs["float32"][0] == pytest.approx(runs["off"][0], rel=1e-5)
    for k, v in runs["off"][1].items():
        if v.is_floating_point():
            torch.testing.assert_close(runs["float32"][1][k], v, rtol=5e-4, atol=5e-4, msg=k)
    assert runs["float16"][0][0] == pytest.approx(runs["off"][0][0], rel=1e-3)
    assert runs["float16"][0] == pytest.approx(runs["off"][0], rel=3e-2)


def test_the_store_is_keyed_on_what_its_states_depend_on(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    base = create_model(tiny_cfg).text_encoder
    key = prefix_identity(base, "float16")
    assert prefix_identity(base, "float16") == key and prefix_identity(base, "float32") != key
    for over in ({"model.text.max_length": 32}, {"model.text.freeze_layers": 2}):
        torch.manual_seed(0)
        assert prefix_identity(create_model(_cfg(tiny_cfg, **over)).text_encoder, "float16") != key, over
    with torch.no_grad():  # other frozen weights: another store
        base.prefix_modules[-1].parameters().__next__().add_(1e-3)
    assert prefix_identity(base, "float16") != key
    # a changed report is a new entry; an unchanged one is not recomputed
    store = TextPrefixStore(tmp_path / key)
    assert store.add(base, TEXTS) == 3 and store.add(base, TEXTS) == 0
    assert store.add(base, [*TEXTS, "Small right pleural effusion."]) == 1 and len(TextPrefixStore(tmp_path / key)) == 4


def test_the_trainer_builds_the_store_once_and_its_loader_hands_the_states(tiny_cfg, tmp_path, monkeypatch):
    import g2d.train.loop as loop

    root = tmp_path / "store"
    first = pretrain(_cfg(tiny_cfg, **{"train.max_steps": 2, "train.text_prefix_store": str(root)}), tmp_path / "a",
                     progress=False)
    assert first.steps == 2 and len(list(root.iterdir())) == 1
    added, batches = [], []
    real_add, real_call = TextPrefixStore.add, PrefixCollate.__call__
    monkeypatch.setattr(TextPrefixStore, "add",
                        lambda self, *a, **k: added.append(real_add(self, *a, **k)) or added[-1])
    monkeypatch.setattr(PrefixCollate, "__call__", lambda self, s: batches.append(real_call(self, s)) or batches[-1])
    calls = []
    monkeypatch.setattr(loop.Pretrainer, "_prefix_collate", lambda self, real=loop.Pretrainer._prefix_collate:
                        calls.append(1) or real(self))
    pretrain(_cfg(tiny_cfg, **{"train.max_steps": 2, "train.text_prefix_store": str(root)}), tmp_path / "b",
             progress=False)
    assert added == [0] and calls == [1]  # another run: nothing recomputed
    assert batches and all(PREFIX_STATES in b["tokens"] for b in batches)
    # trainable embeddings (the release's choice): nothing frozen to store, the tower runs whole
    batches.clear()
    pretrain(_cfg(tiny_cfg, **{"train.max_steps": 1, "train.text_prefix_store": str(root),
                               "model.text.freeze_embeddings": False}), tmp_path / "c", progress=False)
    assert batches and not any(PREFIX_STATES in b["tokens"] for b in batches)
