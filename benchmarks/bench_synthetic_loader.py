"""The demo's pre-training batches, loaded as the trainer loads them, with and without the kept renders;
with ``--labelled``, a detection cell's reads of the labelled synthetic splits instead.

Builds the pre-training data set of the README demo's config (:func:`g2d.demo.demo_config`: 1,536
synthetic pairs at 128 px) through :func:`g2d.train.data.build_pretrain_dataset`, reads every report
once (the pass that builds the text-prefix store), then draws ``--steps`` batches of 32 in the
trainer's order (``EpochSampler``, ``SeededSamples``, ``collate_pairs``, no workers) and prints the
seconds of each part. Only the data path: the step's compute is ``bench_step.py``'s.

``--labelled``: the demo's detection cell reads instead (``synthetic:160``'s train and val splits at
128 px, 12 epochs, as ``g2d eval detection`` reads them through :class:`SyntheticLabelled`), kept
(``keep_mb`` = ``--cache-mb``) or rendered on every access (``--cache-mb 0``).

    PYTHONPATH=src python benchmarks/bench_synthetic_loader.py --cache-mb 1024
    farm-bench -n 5 --timeout 900 --vs 'python benchmarks/bench_synthetic_loader.py --cache-mb 0' \
        -- python benchmarks/bench_synthetic_loader.py --cache-mb 1024
"""

from __future__ import annotations

import argparse
import time

from torch.utils.data import DataLoader

from g2d.config import apply_overrides
from g2d.data.labelled.specs import SyntheticLabelled
from g2d.data.pretraining.pairs import collate_pairs
from g2d.data.transforms import ImageTransformCfg
from g2d.demo import demo_config
from g2d.train.data import EpochSampler, SeededSamples, build_pretrain_dataset, dataset_texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-mb", type=int, default=1024, help="data.synthetic_cache_mb (0: render every access)")
    p.add_argument("--steps", type=int, default=256, help="batches to draw (the demo: 256)")
    p.add_argument("--labelled", action="store_true", help="a detection cell's reads of synthetic:160 instead")
    args = p.parse_args()
    if args.labelled:
        t0 = time.perf_counter()
        geometry = ImageTransformCfg(resize=128, crop=128, augment="none")
        splits = [SyntheticLabelled(s, n_train=160, geometry=geometry, keep_mb=args.cache_mb) for s in ("train", "val")]
        for _ in range(12):
            for split in splits:
                for i in range(len(split)):
                    split[i]
        print(f"cache {args.cache_mb} MiB: 12 epochs of synthetic:160 train + val {time.perf_counter() - t0:.2f} s")
        return
    cfg = demo_config(args.steps, 1536, 0)
    apply_overrides(cfg, {"data.synthetic_cache_mb": args.cache_mb})
    t0 = time.perf_counter()
    dataset = build_pretrain_dataset(cfg.validate())
    dataset_texts(dataset)
    t1 = time.perf_counter()
    sampler = EpochSampler(len(dataset), 0, 1, cfg.train.seed)
    loader = DataLoader(SeededSamples(dataset, cfg.train.seed), batch_size=cfg.train.batch_size,
                        sampler=sampler, collate_fn=collate_pairs, drop_last=True)
    done, epoch = 0, 0
    while done < args.steps:
        sampler.set_epoch(epoch)
        for _ in loader:
            done += 1
            if done == args.steps:
                break
        epoch += 1
    t2 = time.perf_counter()
    epochs = args.steps * cfg.train.batch_size / len(dataset)
    print(f"cache {args.cache_mb} MiB: reports {t1 - t0:.2f} s, {args.steps} batches {t2 - t1:.2f} s "
          f"({epochs:.2f} epochs), total {t2 - t0:.2f} s")


if __name__ == "__main__":
    main()
