"""The frozen text prefix, computed once per report (``train.text_prefix_store``).

With frozen embeddings the first ``model.text.freeze_layers`` layers of the text tower (9 of
ClinicalBERT's 12 in the ``paper`` preset, 4 of MiniLM's 6 in ``tiny``) are a fixed function of a
report's tokens, yet every epoch recomputes them for every report. The store keeps their output, the
input of the first trainable layer, per report on disk, and the loader hands it to the step with the
tokens (:class:`PrefixCollate`), so only the trainable layers run.

Layout of a store (one folder per identity under the root, so a changed tokenizer, text model,
``max_length``, ``freeze_layers`` or storage dtype never reuses an entry):

- ``<root>/<identity>/index.json``: ``{report key: [chunk, first row, rows]}``; a report's key is the
  digest of its token ids (after truncation), so a changed report is a new entry;
- ``<root>/<identity>/<chunk>.npy``: ``[rows, hidden]`` float16 (or float32) arrays, memory-mapped when
  read: the store is bounded by the disk, not the RAM (MIMIC-CXR, about 220k reports of about 70
  tokens at 768 wide: about 24 GB in float16; docs/benchmarks.md).

Built on first use and extended when new reports appear; written by one process per machine (local
rank 0, atomic files), the other ranks wait and read. A report missing from the index (another run
writing at the same time) makes its batch compute the prefix instead: never a wrong state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from g2d.checkpoint import atomic_write
from g2d.fingerprint import digest
from g2d.model.text_encoder import PREFIX_STATES, ReportTokenizer, TextEncoder

__all__ = ["TextPrefixStore", "PrefixCollate", "prefix_identity", "default_store_root", "STORE_VERSION"]

log = logging.getLogger("g2d.train")

STORE_VERSION = 1
INDEX = "index.json"


def default_store_root() -> Path:
    """``$G2D_CACHE/text-prefix`` (default ``~/.cache/g2d/text-prefix``)."""
    return Path(os.environ.get("G2D_CACHE", Path.home() / ".cache" / "g2d")) / "text-prefix"


def prefix_identity(encoder: TextEncoder, dtype: str, compute: str = "fp32") -> str:
    """What the stored states depend on: the frozen modules' weights (embeddings and the first
    ``freeze_layers`` layers, by value), the tokenizer (class, vocabulary, lower-casing), ``max_length``,
    ``freeze_layers``, the storage dtype and the precision they were computed in (``compute``: the
    training step's autocast, e.g. ``cpu-bf16``, so stored states are the ones the step would compute)."""
    h = hashlib.sha256()
    for module in encoder.prefix_modules:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    tok = encoder.tokenizer
    vocab = sorted(tok.get_vocab().items())
    return digest([STORE_VERSION, type(tok).__name__, vocab, bool(getattr(tok, "do_lower_case", False)),
                   encoder.cfg.max_length, encoder.cfg.freeze_layers, dtype, compute, h.hexdigest()])[:20]


def report_key(ids: Sequence[int]) -> str:
    return hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


class TextPrefixStore:
    """The stored prefix states of one text tower identity (see the module docstring).

    :param folder: ``<root>/<identity>``. Opening reads the index; chunks are memory-mapped lazily
        (in each process that reads them, DataLoader workers included).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.index: dict[str, list[Any]] = {}
        self._chunks: dict[str, np.ndarray] = {}
        self.reload()

    def reload(self) -> None:
        path = self.folder / INDEX
        self.index = json.loads(path.read_text()) if path.is_file() else {}

    def __len__(self) -> int:
        return len(self.index)

    def _chunk(self, name: str) -> np.ndarray:
        if name not in self._chunks:
            self._chunks[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        return self._chunks[name]

    def __getstate__(self) -> dict[str, Any]:  # a worker maps the chunks itself
        return {"folder": self.folder, "index": self.index, "_chunks": {}}

    def states(self, ids: Sequence[int]) -> np.ndarray | None:
        """The stored ``[len(ids), hidden]`` states of one report, or ``None`` when it is not stored."""
        entry = self.index.get(report_key(ids))
        if entry is None:
            return None
        name, start, rows = entry
        return self._chunk(name)[start:start + rows]

    def add(self, encoder: TextEncoder, texts: Sequence[str], dtype: str = "float16", batch_size: int = 64,
            progress: bool = False, autocast: Callable[[], Any] = contextlib.nullcontext) -> int:
        """Compute and write the states of the reports of ``texts`` not stored yet (one new chunk, then
        the merged index, both written atomically), under ``autocast()`` (the training step's, so the
        states are those the step would compute). Returns the number of reports added."""
        missing: dict[str, list[int]] = {}
        for i in range(0, len(texts), 1024):
            enc = encoder.tokenizer(list(texts[i:i + 1024]), truncation=True, max_length=encoder.cfg.max_length)
            for ids in enc["input_ids"]:
                key = report_key(ids)
                if key not in self.index:
                    missing.setdefault(key, ids)
        if not missing:
            return 0
        from tqdm.auto import tqdm

        device = next(encoder.parameters()).device
        keys = sorted(missing, key=lambda k: len(missing[k]))  # batches of similar length: little padding
        token_types = "token_type_ids" in getattr(encoder.tokenizer, "model_input_names", ())
        parts, entries, row = [], {}, 0
        chunk = digest(keys)[:16]
        was_training = encoder.training
        encoder.eval()
        try:
            for i in tqdm(range(0, len(keys), batch_size), desc="text prefix store", disable=not progress,
                          leave=False):
                batch_keys = keys[i:i + batch_size]
                ids_list = [missing[k] for k in batch_keys]
                with autocast():
                    states = encoder.prefix_states(_padded(ids_list, token_types, device)).float().cpu().numpy()
                for j, (k, ids) in enumerate(zip(batch_keys, ids_list)):
                    parts.append(states[j, :len(ids)].astype(dtype))
                    entries[k] = [chunk, row, len(ids)]
                    row += len(ids)
        finally:
            encoder.train(was_training)
        self.folder.mkdir(parents=True, exist_ok=True)
        data = np.concatenate(parts)
        atomic_write(self.folder / f"{chunk}.npy", lambda tmp: _save_npy(tmp, data))
        self.reload()  # another writer may have added entries meanwhile: merge, never drop
        merged = {**self.index, **entries}
        atomic_write(self.folder / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(merged)))
        self.index = merged
        log.info("text prefix store %s: %d reports added (%d stored, %.1f MB)", self.folder, len(entries),
                 len(merged), data.nbytes / 2**20)
        return len(entries)

    def batch_states(self, tokens: dict[str, Any]) -> Tensor | None:
        """``[B, L, hidden]`` stored states for right-padded ``tokens`` (zeros at padding), or ``None``
        when a report of the batch is not stored."""
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        rows = []
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            s = self.states(ids[b, :n].tolist())
            if s is None:
                return None
            rows.append(s)
        out = torch.zeros(ids.shape[0], ids.shape[1], rows[0].shape[1], dtype=torch.float32)
        for b, s in enumerate(rows):
            out[b, :len(s)] = torch.from_numpy(np.array(s, dtype=np.float32))  # a copy out of the memory map
        return out


def _padded(ids_list: list[list[int]], token_types: bool, device: torch.device) -> dict[str, Tensor]:
    """Right-padded model inputs of exactly these token ids (a report's key is of its ids)."""
    n = max(len(ids) for ids in ids_list)
    input_ids = torch.zeros(len(ids_list), n, dtype=torch.long)
    mask = torch.zeros(len(ids_list), n, dtype=torch.long)
    for b, ids in enumerate(ids_list):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        mask[b, :len(ids)] = 1
    out = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    if token_types:
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
    return out


def _save_npy(path: Path, data: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, data)


class PrefixCollate:
    """A pre-training collate function that also tokenizes the batch's reports and attaches their
    stored prefix states (``batch["tokens"]``, with :data:`~g2d.model.text_encoder.PREFIX_STATES` when
    every report of the batch is stored), in the DataLoader's workers."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]], tokenize: ReportTokenizer,
                 store: TextPrefixStore | None) -> None:
        self.collate, self.tokenize, self.store = collate, tokenize, store

    def __call__(self, samples: list[Any]) -> dict[str, Any]:
        batch = self.collate(samples)
        tokens = self.tokenize(batch["text"])
        if self.store is not None:
            states = self.store.batch_states(tokens)
            if states is not None:
                tokens[PREFIX_STATES] = states
        batch["tokens"] = tokens
        return batch
