"""``g2d demo``: pre-train the tiny preset on synthetic data and evaluate it; see docs/demo.md."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="pre-train the tiny preset on synthetic data and evaluate it",
                       description="Runs the whole pre-training path on the embedded synthetic data "
                                   "on CPU and compares G2D with decoder-free pre-training and random "
                                   "initialisation.")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per pre-training run")
    p.add_argument("--train-samples", type=int, default=None)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--downstream-train", type=int, default=None,
                   help="synthetic images per downstream set (0 skips the downstream protocols)")
    p.add_argument("--downstream-epochs", type=int, default=None, help="segmentation epochs (detection: at most 4)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from g2d.demo import run_demo

    kwargs = {k: v for k, v in {"steps": args.steps, "train_samples": args.train_samples,
                                "eval_samples": args.eval_samples, "downstream_train": args.downstream_train,
                                "downstream_epochs": args.downstream_epochs}.items() if v is not None}
    print(run_demo(args.out, device=args.device, seed=args.seed, **kwargs)["markdown"])
    return 0
