"""1 -> 2 process scaling on CPU (gloo): throughput and correctness on the same global batch.

A small G2D model (the ``tiny`` preset: ResNet-18, a small random BERT, ``--size`` px) trains for
``--steps`` optimizer steps on the same global batch sequence, once in 1 process (``--threads``
torch threads) and once in 2 gloo processes (``--mode split``, default: ``--threads`` / 2 threads
each, so both runs use the same cores; ``--mode scale``: ``--threads`` each, twice the cores), each
rank taking half of every global batch, through the trainer's own pieces (``compute_losses`` with
gathered negatives, ``wrap_ddp``, the trainer's AdamW or SGD). Prints samples/s of each, the
2-process overhead, and the largest difference of loss and of any parameter between the two runs
after the last step.

BatchNorm runs with its running statistics (eval mode) by default (``--bn eval``): with per-rank
batch statistics (``--bn train``, as in real training, no SyncBatchNorm) the two runs legitimately
differ. With AdamW, 1e-7 gradient differences can flip the sign of near-zero gradients and move a
weight by up to 2 x lr per step; SGD (``--optimizer sgd``, default) shows the difference of the
updates themselves.

    PYTHONPATH=src python benchmarks/bench_scaling.py --steps 5 --batch 16 --size 128
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from g2d.config import config_from_dict, get_config
from g2d.data.synthetic import SyntheticCXR, SyntheticCXRCfg
from g2d.factory import create_model
from g2d.model.text_encoder import build_tiny_text_model
from g2d.objective import compute_losses
from g2d.train.loop import wrap_ddp


def _threads(args, world: int) -> int:
    """Torch threads per process: ``split`` shares ``--threads`` among the ranks (same cores for
    both runs); ``scale`` gives every rank ``--threads`` (2 processes use twice the cores)."""
    return max(1, args.threads // world) if args.mode == "split" else args.threads


def _run(rank: int, world: int, args, cfg_dict, images, texts, init_file: str, out_file: str) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(_threads(args, world))
        cfg = config_from_dict(cfg_dict)
        torch.manual_seed(0)
        model = create_model(cfg)
        model.train(args.bn == "train")
        forward = wrap_ddp(model, torch.device("cpu")) if world > 1 else model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=args.lr) if args.optimizer == "sgd" else \
            torch.optim.AdamW(params, lr=args.lr, weight_decay=cfg.train.weight_decay, foreach=True)
        share = args.batch // world
        walls, losses = [], []
        for step in range(args.warmup + args.steps):
            batch = step % (images.shape[0] // args.batch)
            lo = batch * args.batch + rank * share
            imgs, txts = images[lo:lo + share], texts[lo:lo + share]
            if world > 1:
                dist.barrier()
            t = time.perf_counter()
            out = compute_losses(model, imgs, model.tokenize(txts), cfg, step, forward)
            out.total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = out.total.detach().clone()
            if world > 1:
                dist.all_reduce(loss)
                loss /= world
            wall = time.perf_counter() - t
            if world > 1:  # the slowest rank sets the pace
                w = torch.tensor([wall])
                dist.all_reduce(w, op=dist.ReduceOp.MAX)
                wall = w.item()
            if step >= args.warmup:
                walls.append(wall)
            losses.append(loss.item())
        if rank == 0:
            torch.save({"walls": walls, "losses": losses,
                        "params": {k: v.detach().clone() for k, v in model.named_parameters()}}, out_file)
    finally:
        if world > 1:
            dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads: in total (--mode split) or per process (--mode scale)")
    p.add_argument("--mode", choices=("split", "scale"), default="split",
                   help="split: both runs on the same cores; scale: each process gets --threads")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bn", choices=("eval", "train"), default="eval")
    p.add_argument("--decoder", default="pseudo", help="model.decoder.mode (pseudo, reconstruction, ...)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="g2d_scaling_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # checkpoints of two runs: hundreds of MB
    n_batches = 2
    data = SyntheticCXR(SyntheticCXRCfg(num_samples=args.batch * n_batches, image_size=args.size, seed=5))
    items = [data[i] for i in range(len(data))]
    images = torch.stack([it["image"] for it in items])
    texts = [it["text"] for it in items]
    text_dir = build_tiny_text_model(tmp / "bert", texts * 4, vocab_size=500, hidden=128, layers=2, heads=2)
    cfg = get_config("tiny", {"model.text.model": str(text_dir), "model.text.freeze_layers": 1,
                              "model.image_size": args.size, "data.resize": args.size,
                              "model.decoder.mode": args.decoder})
    cfg_dict = cfg.to_dict()
    results = {}
    for world in (1, 2):
        out_file = str(tmp / f"world{world}.pt")
        mp.spawn(_run, args=(world, args, cfg_dict, images, texts, str(tmp / f"init{world}"), out_file),
                 nprocs=world, join=True)
        results[world] = torch.load(out_file, weights_only=False)
    sps = {w: args.batch / statistics.median(r["walls"]) for w, r in results.items()}
    ideal = 1.0 if args.mode == "split" else 2.0  # 2-process speed-up with zero overhead
    loss_diff = max(abs(a - b) for a, b in zip(results[1]["losses"], results[2]["losses"]))
    p1, p2 = results[1]["params"], results[2]["params"]
    param_diff = max((p1[k] - p2[k]).abs().max().item() for k in p1)
    summary = {
        "samples_per_s_1proc": sps[1], "samples_per_s_2proc": sps[2],
        "2proc_over_1proc": sps[2] / sps[1], "overhead": 1 - sps[2] / (ideal * sps[1]),
        "max_abs_loss_diff": loss_diff, "max_abs_param_diff": param_diff,
        "losses_1proc": results[1]["losses"], "losses_2proc": results[2]["losses"],
        "settings": {**{k: v for k, v in vars(args).items() if k != "json"},
                     "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
                     "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")},
    }
    print(json.dumps(summary, indent=2))
    print(f"\n| processes | threads each | samples/s | max |loss diff| | max |param diff| after "
          f"{args.warmup + args.steps} steps |\n|---|---|---|---|---|")
    print(f"| 1 | {_threads(args, 1)} | {sps[1]:.2f} | - | - |")
    print(f"| 2 (gloo) | {_threads(args, 2)} | {sps[2]:.2f} | {loss_diff:.2e} | {param_diff:.2e} |")
    print(f"\n2 processes / 1 process = {sps[2] / sps[1]:.2f}x samples/s (mode {args.mode}, ideal "
          f"{ideal:.0f}x: overhead {100 * summary['overhead']:.0f} %); optimizer {args.optimizer}, "
          f"lr {args.lr}, BN {args.bn}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
