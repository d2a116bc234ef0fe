"""Peers' image-text models for zero-shot classification and grounding (``--model KIND:PATH
--text-model NAME|DIR``), for the peers whose zero-shot is an image-text cosine similarity: BioViL,
MGCA, GLoRIA, ConVIRT (ViLMedic) and MedCLIP.

A :class:`PeerVLModel` has the interface the zero-shot and grounding code uses for G2D models
(:meth:`encode_image`, :meth:`encode_text`, :meth:`dense_embeddings`, ``logit_scale``), built from:

- the peer's image encoder (:func:`g2d.peers.load_peer_encoder`) and its image projection head from
  the same checkpoint;
- its text backbone: the architecture and tokenizer of a Hugging Face model (``--text-model``, a hub
  name or a local folder; the defaults below), with the weights from the peer's checkpoint (MGCA,
  GLoRIA, ConVIRT, MedCLIP) or from that model itself (BioViL's CXR-BERT);
- its text head and pooling, as its code computes them.

Facts from the peers' code (``../shared/reference/peer-checkpoints.md``; hi-ml b67c1d2, MGCA 680fe4a,
GLoRIA 416466a, ViLMedic 0642c4b, MedCLIP 9c3396f). Every weight is checked by name and shape; files
load with ``weights_only=True``. What is not reproduced is listed in :data:`PEER_TEXT` (``not_done``)
and in docs/peers.md. MedKLIP, KAD (query decoders), PRIOR (prototype text path) and torchxrayvision
(no text tower) are refused with the reason.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from g2d.errors import CheckpointError, ConfigError, DataError
from g2d.image_input import as_model_input
from g2d.model.text_encoder import _offline, check_tokenizer
from g2d.peers import (
    PEER_KINDS,
    PeerEncoder,
    PeerKind,
    global_input,
    load_peer_encoder,
    read_peer_state,
    resolve_kind,
)

__all__ = ["PeerText", "PEER_TEXT", "HEAD_LAYOUTS", "IGNORABLE_BUFFERS", "PeerVLModel", "load_peer_vl_model"]

log = logging.getLogger("g2d.peers")


def _words(text: str) -> str:
    """MGCA / GLoRIA report cleaning: lower case, ``\\w+`` tokens, ASCII only."""
    return " ".join(re.findall(r"\w+", text.lower().encode("ascii", "ignore").decode()))


@dataclass(frozen=True)
class PeerText:
    """How one peer embeds text and projects images, for cosine zero-shot.

    :ivar text_model: default ``--text-model`` (hub name, ``@revision`` allowed): config and
        tokenizer, and for BioViL the weights too.
    :ivar text_prefix: where the text backbone's weights sit: in the peer checkpoint, or with
        ``text_in_folder`` in ``text_model``'s own weight file (BioViL's CXR-BERT: ``bert.``).
    :ivar pooling: ``cls`` (last layer [CLS]), ``pooler`` (BERT/RoBERTa pooler output), ``last4``
        (GLoRIA: the last 4 layers summed, summed over the tokens [CLS]..[SEP]; equal up to scale to
        GLoRIA's mean over its zero-padded word positions, and cosine ignores scale), ``medclip``
        (layers 1, 2 and last averaged, mean over every token; each prompt encoded on its own).
    :ivar text_head: checkpoint prefix of the text projection (``""``: none).
    :ivar image_head: checkpoint prefix of the image projection; ``image_head_on_grid``: applied to
        every layer-4 cell and averaged (BioViL) rather than to the average-pooled vector.
    :ivar dense_head, dense_stage: the head and encoder stage (3 = layer3, 4 = layer4) of the
        grounding map (cosine of the prompt with each cell's projection).
    :ivar local_score: zero-shot adds GLoRIA's word-region score to the global cosine
        (:meth:`PeerVLModel.similarity`).
    :ivar positions_from_token_types: MGCA passes ``token_type_ids`` (all 0) where its BERT expects
        ``position_ids``, and its embeddings have no token-type table: every token gets position 0.
    """

    kind: str
    text_model: str
    text_prefix: str
    pooling: str
    text_head: str
    image_head: str
    dense_head: str
    dense_stage: int = 4
    image_head_on_grid: bool = False
    max_length: int | None = None
    pad_to_max: bool = False
    logit_scale: float | None = 1 / 0.07       # None: the checkpoint's ``logit_scale``
    clean: Callable[[str], str] | None = None
    local_score: bool = False
    text_in_folder: bool = False
    text_pooler: bool = False
    positions_from_token_types: bool = False
    not_done: str = ""
    source: str = ""


PEER_TEXT: dict[str, PeerText] = {t.kind: t for t in (
    PeerText("biovil", "microsoft/BiomedVLP-CXR-BERT-specialized@v1.1", "bert", "cls", "cls_projection_head",
             "projector.model", "projector.model", image_head_on_grid=True, text_in_folder=True,
             clean=lambda t: t.rstrip("!?."),
             not_done="g2d eval grounding does not Gaussian-smooth the map (hi-ml: sigma 1.5 cells); "
                      "phrase-grounding's biovil pipeline does",
             source="hi-ml: text/model/modelling_cxrbert.py (CLS -> cls_projection_head), "
                    "image/model/model.py (mean of the projected layer-4 grid)"),
    PeerText("mgca", "emilyalsentzer/Bio_ClinicalBERT", "text_encoder_q.model", "cls",
             "text_encoder_q.global_embed.head", "img_encoder_q.global_embed.head",
             "img_encoder_q.global_embed.head", max_length=112, pad_to_max=True,
             clean=_words, positions_from_token_types=True,
             not_done="the grounding map applies the global image head to each layer-4 cell (MGCA has no "
                      "grounding code); MGCA's local (layer-3, word) alignment is not used",
             source="MGCA: models/backbones/encoder.py (CLS -> global_embed), med.py (6 layers, no pooler, "
                    "no token-type table), mgca_module.py (temperature 0.07)"),
    PeerText("gloria", "emilyalsentzer/Bio_ClinicalBERT", "gloria.text_encoder.model", "last4", "",
             "gloria.img_encoder.global_embedder", "gloria.img_encoder.local_embedder", dense_stage=3,
             max_length=97, pad_to_max=True, clean=_words, text_pooler=True, local_score=True,
             not_done="zero-shot scores image-prompt pairs as GLoRIA does (global cosine and local word-region "
                      "score averaged) inside g2d's positive-vs-negative protocol: GLoRIA's own max over a "
                      "class's prompts and z-scoring of each class over the batch are not applied; the grounding "
                      "map is the cosine of the sentence with each layer-3 cell's local embedding",
             source="GLoRIA: models/text_model.py (last 4 layers summed, word aggregation), "
                    "models/vision_model.py (global_embedder on layer 4, local_embedder on layer 3)"),
    PeerText("convirt", "allenai/biomed_roberta_base", "linguistic.encoder", "pooler", "lin_proj",
             "vis_proj", "vis_proj", max_length=128, pad_to_max=True, logit_scale=1 / 0.1,
             clean=str.lower, text_pooler=True,
             not_done="report cleaning (r2gen_clean_report) is approximated by lower-casing; the grounding "
                      "map applies vis_proj to each layer-4 cell",
             source="ViLMedic: models/selfsup/conVIRT.py (lin_proj(pooler_output), vis_proj(avgpool), tau 0.1)"),
    PeerText("mflag", "microsoft/BiomedVLP-CXR-BERT-general", "lm_model.bert", "cls", "proj_t", "proj_v", "proj_v",
             max_length=512,
             not_done="the grounding map applies proj_v to each layer-4 cell (M-FLAG has no grounding code)",
             source="M-FLAG (BenchX's copy, unifier/models/vlm_src/MFLAG/utils/utils_builder.py): CXR-BERT-general "
                    "[CLS] of the last layer -> proj_t, avg-pooled layer 4 -> proj_v"),
    PeerText("medclip", "emilyalsentzer/Bio_ClinicalBERT", "text_model.model", "medclip",
             "text_model.projection_head", "vision_model.model.fc", "vision_model.model.fc", max_length=77,
             logit_scale=None, text_pooler=True,
             not_done="the grounding map applies the image projection (fc) to each layer-4 cell",
             source="MedCLIP: modeling_medclip.py (layers 1, 2, last; mean over tokens; projection_head; "
                    "logit_scale clamped to [0, ln 100])"),
)}


# ------------------------------------------------------------------------------------ heads


def _take(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


# The layout of every projection head g2d builds from a peer's checkpoint, layer by layer (a Sequential's
# index = the position here; a single layer stores its keys without an index). Layer sizes come from the
# weights; which layers exist, their biases and BatchNorm affinity are fixed, so a file that lacks one (a
# missing bias, a missing BatchNorm) is refused instead of loading into another architecture.
# "linear"/"conv" carry weight and bias, "-nobias" weight only ("conv" = 1x1, applied per vector);
# "bn" is BatchNorm with weight and bias, "bn-noaffine" without; "relu" has no parameters.
HEAD_LAYOUTS: dict[tuple[str, str], tuple[str, ...]] = {
    # MGCA encoder.py:17-54 GlobalEmbedding: Linear, BN, ReLU, Linear, BN(affine=False)
    ("mgca", "img_encoder_q.global_embed.head"): ("linear", "bn", "relu", "linear", "bn-noaffine"),
    ("mgca", "text_encoder_q.global_embed.head"): ("linear", "bn", "relu", "linear", "bn-noaffine"),
    # GLoRIA vision_model.py: global_embedder Linear 2048->768, local_embedder 1x1 conv 1024->768 without bias
    ("gloria", "gloria.img_encoder.global_embedder"): ("linear",),
    ("gloria", "gloria.img_encoder.local_embedder"): ("conv-nobias",),
    # ViLMedic conVIRT.py: Linear, ReLU, Linear (vision and language)
    ("convirt", "vis_proj"): ("linear", "relu", "linear"),
    ("convirt", "lin_proj"): ("linear", "relu", "linear"),
    # MedCLIP modeling_medclip.py: fc and projection_head, Linear without bias
    ("medclip", "vision_model.model.fc"): ("linear-nobias",),
    ("medclip", "text_model.projection_head"): ("linear-nobias",),
    # M-FLAG ResNet_CXRBert: Linear, BN, ReLU, Linear, BN(affine=False) (vision 2048 and text 768 -> 1024)
    ("mflag", "proj_v"): ("linear", "bn", "relu", "linear", "bn-noaffine"),
    ("mflag", "proj_t"): ("linear", "bn", "relu", "linear", "bn-noaffine"),
    # hi-ml modules.py:12-53 MLP: 1x1 conv without bias, BN2d, ReLU, 1x1 conv with bias
    ("biovil", "projector.model"): ("conv-nobias", "bn", "relu", "conv"),
}

# buffers a file may lack or carry without changing the computation (BatchNorm's batch counter, used
# only with momentum=None; HF's position_ids, issue #37 of MedCLIP)
IGNORABLE_BUFFERS = ("num_batches_tracked", "position_ids")


def _head(kind: str, prefix: str, parts: dict[str, Tensor], path: Path) -> nn.Module:
    """A per-vector head ``[N, C_in] -> [N, d]`` in the layout :data:`HEAD_LAYOUTS` gives for
    ``(kind, prefix)``, from the file's tensors under ``prefix`` (``parts``, prefix stripped).

    :raises CheckpointError: a missing, renamed or added key, or a shape that does not chain, naming
        the key (with ``prefix``)."""
    layout = HEAD_LAYOUTS[kind, prefix]
    if not parts:
        raise CheckpointError(f"{kind}: {path} has no {prefix}.* weights (the {kind} projection head)")
    single = len(layout) == 1
    file_keys = {k if not single else f"0.{k}": k for k in parts}  # module key -> file key
    state = {m: parts[f] for m, f in file_keys.items() if not m.endswith(IGNORABLE_BUFFERS)}
    layers: list[nn.Module] = []
    width: int | None = None

    def name(key: str) -> str:  # a module key as the file spells it
        return repr(f"{prefix}.{key[2:] if single else key}")

    def need(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"{kind}: {path}: missing key {name(key)} (the {kind} head is {', '.join(layout)})")
        return state[key]

    for i, code in enumerate(layout):
        if code == "relu":
            layers.append(nn.ReLU())
            continue
        if code.startswith(("linear", "conv")):
            w = need(f"{i}.weight")
            if w.ndim != (2 if code.startswith("linear") else 4) or (w.ndim == 4 and w.shape[2:] != (1, 1)):
                raise CheckpointError(f"{kind}: {path}: {prefix}.{i}.weight has shape {tuple(w.shape)}, not a "
                                      f"{'Linear' if code.startswith('linear') else '1x1 convolution'} weight")
            if width is not None and w.shape[1] != width:
                raise CheckpointError(f"{kind}: {path}: {prefix}.{i}.weight takes {w.shape[1]} inputs where the "
                                      f"layer before gives {width}")
            width = int(w.shape[0])
            lin = nn.Linear(int(w.shape[1]), width, bias=not code.endswith("nobias"))
            state[f"{i}.weight"] = w.reshape(width, -1)
            layers.append(lin)
        else:  # bn, bn-noaffine
            width = int(need(f"{i}.running_mean").numel()) if width is None else width
            layers.append(nn.BatchNorm1d(width, affine=code == "bn"))
    head = nn.Sequential(*layers)
    expected = {k: v for k, v in head.state_dict().items() if not k.endswith(IGNORABLE_BUFFERS)}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise CheckpointError(f"{kind}: {path}: {'missing' if missing else 'unexpected'} key {name(key)} "
                              f"(the {kind} head is {', '.join(layout)})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{kind}: {path}: {name(k)} has shape {tuple(v.shape)}, the layout needs "
                                  f"{tuple(expected[k].shape)}")
    head.load_state_dict(state, strict=False)  # only the ignorable buffers may be absent
    return head.eval()


def _biovil_text_head(parts: dict[str, Tensor], path: Path) -> nn.Module:
    """hi-ml's BertProjectionHead: dense_to_hidden -> GELU -> LayerNorm (eps 1e-12) -> dense_to_output.

    :raises CheckpointError: a missing, renamed or added key, or a shape that does not fit, naming it."""
    names = {"dense_to_hidden": "0", "LayerNorm": "2", "dense_to_output": "3"}
    expected = [f"{n}.{p}" for n in names for p in ("weight", "bias")]
    missing, unexpected = sorted(set(expected) - set(parts)), sorted(set(parts) - set(expected))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise CheckpointError(f"biovil: {path}: {'missing' if missing else 'unexpected'} key "
                              f"cls_projection_head.{key} (the head is dense_to_hidden, GELU, LayerNorm, "
                              "dense_to_output)")
    d_in, d = parts["dense_to_hidden.weight"].shape[1], parts["dense_to_hidden.weight"].shape[0]
    head = nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.LayerNorm(d, eps=1e-12), nn.Linear(d, d))
    try:
        head.load_state_dict({f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in parts.items()})
    except RuntimeError as err:
        raise CheckpointError(f"biovil: {path}: cls_projection_head: {' '.join(str(err).split())[:160]}") from None
    return head.eval()


def _per_vector(head: nn.Module, grid: Tensor) -> Tensor:
    """Apply a per-vector head to every cell: [B, C, h, w] -> [B, h, w, d]."""
    b, c, h, w = grid.shape
    return head(grid.permute(0, 2, 3, 1).reshape(-1, c)).reshape(b, h, w, -1)


# ------------------------------------------------------------------------------------ text


def _text_folder(name: str, weights: bool) -> Path:
    """A local folder for a hub name (``NAME@REVISION``) or a folder, through huggingface_hub's cache
    (config and tokenizer files; the weight files only when ``weights``).

    :raises ConfigError: a path that is not a folder, or a name neither cached nor reachable.
    """
    if Path(name).is_dir():
        return Path(name)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists():
        raise ConfigError(f"--text-model {name}: not a folder (a local text model is a folder holding "
                          "config.json and the tokenizer files)")
    repo, _, rev = name.partition("@")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=rev or None, local_files_only=_offline(),
                                      allow_patterns=["*.json", "*.txt", "*.model"]
                                      + (["*.safetensors", "*.bin"] if weights else [])))
    except Exception as err:  # huggingface_hub raises several types for offline / missing
        raise ConfigError(f"cannot load text model {name!r}: {' '.join(str(err).split())}. Pass --text-model with "
                          "a local folder holding it (config.json, tokenizer files, and for BioViL its weights), "
                          "or download it once where the Hugging Face hub is reachable (a cache of another "
                          "revision: name it, or drop the @revision).") from None


def _read_weights(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    from g2d.checkpoint import load_checkpoint

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            obj = load_file(str(folder / name)) if name.endswith(".safetensors") else load_checkpoint(folder / name)
            return {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")


class PeerTextTower(nn.Module):
    """A peer's text backbone + pooling + head: ``list[str] -> [N, d]`` (not normalised)."""

    def __init__(self, spec: PeerText, backbone: nn.Module, head: nn.Module, tokenizer: Any):
        super().__init__()
        self.spec, self.backbone, self.head, self.tokenizer = spec, backbone, head, tokenizer

    def _clean(self, texts: list[str]) -> list[str]:
        s = self.spec
        cleaned = [s.clean(t) if s.clean else t for t in texts]
        for raw, t in zip(texts, cleaned):
            if not t.strip():
                raise DataError(f"{s.kind}: the prompt {raw!r} is empty after {s.kind}'s text cleaning "
                                "(ASCII words only for MGCA and GLoRIA)")
        return cleaned

    def _run(self, texts: list[str]) -> tuple[dict[str, Tensor], Any]:
        """Tokens and backbone output of cleaned texts (hidden states of every layer included)."""
        s = self.spec
        length: int = s.max_length or cast(Any, self.backbone).config.max_position_embeddings
        full = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        if max(full) > length:
            log.warning("%s: a prompt of %d tokens is cut to %d (%s's limit)", s.kind, max(full), length, s.kind)
        tok = self.tokenizer(texts, padding="max_length" if s.pad_to_max else True, truncation=True,
                             max_length=length, return_tensors="pt")
        device = next(self.backbone.parameters()).device
        tok = {k: v.to(device) for k, v in tok.items()}
        kwargs: dict[str, Any] = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
                                  "output_hidden_states": True}
        if s.positions_from_token_types:
            kwargs["position_ids"] = torch.zeros_like(tok["input_ids"])
        return tok, self.backbone(**kwargs)

    def forward(self, texts: list[str]) -> Tensor:
        s = self.spec
        cleaned = self._clean(texts)
        if s.pooling == "medclip" and len(cleaned) > 1:
            # MedCLIP averages over padding too, so padding texts together would make each embedding
            # depend on the others in the batch: each prompt is encoded on its own (no padding), the
            # same as MedCLIP's own padding for a class whose prompts have one length
            return torch.cat([self.forward([t]) for t in cleaned])
        tok, out = self._run(cleaned)
        if s.pooling == "cls":
            x = out.last_hidden_state[:, 0]
        elif s.pooling == "pooler":
            x = out.pooler_output
        elif s.pooling == "last4":
            mask = tok["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
            x = (torch.stack(out.hidden_states[-4:]).sum(0) * mask).sum(1)
        else:  # medclip
            hs = out.hidden_states
            x = torch.stack([hs[1], hs[2], hs[-1]]).mean(2).mean(0)
        return self.head(x)

    def words(self, texts: list[str]) -> tuple[Tensor, list[int]]:
        """GLoRIA's word features (models/text_model.py): the last 4 layers summed, word pieces summed
        into words, [CLS] first, [SEP] last, zeros after: [N, max_length, D]; and each prompt's
        ``cap_len`` as gloria_model.py computes it, the number of characters of the cleaned text that
        are not ``[`` (characters, not words: GLoRIA's code counts them so, and its local score uses
        that many word slots after [CLS], zeros included)."""
        cleaned = self._clean(texts)
        tok, out = self._run(cleaned)
        h = torch.stack(out.hidden_states[-4:]).sum(0)
        words = torch.zeros_like(h)
        for i, ids in enumerate(tok["input_ids"].tolist()):
            agg: list[Tensor] = []
            for j, piece in enumerate(self.tokenizer.convert_ids_to_tokens(ids)):
                if piece == self.tokenizer.sep_token:
                    agg.append(h[i, j])
                    break
                if piece.startswith("##") and agg:
                    agg[-1] = agg[-1] + h[i, j]
                else:
                    agg.append(h[i, j])
            words[i, :len(agg)] = torch.stack(agg)
        return words, [len(t) - t.count("[") for t in cleaned]


def _backbone(spec: PeerText, folder: Path, state: dict[str, Tensor], path: Path) -> tuple[nn.Module, Any]:
    """The text backbone with the weights under ``spec.text_prefix`` in ``state`` (read from ``path``),
    and its tokenizer; every tensor checked."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel  # type: ignore[attr-defined]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    weights = _take(state, spec.text_prefix)
    where = f"{path} ({spec.text_prefix}.*)"
    import json

    raw = json.loads((folder / "config.json").read_text(encoding="utf-8")) if (folder / "config.json").is_file() else {}
    if raw.get("model_type") == "cxr-bert":  # BioViL's and M-FLAG's CXR-BERT: read as the BERT it is, no remote code
        raw.pop("model_type")
        config = BertConfig(**raw)
        model: nn.Module = BertModel(config, add_pooling_layer=spec.text_pooler)
    else:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if spec.kind == "mgca":                                    # med.py: 6 layers, text mode only
            layers = {int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer.")}
            config.num_hidden_layers = max(layers) + 1 if layers else config.num_hidden_layers
            weights = {k: v for k, v in weights.items() if ".crossattention." not in k}
        model = AutoModel.from_config(config, add_pooling_layer=spec.text_pooler)
    if not weights:
        raise CheckpointError(f"{spec.kind}: no text weights in {where}")
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}  # old HF buffer (issue #37)
    expected = model.state_dict()
    expected_names = {k for k in expected if not k.endswith("position_ids")}
    if spec.positions_from_token_types and "embeddings.token_type_embeddings.weight" not in weights:
        weights["embeddings.token_type_embeddings.weight"] = torch.zeros_like(
            expected["embeddings.token_type_embeddings.weight"])        # med.py has no token-type table
    missing = sorted(expected_names - set(weights))
    unexpected = sorted(set(weights) - expected_names)
    bad = [k for k in weights if k in expected and weights[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        first = (missing or unexpected or bad)[0]
        raise CheckpointError(f"{spec.kind}: the text weights in {where} do not fit {folder.name}'s "
                              f"architecture: {len(missing)} missing, {len(unexpected)} unexpected, {len(bad)} "
                              f"of another shape; first: {first!r}")
    model.load_state_dict({**expected, **weights})
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError):                       # CXR-BERT names a custom tokenizer class
        from transformers import BertTokenizerFast  # type: ignore[attr-defined]

        tokenizer = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    check_tokenizer(tokenizer, weights["embeddings.word_embeddings.weight"].shape[0], f"{spec.kind}: {folder}")
    return model.eval(), tokenizer


def _out_dim(head: nn.Module, width: int, what: str, where: Path, kind: str) -> int:
    """The head's output size for ``width`` inputs, or a CheckpointError naming the head (checked at
    load time, not at the first image)."""
    try:
        with torch.no_grad():
            return int(head.eval()(torch.zeros(2, width)).shape[-1])
    except RuntimeError as err:
        raise CheckpointError(f"{kind}: {where}: the {what} does not take the {width}-wide features it is "
                              f"given ({' '.join(str(err).split())[:120]})") from None


# ------------------------------------------------------------------------------------ model


class PeerVLModel(nn.Module):
    """A peer's image-text model with G2D's zero-shot interface (all in eval mode, no gradients).

    :ivar logit_scale: log of the similarity scale (``.exp()`` multiplies cosines); the peer's own
        where it has one (MedCLIP's learnt value, MGCA 1/0.07, ConVIRT 1/0.1), else 1/0.07. Zero-shot
        AUROC does not depend on it.
    """

    def __init__(self, spec: PeerText, encoder: PeerEncoder, image_head: nn.Module, dense_head: nn.Module,
                 text: PeerTextTower, logit_scale: float, report: dict[str, Any], peer_kind: PeerKind):
        super().__init__()
        self.spec, self.image_encoder, self.image_head, self.dense_head, self.text = (
            spec, encoder, image_head, dense_head, text)
        self.peer_kind = peer_kind  # the encoder's layout and input pipeline (benchx: resolved per file)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)), requires_grad=False)
        self.report = report
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _features(self, images: Tensor, where: str) -> list[Tensor]:
        images = as_model_input(images, f"{self.spec.kind} {where}")  # [0, 1]; uint8 / 255
        return self.image_encoder(global_input(images, self.peer_kind.global_input))

    @torch.no_grad()
    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """[B, 1 or 3, H, W] in [0, 1] -> [B, d] (the peer's normalisation is applied inside)."""
        grid = self._features(images, "encode_image")[-1]
        emb = (_per_vector(self.image_head, grid).mean((1, 2)) if self.spec.image_head_on_grid
               else self.image_head(grid.mean((2, 3))))
        return F.normalize(emb, dim=-1) if normalize else emb

    @torch.no_grad()
    def dense_embeddings(self, images: Tensor, normalize: bool = True) -> Tensor:
        """[B, 1 or 3, H, W] -> [B, h, w, d]: each cell of the grounding stage through the dense head."""
        pix = _per_vector(self.dense_head, self._features(images, "dense_embeddings")[self.spec.dense_stage])
        return F.normalize(pix, dim=-1) if normalize else pix

    @property
    def scores_pairs(self) -> bool:
        """Zero-shot uses :meth:`similarity` (GLoRIA) rather than the cosine of the embeddings."""
        return self.spec.local_score

    @torch.no_grad()
    def similarity(self, images: Tensor, texts: list[str]) -> Tensor:
        """GLoRIA's zero-shot similarity (gloria.py, models/gloria_model.py): the mean of the global cosine
        and the local score, 5 x the best word's cosine with its attention-weighted layer-3 context
        (attention: softmax over words, x 4, softmax over regions; loss/gloria_loss.py).

        :param images: [B, 1 or 3, H, W] in [0, 1]. :param texts: P prompts. :return: [B, P].
        """
        feats = self._features(images, "similarity")
        words, cap_lens = self.text.words(texts)
        # the sentence is the sum of the word slots ([CLS]..[SEP], zeros after): one text pass for both
        sent = self.text.head(words.sum(1))
        glob = F.normalize(self.image_head(feats[-1].mean((2, 3))), dim=-1) @ F.normalize(sent, dim=-1).T
        regions = _per_vector(self.dense_head, feats[self.spec.dense_stage]).flatten(1, 2)     # [B, S, D]
        local = []
        for p, n in enumerate(cap_lens):
            w = words[p, 1:n + 1]                                                               # [n, D]
            attn = (regions @ w.T).softmax(-1)                                                  # [B, S, n]
            attn = (attn.transpose(1, 2) * 4.0).softmax(-1)                                     # [B, n, S]
            ctx = attn @ regions                                                                # [B, n, D]
            cos = (ctx * w).sum(-1) / (ctx.norm(dim=-1) * w.norm(dim=-1)).clamp_min(1e-8)
            local.append(5.0 * cos.max(1).values)         # log(max_w exp(5 cos)), as gloria_model.py
        return (glob + torch.stack(local, 1)) / 2

    @torch.no_grad()
    def encode_text(self, texts: list[str], normalize: bool = True) -> Tensor:
        """list of N prompts -> [N, d]."""
        emb = self.text(list(texts))
        return F.normalize(emb, dim=-1) if normalize else emb


def load_peer_vl_model(kind_name: str, path: str | Path, text_model: str | None = None,
                       trust_pickle: bool = False) -> PeerVLModel:
    """A peer's image-text model for cosine zero-shot and grounding.

    :param kind_name: ``biovil``, ``mgca``, ``gloria``, ``convirt``, ``medclip`` or ``benchx`` (the file's
        method, :func:`g2d.peers.resolve_kind`: MGCA, GLoRIA, ConVIRT, MedCLIP or M-FLAG).
    :param path: the peer's checkpoint (BioViL: its image file).
    :param text_model: hub name (``NAME@REV``) or local folder of the text model (default:
        :attr:`PeerText.text_model`): config and tokenizer, and BioViL's text weights.
    :raises ConfigError: a kind whose zero-shot is not an image-text cosine (MedKLIP, KAD, PRIOR,
        torchxrayvision, the G2D release), with the reason.
    :raises CheckpointError: weights that do not fit, naming the first key.
    :raises OSError: a text model that cannot be found (offline and not cached).
    """
    path = Path(path)
    if kind_name not in PEER_KINDS:
        raise ConfigError(f"{kind_name}: not a peer kind; peers with an image-text model: "
                          f"{', '.join(sorted(PEER_TEXT))}, benchx; see docs/peers.md")
    # a BenchX file is read first: its method decides the layout
    state = read_peer_state(kind_name, path, trust_pickle) if kind_name == "benchx" else {}
    peer_kind, method = resolve_kind(kind_name, state, path)
    layout = peer_kind.name.removeprefix("benchx-")
    if layout not in PEER_TEXT:
        raise ConfigError(f"{kind_name}{f' ({method})' if method else ''}: no image-text model g2d can build "
                          f"({peer_kind.zero_shot}), which zero-shot classification and grounding need; peers "
                          f"with one: {', '.join(sorted(PEER_TEXT))} and BenchX's files of them; see docs/peers.md")
    spec = PEER_TEXT[layout]
    state = state or read_peer_state(kind_name, path, trust_pickle)
    encoder, report = load_peer_encoder(kind_name, path, state=state)
    kind_name = layout  # heads and messages in the method's layout
    image_head = _head(kind_name, spec.image_head, _take(state, spec.image_head), path)
    dense_head = (image_head if spec.dense_head == spec.image_head
                  else _head(kind_name, spec.dense_head, _take(state, spec.dense_head), path))
    folder = _text_folder(text_model or spec.text_model, weights=spec.text_in_folder)
    text_state = _read_weights(folder) if spec.text_in_folder else state
    backbone, tokenizer = _backbone(spec, folder, text_state, folder if spec.text_in_folder else path)
    if spec.kind == "biovil":
        text_head = _biovil_text_head(_take(text_state, spec.text_head), folder)
    elif spec.text_head:
        text_head = _head(kind_name, spec.text_head, _take(state, spec.text_head), path)
    else:
        text_head = nn.Identity()
    if spec.logit_scale is None:
        if "logit_scale" not in state or not torch.isfinite(state["logit_scale"]).all():
            raise CheckpointError(f"{kind_name}: {path} has no finite logit_scale")
        scale = math.exp(float(state["logit_scale"].clamp(0, math.log(100))))
    else:
        scale = spec.logit_scale
    # every head fits its input and the two towers meet in one space
    dense_width = encoder.channels[spec.dense_stage]
    d_image = _out_dim(image_head, encoder.channels[-1], f"image head ({spec.image_head})", path, kind_name)
    _out_dim(dense_head, dense_width, f"grounding head ({spec.dense_head})", path, kind_name)
    d_text = _out_dim(text_head, int(cast(Any, backbone).config.hidden_size), "text head", path, kind_name)
    if d_image != d_text:
        raise CheckpointError(f"{kind_name}: {path}: image embeddings have {d_image} dimensions, text embeddings "
                              f"{d_text}: not one joint space")
    text = PeerTextTower(spec, backbone, text_head, tokenizer)
    log.info("%s: image %s + text %s (%s pooling)", kind_name, path, folder, spec.pooling)
    return PeerVLModel(spec, encoder, image_head, dense_head, text, scale,
                       {**report, "text_model": str(folder), "text_pooling": spec.pooling,
                        "not_reproduced": spec.not_done}, peer_kind)
