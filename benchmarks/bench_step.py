"""Pre-training step benchmark: g2d's step vs. a step built like the released code, side by side.

Both use the same `paper` model (ResNet-50, BERT-base-sized text tower with random weights — no
download — 3 heads, d = 128, U-Net decoder), the same images and reports, batch and input size.
The baseline follows the release's design: every report padded to 256 tokens, embeddings left
trainable (backward through all 12 layers), pseudo masks built on the CPU with NumPy quantiles
(a host sync per step). Prints samples/s, peak memory, a per-phase breakdown and the ratio.

    python benchmarks/bench_step.py --device cpu --batch 8 --steps 3
    python benchmarks/bench_step.py --device cuda --batch 128 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from g2d.config import get_config
from g2d.data.synthetic import SyntheticCXR, SyntheticCXRCfg
from g2d.factory import create_model
from g2d.losses import contrastive_loss, pixel_alignment_loss
from g2d.model.text_encoder import build_tiny_text_model
from g2d.pseudo_mask import build_pseudo_masks


def release_pseudo_masks(attn: torch.Tensor, size: int) -> torch.Tensor:
    """The release's construction: CPU, NumPy, nearest upsampling, per-image 0.85 quantile."""
    a = attn.detach().float().cpu().mean(1, keepdim=True)
    a = F.interpolate(a, size=(size, size), mode="nearest")[:, 0].numpy()
    thr = np.quantile(a, 0.85, axis=(1, 2), keepdims=True)
    return torch.from_numpy((a > thr).astype(np.float32))[:, None].to(attn.device)


class Timer:
    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t


def step(model, cfg, opt, images, texts, baseline: bool, timer: Timer, autocast) -> None:
    size = images.shape[-1]
    with timer("tokenize"):
        if baseline:
            tok = model.text_encoder.tokenizer(texts, padding="max_length", truncation=True,
                                               max_length=256, return_tensors="pt")
            tok = {k: v.to(images.device) for k, v in tok.items()}
        else:
            tok = model.tokenize(texts)
    with autocast():
        with timer("image_forward"):
            feats = model.image_encoder(images)
            pooled, attn = model.pool(model._dense_for_pool(feats[-1]))
            img = F.normalize(model.image_proj(pooled), dim=-1)
        with timer("text_forward"):
            txt = model.text_forward(tok)
        with timer("pseudo_masks"):
            with torch.no_grad():
                masks = release_pseudo_masks(attn, size) if baseline else \
                    build_pseudo_masks(attn.float(), images.float(), cfg.model.pseudo_mask)
        with timer("decoder_forward"):
            logits = model.segmentation_head(model.decoder(feats))
        with timer("losses"):
            loss = contrastive_loss(img, txt, model.logit_scale.exp(), cfg.loss) + \
                pixel_alignment_loss(logits, masks, cfg.loss)
    with timer("backward"):
        loss.backward()
    with timer("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def run(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = SyntheticCXR(SyntheticCXRCfg(num_samples=args.batch, image_size=args.size, seed=0))
    items = [data[i] for i in range(args.batch)]
    images = torch.stack([it["image"] for it in items]).to(device)
    texts = [it["text"] for it in items]
    if args.reports:  # real report lengths matter for the text tower's cost
        texts = (Path(args.reports).read_text(encoding="utf-8").split("\n\n") * args.batch)[: args.batch]
    tmp = Path(tempfile.mkdtemp())
    text_dir = build_tiny_text_model(tmp / "bert", texts * 4, vocab_size=3000, hidden=768, layers=12,
                                     heads=12)
    results = {}
    for name, baseline in (("g2d", False), ("release_design", True)):
        cfg = get_config("paper", {"model.image.weights": "none", "model.text.model": str(text_dir),
                                   "model.image_size": args.size,
                                   "model.text.freeze_embeddings": not baseline})
        model = create_model(cfg).to(device).train()
        if device.type == "cuda" and not baseline:
            model = model.to(memory_format=torch.channels_last)
        x = images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and not baseline \
            else images
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-8, fused=device.type == "cuda" and not baseline)
        dtype = torch.bfloat16 if not baseline else torch.float16
        autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if device.type == "cuda" \
            else contextlib.nullcontext
        timer = Timer(device)
        for _ in range(args.warmup):
            step(model, cfg, opt, x, texts, baseline, timer, autocast)
        timer.times.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        walls = []
        for _ in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(model, cfg, opt, x, texts, baseline, timer, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
        tok_len = model.tokenize(texts)["input_ids"].shape[1]
        flops = None
        if args.flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                step(model, cfg, opt, x, texts, baseline, Timer(device), autocast)
            flops = counter.get_total_flops()
        res = {
            "samples_per_s": args.batch / statistics.median(walls),
            "step_s_median": statistics.median(walls),
            "breakdown_s_per_step": {k: v / args.steps for k, v in timer.times.items()},
            "text_tokens_per_report": 256 if baseline else tok_len,
        }
        if flops:
            res["tflop_per_step"] = flops / 1e12
            res["achieved_tflops"] = flops / 1e12 / res["step_s_median"]
            if args.peak_tflops:
                res["fraction_of_bf16_peak"] = res["achieved_tflops"] / args.peak_tflops
        total = sum(res["breakdown_s_per_step"].values())
        res["pseudo_mask_share"] = res["breakdown_s_per_step"]["pseudo_masks"] / total
        if device.type == "cuda":
            res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        results[name] = res
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["speedup"] = results["g2d"]["samples_per_s"] / results["release_design"]["samples_per_s"]
    results["machine"] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or
        platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": args.batch, "size": args.size, "steps": args.steps,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() or "unknown",
        "date": time.strftime("%Y-%m-%d"),
    }
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reports", help="text file of reports separated by blank lines (default: synthetic)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--flops", action="store_true", help="count FLOPs of one step (FlopCounterMode)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for the fraction "
                   "(H100 SXM: 989)")
    args = p.parse_args()
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
