"""Does the attention follow the findings? One short `tiny` pre-training on synthetic data with
config overrides, then the attention diagnostics, retrieval and the final contrastive loss.

    python benchmarks/attention_study.py NAME --steps 128 --seed 0 model.pool.token_norm=true ...

Writes ``runs/attention_study/NAME_sSEED/result.json`` and appends one row to
``runs/attention_study/results.csv``. docs/attention.md records what the runs showed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from pathlib import Path

from g2d.attention_diagnostics import (
    collect_attention,
    diagnose_attention,
    synthetic_probe,
)
from g2d.config import apply_overrides, parse_overrides
from g2d.demo import _held_out, demo_config, evaluate
from g2d.downstream.results import write_json
from g2d.factory import load_model
from g2d.train.loop import pretrain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("name")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1536)
    p.add_argument("--out", default="runs/attention_study")
    args = p.parse_intermixed_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = demo_config(args.steps, args.samples, args.seed)
    cfg.train.probe_every = max(16, args.steps // 8)
    apply_overrides(cfg, parse_overrides(args.overrides))
    cfg.validate()
    run = Path(args.out) / f"{args.name}_s{args.seed}"
    t0 = time.perf_counter()
    result = pretrain(cfg, run, progress=False, device="cpu")
    train_s = time.perf_counter() - t0
    model = load_model(run / "export")
    images, masks, _ = synthetic_probe(128, cfg.model.image_size, args.seed + 1)
    diag = diagnose_attention(collect_attention(model, images), images, masks, cfg.model.pseudo_mask)
    data = _held_out(256, cfg.model.image_size, args.seed + 1)
    retrieval = evaluate(model, data)
    last = result.history[-3:]
    row = {"name": args.name, "seed": args.seed, "steps": args.steps, "train_s": round(train_s, 1),
           "vla_end": sum(h["vla"] for h in last) / len(last), "ln_b": math.log(cfg.train.batch_size),
           **{k: v for k, v in diag.as_dict().items() if "/" not in k},
           "top1_findings": retrieval["top1_findings"], "grounding_dice": retrieval["grounding_dice"],
           "overrides": " ".join(args.overrides)}
    write_json(run / "result.json", {**row, "diagnostics": diag.as_dict(), "probes": result.probes})
    table = Path(args.out) / "results.csv"
    new = not table.is_file()
    with table.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
