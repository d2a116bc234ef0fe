"""Open a labelled set from a ``--data`` spec: ``NAME:PATH`` for public sets, ``csv:FILE``, ``synthetic``.

Specs (``PATH`` is the set's downloaded folder, laid out as published):

=================  ==========================================================================
``siim:DIR``       SIIM-ACR pneumothorax (``train-rle.csv`` + DICOMs or PNGs)
``rsna:DIR``       RSNA pneumonia (``stage_2_train_labels.csv`` + DICOMs)
``object-cxr:DIR`` Object-CXR (``train.csv``, ``dev.csv`` + images)
``chexpert:DIR``   CheXpert (``train.csv``, ``valid.csv``)
``cxr14:DIR``      ChestX-ray14 (``Data_Entry_2017*.csv``, ``train_val_list.txt``, ``test_list.txt``)
``covidx:DIR``     COVIDx (label ``.txt`` files)
``ms-cxr:DIR``     MS-CXR phrase grounding (``MS_CXR_Local_Alignment_v*.csv``; ``?images=`` MIMIC-CXR-JPG)
``chexlocalize:DIR`` CheXlocalize (``gt_segmentations_{val,test}.json``; ``?images=`` CheXpert)
``vindr:DIR``      VinDr-CXR (``annotations/*.csv`` + DICOMs; ``?readers=all|majority&unit=finding|image``)
``csv:FILE``       any table: ``image`` + optional ``mask``, ``boxes``, ``split`` and label columns
``synthetic[:N]``  the embedded synthetic set (N training images, default 256)
=================  ==========================================================================

Public sets use the split tables shipped in :mod:`g2d.data.labelled.splits`, or the splits the
dataset itself defines (MS-CXR's ``split`` column, CheXlocalize's val/test files, VinDr's train/test);
``csv:`` tables use their ``split`` column, or else a seeded 70/15/15 split by patient (or image) id.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from g2d.data.labelled.dataset import LabelledCXR, Record, SkipLog
from g2d.data.labelled.splits import (
    SPLITS,
    check_fraction,
    check_subset,
    fraction_count,
    load_order,
    load_split,
    order_ranks,
    rank_groups,
    rank_train,
    split_ids,
    subset_ranks,
)
from g2d.data.transforms import ImageTransformCfg
from g2d.data_spec import split_spec
from g2d.errors import DataError

__all__ = ["READERS", "open_dataset", "parse_spec", "with_options", "SyntheticLabelled", "assign_random_split"]

log = logging.getLogger("g2d.data")

# name -> "module:function"; each reader is ``read(path: Path, **opts) -> (records, tasks, SkipLog)``
# and each module names its shipped split table in ``SPLIT_TABLE`` (None: the records carry splits) and,
# optionally, an order table in ``ORDER_TABLE`` that ranks the training ids for the label fractions.
READERS: dict[str, str] = {
    "siim": "g2d.data.labelled.siim:read_siim",
    "rsna": "g2d.data.labelled.rsna:read_rsna",
    "object-cxr": "g2d.data.labelled.object_cxr:read_object_cxr",
    "chexpert": "g2d.data.labelled.chexpert:read_chexpert",
    "cxr14": "g2d.data.labelled.cxr14:read_cxr14",
    "covidx": "g2d.data.labelled.covidx:read_covidx",
    "ms-cxr": "g2d.data.labelled.ms_cxr:read_ms_cxr",
    "chexlocalize": "g2d.data.labelled.chexlocalize:read_chexlocalize",
    "vindr": "g2d.data.labelled.vindr:read_vindr",
    "csv": "g2d.data.labelled.csv_table:read_labelled_csv",
}


def assign_random_split(records: list[Record], seed: int = 0,
                        shares: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> dict[str, str]:
    """Seeded train/val/test assignment by patient (or image id when a record has no patient)."""
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(r.patient or r.id, []).append(r.id)
    keys = sorted(groups)
    order = [keys[j] for j in np.random.default_rng(seed).permutation(len(keys))]
    n_val = round(shares[1] * len(keys))
    n_test = round(shares[2] * len(keys))
    out: dict[str, str] = {}
    for k, g in enumerate(order):
        s = "val" if k < n_val else "test" if k < n_val + n_test else "train"
        for i in groups[g]:
            out[i] = s
    return out


def _reader(name: str):
    if name not in READERS:
        raise DataError(f"unknown data set {name!r}; use one of {sorted(READERS)} or 'synthetic'")
    mod_name, fn = READERS[name].split(":")
    mod = importlib.import_module(mod_name)
    return getattr(mod, fn), getattr(mod, "SPLIT_TABLE", None), getattr(mod, "ORDER_TABLE", None)


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``NAME:PATH[?key=value&key=value]`` -> ``(name, path, reader options)``.

    The options after ``?`` go to the set's reader as keyword arguments, so every option a reader
    takes is reachable from a command line: ``csv:labels.csv?labels=a,b&image_col=file``.

    :raises DataError: no ``NAME:``, an option without ``=``, or one the reader does not take.
    """
    if ":" not in spec.partition("?")[0]:
        raise DataError(f"data spec {spec!r}: expected NAME:PATH (e.g. siim:/data/siim), csv:FILE or synthetic")
    name, path, opts = split_spec(spec)
    if opts and name in READERS:
        params = {p.name: p for p in inspect.signature(_reader(name)[0]).parameters.values()
                  if p.name != "path" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        unknown = sorted(set(opts) - set(params))
        if unknown:
            raise DataError(f"data spec {spec!r}: the {name} reader takes no option {unknown[0]!r} "
                            f"(options: {', '.join(params) or 'none'})")
        opts = {k: v if "str" in str(params[k].annotation) else _typed(spec, k, v, params[k].default)
                for k, v in opts.items()}
    return name, path, opts


def _typed(spec: str, key: str, value: str, default: Any) -> Any:
    """A spec option's text as the type of the reader parameter's default (bool, int, float), for
    parameters that do not take text."""
    if isinstance(default, bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise DataError(f"data spec {spec!r}: option {key}={value!r} must be true or false")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(value)
        except ValueError:
            raise DataError(f"data spec {spec!r}: option {key}={value!r} must be a number") from None
    return value


def with_options(spec: str, **opts: str | None) -> str:
    """``spec`` with reader options added (``None`` values are left out); see :func:`parse_spec`."""
    given = {k: v for k, v in opts.items() if v is not None}
    if not given:
        return spec
    sep = "&" if "?" in spec else "?"
    return spec + sep + "&".join(f"{k}={v}" for k, v in given.items())


def open_dataset(spec: str, split: str = "train", fraction: float = 1.0,
                 geometry: ImageTransformCfg | None = None, *, split_seed: int = 0, subset: int = 0,
                 max_skip_fraction: float = 0.1, **reader_opts: Any) -> LabelledCXR | SyntheticLabelled:
    """The ``split`` part of the set named by ``spec``, training ids cut to ``fraction``.

    ``subset``: which label subset of the training split (0: the published nested fractions; k >= 1:
    the k-th seeded re-draw of the same size, :func:`g2d.data.labelled.splits.subset_ranks`).

    ``spec`` may carry reader options after ``?`` (:func:`parse_spec`); ``reader_opts`` add to them.

    Raises:
        DataError: unknown spec, missing folder/file, or more than ``max_skip_fraction`` of the
            split's published ids unusable (missing files, bad rows).
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    check_fraction(fraction)
    check_subset(subset)
    if spec == "synthetic" or spec.startswith(("synthetic:", "synthetic?")):
        if "?" in spec:
            raise DataError(f"data spec {spec!r}: the synthetic set takes no reader options")
        try:
            n = int(spec.split(":", 1)[1]) if ":" in spec else 256
        except ValueError:
            raise DataError(f"data spec {spec!r}: expected synthetic or synthetic:N") from None
        return SyntheticLabelled(split, n, fraction, geometry, subset)
    name, path, spec_opts = parse_spec(spec)
    reader_opts = {**spec_opts, **reader_opts}
    read, table_name, order_name = _reader(name)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{name}: {p} not found")
    records, tasks, skipped = read(p, **reader_opts)
    skipped.check(len(records) + skipped.total, max_skip_fraction)  # bad rows over the whole set
    by_id = {r.id: r for r in records}
    patients = {r.id: r.patient for r in records if r.patient}
    # fractions by patient wherever g2d draws the order itself; a shipped table's published order stays
    by_patient = bool(patients) and (subset > 0 or (table_name is None and order_name is None))
    if table_name is not None:
        table = load_split(table_name)
        # Rows a shipped table cannot list (e.g. CheXpert's official valid.csv is not redistributable)
        # come from the records' own val/test split; training ids always come from the table's ranks.
        for r in records:
            if r.split in ("val", "test") and r.id not in table:
                table[r.id] = (r.split, -1)
    else:
        given = {r.id: r.split for r in records if r.split}
        assignment = given if given else assign_random_split(records, split_seed)
        unknown = {s for s in assignment.values() if s not in SPLITS}
        if unknown:
            raise DataError(f"{name}:{p}: split values {sorted(unknown)}; use {SPLITS}")
        train = [i for i, s in assignment.items() if s == "train"]
        ranks = (order_ranks(train, load_order(order_name), split_seed) if order_name
                 else rank_groups(train, patients, split_seed) if by_patient else rank_train(train, split_seed))
        table = {i: (s, ranks.get(i, -1)) for i, s in assignment.items()}
    wanted = split_ids(table, split, fraction, subset=subset, groups=patients if by_patient else None)
    # The reader named each dropped row; here only the share of this split's ids that is unusable
    # counts (ids are not logged: they can hold patient numbers).
    missing = sum(1 for i in wanted if i not in by_id)  # listed, but the files lack them or rows were bad
    if not wanted:
        raise DataError(f"{name}:{p}: the {split} split is empty")
    if missing:
        log.warning("%s/%s: %d of %d listed ids unusable (missing or bad rows)", name, split, missing,
                    len(wanted))
    if missing / len(wanted) > max_skip_fraction:
        raise DataError(f"{name}/{split}: {missing} of {len(wanted)} ids unusable "
                        f"({missing / len(wanted):.1%} > max_skip_fraction {max_skip_fraction:.0%}); "
                        f"{skipped.summary()}")
    ds = LabelledCXR(f"{name}/{split}", [by_id[i] for i in wanted if i in by_id], tasks, geometry, skipped)
    log.info("%s/%s: %d images (fraction %g, subset %d); %s", name, split, len(ds), fraction, subset,
             skipped.summary())
    return ds


class SyntheticLabelled(torch.utils.data.Dataset):
    """The embedded synthetic set in the :class:`LabelledCXR` sample layout.

    Splits are disjoint by seed (train 1001, val 1002, test 1003; pre-training uses seed 0 by
    default). ``n_train`` images in train; val and test hold ``max(16, n_train // 4)``. Labels are the
    five synthetic findings; ``mask`` is the union of finding masks; ``boxes`` are the findings' boxes.
    The training fraction keeps the first images (``subset`` 0) or those of smallest rank in label
    subset ``subset``'s permutation of the ``n_train`` images (sample i renders from (seed, i) alone).
    Rendered samples are kept in memory up to ``keep_mb`` MiB (:class:`g2d.data.synthetic.KeptRenders`).
    """

    def __init__(self, split: str, n_train: int = 256, fraction: float = 1.0,
                 geometry: ImageTransformCfg | None = None, subset: int = 0, keep_mb: float = 1024) -> None:
        from g2d.data.synthetic import FINDINGS, KeptRenders, SyntheticCXR, SyntheticCXRCfg

        size = geometry.output_size if geometry is not None else 224
        n = fraction_count(n_train, fraction) if split == "train" else max(16, n_train // 4)
        seed = 1001 + SPLITS.index(split)
        ranks = subset_ranks([f"{i:09d}" for i in range(n_train)], subset) if split == "train" else None
        self.indices = list(range(n)) if ranks is None else sorted(int(i) for i, r in ranks.items() if r < n)
        # kept after the first render (keep_mb MiB; 0 = render on every access): every epoch of a
        # fine-tuning, and labels(), read the same images
        self.source: Any = SyntheticCXR(SyntheticCXRCfg(num_samples=max(self.indices, default=-1) + 1,
                                                        image_size=size, seed=seed))
        if keep_mb:
            self.source = KeptRenders(self.source, ("image", "labels", "mask", "boxes", "findings", "text",
                                                    "finding_masks"), keep_mb)  # what the protocols read
        self.name, self.tasks = f"synthetic/{split}", list(FINDINGS)
        self.with_mask = self.with_boxes = True
        self.skipped = SkipLog(self.name)

    def __len__(self) -> int:
        return len(self.indices)

    def render_now(self) -> None:
        """Render and keep every sample in this process now: called before DataLoader workers start
        (:func:`g2d.downstream.harness.make_loader`), which are started anew each epoch, so samples
        they rendered would go with them."""
        from g2d.data.synthetic import KeptRenders

        if isinstance(self.source, KeptRenders):
            self.source.fill(self.indices)

    @property
    def ids(self) -> list[str]:
        return [f"{self.name}/{i}" for i in self.indices]

    def labels(self) -> np.ndarray:
        return np.stack([self.source[i]["labels"].numpy() for i in self.indices])

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.source[self.indices[i]]
        return {"image": s["image"], "id": f"{self.name}/{self.indices[i]}", "labels": s["labels"], "mask": s["mask"],
                "boxes": s["boxes"], "orig_hw": tuple(s["image"].shape[-2:]), "index": i,
                "prompt_findings": s["findings"]}
