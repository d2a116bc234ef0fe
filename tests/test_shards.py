"""The image-text store: encoding, tar shards + index, map-style and streaming readers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from g2d.data.pretraining.pairs import collate_pairs
from g2d.data.pretraining.shards import (
    INDEX_DTYPE,
    ShardedPairs,
    encode_image,
    finalize_store,
    read_sidecar,
    shard_urls,
    webdataset_pairs,
    write_shard,
)
from g2d.data.transforms import ImageTransformCfg, build_transform, eval_geometry
from g2d.errors import DataError


def _png(tmp: Path, name: str, arr: np.ndarray, mode: str | None = None) -> Path:
    p = tmp / name
    Image.fromarray(arr, mode).save(p)
    return p


def _smooth(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((np.sin(y / 7.0) * np.cos(x / 5.0) + 1) * 127).astype(np.uint8)


def test_encode_image_resizes_shorter_side_like_the_transform(tmp_path: Path) -> None:
    src = _png(tmp_path, "a.png", _smooth(90, 150))
    data, orig = encode_image(src, image_size=32, fmt="png")
    im = Image.open(io.BytesIO(data))
    assert orig == (90, 150) and im.mode == "L"
    assert (im.height, im.width) == eval_geometry((90, 150), ImageTransformCfg(resize=32, crop=32))["resized_hw"]
    # the stored image then goes through the shared transform; the result matches the transform on
    # the original up to 8-bit rounding and resampling order
    tf = build_transform(ImageTransformCfg(resize=32, crop=32, augment="none"), train=False)
    a, b = tf(im), tf(Image.open(src))
    assert a.shape == b.shape == (1, 32, 32) and (a - b).abs().mean() < 2 / 255
    # never upscaled; lossless when not resized
    small = _smooth(20, 24)
    data, orig = encode_image(_png(tmp_path, "s.png", small), image_size=32)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), small)


def test_encode_image_converts_modes_and_formats(tmp_path: Path) -> None:
    rgb = np.stack([_smooth(40, 40)] * 3, axis=-1)
    data, _ = encode_image(_png(tmp_path, "rgb.png", rgb), image_size=32, fmt="jpg")
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and im.mode == "L" and im.size == (32, 32)
    sixteen = (_smooth(40, 40).astype(np.uint16) * 200)
    data, _ = encode_image(_png(tmp_path, "16.png", sixteen), image_size=32)
    arr = np.asarray(Image.open(io.BytesIO(data)))
    assert arr.dtype == np.uint8 and arr.max() >= 250  # scaled by its real range, as the transform does
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(OSError):
        encode_image(tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match="format"):
        encode_image(tmp_path / "bad.jpg", fmt="webp")


def _store(root: Path, n: int = 10, per_shard: int = 4, size: int = 40) -> list[tuple[str, bytes, str]]:
    """A store of ``n`` random images in shards of ``per_shard``; returns (key, png bytes, text)."""
    (root / "shards").mkdir(parents=True)
    rng = np.random.default_rng(1)
    samples, names = [], []
    for k in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random((size, size + k)) * 255).astype(np.uint8), "L").save(buf, format="PNG")
        samples.append((f"key{k:04d}", buf.getvalue(), f"report number {k} with unicode \u00e9"))
    for s in range(0, n, per_shard):
        name = f"train-{s // per_shard:06d}.tar"
        names.append(name)
        write_shard(root / "shards" / name, [(key, img, "png", text, {"k": key})
                                              for key, img, text in samples[s:s + per_shard]])
    finalize_store(root, "train", names)
    return samples


def test_shards_are_plain_webdataset_tars_and_index_seeks(tmp_path: Path) -> None:
    samples = _store(tmp_path)
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as tar:
        assert tar.getnames()[:3] == ["key0000.png", "key0000.txt", "key0000.json"]
    index = np.load(tmp_path / "index-train.npy")
    assert index.dtype == INDEX_DTYPE and len(index) == 10 and list(index["shard"]) == [0] * 4 + [1] * 4 + [2] * 2
    ds = ShardedPairs(tmp_path, "train")
    for i in (9, 0, 5, 3):  # any order
        key, png, text = samples[i]
        assert ds.text(i) == text
        np.testing.assert_array_equal(np.asarray(ds.image(i)), np.asarray(Image.open(io.BytesIO(png))))
    item = ds[-1]
    assert item["index"] == 9 and item["image"].shape == (1, 40, 49) and item["image"].dtype == torch.float32
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(ValueError, match="must not contain"):
        write_shard(tmp_path / "x.tar", [("a.b", b"", "png", "", {})])


def test_dataloader_workers_read_the_same_samples(tmp_path: Path) -> None:
    _store(tmp_path)
    tf = build_transform(ImageTransformCfg(resize=40, crop=32, augment="none"), train=False)
    ds = ShardedPairs(tmp_path, "train", transform=tf)
    ds[0]  # parent opens a file handle before forking: workers must not share its position
    serial = list(DataLoader(ds, batch_size=3, collate_fn=collate_pairs))
    forked = list(DataLoader(ds, batch_size=3, collate_fn=collate_pairs, num_workers=2))
    assert [b["text"] for b in serial] == [b["text"] for b in forked]
    for a, b in zip(serial, forked):
        torch.testing.assert_close(a["image"], b["image"])
    assert serial[0]["image"].shape == (3, 1, 32, 32)


def test_damaged_store_is_detected(tmp_path: Path) -> None:
    _store(tmp_path)
    tar = tmp_path / "shards" / "train-000001.tar"
    assert read_sidecar(tar) is not None
    tar.write_bytes(tar.read_bytes()[:1000])
    assert read_sidecar(tar) is None  # truncated: the preparation redoes it
    with pytest.raises(DataError, match="truncated"):
        ShardedPairs(tmp_path, "train").text(5)
    with pytest.raises(DataError, match="no prepared 'test' split"):
        ShardedPairs(tmp_path, "test")


def test_streaming_reader_splits_shards_over_workers(tmp_path: Path) -> None:
    samples = _store(tmp_path, n=12, per_shard=3)
    urls = shard_urls(tmp_path, "train")
    assert len(urls) == 4 and urls[0].endswith("train-000000.tar")
    assert shard_urls(tmp_path, "train", "https://host/store/shards/")[1] == "https://host/store/shards/train-000001.tar"
    ds = webdataset_pairs(urls, shuffle=0)
    seen = [s["key"] for s in ds]
    assert seen == [k for k, _, _ in samples]  # one process: every shard once, in order
    loader = DataLoader(webdataset_pairs(urls, shuffle=5, seed=3), batch_size=None, num_workers=2)
    keys = [s["key"] for s in loader]
    assert sorted(keys) == sorted(seen)  # two workers: disjoint shards, every sample exactly once
    first = next(iter(webdataset_pairs(urls, shuffle=0)))
    assert first["text"] == samples[0][2] and first["image"].shape == (1, 40, 40)
