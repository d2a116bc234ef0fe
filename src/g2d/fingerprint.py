"""What identifies the inputs of a cached or finished result: files by absolute path, size and
modification time; models by their weight files; labelled sets by every record's image and label
files and label values.

Caches keyed on the *text* of a command-line argument go stale when a user replaces images in place
or runs the same relative ``--data`` from another folder. Every cache and every "finished, reuse it"
check keys on these instead (docs/reliability.md lists each cache, its key and how to clear it).

Size + mtime (not a content hash) because hashing every image of a 100k-image set on each run would
cost more than the work the cache saves; a file rewritten with the same size within the file
system's timestamp resolution would go unnoticed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["file_stamp", "model_identity", "dataset_identity", "digest", "absolute_paths"]


def digest(obj: Any) -> str:
    """A short stable hash of JSON-able data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def absolute_paths(obj: Any) -> Any:
    """``obj`` (JSON-able: dicts, lists, strings) with every string that names an existing file or
    folder made absolute: alone, after a ``KIND:`` prefix (``csv:data/x.csv``, ``mgca:ckpt.pt``) or
    before a ``?query``. Result stores key on this, so ``--out runs/x`` run from ``/work`` and
    ``--out /work/runs/x`` find the same results. Strings that name nothing on disk (``random``,
    ``synthetic:160``, a hub name) are kept as written."""
    if isinstance(obj, dict):
        return {k: absolute_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [absolute_paths(v) for v in obj]
    if not isinstance(obj, str) or not obj or obj.startswith("hf-hub:"):
        return obj
    m = re.fullmatch(r"([a-z][a-z0-9-]+:)?([^?]+)(\?.*)?", obj, flags=re.DOTALL)
    if m is None:
        return obj
    prefix, path, query = m.group(1) or "", m.group(2), m.group(3) or ""
    try:
        if not Path(path).expanduser().exists():
            return obj
    except OSError:  # a name too long for the file system, say
        return obj
    return prefix + str(Path(path).expanduser().resolve()) + query


def file_stamp(path: str | Path) -> list[Any]:
    """``[absolute path, size, mtime_ns]`` of a file; ``[absolute path, None, None]`` when missing."""
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError:
        return [str(p), None, None]
    return [str(p), st.st_size, st.st_mtime_ns]


def model_identity(spec: str) -> str:
    """``random`` / ``imagenet`` as they are; a model path by the stamps of the files
    :func:`g2d.load_model` reads (an export's weights and config, else the run's last checkpoint, or
    the file itself), so retraining into the same folder, or the same relative path elsewhere, is
    another model, while results written into the folder are not. ``hf-hub:ORG/NAME[@REV]``: the
    cached snapshot's files (its folder names the commit, so a new revision is another model); the
    name alone when it is not cached."""
    if spec in ("random", "imagenet"):
        return spec
    if spec.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download

        repo, _, revision = spec[len("hf-hub:"):].partition("@")
        try:
            return model_identity(snapshot_download(repo, revision=revision or None, local_files_only=True))
        except Exception:  # not cached (yet): loading it will say why
            return spec
    kind = re.fullmatch(r"([a-z][a-z0-9-]+):(.+)", spec)  # a peer's KIND:PATH (g2d.peers)
    if kind is not None:
        return digest([kind.group(1), model_identity(kind.group(2))])
    p = Path(spec).expanduser().resolve()
    files = [p]
    if p.is_dir():
        files = [p / "checkpoints" / "last.pt"]
        for export in (p, p / "export"):
            if (export / "model.safetensors").is_file():
                files = [export / "model.safetensors", export / "config.json"]
                break
    return digest([str(p), [file_stamp(q) for q in files]])


def _mask_files(mask: Any) -> list[str]:
    """Paths of the files a mask source reads (FileMask, UnionMask of FileMasks)."""
    if mask is None:
        return []
    if hasattr(mask, "path"):
        return [mask.path]
    return [f for part in getattr(mask, "parts", ()) for f in _mask_files(part)]


def dataset_identity(ds: Any, mask_form: Callable[[Any], Any] | None = None) -> str:
    """Identity of a labelled set's content: per record its id, the image file's stamp, its
    labels, boxes, label space, mask source and the stamps of the mask files it reads. Sets made by
    a generator (``synthetic``) are identified by their name, size and generator settings.
    ``mask_form=repr`` gives the identity stores kept before 2026-12-01, which held the mask files'
    paths as spelled (so the same set named another way was another set)."""
    mask_form = mask_form or _mask_content
    records = getattr(ds, "records", None)
    if records is None:  # generated data: deterministic given its class and configuration
        source = getattr(ds, "source", None)
        cfg = getattr(source, "cfg", None)
        indices = list(getattr(ds, "indices", range(len(ds))))
        picked = [] if indices == list(range(len(ds))) else [indices]  # a re-drawn label subset
        return digest([type(ds).__name__, getattr(ds, "name", ""), len(ds),
                       dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)
                       else repr(cfg), *picked])
    rows = []
    for r in records:
        rows.append([r.id, file_stamp(r.image),
                     None if r.labels is None else np.asarray(r.labels).tolist(),
                     None if r.boxes is None else np.asarray(r.boxes).tolist(),
                     r.label_hw, mask_form(r.mask), [file_stamp(f) for f in _mask_files(r.mask)]])
    return digest([getattr(ds, "name", ""), list(getattr(ds, "tasks", [])), rows])


def _mask_content(mask: Any) -> Any:
    """A mask source without the path and message fields that depend on how the set was named
    (``path`` is covered by the mask files' stamps, ``where`` is a ``file:line`` for messages)."""
    if mask is None or not dataclasses.is_dataclass(mask):
        return None if mask is None else repr(mask)
    out: list[Any] = [type(mask).__name__]
    for f in dataclasses.fields(mask):
        if f.name in ("path", "where"):
            continue
        value = getattr(mask, f.name)
        out.append([_mask_content(p) for p in value] if f.name == "parts" else value)
    return out
