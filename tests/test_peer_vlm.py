"""Peers' image-text models for zero-shot and grounding (g2d.peer_vlm): for BioViL, MGCA, GLoRIA,
ConVIRT, MedCLIP and M-FLAG (a BenchX file), a checkpoint in the peer's exact layout (image trunk,
image head, text backbone under its prefix, text head) and a tiny text model folder (config +
tokenizer; BioViL's weights) are built here from random weights; the loaded model must give the
embeddings the peer's own recipe gives (computed here with plain torch / transformers modules), and
the protocols must run on it. No download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from g2d.downstream import protocol
from g2d.errors import CheckpointError, ConfigError
from g2d.model.text_encoder import build_tiny_text_model
from g2d.peer_vlm import PEER_TEXT, load_peer_vl_model

CORPUS = ["there is a small pneumothorax at the right apex", "no pneumothorax", "pleural effusion at the left base",
          "the heart is enlarged", "a nodule in the right upper zone", "no acute cardiopulmonary process"] * 5
PROMPTS = ["small pneumothorax at the right apex", "no pleural effusion", "the heart is enlarged"]
# layouts reached through another --model kind: M-FLAG is a BenchX method (benchx:M-FLAG.pth)
LOAD_AS = {"mflag": "benchx"}


def _trunk() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    for m in net.modules():  # non-trivial BatchNorm statistics, so eval mode matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net, {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}


def _bert(folder: Path, layers: int | None = None, pooler: bool = True) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(folder))
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(1)
    return AutoModel.from_config(config, add_pooling_layer=pooler).eval()


def _mlp(*sizes: int, bn: bool, last_bn_affine: bool = True) -> nn.Sequential:
    """Linear [-> BN] -> ReLU -> Linear [-> BN]: MGCA's head (indices 0, 1, 3, 4) or ConVIRT's (0, 2)."""
    torch.manual_seed(2)
    layers: list[nn.Module] = [nn.Linear(sizes[0], sizes[1])]
    if bn:
        layers.append(nn.BatchNorm1d(sizes[1]))
    layers += [nn.ReLU(), nn.Linear(sizes[1], sizes[2])]
    if bn:
        layers.append(nn.BatchNorm1d(sizes[2], affine=last_bn_affine))
    for m in layers:
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(*layers).eval()


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return build_tiny_text_model(tmp_path_factory.mktemp("bert"), CORPUS, vocab_size=120, hidden=32, layers=3,
                                 heads=2)


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaTokenizerFast

    out = tmp_path_factory.mktemp("roberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(out))
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                               unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    tok.save_pretrained(out)
    RobertaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=140, pad_token_id=1).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def peers(tmp_path_factory, bert_dir, roberta_dir):
    """kind -> (checkpoint path, text folder, reference image fn, reference text fn, trunk state)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("peer_vlm")
    net, trunk = _trunk()
    tok = AutoTokenizer.from_pretrained(str(bert_dir))

    def feats(x, size=None):
        if size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        y3 = net.layer3(net.layer2(net.layer1(y)))
        return y3, net.layer4(y3)

    out = {}
    # MedCLIP: vision_model.model.* (fc = 512-d projection, no bias), text_model.model.* (BERT with pooler and
    # the old position_ids buffer), text_model.projection_head (no bias), logit_scale
    bert = _bert(bert_dir)
    fc, proj = nn.Linear(512, 16, bias=False), nn.Linear(32, 16, bias=False)
    state = {**_prefixed("vision_model.model", trunk), "vision_model.model.fc.weight": fc.weight.data,
             **_prefixed("text_model.model", bert.state_dict()),
             "text_model.model.embeddings.position_ids": torch.arange(64)[None],
             "text_model.projection_head.weight": proj.weight.data, "logit_scale": torch.tensor(5.0)}
    torch.save(state, root / "medclip.bin")

    def medclip_text(texts, bert=bert, proj=proj):
        """modeling_medclip.py: layers 1, 2 and last, mean over every token; each prompt on its own (so
        no padding enters the mean, whatever else is in the batch)."""
        out = []
        for text in texts:
            hs = bert(**tok([text], truncation=True, max_length=77, return_tensors="pt"),
                      output_hidden_states=True).hidden_states
            out.append(proj((hs[1].mean(1) + hs[2].mean(1) + hs[-1].mean(1)) / 3))
        return torch.cat(out)
    out["medclip"] = (root / "medclip.bin", bert_dir, lambda x: fc(feats(x)[1].mean((2, 3))), medclip_text)

    # MGCA: Lightning state_dict; 2-layer text model (the folder's config says 3) with BLIP cross-attention
    # keys and no token-type table; heads Linear-BN-ReLU-Linear-BN(affine=False)
    bert2 = _bert(bert_dir, layers=2, pooler=False)
    text_state = {k: v for k, v in bert2.state_dict().items() if "token_type" not in k}
    for i in range(2):
        text_state[f"encoder.layer.{i}.crossattention.self.query.weight"] = torch.randn(32, 32)
    img_head, txt_head = _mlp(512, 64, 16, bn=True, last_bn_affine=False), _mlp(32, 64, 16, bn=True,
                                                                                 last_bn_affine=False)
    state = {**_prefixed("img_encoder_q.model", trunk), **_prefixed("text_encoder_q.model", text_state),
             **{f"img_encoder_q.global_embed.head.{k}": v for k, v in img_head.state_dict().items()},
             **{f"text_encoder_q.global_embed.head.{k}": v for k, v in txt_head.state_dict().items()},
             "img_encoder_q.local_embed.head.0.weight": torch.randn(64, 256, 1), "prototype_layer.weight":
             torch.randn(5, 16)}
    torch.save({"state_dict": state, "epoch": 1}, root / "mgca.ckpt")

    def mgca_text(texts):
        t = tok([" ".join(s.lower().split()) for s in texts], padding="max_length", truncation=True, max_length=112,
                return_tensors="pt")
        with torch.no_grad():
            bert2.embeddings.token_type_embeddings.weight.zero_()
        h = bert2(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                  position_ids=torch.zeros_like(t["input_ids"])).last_hidden_state[:, 0]
        return txt_head(h)
    out["mgca"] = (root / "mgca.ckpt", bert_dir, lambda x: img_head(feats(x, 299)[1].mean((2, 3))), mgca_text)

    # GLoRIA: gloria.* prefixes, Linear global_embedder on layer 4, 1x1 conv local_embedder on layer 3, no text
    # projection: the sentence is the last 4 layers summed over [CLS]..[SEP]
    bert3 = _bert(bert_dir)
    glob, local = nn.Linear(512, 32), nn.Conv2d(256, 32, 1, bias=False)
    state = {**_prefixed("gloria.img_encoder.model", trunk), **_prefixed("gloria.text_encoder.model",
                                                                          bert3.state_dict()),
             "gloria.img_encoder.global_embedder.weight": glob.weight.data,
             "gloria.img_encoder.global_embedder.bias": glob.bias.data,
             "gloria.img_encoder.local_embedder.weight": local.weight.data}
    torch.save({"state_dict": state}, root / "gloria.ckpt")

    def gloria_words(texts):
        """Word features as GLoRIA's aggregate_tokens builds them from the last 4 layers summed: word pieces
        summed into words, [CLS] kept, [SEP] appended, zeros up to word_num: [N, 97, 32]."""
        t = tok([" ".join(s.lower().split()) for s in texts], padding="max_length", truncation=True, max_length=97,
                return_tensors="pt")
        h = sum(bert3(**t, output_hidden_states=True).hidden_states[-4:])
        out_words = torch.zeros(len(texts), 97, 32)
        for i, ids in enumerate(t["input_ids"]):
            words: list[torch.Tensor] = []
            for j, piece in enumerate(tok.convert_ids_to_tokens(ids.tolist())):
                if piece == "[SEP]":
                    words.append(h[i, j])
                    break
                if piece.startswith("##") and words:
                    words[-1] = words[-1] + h[i, j]
                else:
                    words.append(h[i, j])
            out_words[i, :len(words)] = torch.stack(words)
        return out_words

    def gloria_text(texts):
        """GLoRIA's text_model.py: the sentence is the mean over the word_num word slots (zeros included) of
        the layer-summed word features."""
        return gloria_words(texts).mean(1)

    def gloria_similarity(x, texts):
        """gloria.py zero-shot: (global cosine + local) / 2; local from attention_fn (bmm / view / softmax as in
        loss/gloria_loss.py) and 5 x the max word cosine; cap_len counts characters."""
        y3, y4 = feats(x, 299)
        img_g = glob(y4.mean((2, 3)))
        img_l = local(y3)                                                     # [B, 32, h, w]
        sent = gloria_text(texts)
        words = gloria_words(texts)
        sims = torch.zeros(x.shape[0], len(texts))
        for b in range(x.shape[0]):
            for p_, text in enumerate(texts):
                cap_len = len([c for c in " ".join(text.lower().split()) if not c.startswith("[")])
                q = words[p_, 1:cap_len + 1].T[None]                           # 1 x ndf x queryL
                ctx = img_l[b:b + 1].view(1, 32, -1)                           # 1 x ndf x sourceL
                attn = torch.bmm(ctx.transpose(1, 2), q)                       # 1 x sourceL x queryL
                attn = torch.softmax(attn.view(-1, q.shape[2]), -1).view(1, -1, q.shape[2])
                attn = torch.softmax(attn.transpose(1, 2).reshape(-1, ctx.shape[2]) * 4.0, -1)
                weighted = torch.bmm(ctx, attn.view(1, q.shape[2], -1).transpose(1, 2))   # 1 x ndf x queryL
                cos = (q * weighted).sum(1) / (q.norm(dim=1) * weighted.norm(dim=1)).clamp(min=1e-8)
                local_score = torch.log(torch.exp(cos * 5.0).max())
                glob_score = F.cosine_similarity(img_g[b], sent[p_], dim=0)
                sims[b, p_] = (local_score + glob_score) / 2
        return sims
    out["gloria"] = (root / "gloria.ckpt", bert_dir, lambda x: glob(feats(x, 299)[1].mean((2, 3))), gloria_text,
                     gloria_similarity)

    # ConVIRT (ViLMedic): {"model": ...}, visual.model.{0,1,4..7}, vis_proj / lin_proj Linear-ReLU-Linear,
    # RoBERTa with pooler under linguistic.encoder
    from transformers import AutoTokenizer as AT

    rob = _bert(roberta_dir)
    rtok = AT.from_pretrained(str(roberta_dir))
    vis, lin = _mlp(512, 24, 16, bn=False), _mlp(32, 24, 16, bn=False)
    index = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    state = {f"visual.model.{index[k.split('.')[0]]}.{k.partition('.')[2]}": v for k, v in trunk.items()}
    state.update(_prefixed("linguistic.encoder", rob.state_dict()))
    state.update({f"vis_proj.{k}": v for k, v in vis.state_dict().items()})
    state.update({f"lin_proj.{k}": v for k, v in lin.state_dict().items()})
    torch.save({"model": state}, root / "convirt.pth")

    def convirt_text(texts):
        t = rtok([s.lower() for s in texts], padding="max_length", truncation=True, max_length=128,
                 return_tensors="pt")
        return lin(rob(**t).pooler_output)
    out["convirt"] = (root / "convirt.pth", roberta_dir, lambda x: vis(feats(x)[1].mean((2, 3))), convirt_text)

    # BioViL: the image file (encoder.encoder.* with the unused ImageNet fc, projector.model.{0,1,3} 1x1 convs on
    # the layer-4 grid) and the CXR-BERT folder (model_type cxr-bert, custom tokenizer class, bert.* +
    # cls_projection_head + cls.predictions)
    bdir = root / "cxr-bert"
    bdir.mkdir()
    for f in bert_dir.iterdir():
        if f.name != "model.safetensors":
            (bdir / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bdir / "config.json").read_text())
    (bdir / "config.json").write_text(json.dumps({**cfg, "model_type": "cxr-bert", "projection_size": 16,
                                                  "architectures": ["CXRBertModel"]}))
    tc = json.loads((bdir / "tokenizer_config.json").read_text())
    (bdir / "tokenizer_config.json").write_text(json.dumps({**tc, "tokenizer_class": "CXRBertTokenizer"}))
    bert4 = _bert(bert_dir, pooler=False)
    torch.manual_seed(3)
    head = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.LayerNorm(16, eps=1e-12), nn.Linear(16, 16)).eval()
    torch.save({**_prefixed("bert", bert4.state_dict()), "cls.predictions.bias": torch.zeros(120),
                "cls_projection_head.dense_to_hidden.weight": head[0].weight.data,
                "cls_projection_head.dense_to_hidden.bias": head[0].bias.data,
                "cls_projection_head.LayerNorm.weight": head[2].weight.data,
                "cls_projection_head.LayerNorm.bias": head[2].bias.data,
                "cls_projection_head.dense_to_output.weight": head[3].weight.data,
                "cls_projection_head.dense_to_output.bias": head[3].bias.data}, bdir / "pytorch_model.bin")
    projector = nn.Sequential(nn.Conv2d(512, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.Conv2d(16, 16, 1)).eval()
    projector[1].running_mean.uniform_(-0.2, 0.2)
    state = {**_prefixed("encoder.encoder", net.state_dict()),
             **{f"projector.model.{k}": v for k, v in projector.state_dict().items()}}
    torch.save(state, root / "biovil.pt")

    def biovil_text(texts):
        t = tok([s.rstrip("!?.") for s in texts], padding=True, return_tensors="pt")
        return head(bert4(**t).last_hidden_state[:, 0])
    out["biovil"] = (root / "biovil.pt", bdir, lambda x: projector(feats(x)[1]).mean((2, 3)), biovil_text)

    # M-FLAG as BenchX saves it (M-FLAG.pth, a raw state dict): encoder.* (torchvision names, fc Identity),
    # proj_v / proj_t Linear-BN-ReLU-Linear-BN(affine=False), CXR-BERT-general under lm_model (bert.* and its
    # MLM head); the text folder is a cxr-bert config + tokenizer
    bert5 = _bert(bert_dir, pooler=False)
    pv, pt = _mlp(512, 64, 16, bn=True, last_bn_affine=False), _mlp(32, 64, 16, bn=True, last_bn_affine=False)
    state = {**_prefixed("encoder", trunk), **_prefixed("proj_v", pv.state_dict()),
             **_prefixed("proj_t", pt.state_dict()), **_prefixed("lm_model.bert", bert5.state_dict()),
             "lm_model.cls.predictions.bias": torch.zeros(120)}
    torch.save(state, root / "M-FLAG.pth")

    def mflag_text(texts):
        t = tok(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
        return pt(bert5(**t).last_hidden_state[:, 0])
    out["mflag"] = (root / "M-FLAG.pth", bdir, lambda x: pv(feats(x)[1].mean((2, 3))), mflag_text)
    return out


def test_every_cosine_peer_has_a_layout_here(peers):
    assert set(peers) == set(PEER_TEXT) == {"biovil", "mgca", "gloria", "convirt", "medclip", "mflag"}


@pytest.mark.parametrize("kind", sorted(PEER_TEXT))
def test_embeddings_follow_the_peers_recipe(kind, peers):
    path, folder, image_ref, text_ref = peers[kind][:4]
    model = load_peer_vl_model(LOAD_AS.get(kind, kind), path, str(folder))
    torch.manual_seed(4)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        # the encoder sees the peer's normalisation (grey copied to 3 channels)
        enc = model.image_encoder
        xn = (x.expand(-1, 3, -1, -1) - enc.mean) / enc.std
        torch.testing.assert_close(model.encode_image(x), F.normalize(image_ref(xn), dim=-1), atol=1e-5, rtol=1e-4)
        ref = text_ref(PROMPTS)
        if kind == "gloria":  # GLoRIA divides by word_num; cosine ignores the scale
            ref = ref / ref.norm(dim=-1, keepdim=True) * model.encode_text(PROMPTS, normalize=False).norm(dim=-1,
                                                                                                       keepdim=True)
        torch.testing.assert_close(model.encode_text(PROMPTS, normalize=False), ref, atol=1e-5, rtol=1e-4)
    dense = model.dense_embeddings(x)
    assert dense.ndim == 4 and dense.shape[0] == 2 and dense.shape[-1] == model.encode_text(PROMPTS).shape[-1]
    torch.testing.assert_close(dense.norm(dim=-1), torch.ones(dense.shape[:-1]))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_logit_scales(peers):
    import math

    assert math.exp(load_peer_vl_model("medclip", peers["medclip"][0], str(peers["medclip"][1])).logit_scale) == \
        pytest.approx(100.0)  # the checkpoint's 5.0, clamped to ln 100 as MedCLIP does
    assert math.exp(load_peer_vl_model("convirt", peers["convirt"][0], str(peers["convirt"][1])).logit_scale) == \
        pytest.approx(10.0)   # tau 0.1


@pytest.mark.parametrize("kind", ["medclip", "biovil", "gloria"])
def test_zero_shot_and_grounding_protocols_run_on_a_peer(kind, peers, tmp_path):
    path, folder = peers[kind][:2]
    common = dict(data="synthetic:32", model=f"{kind}:{path}", text_model=str(folder), image_size=64, resize=64,
                  num_workers=0, no_progress=True)
    m = protocol.run("zeroshot", protocol.make("zeroshot", out=str(tmp_path / "zs"), threshold="0.5", **common))
    assert 0.0 <= m["auc"] <= 1.0 and m["model"] == f"{kind}:{path}"
    g = protocol.run("grounding", protocol.make("grounding", out=str(tmp_path / "gr"), figures=1, **common))
    assert 0.0 <= g["dice"] <= 1.0 and g["images"] > 0
    p = protocol.run("phrase-grounding", protocol.make("phrase-grounding", out=str(tmp_path / "pg"), figures=0,
                                                       bootstrap=50, **common))
    assert p["pairs"] > 0 and 0.0 <= p["hit"] <= 1.0 and p["model"] == f"{kind}:{path}"


def test_g2d_zero_shot_and_ground_commands_take_a_peer(peers, tmp_path, capsys):
    from PIL import Image

    from g2d.cli import main

    path, folder = peers["mgca"][:2]
    img = tmp_path / "cxr.png"
    Image.fromarray((torch.rand(80, 96) * 255).byte().numpy()).save(img)
    spec = ["--model", f"mgca:{path}", "--text-model", str(folder), "--device", "cpu"]
    assert main(["zero-shot", str(img), "--findings", "pneumothorax,effusion", "--csv", str(tmp_path / "p.csv"),
                 *spec]) == 0
    assert (tmp_path / "p.csv").read_text().count("\n") == 2
    assert main(["ground", str(img), "--text", "small pneumothorax", "--out", str(tmp_path / "h.png"), *spec]) == 0
    assert Image.open(tmp_path / "h.png").size[0] == 96
    assert main(["figure", "attention", "--model", f"mgca:{path}", "--images", str(img), "--out",
                 str(tmp_path / "f")]) != 0
    assert "g2d figure grounding" in capsys.readouterr().err
    assert main(["figure", "grounding", "--images", str(img), "--prompts", "small pneumothorax", "effusion",
                 "--out", str(tmp_path / "g"), *spec]) == 0
    assert (tmp_path / "g" / "grounding_panels.png").is_file() and (tmp_path / "g" / "cxr.png").is_file()


def test_peers_without_a_cosine_zero_shot_say_why(tmp_path):
    for kind, words in (("medklip", "query decoder"), ("kad", "TQN"), ("xrv", "text tower"),
                        ("prior", "prototype"), ("g2d-release", "no text tower")):
        with pytest.raises(ConfigError, match=words):
            load_peer_vl_model(kind, tmp_path / "x.pt")


def test_text_weights_that_do_not_fit_name_the_first_key(peers, bert_dir, tmp_path):
    state = torch.load(peers["medclip"][0], weights_only=True)
    del state["text_model.model.encoder.layer.1.output.dense.weight"]
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match=r"medclip: .*first: 'encoder\.layer\.1\.output\.dense\.weight'"):
        load_peer_vl_model("medclip", tmp_path / "bad.bin", str(bert_dir))
    state = torch.load(peers["mgca"][0], weights_only=True)
    del state["state_dict"]["img_encoder_q.global_embed.head.0.weight"], state["state_dict"][
        "img_encoder_q.global_embed.head.0.bias"]
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if "global_embed" not in k
                           or not k.startswith("img_")}
    torch.save(state, tmp_path / "nohead.ckpt")
    with pytest.raises(CheckpointError, match=r"mgca: .*img_encoder_q\.global_embed\.head"):
        load_peer_vl_model("mgca", tmp_path / "nohead.ckpt", str(bert_dir))


def test_a_missing_text_model_offline_says_what_to_pass(peers, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match=r"Bio_ClinicalBERT.*--text-model"):
        load_peer_vl_model("medclip", peers["medclip"][0])
    with pytest.raises(ConfigError, match="not a folder"):
        load_peer_vl_model("medclip", peers["medclip"][0], str(tmp_path / "models" / "Bio_ClinicalBERT"))


def test_a_local_text_model_folder_keys_stored_results(bert_dir, tmp_path):
    """A result computed with one text model folder is not reused after the folder changed."""
    import shutil

    folder = tmp_path / "text"
    shutil.copytree(bert_dir, folder)
    args = protocol.make("zeroshot", data="synthetic:16", out="x", model="medclip:w.bin", text_model=str(folder))
    first = protocol.content_inputs(args)["text_model_id"]
    assert protocol.content_inputs(args)["text_model_id"] == first
    (folder / "vocab.txt").write_text((folder / "vocab.txt").read_text() + "newword\n")
    assert protocol.content_inputs(args)["text_model_id"] != first
    assert "text_model_id" not in protocol.content_inputs(
        protocol.make("zeroshot", data="synthetic:16", out="x", model="medclip:w.bin", text_model="org/name"))


def test_fixture_tokenizers_know_the_words(bert_dir, roberta_dir):
    """The tests above mean something only if prompts are not all [UNK]."""
    from transformers import AutoTokenizer

    for folder in (bert_dir, roberta_dir):
        tok = AutoTokenizer.from_pretrained(str(folder))
        ids = tok("small pneumothorax at the right apex")["input_ids"]
        assert len(tok) > 50 and tok.unk_token_id not in ids, folder


def test_a_text_folder_without_its_tokenizer_is_refused(peers, bert_dir, tmp_path):
    """config.json + weights but no tokenizer files: transformers falls back to a few special tokens
    and every word would be [UNK]; the load stops instead of scoring nonsense."""
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    (folder / "config.json").write_text((bert_dir / "config.json").read_text())
    rows = json.loads((bert_dir / "config.json").read_text())["vocab_size"]
    with pytest.raises(ConfigError, match=rf"tokenizer has \d+ tokens but the text weights have {rows}"):
        load_peer_vl_model("medclip", peers["medclip"][0], str(folder))


def test_heads_that_do_not_fit_are_refused_at_load(peers, bert_dir, tmp_path):
    state = torch.load(peers["medclip"][0], weights_only=True)
    state["vision_model.model.fc.weight"] = torch.randn(16, 300)          # not the trunk's 512 channels
    torch.save(state, tmp_path / "a.bin")
    with pytest.raises(CheckpointError, match=r"medclip: .*image head .* 512-wide"):
        load_peer_vl_model("medclip", tmp_path / "a.bin", str(bert_dir))
    state["vision_model.model.fc.weight"] = torch.randn(24, 512)          # 24-d images, 16-d texts
    torch.save(state, tmp_path / "b.bin")
    with pytest.raises(CheckpointError, match="24 dimensions, text embeddings 16"):
        load_peer_vl_model("medclip", tmp_path / "b.bin", str(bert_dir))


def test_medclip_prompts_do_not_depend_on_their_batch(peers):
    model = load_peer_vl_model("medclip", peers["medclip"][0], str(peers["medclip"][1]))
    alone = model.encode_text(["effusion"])
    torch.testing.assert_close(model.encode_text(["effusion", "small pneumothorax at the right apex"])[:1], alone)


def test_a_prompt_that_cleaning_empties_is_refused(peers):
    from g2d.errors import DataError

    model = load_peer_vl_model("mgca", peers["mgca"][0], str(peers["mgca"][1]))
    with pytest.raises(DataError, match="empty after mgca's text cleaning"):
        model.encode_text(["气胸"])


def test_gloria_zero_shot_adds_its_local_word_region_score(peers, tmp_path):
    path, folder, _, _, similarity_ref = peers["gloria"]
    model = load_peer_vl_model("gloria", path, str(folder))
    assert model.scores_pairs
    torch.manual_seed(5)
    x = torch.rand(2, 1, 64, 64)
    enc = model.image_encoder
    with torch.no_grad():
        ref = similarity_ref((x.expand(-1, 3, -1, -1) - enc.mean) / enc.std, PROMPTS)
    torch.testing.assert_close(model.similarity(x, PROMPTS), ref, atol=1e-4, rtol=1e-4)
    # the protocol uses it: pair scores averaged per class, then positive vs negative
    from g2d.inference.zeroshot import ZeroShotScorer

    scorer = ZeroShotScorer(model, {"a": [(PROMPTS[0], PROMPTS[1])], "b": [(PROMPTS[2], PROMPTS[1])]})
    sim = model.similarity(x, [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[1]])
    expected = torch.sigmoid(model.logit_scale.exp() * (sim[:, [0, 2]] - sim[:, [1, 3]]))
    torch.testing.assert_close(scorer(x), expected)


def _head_cases():
    from g2d.peer_vlm import HEAD_LAYOUTS

    cases = []
    for (kind, prefix), layout in sorted(HEAD_LAYOUTS.items()):
        single = len(layout) == 1
        first = next(i for i, c in enumerate(layout) if c != "relu")
        key = (lambda i, name: name) if single else (lambda i, name: f"{i}.{name}")
        if any(c in ("linear", "conv") for c in layout):
            i = next(i for i, c in enumerate(layout) if c in ("linear", "conv"))
            cases.append((kind, prefix, "remove bias", [key(i, "bias")], {}, key(i, "bias")))
        if "bn" in layout:
            i = layout.index("bn")
            bn_keys = [key(i, n) for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
            cases.append((kind, prefix, "remove BatchNorm", bn_keys, {}, key(i, "")))
        cases.append((kind, prefix, "rename", [key(first, "weight")], {key(first, "weights"): None},
                      key(first, "weight")))
        cases.append((kind, prefix, "add", [], {key(9, "weight") if not single else "scale": torch.ones(2)},
                      key(9, "weight") if not single else "scale"))
    return cases


@pytest.mark.parametrize("kind,prefix,change,drop,add,named", _head_cases(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_a_head_with_one_layer_or_key_changed_is_refused_by_name(peers, kind, prefix, change, drop, add, named,
                                                                  tmp_path):
    """Issue 29: every projection head has its expected layout (HEAD_LAYOUTS): a missing bias, a missing
    BatchNorm layer, a renamed or an added key fails the load naming the key, where before a head
    without its bias or BatchNorm loaded into another architecture without a word."""
    from g2d.peers import PEER_KINDS

    obj = torch.load(peers[kind][0], weights_only=True)
    container = PEER_KINDS[LOAD_AS.get(kind, kind)].container
    state = next((obj[c] for c in container if isinstance(obj, dict) and c in obj), obj)
    moved = {}
    for k in drop:
        if f"{prefix}.{k}" in state:
            moved[k] = state.pop(f"{prefix}.{k}")
    for k, v in add.items():
        state[f"{prefix}.{k}"] = v if v is not None else moved[drop[0]]
    assert moved or add
    torch.save(obj, tmp_path / "changed.pt")
    with pytest.raises(CheckpointError, match=rf"{kind}: .*{prefix}\.{named}"):
        load_peer_vl_model(LOAD_AS.get(kind, kind), tmp_path / "changed.pt", str(peers[kind][1]))


@pytest.mark.parametrize("change", ["remove", "rename", "add"])
def test_text_weights_with_one_key_changed_are_refused_by_name(peers, change, tmp_path):
    obj = torch.load(peers["mgca"][0], weights_only=True)
    state = obj["state_dict"]
    key = "text_encoder_q.model.encoder.layer.1.output.dense.bias"
    if change == "remove":
        del state[key]
    elif change == "rename":
        state[key.replace("dense", "dense_v2")] = state.pop(key)
    else:
        state["text_encoder_q.model.encoder.layer.1.output.extra"] = torch.zeros(2)
    torch.save(obj, tmp_path / "changed.ckpt")
    named = {"remove": "encoder.layer.1.output.dense.bias", "rename": "encoder.layer.1.output.dense",
             "add": "encoder.layer.1.output.extra"}[change]
    with pytest.raises(CheckpointError, match=rf"mgca: .*{named}"):
        load_peer_vl_model("mgca", tmp_path / "changed.ckpt", str(peers["mgca"][1]))
    # the old position_ids buffer is on the explicit allow-list (MedCLIP's file carries one)
    from g2d.peer_vlm import IGNORABLE_BUFFERS

    assert IGNORABLE_BUFFERS == ("num_batches_tracked", "position_ids")


def test_peer_entry_points_keep_the_input_contract(peers):
    """Issue 29: a peer's model takes [0, 1] (uint8 converted) and refuses 0-255 floats by name."""
    from g2d.errors import ImageInputError

    x = torch.rand(2, 1, 64, 64)
    u8 = (x * 255).round().to(torch.uint8)
    for kind in ("medclip", "gloria"):
        model = load_peer_vl_model(kind, peers[kind][0], str(peers[kind][1]))
        calls = [model.encode_image, model.dense_embeddings]
        if kind == "gloria":
            calls.append(lambda t, m=model: m.similarity(t, ["pleural effusion"]))
        for call in calls:
            with pytest.raises(ImageInputError, match=rf"{kind} .*\[0, 1\]"):
                call(x * 255)
            torch.testing.assert_close(call(u8), call(u8.float() / 255))


def test_benchx_files_take_their_methods_text_tower_and_benchx_input(peers, tmp_path):
    """A BenchX MGCA file (MGCA's own layout) is MGCA's image-text model fed BenchX's input: mean 0.4978,
    std 0.2449, no 299 px resize; BenchX's MedKLIP has no image-text cosine."""
    path, folder, _, text_ref = peers["mgca"][:4]
    model = load_peer_vl_model("benchx", path, str(folder))
    assert model.report["benchx_method"] == "MGCA-resnet50" and model.peer_kind.global_input is None
    torch.testing.assert_close(model.image_encoder.mean.flatten(), torch.full((3,), 0.4978))
    mgca = load_peer_vl_model("mgca", path, str(folder))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(PROMPTS), mgca.encode_text(PROMPTS))
        mgca.image_encoder.mean.fill_(0.4978)   # MGCA's encoder and head on BenchX's input, at 64 px
        mgca.image_encoder.std.fill_(0.2449)
        expected = mgca.image_head(mgca.image_encoder(x)[-1].mean((2, 3)))
        torch.testing.assert_close(model.encode_image(x), F.normalize(expected, dim=-1))
    torch.save({"model": {f"module.res_features.{i}.weight": torch.zeros(1) for i in (0,)}}, tmp_path / "MedKLIP.pth")
    with pytest.raises(ConfigError, match=r"benchx \(MedKLIP\).*query decoder"):
        load_peer_vl_model("benchx", tmp_path / "MedKLIP.pth")
