"""What buys more learning per CPU second on the `tiny` preset (the demo's model)? One training
step (forward, losses, backward, AdamW) of each variant on the same batches, steps interleaved
(A B C, B C A, ...) so load from other processes hits all variants alike; prints the median step
time and the ratio to the first variant.

    python benchmarks/bench_tiny_cpu.py --steps 12 --warmup 3

Variants: ``fp32`` (the tiny preset's attention settings, contiguous tensors), ``bf16`` (CPU bf16
autocast, ``train.cpu_bf16``), ``channels_last``, ``bf16_channels_last``, ``stride32`` (the 4x4 map:
what the finer attention map costs), ``compile`` (``train.compile``; its first steps compile and are
left out as warm-up). ``--flops`` also counts one step's FLOPs per variant and prints its FLOP rate
beside this CPU's best matmul rate in fp32 and bf16 (``bench_step.matmul_ceiling_gflops``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from g2d.config import get_config
from g2d.data.synthetic import SyntheticCXR, SyntheticCXRCfg
from g2d.factory import create_model
from g2d.objective import compute_losses
from g2d.train.loop import _autocast, compile_model, param_groups

VARIANTS = {
    "fp32": {},
    "bf16": {"train.cpu_bf16": True, "train.precision": "bf16"},
    "channels_last": {"channels_last": True},
    "bf16_channels_last": {"train.cpu_bf16": True, "train.precision": "bf16", "channels_last": True},
    "stride32": {"model.image.output_stride": 32},
    "compile": {"train.compile": True},
    "bf16_channels_last_compile": {"train.cpu_bf16": True, "train.precision": "bf16", "channels_last": True,
                                   "train.compile": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--flops", action="store_true", help="count one step's FLOPs per variant")
    args = p.parse_args()
    names = args.variants.split(",")
    base = get_config("tiny", {"train.batch_size": args.batch})
    ds = SyntheticCXR(SyntheticCXRCfg(num_samples=args.batch * 4, image_size=base.model.image_size, seed=0))
    batches = []
    for b in range(4):
        items = [ds[b * args.batch + i] for i in range(args.batch)]
        batches.append((torch.stack([it["image"] for it in items]), [it["text"] for it in items]))
    runs = {}
    for name in names:
        over = dict(VARIANTS[name])
        channels_last = over.pop("channels_last", False)
        cfg = copy.deepcopy(base)
        from g2d.config import apply_overrides

        apply_overrides(cfg, over)
        torch.manual_seed(0)
        model = create_model(cfg).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            compile_model(model)
        opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr, foreach=True)
        runs[name] = (cfg, model, opt, channels_last, [])
    device = torch.device("cpu")

    def train_step(name: str, step: int) -> None:
        cfg, model, opt, channels_last, _ = runs[name]
        images, texts = batches[step % len(batches)]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(cfg, device):
            losses = compute_losses(model, images, model.tokenize(texts), cfg, step)
        losses.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for step in range(args.warmup + args.steps):
        order = names[step % len(names):] + names[:step % len(names)]
        for name in order:
            t0 = time.perf_counter()
            train_step(name, step)
            if step >= args.warmup:
                runs[name][4].append(time.perf_counter() - t0)
    ref = statistics.median(runs[names[0]][4])
    rows = []
    for name in names:
        t = runs[name][4]
        med = statistics.median(t)
        rows.append({"variant": name, "median_s": round(med, 3), "min_s": round(min(t), 3),
                     "max_s": round(max(t), 3), "ratio": round(med / ref, 3)})
        if args.flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                train_step(name, args.warmup + args.steps)
            rows[-1]["gflop"] = round(counter.get_total_flops() / 1e9, 1)
            rows[-1]["gflop_per_s"] = round(rows[-1]["gflop"] / med, 1)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; batch {args.batch}, {args.steps} timed steps after {args.warmup}")
    print("| variant | median s/step | min | max | ratio to " + names[0] + " |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_s']} | {r['min_s']} | {r['max_s']} | {r['ratio']} |")
    if args.flops:
        from bench_step import matmul_ceiling_gflops

        print("| variant | GFLOP a step | GFLOP/s |\n|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['gflop']} | {r['gflop_per_s']} |")
        print(f"this CPU's 4096x4096 matmul: fp32 {matmul_ceiling_gflops():.0f} GFLOP/s, "
              f"bf16 {matmul_ceiling_gflops(torch.bfloat16):.0f} GFLOP/s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
