"""``g2d demo``: the whole pre-training path and the downstream suite on the embedded synthetic data,
on a laptop CPU.

Pre-trains the ``tiny`` preset twice from the same seed and data — G2D (decoder on pseudo masks)
and the decoder-free ablation (``model.decoder.mode=none``) — then evaluates both and a randomly
initialised model on held-out synthetic data:

- image-to-text retrieval top-1: the nearest report names the same findings at the same places
  (``top1_findings``) and is the image's own report (``top1_exact``);
- zero-shot grounding Dice: for held-out images with one finding, the similarity between the
  finding's prompt and every pixel embedding, binarised by :func:`g2d.inference.grounding.binarize`,
  against the finding's mask;
- the downstream protocols of ``g2d eval`` on the synthetic labelled set (``synthetic:N``):
  frozen-encoder segmentation at 1 % and 10 % (encoder and, for G2D, encoder-decoder transfer),
  YOLOv3 detection, linear probing, zero-shot classification and zero-shot grounding.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from g2d.attention_diagnostics import collect_attention, diagnose_attention
from g2d.config import G2DConfig, get_config
from g2d.data.labelled.splits import fraction_count
from g2d.data.synthetic import SyntheticCXR, SyntheticCXRCfg, prompt_for
from g2d.downstream import protocol
from g2d.downstream.results import write_json
from g2d.factory import create_model, load_model
from g2d.figures import attention_panels, grounding_panels, loss_curves
from g2d.fingerprint import absolute_paths, model_identity
from g2d.inference.grounding import binarize, similarity_maps
from g2d.inference.retrieval import embed_pairs
from g2d.metrics import dice_per_image, image_to_text_top1
from g2d.model import G2DModel
from g2d.pseudo_mask import build_pseudo_masks
from g2d.seeding import seed_everything
from g2d.train.loop import pretrain

log = logging.getLogger("g2d.demo")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 ``avx512_bf16`` or AMX), where CPU bf16
    autocast trains the demo model about 1.6x faster (docs/attention.md); elsewhere it is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def demo_config(steps: int, train_samples: int, seed: int, cpu_bf16: bool = False) -> G2DConfig:
    return get_config("tiny", {
        "data.synthetic_samples": train_samples,
        "data.synthetic_seed": seed,
        "train.max_steps": steps,
        "train.epochs": 1000,
        "train.seed": seed,
        "train.ckpt_every": max(1, steps // 2),
        "train.cpu_bf16": cpu_bf16,
        "train.precision": "bf16" if cpu_bf16 else "fp32",
    })


def _held_out(n: int, size: int, seed: int) -> dict[str, Any]:
    ds = SyntheticCXR(SyntheticCXRCfg(num_samples=n, image_size=size, seed=seed))
    items = [ds[i] for i in range(n)]
    return {
        "image": torch.stack([it["image"] for it in items]),
        "text": [it["text"] for it in items],
        "findings": [tuple(sorted(it["findings"])) for it in items],
        "finding_masks": [it["finding_masks"] for it in items],
    }


def evaluate(model: G2DModel, data: dict[str, Any]) -> dict[str, float]:
    """Retrieval top-1, zero-shot grounding Dice and the attention diagnostics
    (:mod:`g2d.attention_diagnostics`: head-mean scores) on held-out synthetic data."""
    img, txt = embed_pairs(model, data["image"], data["text"])
    one = [i for i, f in enumerate(data["findings"]) if len(f) == 1]
    prompts = [prompt_for(*data["findings"][i][0]) for i in one]
    heat = similarity_maps(model, data["image"][one], prompts)
    targets = torch.stack([data["finding_masks"][i][0] > 0.5 for i in one])
    dice = dice_per_image(binarize(heat), targets)
    attention = collect_attention(model, data["image"][one])
    diag = diagnose_attention(attention, data["image"][one], targets, model.cfg.pseudo_mask).mean
    return {
        "top1_findings": image_to_text_top1(img, txt, data["findings"]),
        "top1_exact": image_to_text_top1(img, txt),
        "grounding_dice": dice.mean().item(),
        "grounding_images": len(one),
        **{f"attention_{k}": v for k, v in dataclasses.asdict(diag).items()},
    }


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "# g2d demo results",
        "",
        f"Pre-training: `tiny` preset, {results['steps']} steps of batch {results['batch_size']} on "
        f"{results['train_samples']} synthetic pairs ({results['precision']}); evaluation on "
        f"{results['eval_samples']} "
        f"held-out synthetic pairs (seed {results['eval_seed']}).",
        "",
        "| model | retrieval top-1 (same findings) | retrieval top-1 (own report) | grounding Dice |",
        "|---|---|---|---|",
    ]
    for name, m in results["models"].items():
        lines.append(f"| {name} | {m['top1_findings']:.3f} | {m['top1_exact']:.3f} | "
                     f"{m['grounding_dice']:.3f} |")
    lines += ["", f"Grounding over {next(iter(results['models'].values()))['grounding_images']} "
              "held-out images with one finding; maps min-max normalised and thresholded at 0.5.", "",
              "## Does the attention follow the findings? (docs/attention.md)", "",
              "Same images. Collapse: mean Pearson r of each image's head-mean attention map with the "
              "mean map (1 = one template for every image). Prior: the score of the set's mean map "
              "(position only).", "",
              "| model | collapse r | pointing | pointing prior | pseudo-mask IoU | IoU prior | peak mass |",
              "|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        lines.append(f"| {name} | {m['attention_collapse_r']:.3f} | {m['attention_pointing']:.3f} | "
                     f"{m['attention_pointing_prior']:.3f} | {m['attention_iou']:.3f} | "
                     f"{m['attention_iou_prior']:.3f} | {m['attention_peak_mass']:.3f} |")
    lines.append("")
    if results["downstream"]:
        names = list(results["models"])
        lines += ["## Downstream protocols (`g2d eval`) on the synthetic labelled set", "",
                  f"{results['downstream_train']} training images (10 % = "
                  f"{fraction_count(results['downstream_train'], 0.1)}), frozen encoders; zero-shot on a "
                  f"{_ZERO_SHOT_TEST}-image test split with prompts/synthetic.txt; '/' = not applicable.",
                  "", "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for label, row in results["downstream"].items():
            cells = ["/" if row.get(n) is None else f"{row[n]:.3f}" for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Machine: {results['machine']}; wall time {results['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


# Segmentation cells train 10x the protocol's rate (2e-3) with --epochs as the patience too: at the
# protocol's 2e-4 and 4 epochs random init reached Dice 0.07 at 10 % (16 images), a row of noise;
# at 2e-3 and 15 epochs it reaches 0.35 (measured at 0d456ae; benchmarks/RESULTS.md's history). No 1 %
# row: with 2 (or 8, 5 %) images every model, random init included, lands at Dice 0.07-0.18,
# noise that separates nothing.
# Detection runs on the whole training split at 2e-3 for 12 epochs: at 10 % for 4 epochs every
# model's mAP was <= 0.001; so it reaches 0.38 (G2D) / 0.32 (decoder none) / 0.00 (random init).
_SEG_LR = "2e-3"
_ZERO_SHOT_TEST = 256
_DET_EPOCHS = 12
_DET_LR = 2e-3

# (task, column label, protocol fields, metric, which models): the demo's downstream cells.
_DOWNSTREAM: list[tuple[str, str, dict[str, Any], str, tuple[str, ...]]] = [
    ("segmentation", "seg Dice 10% enc", {"fraction": 0.1, "transfer": "encoder"}, "dice", ()),
    ("segmentation", "seg Dice 10% enc-dec", {"fraction": 0.1, "transfer": "encoder-decoder"}, "dice", ("G2D",)),
    ("detection", "det mAP 100%", {"fraction": 1.0, "head_width": 256}, "map", ()),
    ("linear", "linear AUC 10%", {"fraction": 0.1, "no_feature_cache": True}, "auc", ()),
    # prompts in the synthetic reports' own wording (prompts/synthetic.txt)
    ("zeroshot", "zero-shot AUC", {"prompts": "synthetic"}, "auc", ("G2D", "decoder none")),
    ("zeroshot", "zero-shot F1", {"prompts": "synthetic"}, "f1", ("G2D", "decoder none")),
    ("grounding", "grounding Dice", {}, "dice", ("G2D", "decoder none")),
]


def _task_fields(task: str, size: int, epochs: int) -> dict[str, Any]:
    """The demo's schedule per protocol (image size, epochs, learning rate)."""
    if task == "segmentation":
        # every model's new decoder as wide as G2D's pre-trained one, so "enc" and "enc-dec" differ by
        # the initialisation only (issue 28)
        widths = ",".join(str(c) for c in get_config("tiny").model.decoder.channels)
        return {"image_size": size, "epochs": epochs, "patience": epochs, "lr": float(_SEG_LR), "batch_size": 8,
                "decoder_channels": widths}
    if task == "detection":
        e = min(epochs, _DET_EPOCHS)
        return {"image_size": size, "epochs": e, "patience": e, "lr": _DET_LR, "batch_size": 8}
    if task == "linear":
        return {"image_size": size, "resize": size, "epochs": 30}
    return {"image_size": size, "resize": size}


def run_downstream(models: dict[str, str], out: Path, size: int, n_train: int, epochs: int, seed: int,
                   device: str) -> dict[str, dict[str, float | None]]:
    """Run the demo's downstream cells (:mod:`g2d.downstream.protocol`); finished cells are reused.

    :param models: display name -> model (export folder or ``random``).
    :return: ``{column label: {model name: metric or None}}``.
    """
    table: dict[str, dict[str, float | None]] = {}
    for task, label, fields, metric, only in _DOWNSTREAM:
        table[label] = {}
        for name, model in models.items():
            if only and name not in only:
                table[label][name] = None
                continue
            cell = out / "downstream" / task / name.replace(" ", "_") / (
                "_".join(f"{k}_{v}" for k, v in fields.items()) or "default")
            # zero-shot reads the test split only: synthetic:1024 holds 256 test images (the 1024 training
            # images are never rendered), so its AUC is not the noise of the 40-image split
            data = f"synthetic:{4 * _ZERO_SHOT_TEST}" if task == "zeroshot" else f"synthetic:{n_train}"
            args = protocol.make(task, data=data, model=model, arch="resnet18", seed=seed,
                                 out=str(cell), device=device, num_workers=0, no_progress=True,
                                 **_task_fields(task, size, epochs), **fields)
            # not every task reuses its own finished run, so the demo keys each cell by its arguments
            # and the model's weight files (a re-trained model in the same folder is another model)
            # (paths absolute, so runs/x and /abs/runs/x are one model; cells of before 2026-12-01 held them as spelled)
            done = cell / "demo_args.json"
            key = {"args": absolute_paths(protocol.key_fields(args)), "model_id": model_identity(model),
                   **protocol.content_inputs(args)}
            keys = (key, {**key, "args": protocol.key_fields(args)})
            if (cell / "metrics.json").is_file() and done.is_file() and _stored_key(task, done) in keys:
                metrics = json.loads((cell / "metrics.json").read_text())
            else:
                log.info("downstream: %s | %s", label, name)
                metrics = protocol.run(task, args)
                done.write_text(json.dumps(key))
            value = metrics.get(metric)
            table[label][name] = None if value is None else float(value)
    return table


def _stored_key(task: str, done: Path) -> dict[str, Any] | None:
    """A cell's recorded key with the protocol's fields added since at their defaults; None if unreadable."""
    try:
        key = json.loads(done.read_text())
        return {**key, "args": protocol.completed_key_fields(task, key["args"])}
    except (TypeError, ValueError, KeyError):
        return None


def run_demo(out_dir: str | Path, steps: int = 256, train_samples: int = 1536, eval_samples: int = 256,
             device: str = "auto", seed: int = 0, downstream_train: int = 160, downstream_epochs: int = 15
             ) -> dict[str, Any]:
    """Run the demo; write ``results.json``, ``results.md``, ``figures/*.png`` and the exported
    G2D model (``g2d/export``) under ``out_dir``; return the results (plus ``markdown``)."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    base = demo_config(steps, train_samples, seed, cpu_bf16=on_cpu and cpu_has_fast_bf16())
    no_decoder = copy.deepcopy(base)
    no_decoder.model.decoder.mode = "none"
    variants = {"G2D": base, "decoder none": no_decoder}
    curves, models = {}, {}
    for name, cfg in variants.items():
        run_dir = out / ("g2d" if name == "G2D" else "no_decoder")
        log.info("pre-training %s in %s", name, run_dir)
        result = pretrain(cfg, run_dir, resume="latest", device=device)
        curves[name] = [h["total"] for h in result.history]
        models[name] = load_model(run_dir / "export")
    seed_everything(seed)
    models["random init"] = create_model(base).eval()

    data = _held_out(eval_samples, base.model.image_size, seed + 1)
    metrics = {name: evaluate(m, data) for name, m in models.items()}

    g2d = models["G2D"]
    figs = out / "figures"
    one = [i for i, f in enumerate(data["findings"]) if len(f) == 1][:6]
    attention = collect_attention(g2d, data["image"][one])
    masks = build_pseudo_masks(attention, data["image"][one], g2d.cfg.pseudo_mask)
    attention_panels(data["image"][one], attention, masks, [data["text"][i] for i in one],
                     figs / "attention_pseudo_masks.png",
                     torch.stack([data["finding_masks"][i][0] for i in one]))
    prompts = [prompt_for(*data["findings"][i][0]) for i in one]
    heat = similarity_maps(g2d, data["image"][one], prompts)
    targets = torch.stack([data["finding_masks"][i][0] for i in one])
    grounding_panels(data["image"][one], heat, targets, prompts, figs / "grounding.png")
    loss_curves(curves, figs / "training_loss.png")

    downstream = {}
    if downstream_train:
        downstream = run_downstream(
            {"G2D": str(out / "g2d" / "export"), "decoder none": str(out / "no_decoder" / "export"),
             "random init": "random"}, out, base.model.image_size, downstream_train, downstream_epochs,
            seed, device)

    results = {
        "models": metrics,
        "downstream": downstream,
        "downstream_train": downstream_train,
        "steps": steps,
        "batch_size": base.train.batch_size,
        "precision": "CPU bf16 autocast" if base.train.cpu_bf16 else base.train.precision,
        "train_samples": train_samples,
        "eval_samples": eval_samples,
        "eval_seed": seed + 1,
        "export": str(out / "g2d" / "export"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "wall_s": time.perf_counter() - start,
    }
    md = _markdown(results)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(md, encoding="utf-8")
    return {**results, "markdown": md}
