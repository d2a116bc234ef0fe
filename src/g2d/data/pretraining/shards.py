"""Image-text store: pre-resized images in WebDataset tar shards plus a seekable index.

Layout of a store folder ``DIR`` (written by :func:`write_shard` + :func:`finalize_store`, e.g. via
``g2d prepare mimic``)::

    DIR/prepare.json                settings the store was built with (checked on resume)
    DIR/shards/<split>-000000.tar   WebDataset shards: <key>.png|.jpg, <key>.txt, <key>.json
    DIR/shards/<split>-000000.json  per-shard sidecar: members and their byte offsets (also the
                                    "shard done" marker that makes preparation resumable)
    DIR/index-<split>.npy           numpy structured array, one row per sample (INDEX_DTYPE)
    DIR/index-<split>.json          shard file names, in shard-number order
    DIR/manifest.csv.gz             one row per stored sample (written last: "store complete")
    DIR/report.json, report.md      what was dropped and why

Two ways to read it:

- :class:`ShardedPairs` (map-style; what ``g2d pretrain --data mimic:DIR`` uses): the index is
  memory-mapped, a sample is read by seeking into its tar at a known offset, so any sample can be
  read in any order. It works with :class:`g2d.train.data.EpochSampler` (disjoint per-rank index
  shards, exact mid-epoch resume) and its memory use does not grow with the dataset (the index is
  paged in by the OS, ~40 bytes a sample; texts are read from the tar, not held in memory).
- :func:`webdataset_pairs` (streaming): a ``webdataset.WebDataset`` pipeline over shard URLs (local
  paths, ``pipe:aws s3 cp ... -``, ``http(s)://``), split by node and by worker, each rank/worker
  reading disjoint shards sequentially. Resume granularity is the epoch (a restarted epoch is
  replayed from its start with a new shard order), which is why the trainer uses the map-style reader.

Images are stored as 8-bit grayscale resized so the shorter side is ``image_size`` (256, paper);
the training/evaluation transform (:mod:`g2d.data.transforms`) does the rest (centre crop 224 and
augmentation) from there, so preprocessing stays defined in one place.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from g2d.data.transforms import ImageTransformCfg, eval_geometry, to_grayscale_float
from g2d.errors import DataError

__all__ = ["INDEX_DTYPE", "STORE_VERSION", "encode_image", "write_shard", "read_sidecar", "finalize_store",
           "ShardedPairs", "shard_urls", "webdataset_pairs", "IMAGE_FORMATS"]

logger = logging.getLogger("g2d.data")

STORE_VERSION = 1
IMAGE_FORMATS = ("png", "jpg")
# Per sample: shard number, byte offset and size of the image and of the text member's data.
INDEX_DTYPE = np.dtype([("shard", "<i4"), ("img_off", "<i8"), ("img_size", "<i4"),
                        ("txt_off", "<i8"), ("txt_size", "<i4")])
_MAX_OPEN = 64  # file handles kept open per process (LRU): bounded however many shards there are


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def encode_image(path: str | os.PathLike, image_size: int = 256, fmt: str = "png",
                 jpeg_quality: int = 95) -> tuple[bytes, tuple[int, int]]:
    """Decode an image once, make it 8-bit grayscale, resize its shorter side to ``image_size``
    (never upscaled) and encode it.

    The target size is :func:`g2d.data.transforms.eval_geometry`'s, so the training transform's own
    resize to ``data.resize == image_size`` is then a no-op. JPEGs are decoded at a reduced DCT scale
    (PIL ``draft``) no smaller than the target, which is several times faster on 2-3k px originals;
    the final resize is PIL's anti-aliased bilinear (the filter torchvision's ``antialias=True`` copies).

    Returns:
        the encoded bytes and the original ``(H, W)``.

    Raises:
        OSError / ValueError / SyntaxError and the other PIL decode errors for a corrupt file.
    """
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {fmt!r}")
    with Image.open(path) as im:
        w0, h0 = im.size
        if min(h0, w0) > image_size:
            g = eval_geometry((h0, w0), ImageTransformCfg(resize=image_size, crop=image_size))
            h, w = g["resized_hw"]
        else:
            h, w = h0, w0
        if im.format == "JPEG" and (h, w) != (h0, w0):
            im.draft("L" if im.mode == "L" else im.mode, (w, h))
        im.load()
        gray: Image.Image
        if im.mode == "L":
            gray = im
        else:  # same conversion as the training transform (alpha, 16-bit, palette, RGB luma)
            arr = to_grayscale_float(im)[0].numpy()
            gray = Image.fromarray(np.round(arr * 255.0).astype(np.uint8), mode="L")
        if gray.size != (w, h):
            gray = gray.resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    if fmt == "png":
        gray.save(buf, format="PNG", compress_level=6)
    else:
        gray.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    return buf.getvalue(), (h0, w0)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # reproducible shards: same inputs, same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, bytes, str, str, dict[str, Any]]],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one WebDataset tar shard and its sidecar ``<path minus .tar>.json``.

    Args:
        path: the ``.tar`` file to write (written to a temporary name and renamed, so a killed run
            never leaves a half shard under the final name).
        samples: ``(key, image_bytes, image_ext, text, meta)``; ``key`` must not contain ``"."``.
        extra: stored in the sidecar as is (e.g. the input hash used to decide whether to redo it,
            and the samples that failed).

    Returns:
        the sidecar dict: ``{"tar": name, "keys": [...], "img": [[off, size]...], "txt": [[off, size]...],
        "ext": [...], **extra}``; offsets are those of the members' data inside the tar.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, ext, text, meta in samples:
            if "." in key or "/" in key:
                raise ValueError(f"shard key {key!r} must not contain '.' or '/' (WebDataset key)")
            _add_member(tar, f"{key}.{ext}", image)
            _add_member(tar, f"{key}.txt", text.encode("utf-8"))
            _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
    # Offsets from tarfile's own reading of the finished file rather than recomputed header sizes.
    keys: list[str] = []
    exts: list[str] = []
    img: list[list[int]] = []
    txt: list[list[int]] = []
    with tarfile.open(tmp, "r") as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            if ext == "txt":
                txt.append([m.offset_data, m.size])
            elif ext in IMAGE_FORMATS:
                keys.append(key)
                exts.append(ext)
                img.append([m.offset_data, m.size])
    side = {"tar": path.name, "keys": keys, "ext": exts, "img": img, "txt": txt, **(extra or {})}
    os.replace(tmp, path)
    sidecar = path.with_suffix(".json")
    tmp_side = sidecar.with_name(sidecar.name + ".tmp")
    tmp_side.write_text(json.dumps(side))
    os.replace(tmp_side, sidecar)  # written last: the shard is done
    return side


def read_sidecar(tar_path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of a finished shard, or ``None`` if the shard or its sidecar is missing/unreadable."""
    tar_path = Path(tar_path)
    sidecar = tar_path.with_suffix(".json")
    if not tar_path.is_file() or not sidecar.is_file():
        return None
    try:
        side = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    ends = [o + s for o, s in side.get("img", []) + side.get("txt", [])]
    if ends and max(ends) > tar_path.stat().st_size:  # truncated tar
        return None
    return side


def finalize_store(root: str | os.PathLike, split: str, tar_names: Sequence[str]) -> np.ndarray:
    """Merge the sidecars of ``tar_names`` (in order) into ``index-<split>.npy`` / ``.json``.

    Returns:
        the index array (``INDEX_DTYPE``, one row per stored sample).
    """
    root = Path(root)
    rows: list[tuple[int, int, int, int, int]] = []
    for k, name in enumerate(tar_names):
        side = read_sidecar(root / "shards" / name)
        if side is None:
            raise DataError(f"{root / 'shards' / name}: shard or its sidecar missing; rerun the preparation")
        for (io_, is_), (to_, ts_) in zip(side["img"], side["txt"]):
            rows.append((k, io_, is_, to_, ts_))
    index = np.array(rows, dtype=INDEX_DTYPE)
    np.save(root / f"index-{split}.npy", index)
    (root / f"index-{split}.json").write_text(json.dumps({"version": STORE_VERSION,
                                                          "shards": list(tar_names)}, indent=1))
    return index


# --------------------------------------------------------------------------------------------------
# Reading: map-style
# --------------------------------------------------------------------------------------------------


class ShardedPairs(torch.utils.data.Dataset):
    """Map-style image-text pairs from a store's ``split``.

    ``dataset[i]`` is ``{"image": FloatTensor [1, S, S], "text": str, "index": int}`` (the layout of
    :class:`g2d.data.pretraining.pairs.ImageTextPairs`, so
    :func:`g2d.data.pretraining.pairs.collate_pairs` applies), the image being
    ``transform(PIL.Image)``; without a transform it is the stored image as float32 ``[1, H, W]`` in [0, 1].

    Memory: the index is memory-mapped and each process keeps at most 64 shard files open, so
    DataLoader workers (fork or spawn) share nothing that grows with the dataset.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transform: Callable[[Image.Image], Tensor] | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        index_file = self.root / f"index-{split}.npy"
        shards_file = self.root / f"index-{split}.json"
        if not index_file.is_file() or not shards_file.is_file():
            raise DataError(f"{self.root}: no prepared '{split}' split (index-{split}.npy missing); "
                            "run `g2d prepare` first")
        self.index = np.load(index_file, mmap_mode="r")
        if self.index.dtype != INDEX_DTYPE:
            raise DataError(f"{index_file}: unexpected index layout {self.index.dtype}")
        meta = json.loads(shards_file.read_text())
        if meta.get("version") != STORE_VERSION:
            raise DataError(f"{shards_file}: store version {meta.get('version')}, expected {STORE_VERSION}")
        self.shards: list[str] = meta["shards"]
        if len(self.index) == 0:
            raise DataError(f"{self.root}: the '{split}' split holds no samples")
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:  # spawn workers reopen their own files
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        state["index"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.index = np.load(self.root / f"index-{self.split}.npy", mmap_mode="r")

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if os.getpid() != self._pid:  # forked worker: never share a file position with the parent
            self._files = OrderedDict()
            self._pid = os.getpid()
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= _MAX_OPEN:
                self._files.popitem(last=False)[1].close()
            f = open(self.root / "shards" / self.shards[shard], "rb")
            self._files[shard] = f
        else:
            self._files.move_to_end(shard)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise DataError(f"{self.shards[shard]}: truncated at byte {offset} (store damaged; re-prepare)")
        return data

    def text(self, i: int) -> str:
        """Text of sample ``i`` (read from its shard; no image decoding)."""
        r = self.index[i]
        return self._read(int(r["shard"]), int(r["txt_off"]), int(r["txt_size"])).decode("utf-8")

    def image(self, i: int) -> Image.Image:
        """The stored (resized, 8-bit grayscale) image of sample ``i``, decoded."""
        r = self.index[i]
        data = self._read(int(r["shard"]), int(r["img_off"]), int(r["img_size"]))
        try:
            im = Image.open(io.BytesIO(data))
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{self.shards[int(r['shard'])]}: sample {i} does not decode ({e}); "
                            "the store is damaged, re-prepare it") from None
        return im

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        i %= n
        im = self.image(i)
        image = self.transform(im) if self.transform is not None else to_grayscale_float(im)
        return {"image": image, "text": self.text(i), "index": i}


# --------------------------------------------------------------------------------------------------
# Reading: streaming
# --------------------------------------------------------------------------------------------------


def shard_urls(root: str | os.PathLike, split: str = "train", base_url: str | None = None) -> list[str]:
    """Shard locations of a store's split: local paths, or ``base_url + "/" + name`` (e.g.
    ``"pipe:aws s3 cp s3://bucket/store/shards"`` is not a URL prefix; use ``"https://host/store/shards"``
    or build ``pipe:`` URLs from the returned names yourself)."""
    meta = json.loads((Path(root) / f"index-{split}.json").read_text())
    if base_url is None:
        return [str(Path(root) / "shards" / n) for n in meta["shards"]]
    return [f"{base_url.rstrip('/')}/{n}" for n in meta["shards"]]


def _to_sample(transform: Callable[[Image.Image], Tensor] | None):
    def convert(sample: dict[str, Any]) -> dict[str, Any]:
        ext = "png" if "png" in sample else "jpg"
        im = Image.open(io.BytesIO(sample[ext]))
        im.load()
        image = transform(im) if transform is not None else to_grayscale_float(im)
        return {"image": image, "text": sample["txt"].decode("utf-8"), "key": sample["__key__"]}
    return convert


def webdataset_pairs(urls: str | Sequence[str], transform: Callable[[Image.Image], Tensor] | None = None,
                     shuffle: int = 1000, seed: int = 0) -> torch.utils.data.IterableDataset:
    """Streaming reader of store shards with the ``webdataset`` library.

    Shards are split across ranks (``webdataset.split_by_node``, from ``torch.distributed``) and then
    across DataLoader workers (``split_by_worker``), so every rank/worker reads disjoint shards; give
    at least ``world_size * num_workers`` shards. Shard order is shuffled per epoch with ``seed`` and
    samples in a ``shuffle``-sized buffer (0: no shuffling). Yields
    ``{"image": [1, S, S], "text": str, "key": str}``. Resume granularity: the epoch.
    """
    import webdataset as wds

    urls = [urls] if isinstance(urls, str) else list(urls)
    # detshuffle: the shard order depends on (seed, epoch) only, the same on every restart.
    ds = wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, detshuffle=True, seed=seed,
                        nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                        empty_check=False)
    if shuffle:
        ds = ds.shuffle(shuffle)
    return ds.map(_to_sample(transform))
