"""Pre-training data: dataset from a spec, a resumable distributed sampler, per-sample seeding."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from g2d.config import G2DConfig, pretrain_source
from g2d.errors import DataError


def build_pretrain_dataset(cfg: G2DConfig, train: bool = True) -> Any:
    """The image-text dataset named by ``cfg.data.spec`` (:func:`g2d.config.pretrain_source`): "synthetic",
    "csv:FILE[?options]" (an image-text table) or "mimic:DIR" (a store written by ``g2d prepare mimic``;
    its ``train`` split).

    :raises DataError: a table or store that cannot be used (missing file, column, too many bad rows).

    :return: a sized map-style dataset of ``{"image", "text"}`` samples (``SyntheticCXR``, in
        :class:`g2d.data.synthetic.KeptRenders` unless ``data.synthetic_cache_mb`` is 0; ``ImageTextPairs`` or
        ``ShardedPairs``, which also report bad images).
    """
    data, size = cfg.data, cfg.model.image_size
    source = pretrain_source(data)
    if source.kind == "synthetic":
        from g2d.data.synthetic import KeptRenders, SyntheticCXR, SyntheticCXRCfg

        synthetic = SyntheticCXR(SyntheticCXRCfg(num_samples=data.synthetic_samples, image_size=size,
                                                 seed=data.synthetic_seed))
        if not data.synthetic_cache_mb:
            return synthetic
        # pre-training reads nothing else (g2d.data.pretraining.pairs.collate_pairs)
        return KeptRenders(synthetic, ("image", "text", "index"), data.synthetic_cache_mb)
    from g2d.data.pretraining.pairs import ImageTextPairs, PairsCfg
    from g2d.data.transforms import ImageTransformCfg, build_transform

    tf = build_transform(ImageTransformCfg(resize=data.resize, crop=size, augment=data.augment), train)
    if source.kind == "mimic":
        from g2d.data.pretraining.shards import ShardedPairs

        return ShardedPairs(source.path, split="train", transform=tf)
    try:
        return ImageTextPairs(PairsCfg(path=source.path, image_col=source.image_col, text_col=source.text_col,
                                       image_dir=source.image_dir, split_col=source.split_col, split=source.split,
                                       delimiter=source.delimiter, max_skip_fraction=data.max_skip_fraction), tf)
    except DataError as err:  # the message says which setting named the table
        raise DataError(f"data.spec: {err}") from None


def dataset_texts(dataset: Any) -> list[str]:
    """All report texts of a pre-training dataset (to build the tiny preset's vocabulary)."""
    if callable(getattr(dataset, "text", None)):  # ImageTextPairs, ShardedPairs: no image decoding
        return [dataset.text(i) for i in range(len(dataset))]
    return [dataset[i]["text"] for i in range(len(dataset))]


class EpochSampler(Sampler):
    """Like ``DistributedSampler`` (disjoint per-rank shards of a per-epoch permutation, padded to
    equal length), but yields ``(epoch, index)`` so the dataset can seed each sample's augmentation
    from them, and can start mid-epoch after a resume without loading the skipped samples.
    """

    def __init__(self, size: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.size, self.rank, self.world, self.seed, self.shuffle = size, rank, world_size, seed, shuffle
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(size / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation; skip this rank's first ``start`` samples."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        order += order[: self.per_rank * self.world - self.size]
        mine = order[self.rank:: self.world][self.start:]
        return iter([(self.epoch, i) for i in mine])

    def __len__(self) -> int:
        return self.per_rank - self.start


class SeededSamples(Dataset):
    """Wrap a dataset so sample ``i`` of epoch ``e`` draws its random augmentation from a generator
    seeded by (seed, e, i): identical across worker counts, ranks and resumes."""

    def __init__(self, dataset: Any, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]
