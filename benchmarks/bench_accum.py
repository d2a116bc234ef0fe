"""What gradient accumulation with the whole batch as negatives costs (``train.accum_negatives``).

One optimizer step of the ``tiny`` preset (128 px, CPU, train mode, AdamW) for a step batch of
``--batch`` images, three ways, each in its own process so that its peak resident memory is its own:

- ``whole``: the batch in one forward/backward (``grad_accum`` 1);
- ``micro``: ``--accum`` micro-batches, each with its own negatives (``accum_negatives=micro``);
- ``batch``: ``--accum`` micro-batches with the whole batch as negatives (``accum_negatives=batch``:
  a no-grad pass caches the embeddings, then each micro-batch is recomputed with gradients).

Prints the median step time (the modes' steps interleaved in one process, so load from other
processes hits them alike) and the peak RSS (``ru_maxrss``, one process per mode), each with its
ratio to ``micro``.

    python benchmarks/bench_accum.py --batch 32 --accum 4 --steps 6 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


class Mode:
    """One way of running the step, with its own model and optimizer (same initial weights)."""

    def __init__(self, mode: str, batch: int, accum: int) -> None:
        from g2d.config import get_config
        from g2d.data.synthetic import SyntheticCXR, SyntheticCXRCfg
        from g2d.factory import create_model
        from g2d.train.loop import param_groups

        self.mode, self.parts = mode, 1 if mode == "whole" else accum
        self.cfg = get_config("tiny", {"train.batch_size": batch // self.parts, "train.grad_accum": self.parts,
                                       "train.accum_negatives": "micro" if mode == "micro" else "batch"})
        torch.manual_seed(0)
        self.model = create_model(self.cfg).train()
        self.opt = torch.optim.AdamW(param_groups(self.model, self.cfg), lr=self.cfg.train.lr, foreach=True)
        ds = SyntheticCXR(SyntheticCXRCfg(num_samples=batch, image_size=self.cfg.model.image_size, seed=0))
        items = [ds[i] for i in range(batch)]
        self.images = torch.stack([it["image"] for it in items])
        self.texts = [it["text"] for it in items]

    def step(self, step: int) -> float:
        from g2d.objective import cache_embeddings, compute_losses

        t0 = time.perf_counter()
        size, model = len(self.images) // self.parts, self.model
        micro = [(self.images[k * size:(k + 1) * size], model.tokenize(self.texts[k * size:(k + 1) * size]))
                 for k in range(self.parts)]
        cached = cache_embeddings(model, micro) if self.mode == "batch" else None
        for j, (x, tok) in enumerate(micro):
            out = compute_losses(model, x, tok, self.cfg, step, micro_batches=self.parts, cached=cached, index=j)
            out.objective.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


MODES = ("micro", "batch", "whole")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode in this process
    a = p.parse_args()
    if a.one:  # peak memory of one mode alone
        m = Mode(a.one, a.batch, a.accum)
        for step in range(a.warmup + 1):
            m.step(step)
        print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))  # Linux: kB
        return
    peak = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--batch", str(a.batch), "--accum",
                              str(a.accum), "--warmup", str(a.warmup)], check=True, capture_output=True, text=True)
        peak[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    modes = {m: Mode(m, a.batch, a.accum) for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for step in range(a.warmup + a.steps):
        order = MODES[step % 3:] + MODES[:step % 3]  # A B C, B C A, C A B
        for m in order:
            t = modes[m].step(step)
            if step >= a.warmup:
                times[m].append(t)
    med = {m: statistics.median(v) for m, v in times.items()}
    machine = platform.processor() or platform.machine()
    print(f"tiny preset, 128 px, step batch {a.batch}, {a.accum} micro-batches; {machine}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| mode | step s (median) | x micro | peak RSS MB | x micro |")
    print("|---|---|---|---|---|")
    for m in MODES:
        print(f"| {m} | {med[m]:.2f} | {med[m] / med['micro']:.2f} | {peak[m]:.0f} | {peak[m] / peak['micro']:.2f} |")


if __name__ == "__main__":
    main()
