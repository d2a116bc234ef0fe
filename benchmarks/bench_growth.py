"""Step-time and memory growth over a long run of the real trainer (leaks, recompiles).

Runs ``Pretrainer`` (the ``tiny`` preset: ResNet-18, a small random BERT built from the reports,
64 px, batch 8, synthetic data, one epoch long enough for every step, no TensorBoard, no
checkpoint until the end) for ``--steps`` optimizer steps and records, after every step, the wall
time and the process's resident memory. Prints step time and RSS per window of 100 steps, the
first and last 100 steps side by side (the first ``--skip`` steps are left out of the first window:
allocator warm-up, compilation), the compiled-frame count with ``--compile``, and a verdict line.

    PYTHONPATH=src python benchmarks/bench_growth.py                 # 1000 steps, eager
    PYTHONPATH=src python benchmarks/bench_growth.py --compile       # train.compile=true
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

from g2d.config import get_config
from g2d.train.loop import Pretrainer

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["frames"].get(k, 0) for k in ("ok",)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the first window")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="train.compile=true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steadier timings on a shared machine)")
    p.add_argument("--max-growth", type=float, default=1.10,
                   help="verdict: last/first window median step time above this is growth")
    p.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                   help="verdict: RSS rise from the end of the first window to the end above this is a leak")
    p.add_argument("--out", help="run folder (default: a temporary one)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="g2d_growth_"))
    if not args.out:  # a folder the user did not ask for is not left behind
        atexit.register(shutil.rmtree, out, ignore_errors=True)
    cfg = get_config("tiny", {
        "model.text.model": "tiny", "model.text.freeze_layers": 1, "model.image_size": args.size,
        "model.pool.width": 48, "data.resize": args.size, "data.num_workers": 0,
        # one epoch holds every step: no epoch-end checkpoint inside the measured window
        "data.synthetic_samples": args.batch * (args.steps + 1), "train.batch_size": args.batch,
        "train.max_steps": args.steps, "train.epochs": 1, "train.log_every": args.window,
        "train.ckpt_every": 10 * args.steps, "train.warmup_steps": 20, "train.compile": args.compile,
    })
    trainer = Pretrainer(cfg, out, progress=False, tensorboard=False, device="cpu")
    trainer.setup()

    times: list[float] = []
    rss: list[float] = []
    frames: list[int] = []
    last = [time.perf_counter()]

    def after_step(*_):  # optimizer step post-hook: once per optimizer step of the loop
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        rss.append(rss_mib())
        frames.append(compiled_frames() if args.compile else 0)

    trainer.optimizer.register_step_post_hook(after_step)
    start = time.perf_counter()
    last[0] = start
    trainer.train()
    total = time.perf_counter() - start
    n = len(times)
    w = args.window
    print(f"{n} steps in {total:.1f} s (batch {args.batch}, {args.size} px, compile={args.compile}, "
          f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f})")
    print("| steps | median step ms | mean step ms | RSS MiB at end | compiled frames |")
    print("|---|---|---|---|---|")
    for a in range(0, n, w):
        seg = times[a:a + w]
        print(f"| {a + 1}-{a + len(seg)} | {1e3 * statistics.median(seg):.1f} | "
              f"{1e3 * statistics.mean(seg):.1f} | {rss[a + len(seg) - 1]:.0f} | {frames[a + len(seg) - 1]} |")
    first = times[args.skip:args.skip + w]
    last_w = times[-w:]
    growth = statistics.median(last_w) / statistics.median(first)
    rss_growth = rss[-1] - rss[min(args.skip + w, n) - 1]
    recompiles = frames[-1] - frames[min(args.skip + w, n) - 1] if args.compile else 0
    ok = growth <= args.max_growth and rss_growth <= args.max_rss_growth_mib and recompiles == 0
    result = {
        "steps": n, "compile": args.compile, "first_window_median_ms": 1e3 * statistics.median(first),
        "last_window_median_ms": 1e3 * statistics.median(last_w), "step_time_ratio_last_first": growth,
        "rss_mib_after_first_window": rss[min(args.skip + w, n) - 1], "rss_mib_end": rss[-1],
        "rss_growth_mib": rss_growth, "frames_compiled_after_first_window": recompiles,
        "total_s": total, "load_avg_1min": os.getloadavg()[0],
    }
    print(f"\nfirst {w} (after {args.skip} warm-up) median {result['first_window_median_ms']:.1f} ms, "
          f"last {w} median {result['last_window_median_ms']:.1f} ms: ratio {growth:.3f}; "
          f"RSS {result['rss_mib_after_first_window']:.0f} -> {rss[-1]:.0f} MiB ({rss_growth:+.1f}); "
          f"new compiled frames after the first window: {recompiles}")
    print(f"VERDICT: {'no growth' if ok else 'GROWTH'} (limits: step-time ratio <= {args.max_growth}, "
          f"RSS rise <= {args.max_rss_growth_mib:.0f} MiB, 0 recompiles)")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "step_s": times, "rss_mib": rss}, indent=2))


if __name__ == "__main__":
    main()
