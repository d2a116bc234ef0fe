"""Downstream protocols as typed Python functions.

Each protocol module (``g2d.downstream.<module>``) defines ``Args``, a dataclass derived from
:class:`ProtocolArgs`, and ``run(args: Args) -> dict`` (the metrics it also writes to
``args.out/metrics.json``). Python callers (``g2d reproduce``, the demo, notebooks) build ``Args``
directly; the command line (``g2d eval NAME``) builds its flags from the same dataclass
(:func:`add_flags`), so a flag and a field can never disagree.

    from g2d.downstream import protocol
    args = protocol.make("segmentation", data="synthetic:160", model="runs/demo/g2d/export",
                         out="runs/seg", fraction=0.1, epochs=15)
    metrics = protocol.run("segmentation", args)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["PROTOCOLS", "ProtocolArgs", "GeometryArgs", "TextImageArgs", "DenseArgs", "arg", "add_flags",
           "make", "run", "module", "key_fields", "completed_key_fields", "content_inputs"]

# name -> (module, one-line description): the protocols ``g2d eval`` runs
PROTOCOLS: dict[str, tuple[str, str]] = {
    "segmentation": ("g2d.downstream.segmentation", "U-Net on the pre-trained encoder: Dice"),
    "detection": ("g2d.downstream.detection", "YOLOv3 head on the frozen encoder: mAP@[0.4:0.75]"),
    "dense-probe": ("g2d.downstream.dense_probe", "per-pixel linear classifier on frozen dense features: Dice"),
    "linear": ("g2d.downstream.linear_probe", "linear probe on frozen pooled features: AUROC / accuracy"),
    "finetune": ("g2d.downstream.finetune", "whole-model fine-tuning: per-class and mean AUROC"),
    "zeroshot": ("g2d.downstream.zeroshot", "zero-shot classification from prompts: AUROC, F1, accuracy"),
    "grounding": ("g2d.downstream.grounding", "zero-shot grounding heat maps: recall, IoU, Dice"),
    "phrase-grounding": ("g2d.downstream.phrase_grounding", "phrase grounding (MS-CXR, CheXlocalize, VinDr): "
                         "CNR, mIoU, hit rate, Dice"),
    "attention": ("g2d.downstream.attention", "attention diagnostics: collapse, pointing game, "
                  "pseudo-mask IoU against the position-only prior"),
}

# fields that change what is shown, not what is computed (left out of result keys)
DISPLAY_ONLY = ("no_progress", "out")


def arg(default: Any = MISSING, *, help: str | None = None, choices: tuple[str, ...] | None = None,
        metavar: str | None = None) -> Any:
    """A dataclass field that is also a command-line flag (``--name-with-dashes``)."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclass(kw_only=True)
class ProtocolArgs:
    """What every protocol takes. ``labels`` is folded into ``data`` (``csv:FILE?labels=a,b``), so
    every caller sees the same spec."""

    data: str = arg(help="siim:DIR, rsna:DIR, object-cxr:DIR, chexpert:DIR, cxr14:DIR, covidx:DIR, ms-cxr:DIR, "
                         "chexlocalize:DIR, vindr:DIR, csv:FILE or synthetic[:N]; reader options after '?': "
                         "csv:FILE?labels=a,b&image_col=file, ms-cxr:DIR?images=MIMIC_JPG (see docs/data.md)")
    out: str = arg(help="folder for metrics.json, results.md and figures")
    labels: str | None = arg(None, help="label columns of a csv: set, a,b,c (the same as csv:FILE?labels=a,b,c)")
    model: str = arg("random", help="G2D export/run folder/checkpoint, 'random', 'imagenet', or a peer's checkpoint "
                                    "as KIND:PATH (mgca, gloria, convirt, medklip, kad, biovil, prior, medclip, "
                                    "xrv, torchvision, g2d-release, benchx; docs/peers.md)")
    trust_pickle: bool = arg(False, help="let a peer's checkpoint that needs pickled classes load (GLoRIA); "
                                         "only for files whose source you trust")
    arch: str = arg("resnet50", help="ResNet of the random/imagenet baselines (a loaded model brings its own)")
    fraction: float = arg(1.0, help="share of the training split (0, 1]")
    subset: int = arg(0, help="label subset at --fraction: 0 the published nested one, k >= 1 the k-th seeded "
                              "re-draw of the same size (paired comparisons over subsets; docs/data.md)")
    seed: int = arg(0)
    device: str = arg("auto", choices=("auto", "cpu", "cuda"))
    num_workers: int = arg(4)
    no_progress: bool = arg(False)

    def __post_init__(self) -> None:
        if self.labels:
            from g2d.data.labelled.specs import with_options

            self.data, self.labels = with_options(self.data, labels=self.labels), None


@dataclass(kw_only=True)
class GeometryArgs(ProtocolArgs):
    """Protocols that choose their evaluation geometry: ``None`` means the loaded G2D model's own
    pre-training geometry (256 / 224 otherwise); a subclass may set its protocol's own defaults."""

    resize: int | None = arg(None, help="resize before the centre crop (shorter side; both sides with --square)")
    image_size: int | None = arg(None, help="side of the centre crop fed to the model")
    square: bool | None = arg(None, help="resize to resize x resize (aspect ratio not kept) instead of the "
                                         "shorter side (default: the loaded model's own rule, square for the "
                                         "release recipe)")

    def geometry_defaults(self) -> tuple[Any, Any, Any]:
        f = {x.name: x.default for x in dataclasses.fields(self)}
        return f["resize"], f["image_size"], f["square"]


@dataclass(kw_only=True)
class TextImageArgs(GeometryArgs):
    """Zero-shot classification and grounding: a model with a text tower, G2D's or a peer's."""

    model: str = arg("random", help="G2D export/run folder/checkpoint, or a peer's checkpoint as KIND:PATH with "
                                    "KIND biovil, mgca, gloria, convirt, medclip or benchx (docs/peers.md)")
    text_model: str | None = arg(None, help="for --model KIND:PATH: the peer's text model, a hub name (NAME@REV) "
                                            "or local folder (default: the peer's own; docs/peers.md)")


@dataclass(kw_only=True)
class DenseArgs(ProtocolArgs):
    """The dense protocols (segmentation, detection): a head trained on the encoder's stage maps,
    early stopping on the validation score, the best epoch tested."""

    epochs: int = arg(50, help="maximum epochs (paper: 50)")
    patience: int = arg(10, help="early stopping: epochs without a better validation score (0: off)")
    batch_size: int | None = arg(None, help="the protocol's default for the data set")
    weight_decay: float = arg(0.05)
    image_size: int = arg(224, help="square resize, no crop (multiple of 32)")
    train_encoder: bool = arg(False, help="train the encoder too (not the paper's setting for G2D)")
    update_bn: bool = arg(False, help="let the frozen encoder's BatchNorm statistics update (MGCA's behaviour)")
    figures: int = arg(4, help="test images drawn to OUT/figures")


_TYPES = {"int": int, "float": float, "str": str}


def add_flags(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """One flag per field of the dataclass ``cls``: ``bool`` -> ``--x`` (store_true), ``bool | None`` ->
    ``--x/--no-x``, ``int``/``float``/``str`` (``| None``) -> typed value; no default -> required."""
    for f in dataclasses.fields(cls):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"help": meta.get("help"), "dest": f.name}
        typ = str(f.type).replace(" | None", "").replace("None | ", "")
        if typ == "bool":
            if str(f.type) == "bool":
                parser.add_argument(flag, action="store_true", default=f.default, **kw)
            else:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, **kw)
            continue
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        parser.add_argument(flag, type=_TYPES[typ], **kw)
    return parser


def module(name: str) -> ModuleType:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; use one of {sorted(PROTOCOLS)}")
    return importlib.import_module(PROTOCOLS[name][0])


def make(name: str, **values: Any) -> ProtocolArgs:
    """The protocol's ``Args`` from Python values (``TypeError`` names an unknown field). A string
    for an ``int``/``float`` field is converted as its flag would be: YAML 1.1 (PyYAML) reads ``2e-3``
    as a string, and a scale's or a user's YAML must not hand the optimizer ``'2e-3'``.

    :raises ValueError: a string that is not a number of the field's type, naming the field.
    """
    cls = module(name).Args
    for f in dataclasses.fields(cls):
        typ = str(f.type).replace(" | None", "").replace("None | ", "")
        value = values.get(f.name)
        if isinstance(value, str) and typ in ("int", "float"):
            try:
                values[f.name] = _TYPES[typ](value)
            except ValueError:
                raise ValueError(f"{name}: {f.name} must be {'an' if typ == 'int' else 'a'} {typ}, "
                                 f"got {value!r}") from None
    return cls(**values)


def run(name: str, args: ProtocolArgs) -> dict[str, Any]:
    return module(name).run(args)


def key_fields(args: ProtocolArgs) -> dict[str, Any]:
    """The fields that decide a result (display-only ones left out): what result stores key on."""
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in DISPLAY_ONLY}


def completed_key_fields(name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A stored ``key_fields`` record as this code keys it: fields the protocol gained since it was
    written take their defaults (new fields default to the old behaviour), so a stored result is
    still found. :raises TypeError, ValueError: a field the protocol no longer has, or a bad value."""
    return key_fields(make(name, **{"out": "", **fields}))


def content_inputs(args: ProtocolArgs) -> dict[str, str]:
    """Content a result depends on beyond its fields, other than the data and the model (which
    callers identify with :mod:`g2d.fingerprint`): the text of the prompt file a ``prompts`` field
    names, so a result is not reused after the file (shipped or the user's) was edited, and the
    files of a local ``text_model`` folder (a hub name is keyed by its name)."""
    from g2d.fingerprint import digest, file_stamp

    out = {}
    prompts = getattr(args, "prompts", MISSING)
    if prompts is not MISSING:
        from g2d.inference.zeroshot import prompt_text

        out["prompts_id"] = digest(prompt_text(prompts)[0])
    text_model = getattr(args, "text_model", None)
    if text_model and Path(text_model).is_dir():
        out["text_model_id"] = digest([file_stamp(f) for f in sorted(Path(text_model).iterdir()) if f.is_file()])
    return out
