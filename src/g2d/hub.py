"""The Hugging Face Hub format of a g2d model: a folder with the weights (safetensors), the full
config, the text tokenizer and config, the image preprocessing and a generated model card, which
``g2d.load_model`` reads from a local folder or as ``hf-hub:ORG/NAME[@REVISION]`` through
``huggingface_hub``'s own cache (open_clip's ``hf-hub:`` convention); ``g2d push``
(:mod:`g2d.commands.push`) uploads it with ``huggingface_hub``'s file API.

Offline behaviour is explicit: a hub name is first looked up in the local cache only; with
``HF_HUB_OFFLINE=1`` (or no network) a name that is not there fails at once, naming the cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from g2d.checkpoint import atomic_write, export_model
from g2d.config import pretrain_source

__all__ = ["PREPROCESS_FILE", "CARD_FILE", "HUB_PREFIX", "save_pretrained", "model_card", "resolve_hub"]

PREPROCESS_FILE = "preprocess.json"
CARD_FILE = "README.md"
HUB_PREFIX = "hf-hub:"


def _eval_metrics(run_dir: Path | None) -> list[dict[str, Any]]:
    """The ``metrics.json`` of every ``g2d eval`` run found under ``run_dir`` (task, data, fraction,
    headline numbers)."""
    if run_dir is None or not Path(run_dir).is_dir():
        return []
    found = []
    for path in sorted(Path(run_dir).rglob("metrics.json")):
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(m, dict) or "task" not in m:
            continue
        headline = {k: m[k] for k in ("dice", "map", "auc", "acc", "f1", "pointing", "iou", "collapse_r")
                    if isinstance(m.get(k), (int, float))}
        if headline:
            found.append({"task": m["task"], "data": str(m.get("data", "")), "fraction": m.get("fraction"),
                          "seed": m.get("seed"), **headline})
    return found


def model_card(cfg: Any, metrics: list[dict[str, Any]], name: str = "g2d model") -> str:
    """``README.md`` with YAML metadata (license, tags, library, training data) and sections for the
    training config, the data it saw, its evaluation results and the limits of a research model."""
    data = cfg.data.spec
    meta = {"license": "apache-2.0", "library_name": "g2d",
            "tags": ["medical-imaging", "chest-x-ray", "vision-language", "g2d", "zero-shot-classification",
                     "image-segmentation"],
            "pipeline_tag": "zero-shot-image-classification"}
    if pretrain_source(cfg.data).kind == "mimic":
        meta["datasets"] = ["mimic-cxr"]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             "A G2D model (Liu et al., NeurIPS 2024: global and dense vision-language pre-training for chest "
             "X-rays), trained and exported with the `g2d` package. Load it with "
             "`g2d.load_model(\"hf-hub:ORG/NAME\")` or from this folder.", "",
             "## Training", "",
             f"- Data: `{data}`" + (" (the embedded synthetic set: generated radiographs, not patients)"
                                    if data == "synthetic" else ""),
             f"- Image encoder: {cfg.model.image.arch}, input {cfg.model.image_size} px; text tower: "
             f"`{cfg.model.text.model}`; decoder: {cfg.model.decoder.mode}",
             f"- Steps: {cfg.train.max_steps or 'epochs ' + str(cfg.train.epochs)}, batch {cfg.train.batch_size}, "
             f"lr {cfg.train.lr}, seed {cfg.train.seed}", "",
             "The full configuration is `config.json`; the image preprocessing it was trained with is "
             f"`{PREPROCESS_FILE}`.", "", "## Evaluation", ""]
    if metrics:
        keys = sorted({k for m in metrics for k in m} - {"task", "data", "fraction", "seed"})
        lines += ["| task | data | fraction | seed | " + " | ".join(keys) + " |", "|" + "---|" * (4 + len(keys))]
        for m in metrics:
            cells = [f"{m[k]:.4f}" if isinstance(m.get(k), float) else "" for k in keys]
            lines.append(f"| {m['task']} | {m['data']} | {m.get('fraction', '')} | {m.get('seed', '')} | "
                         + " | ".join(cells) + " |")
    else:
        lines.append("No `g2d eval` results were found beside this model.")
    lines += ["", "## Intended use and limits", "",
              "A research model for studying chest X-ray representation learning. It is not a medical device, "
              "has not been validated clinically, and must not be used for diagnosis or treatment decisions. "
              "Its behaviour on patients, scanners and populations unlike its training data is unknown; a model "
              "trained on the synthetic set has never seen a real radiograph.", ""]
    return "\n".join(lines)


def save_pretrained(model: Any, out_dir: str | Path, run_dir: str | Path | None = None) -> Path:
    """Write ``model`` (a :class:`~g2d.model.G2DModel` with its ``config`` and ``preprocess``, as
    :func:`g2d.create_model` and :func:`g2d.load_model` return it) in the hub format.

    :param run_dir: a folder whose ``g2d eval`` results (``metrics.json``) go into the model card.
    :return: ``out_dir`` holding ``model.safetensors``, ``config.json``, ``text/``, ``preprocess.json``
        and ``README.md``.
    """
    out = export_model(model, model.config.to_dict(), out_dir)
    atomic_write(out / PREPROCESS_FILE, lambda tmp: Path(tmp).write_text(
        json.dumps(dataclasses.asdict(model.preprocess), indent=2), encoding="utf-8"))
    card = model_card(model.config, _eval_metrics(Path(run_dir) if run_dir else None), Path(out).name)
    atomic_write(out / CARD_FILE, lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
    return Path(out)


def resolve_hub(spec: str) -> Path:
    """``hf-hub:ORG/NAME[@REVISION]`` -> the local snapshot folder (from the cache; downloaded only
    when the cache lacks it and the hub is reachable).

    :raises FileNotFoundError: not in the cache and offline (``HF_HUB_OFFLINE=1``) or unreachable;
        the message names the cache folder.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    name = spec[len(HUB_PREFIX):]
    repo, _, revision = name.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    where = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{spec}: not in the local Hugging Face cache ({where}) and HF_HUB_OFFLINE is set; "
                                f"download it on a machine with network, or copy that cache here") from None
    try:
        return Path(snapshot_download(repo, revision=revision or None, etag_timeout=10))
    except Exception as err:  # no network, unknown repo, gated repo: one message that says where it looked
        raise FileNotFoundError(f"{spec}: not in the local Hugging Face cache ({where}) and the hub could not be "
                                f"reached or refused it ({type(err).__name__}: {err})") from None
