"""Peers' checkpoints through ``--model KIND:PATH``: for every kind, a state dict of that peer's exact
layout (prefixes, index names, extra heads, 1-channel conv1, missing layer4) is built from a random
torchvision ResNet, saved in the peer's container, loaded, and compared with the originals; the
protocols run on it; a wrong file names the kind and its first mismatching key; the default load
executes nothing (no download anywhere)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import torchvision

from g2d.data.transforms import ImageTransformCfg
from g2d.downstream import protocol
from g2d.errors import CheckpointError, ConfigError
from g2d.peers import BENCHX_METHODS, PEER_KINDS, load_peer_encoder, resolve_kind, split_model_spec
from g2d.towers import load_image_tower

CHILD_INDEX = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


def _resnet(in_channels: int = 3, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if in_channels == 1:
        net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _trunk(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _indexed(state, prefix):
    out = {}
    for k, v in _trunk(state).items():
        first, _, rest = k.partition(".")
        out[f"{prefix}{CHILD_INDEX[first]}.{rest}"] = v
    return out


def _layouts(tv, tv1, tv18):
    """kind -> (container object, the torchvision state it should load to)."""
    noise = torch.randn(4, 4)
    return {
        "torchvision": (tv, tv),
        "g2d-release": (_trunk(tv), tv),
        "mgca": ({"state_dict": {**{f"img_encoder_q.model.{k}": v for k, v in _trunk(tv).items()},
                                 "img_encoder_q.global_embed.head.0.weight": noise,
                                 "text_encoder_q.model.embeddings.word_embeddings.weight": noise},
                  "epoch": 3, "global_step": 100}, tv),
        "convirt": ({"model": {**_indexed(tv, "visual.model."), "vis_proj.0.weight": noise,
                               "linguistic.encoder.pooler.dense.weight": noise}}, tv),
        "medklip": ({"model": {k: v for k, v in _indexed(tv, "module.res_features.").items()
                               if not k.startswith("module.res_features.7.")} | {"module.res_l1.weight": noise},
                     "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "config": {"d_model": 256},
                     "epoch": 9}, {k: v for k, v in tv.items() if not k.startswith("layer4.")}),
        "kad": ({"image_encoder": {**{f"resnet.{k}": v for k, v in tv.items()}, **_indexed(tv, "res_features."),
                                   "res_l1.weight": noise},
                 "text_encoder": {"bert_model.pooler.dense.weight": noise}, "model": {"mlp_head.0.weight": noise}},
                tv),
        "biovil": ({**{f"encoder.encoder.{k}": v for k, v in tv.items()}, "projector.model.0.weight": noise}, tv),
        "prior": (_trunk(tv1), tv1),
        "medclip": ({**{f"vision_model.model.{k}": v for k, v in _trunk(tv).items()},
                     "vision_model.model.fc.weight": torch.randn(512, 512),
                     "text_model.model.embeddings.position_ids": torch.arange(8)[None],
                     "text_model.projection_head.weight": torch.randn(512, 768)}, tv),
        "xrv": (tv18, tv18),
        # BenchX's M-FLAG.pth: a raw state dict, encoder.* (torchvision names, fc Identity), heads, CXR-BERT
        "benchx": ({**{f"encoder.{k}": v for k, v in _trunk(tv).items()}, "proj_v.0.weight": noise,
                    "proj_t.0.weight": noise, "lm_model.bert.embeddings.word_embeddings.weight": noise}, tv),
    }


@pytest.fixture(scope="module")
def peer_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    tv, tv1, tv18 = _resnet(), _resnet(in_channels=1), _resnet(in_channels=1, num_classes=18)
    files = {}
    for kind, (obj, expected) in _layouts(tv, tv1, tv18).items():
        path = root / f"{kind}.pt"
        torch.save(obj, path)
        files[kind] = (path, expected)
    return files


def test_every_kind_has_a_layout_here():
    assert set(_layouts(_resnet(), _resnet(1), _resnet(1, 18))) == set(PEER_KINDS) - {"gloria"}  # gloria below


def _container_state(obj, kind):
    """The state dict inside a peer's container object (the kind's container keys, as the loader)."""
    for key in PEER_KINDS[kind].container:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


@pytest.mark.parametrize("change", ["remove", "rename", "add"])
@pytest.mark.parametrize("kind", sorted(set(PEER_KINDS) - {"gloria"}))
def test_an_encoder_file_with_one_key_removed_renamed_or_added_is_refused_by_name(kind, peer_files, change,
                                                                                   tmp_path):
    """Issue 29: every encoder a peer's file builds has its expected layout; one key removed (a bias),
    renamed, or added under the encoder's prefix fails the load, naming the key."""
    import re

    obj = torch.load(peer_files[kind][0], weights_only=True)
    state = _container_state(obj, kind)
    resolved, _ = resolve_kind(kind, state, peer_files[kind][0])   # benchx: the method's layout
    prefix = resolved.prefix
    key = next(k for k in state if re.match(prefix + r"(layer2|5)\.0\.bn1\.bias$", k))
    start = re.match(prefix, key).end()
    if change == "remove":
        del state[key]
        named = "layer2.0.bn1.bias"
    elif change == "rename":
        state[key + "_v2"] = state.pop(key)
        named = "layer2.0.bn1.bias"
    else:
        named = key[:start] + ("11.weight" if resolved.index_names else "extra_layer.weight")
        state[named] = torch.zeros(3)
    torch.save(obj, tmp_path / "changed.pt")
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_peer_encoder(kind, tmp_path / "changed.pt")


@pytest.mark.parametrize("kind", sorted(set(PEER_KINDS) - {"gloria"}))
def test_each_kind_loads_the_original_weights(kind, peer_files):
    path, expected = peer_files[kind]
    encoder, report = load_peer_encoder(kind, path)
    got = encoder.state_dict()
    for k, v in expected.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        if k == "conv1.weight" and v.shape[1] == 1:  # 1-channel stem: a third of the kernel per channel
            torch.testing.assert_close(got[k], v.expand(-1, 3, -1, -1) / 3)
        else:
            torch.testing.assert_close(got[k], v, msg=f"{kind}: {k}")
    k, _ = resolve_kind(kind, _container_state(torch.load(path, weights_only=True), kind), path)
    assert report["arch"] == "resnet18" and report["kind"] == k.name
    assert report["absent"] == (["layer4"] if kind == "medklip" else [])
    assert report["conv1_channels"] == (1 if kind in ("prior", "xrv") else 3)
    torch.testing.assert_close(encoder.mean.flatten(), torch.tensor(k.mean))
    torch.testing.assert_close(encoder.std.flatten(), torch.tensor(k.std))


def test_a_one_channel_stem_gives_the_peers_own_features(peer_files):
    """PRIOR / torchxrayvision take 1 channel: the 3-channel stem on a grey image copied 3 times
    equals the peer's 1-channel conv1 on the normalised grey image."""
    path, tv1 = peer_files["xrv"]
    encoder, _ = load_peer_encoder("xrv", path)
    x = torch.rand(2, 1, 64, 64)
    ours = encoder.conv1(encoder.prepare(x))
    theirs = torch.nn.functional.conv2d(x * 2048 - 1024, tv1["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)


def test_xrv_input_is_scaled_to_plus_minus_1024(peer_files):
    encoder, _ = load_peer_encoder("xrv", peer_files["xrv"][0])
    out = encoder.prepare(torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([-1024.0, 0.0, 1024.0]))


def test_release_encoder_decoder_file_brings_its_decoder(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    unet = smp.Unet("resnet18", encoder_weights=None, classes=1)
    torch.save(unet.state_dict(), tmp_path / "run_encoder_decoder.pth")
    tower = load_image_tower(f"g2d-release:{tmp_path / 'run_encoder_decoder.pth'}")
    assert tower.decoder is not None and tower.peer["decoder"] is True
    ref = {k[len("decoder."):]: v for k, v in unet.state_dict().items() if k.startswith("decoder.")}
    for k, v in tower.decoder.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    enc = {k[len("encoder."):]: v for k, v in unet.state_dict().items() if k.startswith("encoder.")}
    torch.testing.assert_close(tower.encoder.state_dict()["layer3.1.conv2.weight"], enc["layer3.1.conv2.weight"])
    # the pseudo-mask head comes with it (g2d eval segmentation --transfer encoder-decoder-head)
    assert tower.head is not None
    torch.testing.assert_close(tower.head[0].weight, unet.state_dict()["segmentation_head.0.weight"])
    torch.testing.assert_close(tower.head[0].bias, unet.state_dict()["segmentation_head.0.bias"])
    # a head that does not fit is refused by name
    state = unet.state_dict()
    state["segmentation_head.0.weight"] = state["segmentation_head.0.weight"][:, :8]
    torch.save(state, tmp_path / "bad_encoder_decoder.pth")
    with pytest.raises(CheckpointError, match="segmentation_head.0.weight"):
        load_image_tower(f"g2d-release:{tmp_path / 'bad_encoder_decoder.pth'}")


class _Runs:
    """Stands for a pickled config class (GLoRIA's OmegaConf): unpickling it runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_gloria_needs_trust_pickle_and_the_default_executes_nothing(tmp_path):
    tv = _resnet()
    marker = tmp_path / "executed"
    obj = {"state_dict": {f"gloria.img_encoder.model.{k}": v for k, v in _trunk(tv).items()},
           "hyper_parameters": _Runs(str(marker))}
    torch.save(obj, tmp_path / "gloria.ckpt")
    with pytest.raises(CheckpointError, match=r"gloria: .*--trust-pickle"):
        load_peer_encoder("gloria", tmp_path / "gloria.ckpt")
    assert not marker.exists()  # weights_only=True refused the class before running anything
    encoder, _ = load_peer_encoder("gloria", tmp_path / "gloria.ckpt", trust_pickle=True)
    assert marker.exists()  # the explicit flag really does unpickle (that is why it must be explicit)
    torch.testing.assert_close(encoder.state_dict()["layer4.1.conv2.weight"], tv["layer4.1.conv2.weight"])


def test_a_wrong_file_names_the_kind_and_the_first_mismatching_key(peer_files, tmp_path):
    with pytest.raises(CheckpointError, match=r"mgca: .* no key under the mgca encoder prefix"):
        load_peer_encoder("mgca", peer_files["torchvision"][0])
    with pytest.raises(CheckpointError, match=r"kad: .*first: 'layer4\.0\.bn1"):
        bad = {f"resnet.{k}": v for k, v in _trunk(_resnet()).items() if not k.startswith("layer4.0.bn1")}
        torch.save({"image_encoder": bad}, tmp_path / "kad.pt")
        load_peer_encoder("kad", tmp_path / "kad.pt")
    state = _resnet()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"torchvision: .*'layer2\.0\.conv1\.weight' has shape"):
        load_peer_encoder("torchvision", tmp_path / "shape.pt")


def test_model_specs():
    assert split_model_spec("mgca:/x/resnet_50.ckpt") == ("mgca", "/x/resnet_50.ckpt")
    assert split_model_spec("g2d:runs/a") == ("g2d", "runs/a")
    assert split_model_spec("hf-hub:org/name@v1") == ("g2d", "hf-hub:org/name@v1")  # a hub name, not a kind
    assert split_model_spec("runs/demo/g2d/export") == ("g2d", "runs/demo/g2d/export")
    assert split_model_spec("random") == ("g2d", "random")
    assert split_model_spec("C:/models/x.pt") == ("g2d", "C:/models/x.pt")
    with pytest.raises(ValueError, match="unknown model kind 'clip'.*biovil"):
        split_model_spec("clip:x.pt")


@pytest.mark.parametrize("kind", ["biovil", "medklip", "prior"])
def test_protocols_run_on_a_peer_encoder(kind, peer_files, tmp_path):
    path = peer_files[kind][0]
    m = protocol.run("linear", protocol.make("linear", data="synthetic:16", model=f"{kind}:{path}",
                                             out=str(tmp_path / "lin"), image_size=64, resize=64, epochs=2,
                                             num_workers=0, no_progress=True, no_feature_cache=True))
    assert 0.0 <= m["auc"] <= 1.0
    seg = protocol.run("segmentation", protocol.make("segmentation", data="synthetic:16", model=f"{kind}:{path}",
                                                     out=str(tmp_path / "seg"), image_size=64, epochs=1,
                                                     batch_size=8, num_workers=0, no_progress=True, figures=0))
    assert 0.0 <= seg["dice"] <= 1.0
    assert json.loads((tmp_path / "lin" / "metrics.json").read_text())["model"] == f"{kind}:{path}"
    for features in ("encoder", "multiscale"):  # the dense linear probe takes every --model kind too
        probe = protocol.run("dense-probe", protocol.make("dense-probe", data="synthetic:16", model=f"{kind}:{path}",
                                                          out=str(tmp_path / f"probe-{features}"), features=features,
                                                          image_size=64, num_workers=0, no_progress=True, figures=0))
        assert 0.0 <= probe["dice"] <= 1.0 and probe["peer"]["kind"] == kind
    for run in ("lin", "seg"):  # every protocol says which peer file it read
        assert json.loads((tmp_path / run / "metrics.json").read_text())["peer"]["kind"] == kind


def test_every_peer_kind_is_named_in_the_model_flags_help():
    (help_text,) = [f.metadata["help"] for f in dataclasses.fields(protocol.ProtocolArgs) if f.name == "model"]
    assert all(k in help_text for k in PEER_KINDS), help_text


def test_zero_shot_with_a_peer_says_what_is_not_supported(peer_files, tmp_path):
    for kind, words in (("medklip", "query decoder"), ("xrv", "text tower")):
        args = protocol.make("zeroshot", data="synthetic:16", model=f"{kind}:{peer_files[kind][0]}",
                             out=str(tmp_path / kind), image_size=64, resize=64, num_workers=0, no_progress=True)
        with pytest.raises(ConfigError, match=words):
            protocol.run("zeroshot", args)


def test_a_peers_own_geometry_is_the_default(peer_files):
    from g2d.downstream.features import geometry_from_args, geometry_source
    from g2d.downstream.linear_probe import Args

    tower = load_image_tower(f"biovil:{peer_files['biovil'][0]}")
    args = Args(data="synthetic", out="x")
    geom = geometry_from_args(args, tower)
    assert (geom.resize, geom.crop, geom.keep_aspect) == (512, 480, True)  # hi-ml: Resize(512), CenterCrop(480)
    assert geometry_source(args, tower) == "model"


def test_a_peer_files_content_keys_stored_results(tmp_path):
    """KIND:PATH is identified by the file behind it, like a g2d model path (g2d.fingerprint)."""
    import os

    from g2d.fingerprint import model_identity

    torch.save(_resnet(), tmp_path / "w.pt")
    first = model_identity(f"torchvision:{tmp_path / 'w.pt'}")
    assert first == model_identity(f"torchvision:{tmp_path / 'w.pt'}")
    assert first != model_identity(f"kad:{tmp_path / 'w.pt'}")
    st = (tmp_path / "w.pt").stat()
    torch.save(_resnet(num_classes=10), tmp_path / "w.pt")
    os.utime(tmp_path / "w.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert model_identity(f"torchvision:{tmp_path / 'w.pt'}") != first


def test_a_file_that_is_not_a_checkpoint_is_not_sent_to_trust_pickle(tmp_path):
    (tmp_path / "notes.ckpt").write_text("hello\n")
    with pytest.raises(CheckpointError, match=r"gloria: cannot read checkpoint .*not a PyTorch file") as err:
        load_peer_encoder("gloria", tmp_path / "notes.ckpt")
    assert "--trust-pickle" not in str(err.value)


def test_mgca_gloria_medclip_inputs_are_their_own(peer_files, tmp_path):
    # peer-checkpoints.md: MGCA / GLoRIA pad the long side to 256 and crop 224, and their forward
    # upsamples to 299 (linear probe, fine-tuning) but their segmentation and detection do not;
    # MedCLIP pads to a square of 224
    for kind in ("mgca", "gloria"):
        p = PEER_KINDS[kind].preprocess
        assert (p.resize, p.crop, p.pad_square, PEER_KINDS[kind].global_input) == (256, 224, True, 299)
    assert PEER_KINDS["medclip"].preprocess.pad_square and PEER_KINDS["medclip"].global_input is None

    seen = []
    tower = load_image_tower(f"mgca:{peer_files['mgca'][0]}")
    tower.encoder.register_forward_pre_hook(lambda m, inp: seen.append(tuple(inp[0].shape[-2:])))
    from g2d.data.labelled.specs import open_dataset
    from g2d.downstream.features import extract_features
    from g2d.downstream.finetune import Classifier

    ds = open_dataset("synthetic:16", split="test", geometry=ImageTransformCfg(resize=64, crop=64, augment="none"))
    _, feats = extract_features(tower, ds, "gap", torch.device("cpu"))
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    want = tower.encoder(torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                                         align_corners=True))[-1].mean((2, 3))
    assert torch.allclose(feats, want, atol=1e-5)
    Classifier(tower.encoder, 2, tower.global_input)(x)
    assert set(seen) == {(299, 299)}
    seen.clear()
    from g2d.downstream.segmentation import build_unet

    build_unet(tower)(x)                                 # the encoder is copied, its hook with it
    assert seen == [(64, 64)]


@pytest.mark.parametrize("change", ["remove", "rename", "add"])
@pytest.mark.parametrize("part", ["decoder.blocks.2.conv1.1.bias", "segmentation_head.0.bias"])
def test_a_release_decoder_or_head_with_one_key_changed_is_refused_by_name(tmp_path, part, change):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    state = smp.Unet("resnet18", encoder_weights=None, classes=1).state_dict()
    if change == "remove":
        del state[part]
        named = part.split(".", 1)[1]
    elif change == "rename":
        state[part + "_v2"] = state.pop(part)
        named = part.split(".", 1)[1]
    else:
        named = part.rsplit(".", 2)[0] + ".extra"
        state[named] = torch.zeros(2)
        named = named.split(".", 1)[1]
    torch.save(state, tmp_path / "run_encoder_decoder.pth")
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_image_tower(f"g2d-release:{tmp_path / 'run_encoder_decoder.pth'}")


def _benchx_files(tv) -> dict[str, object]:
    """One file per BenchX ResNet method, in the form BenchX saves it (configs/_base_/models/*.yml prefixes;
    ConVIRT through BenchX's VisualEncoder with named children; MedKLIP's Sequential indices, no layer4)."""
    noise = torch.randn(4, 4)
    named = _trunk(tv)
    return {
        "MGCA-resnet50": {"state_dict": {**{f"img_encoder_q.model.{k}": v for k, v in named.items()},
                                         "img_encoder_q.global_embed.head.0.weight": noise}, "epoch": 49},
        "GLoRIA": {"state_dict": {**{f"gloria.img_encoder.model.{k}": v for k, v in named.items()},
                                  "gloria.img_encoder.global_embedder.weight": noise},
                   "hyper_parameters": {"lr": 5e-5}},
        "ConVIRT": {"model": {**{f"visual.model.{k}": v for k, v in named.items()}, "vis_proj.0.weight": noise}},
        "MedKLIP": {"model": {k: v for k, v in _indexed(tv, "module.res_features.").items()
                              if not k.startswith("module.res_features.7.")}},
        "MedCLIP-resnet50": {**{f"vision_model.model.{k}": v for k, v in named.items()},
                             "vision_model.model.fc.weight": torch.randn(512, 512)},
        "M-FLAG": {**{f"encoder.{k}": v for k, v in named.items()}, "proj_v.0.weight": noise},
    }


def test_benchx_files_load_as_their_methods_with_benchx_input(tmp_path):
    tv = _resnet()
    files = _benchx_files(tv)
    assert set(files) == {m for m, _, _ in BENCHX_METHODS}
    for method, obj in files.items():
        path = tmp_path / f"{method}.pt"
        torch.save(obj, path)
        tower = load_image_tower(f"benchx:{path}")
        assert tower.peer["benchx_method"] == method, method
        assert tower.preprocess == ImageTransformCfg(resize=224, crop=224, augment="none")   # BenchX's, for all
        assert tower.global_input is None                                                   # no 299 px resize
        torch.testing.assert_close(tower.encoder.mean.flatten(), torch.full((3,), 0.4978))
        torch.testing.assert_close(tower.encoder.std.flatten(), torch.full((3,), 0.2449))
        got = tower.encoder.state_dict()
        for k, v in tv.items():
            if k.startswith("fc.") or k.endswith("num_batches_tracked") or (method == "MedKLIP" and "layer4" in k):
                continue
            torch.testing.assert_close(got[k], v, msg=f"{method}: {k}")
        assert tower.peer["absent"] == (["layer4"] if method == "MedKLIP" else [])


def test_benchx_vit_and_unknown_files_are_refused(tmp_path):
    torch.save({"state_dict": {"img_encoder_q.model.patch_embed.proj.weight": torch.zeros(2, 3, 16, 16),
                               "img_encoder_q.model.blocks.0.norm1.weight": torch.zeros(2)}}, tmp_path / "vit.ckpt")
    with pytest.raises(CheckpointError, match="ViT or Swin"):
        load_image_tower(f"benchx:{tmp_path / 'vit.ckpt'}")
    torch.save({"model": {"vision_encoder.visual.pos_embed": torch.zeros(1, 2, 3)}}, tmp_path / "mrm.pth")
    with pytest.raises(CheckpointError, match="ViT or Swin"):
        load_image_tower(f"benchx:{tmp_path / 'mrm.pth'}")
    torch.save({"backbone.conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no BenchX method's image-encoder prefix"):
        load_image_tower(f"benchx:{tmp_path / 'other.pth'}")
