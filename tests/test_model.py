import json

import pytest
import torch

from g2d.config import get_config
from g2d.errors import ConfigError
from g2d.factory import create_model
from g2d.model.attention_pool import AttentionPool2d


@pytest.mark.parametrize("heads", [1, 2, 3, 4])
@pytest.mark.parametrize("with_query", [False, True])
def test_attention_weights_are_a_distribution(heads, with_query):
    torch.manual_seed(0)
    pool = AttentionPool2d(in_dim=32, width=48, heads=heads, out_dim=16, spatial=4,
                           keys_include_query=with_query)
    pooled, att = pool(torch.randn(5, 32, 4, 4))
    assert pooled.shape == (5, 16) and att.shape == (5, heads, 4, 4)
    assert (att >= 0).all()
    sums = att.sum(dim=(2, 3))
    if with_query:  # the query's own weight is dropped from the spatial map
        assert (sums < 1).all() and (sums > 0).all()
    else:
        torch.testing.assert_close(sums, torch.ones_like(sums))


def test_attention_pool_other_resolution_interpolates_positions():
    pool = AttentionPool2d(in_dim=8, width=12, heads=3, out_dim=8, spatial=4)
    _, att = pool(torch.randn(2, 8, 6, 5))
    assert att.shape == (2, 3, 6, 5)


def test_attention_width_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        AttentionPool2d(in_dim=8, width=128, heads=3, out_dim=8, spatial=4)


@pytest.mark.parametrize("variant", [{}, {"model.pool.pool_on": "projected", "model.pool.width": 128,
                                          "model.pool.heads": 4, "model.pool.keys_include_query": True}])
def test_model_output_shapes(tiny_cfg, variant):
    from g2d.config import apply_overrides

    apply_overrides(tiny_cfg, variant)
    tiny_cfg.validate()
    model = create_model(tiny_cfg)
    images = torch.rand(4, 1, 64, 64)
    out = model(images, model.tokenize(["a b", "c", "opacity in the right lower lobe", "no"]))
    heads, side = tiny_cfg.model.pool.heads, 64 // tiny_cfg.model.image.output_stride  # tiny: stride 16
    assert out.image.embedding.shape == (4, 128) and out.text_embedding.shape == (4, 128)
    assert out.image.attention.shape == (4, heads, side, side)
    assert out.image.decoder_logits.shape == (4, 1, 64, 64)
    assert [f.shape[-1] for f in out.image.features] == [32, 16, 8, 4, side]
    torch.testing.assert_close(out.image.embedding.norm(dim=-1), torch.ones(4))
    assert model.dense_embeddings(images).shape == (4, side, side, 128)
    assert torch.allclose(out.logit_scale, torch.tensor(1 / 0.07))


def test_per_head_decoder_channels(tiny_cfg):
    tiny_cfg.model.pseudo_mask.aggregate_heads = False
    model = create_model(tiny_cfg)
    assert model.image_forward(torch.rand(2, 1, 64, 64)).decoder_logits.shape == (2, 3, 64, 64)
    tiny_cfg.model.decoder.mode = "none"
    assert create_model(tiny_cfg).decoder is None


def test_text_tokenization_pads_to_longest(tiny_cfg):
    model = create_model(tiny_cfg)
    tok = model.tokenize(["opacity", "opacity in the right lower lobe"])
    assert tok["input_ids"].shape[1] < 16
    long = model.tokenize(["opacity " * 200])
    assert long["input_ids"].shape[1] == tiny_cfg.model.text.max_length


@pytest.mark.parametrize("buckets", [2, 4])
def test_length_buckets_match_one_padded_batch(tiny_cfg, buckets):
    """Grouped encoding (model.text.length_buckets) is an optimisation: same embeddings and
    gradients as padding the whole batch to its longest report, in the caller's order."""
    from g2d.model.text_encoder import LENGTH_GROUPS

    texts = ["no acute process", "small left pleural effusion with adjacent atelectasis and a "
             "right lower lobe opacity that may be pneumonia " * 3, "clear", "stable cardiomegaly",
             "opacity", "the lungs are clear without consolidation or effusion or pneumothorax"]
    results = {}
    for n in (1, buckets):
        tiny_cfg.model.text.length_buckets = n
        torch.manual_seed(0)
        model = create_model(tiny_cfg).eval()
        tok = model.tokenize(texts)
        assert (LENGTH_GROUPS in tok) == (n > 1)
        emb = model.text_forward(tok)
        emb.pow(2).sum().backward()
        layer = model.text_encoder.backbone.encoder.layer[-1]
        results[n] = emb.detach(), layer.attention.self.query.weight.grad.clone()
    torch.testing.assert_close(results[buckets][0], results[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[buckets][1], results[1][1], atol=1e-5, rtol=1e-4)


def test_length_buckets_skip_when_lengths_are_equal(tiny_cfg):
    tiny_cfg.model.text.length_buckets = 4
    from g2d.model.text_encoder import LENGTH_GROUPS

    assert LENGTH_GROUPS not in create_model(tiny_cfg).tokenize(["clear lungs"] * 8)


def test_frozen_text_layers_run_without_autograd(tiny_cfg):
    tiny_cfg.model.text.freeze_layers = 1
    model = create_model(tiny_cfg)
    text = model.text_encoder
    layers = text.backbone.encoder.layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text_encoder.backbone.encoder.layer.0.") for n in trainable)
    assert not any("embeddings" in n for n in trainable)
    assert any(n.startswith("text_encoder.backbone.encoder.layer.1.") for n in trainable)
    seen = {}
    layers[0].register_forward_hook(lambda m, a, o: seen.__setitem__(0, torch.is_grad_enabled()))
    layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__(1, torch.is_grad_enabled()))
    model.train()
    assert not layers[0].training and layers[1].training  # frozen means frozen: no dropout
    emb = model.text_forward(model.tokenize(["pleural effusion", "no acute process"]))
    assert seen == {0: False, 1: True}
    assert torch.is_grad_enabled()  # restored
    emb.sum().backward()
    assert layers[1].attention.self.query.weight.grad is not None


def test_release_text_freezing_keeps_embeddings_trainable(tiny_cfg):
    tiny_cfg.model.text.freeze_embeddings = False
    model = create_model(tiny_cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("word_embeddings" in n for n in trainable)


def test_too_many_frozen_layers(tiny_cfg):
    tiny_cfg.model.text.freeze_layers = 5
    with pytest.raises(ValueError, match="freeze_layers=5 exceeds"):
        create_model(tiny_cfg)


def test_imagenet_weights_offline_fail_clearly(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    tiny_cfg.model.image.weights = "imagenet"
    with pytest.raises(FileNotFoundError, match="torch hub cache"):
        create_model(tiny_cfg)


def test_image_weights_from_file(tiny_cfg, tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    tiny_cfg.model.image.weights = str(tmp_path / "r18.pth")
    model = create_model(tiny_cfg)
    torch.testing.assert_close(model.image_encoder.conv1.weight, net.conv1.weight)
    tiny_cfg.model.image.arch = "resnet50"
    tiny_cfg.model.decoder.channels = (16, 16, 16, 16, 16)
    with pytest.raises(ValueError, match="do not fit resnet50"):
        create_model(tiny_cfg)


def test_encoder_and_decoder_load_into_smp_unet(tiny_cfg):
    smp = pytest.importorskip("segmentation_models_pytorch")
    tiny_cfg.model.image.output_stride = 32  # smp's strided ResNet: equal outputs need the same strides
    model = create_model(tiny_cfg).eval()
    unet = smp.Unet("resnet18", encoder_weights=None, classes=1,
                    decoder_channels=tuple(tiny_cfg.model.decoder.channels)).eval()
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("image_encoder."):
            state["encoder." + k[len("image_encoder."):]] = v
        elif k.startswith(("decoder.", "segmentation_head.")):
            state[k] = v
    missing, unexpected = unet.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith("encoder.fc")]
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ours = model.image_forward(x).decoder_logits
        theirs = unet(x.expand(-1, 3, -1, -1))
    torch.testing.assert_close(ours, theirs)


def test_config_rejects_bad_heads_before_building():
    with pytest.raises(ConfigError, match="does not divide"):
        get_config("paper", ["model.pool.heads=3", "model.pool.width=128"])


@pytest.mark.parametrize("dim", [256, 512])
def test_projector_dimension(tiny_cfg, dim):
    tiny_cfg.model.embed_dim = dim
    model = create_model(tiny_cfg.validate())
    out = model(torch.rand(2, 1, 64, 64), model.tokenize(["a", "b"]), decode=False)
    assert out.image.embedding.shape == (2, dim) and out.text_embedding.shape == (2, dim)


def test_learnable_temperature(tiny_cfg):
    tiny_cfg.loss.learnable_temperature = True
    model = create_model(tiny_cfg)
    assert model.logit_scale.requires_grad
    assert not create_model(get_config("tiny", {"model.text.model": tiny_cfg.model.text.model,
                                                "model.text.freeze_layers": 1})).logit_scale.requires_grad


def test_imagenet_weights_from_the_local_torch_cache(tiny_cfg, tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    net = torchvision.models.resnet18(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(net.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    tiny_cfg.model.image.weights = "imagenet"
    model = create_model(tiny_cfg)
    torch.testing.assert_close(model.image_encoder.layer4[0].conv1.weight, net.layer4[0].conv1.weight)


@pytest.mark.parametrize("stride", [16, 8])
def test_output_stride_dilates_and_keeps_weight_names(tiny_cfg, stride):
    """A dilated encoder gives a finer attention map, the decoder still reaches full resolution,
    and the state dict has the same names and shapes as the strided one (weights interchange)."""
    tiny_cfg.model.image.output_stride = stride
    model = create_model(tiny_cfg).eval()
    out = model.image_forward(torch.rand(2, 1, 64, 64))
    assert out.attention.shape[-2:] == (64 // stride, 64 // stride)
    assert out.decoder_logits.shape[-2:] == (64, 64)
    assert model.dense_embeddings(torch.rand(1, 1, 64, 64)).shape[1:3] == (64 // stride, 64 // stride)
    tiny_cfg.model.image.output_stride = 32
    plain = create_model(tiny_cfg).image_encoder.state_dict()
    dilated = model.image_encoder.state_dict()
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in dilated.items()}


def test_token_norm_lowers_saturation():
    """Large-norm ReLU tokens saturate the softmax; LayerNorm on the tokens keeps it spread."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4, 64, 4, 4)) * 30
    for norm, low, high in ((False, 0.9, 1.01), (True, 0.0, 0.5)):
        torch.manual_seed(1)
        pool = AttentionPool2d(64, 48, 3, 16, 4, token_norm=norm)
        _, att = pool(x)
        peak = att.flatten(2).max(-1).values.mean().item()
        assert low < peak < high, (norm, peak)


def test_key_position_false_keeps_positions_out_of_the_attention():
    """Without positions in the keys, the same tokens give the same map wherever the table moves;
    with them (CLIP, the default) the map moves with it. The pooled output uses positions either way."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    for key_position in (True, False):
        torch.manual_seed(1)
        pool = AttentionPool2d(8, 12, 3, 12, 4, key_position=key_position)
        out, att = pool(x)
        with torch.no_grad():
            pool.pos[1:] += torch.randn_like(pool.pos[1:])
        out2, att2 = pool(x)
        assert torch.allclose(att, att2) is not key_position
        assert not torch.allclose(out, out2)


def test_mean_pooling_ignores_padding(tiny_cfg):
    tiny_cfg.model.text.pooling = "mean"
    tiny_cfg.model.text.length_buckets = 1
    model = create_model(tiny_cfg).eval()
    short = model.encode_text(["small left pleural effusion"])
    padded = model.encode_text(["small left pleural effusion",
                                "a much longer report that pads the first one with many tokens here"])
    torch.testing.assert_close(short[0], padded[0], rtol=0, atol=1e-5)
    tokens = model.tokenize(["small left pleural effusion"])
    with torch.no_grad():  # the frozen prefix's hook switches grad mode; no_grad restores it on exit
        hidden = model.text_encoder.backbone(**tokens).last_hidden_state[0]
    torch.testing.assert_close(model.text_encoder(tokens)[0], hidden.mean(0))  # not the CLS row


def test_tiny_text_model_tokenizer_knows_its_corpus(tmp_path):
    """transformers 5 reads BertTokenizerFast(vocab_file=...) as 5 special tokens, so every word was
    [UNK] and the tiny text tower saw no text at all."""
    from transformers import AutoTokenizer

    from g2d.model.text_encoder import build_tiny_text_model

    folder = build_tiny_text_model(tmp_path / "t", ["there is a small pneumothorax at the right apex"] * 4,
                                   vocab_size=80)
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok("small pneumothorax")["input_ids"]
    assert len(tok) > 20 and tok.unk_token_id not in ids
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == len(tok)


def test_tiny_text_model_is_the_same_in_every_process(tmp_path):
    # tokenizers' WordPiece trainer numbers pieces in hash-map order (huggingface/tokenizers#1794): the
    # tiny model built from one corpus differed from run to run, and so did training curves.
    import hashlib
    import subprocess
    import sys

    script = ("import sys; from g2d.model.text_encoder import build_tiny_text_model as b; "
              "b(sys.argv[1], ['Small left pleural effusion.', 'No pneumothorax. Heart size normal.'] * 3, "
              "vocab_size=60, hidden=16, layers=1, heads=1)")
    digests = []
    for k in range(3):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(k))], check=True, timeout=300)
        digests.append([hashlib.sha256((tmp_path / str(k) / name).read_bytes()).hexdigest()
                        for name in ("vocab.txt", "tokenizer.json", "model.safetensors")])
    assert digests[0] == digests[1] == digests[2]
    vocab = (tmp_path / "0" / "vocab.txt").read_text().split()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and "##f" in vocab and "effusion" in vocab


def test_tiny_vocabulary_keeps_every_character_then_the_most_frequent_words():
    from g2d.model.text_encoder import tiny_vocabulary

    corpus = ["b a b", "Ab ab AB", "cd ab"]
    base = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d", "##a", "##b", "##c", "##d"]
    assert tiny_vocabulary(corpus, vocab_size=4) == base  # every character, even past vocab_size
    assert tiny_vocabulary(corpus, vocab_size=14) == base + ["ab"]  # 4 x "ab" (lower-cased), 1 x "cd"
    assert tiny_vocabulary(corpus, vocab_size=99) == base + ["ab", "cd"]
