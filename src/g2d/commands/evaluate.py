"""``g2d eval TASK``: one downstream protocol on one data set, model, label fraction and seed.

Each task module in :mod:`g2d.downstream` provides ``add_arguments(parser)`` for its own flags and
``run(args) -> dict`` (the metrics it wrote to ``OUT/metrics.json``).
"""

from __future__ import annotations

import argparse
import importlib

TASKS: dict[str, tuple[str, str]] = {
    "segmentation": ("g2d.downstream.segmentation", "U-Net on the pre-trained encoder: Dice"),
    "detection": ("g2d.downstream.detection", "YOLOv3 head on the frozen encoder: mAP@[0.4:0.75]"),
    "linear": ("g2d.downstream.linear_probe", "linear probe on frozen pooled features: AUROC / accuracy"),
    "finetune": ("g2d.downstream.finetune", "whole-model fine-tuning: per-class and mean AUROC"),
    "zeroshot": ("g2d.downstream.zeroshot", "zero-shot classification from prompts: AUROC, F1, accuracy"),
    "grounding": ("g2d.downstream.grounding", "zero-shot grounding heat maps: recall, IoU, Dice"),
    "attention": ("g2d.downstream.attention", "attention diagnostics: collapse, pointing game, "
                  "pseudo-mask IoU against the position-only prior"),
}


class _TaskParser(argparse.ArgumentParser):
    """Folds ``--labels`` into the data spec (``csv:FILE?labels=a,b``) once all flags are read, so
    every caller of ``run(args)`` (CLI, reproduce, demo) sees the same spec."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        if getattr(ns, "labels", None):
            from g2d.data.sets import with_options

            ns.data, ns.labels = with_options(ns.data, labels=ns.labels), None
        return ns, rest


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="siim:DIR, rsna:DIR, object-cxr:DIR, chexpert:DIR, "
                   "cxr14:DIR, covidx:DIR, csv:FILE or synthetic[:N]; reader options after '?': "
                   "csv:FILE?labels=a,b&image_col=file (see docs/data.md)")
    p.add_argument("--labels", default=None, help="label columns of a csv: set, a,b,c "
                   "(the same as csv:FILE?labels=a,b,c)")
    p.add_argument("--model", default="random", help="G2D export/run folder/checkpoint, 'random' or 'imagenet'")
    p.add_argument("--arch", default="resnet50", help="ResNet of the random/imagenet baselines "
                   "(a loaded model brings its own); pass it to load_image_tower")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the training split (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for metrics.json, results.md and figures")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--no-progress", action="store_true")


def _task(t: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    module = TASKS[name][0]
    _common(t)
    importlib.import_module(module).add_arguments(t)
    t.set_defaults(task=name, run=lambda a: _run(module, a))
    return t


def task_parser(name: str) -> argparse.ArgumentParser:
    """A stand-alone parser for ``g2d eval NAME`` (tests and scripts use it)."""
    return _task(_TaskParser(prog=f"g2d eval {name}", description=TASKS[name][1]), name)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="run a downstream protocol", description=__doc__)
    tasks = p.add_subparsers(dest="task", required=True, parser_class=_TaskParser)
    for name, (_, help_) in TASKS.items():
        _task(tasks.add_parser(name, help=help_, description=help_), name)


def _run(module: str, args: argparse.Namespace) -> int:
    metrics = importlib.import_module(module).run(args)
    print(f"{args.task}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                        if isinstance(v, float)))
    print(f"wrote {args.out}/metrics.json")
    return 0
