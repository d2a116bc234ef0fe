"""The G2D pre-training loop (single process, or DDP under torchrun)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from g2d.attention_diagnostics import (
    collect_attention,
    diagnose_attention,
    synthetic_probe,
)
from g2d.checkpoint import export_model, load_checkpoint, save_checkpoint
from g2d.config import G2DConfig, config_from_dict, save_config
from g2d.data.pretraining.pairs import collate_pairs
from g2d.errors import DataError, NonFiniteLossError
from g2d.factory import check_image_weights, create_model, prepare_text_model
from g2d.model import G2DModel
from g2d.model.text_encoder import ReportTokenizer, tokens_to
from g2d.objective import cache_embeddings, compute_losses
from g2d.seeding import seed_everything
from g2d.train.data import (
    EpochSampler,
    SeededSamples,
    build_pretrain_dataset,
    dataset_texts,
)
from g2d.train.distributed import (
    DistInfo,
    all_ranks_true,
    barrier,
    fault_point,
    init_distributed,
    nan_fault,
    union_over_ranks,
)
from g2d.train.scheduler import build_scheduler
from g2d.train.text_prefix import PrefixCollate, TextPrefixStore, default_store_root, prefix_identity

log = logging.getLogger("g2d.train")

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)  # all logged means, with "step"
    # attention diagnostics on the held-out probe batch (g2d.attention_diagnostics), with "step"
    probes: list[dict[str, float]] = field(default_factory=list)
    skipped_steps: int = 0
    export_dir: Path | None = None


def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _autocast(cfg: G2DConfig, device: torch.device):
    if device.type == "cpu" and cfg.train.cpu_bf16 and cfg.train.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if device.type != "cuda" or cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def wrap_ddp(model: G2DModel, device: torch.device) -> DistributedDataParallel:
    """DDP as the trainer uses it: every trainable parameter takes part in every step (frozen
    text layers have ``requires_grad=False``; the decoder runs with weight 0 during the
    contrastive-only warm-up), so no unused-parameter search.

    Not ``static_graph=True``: with the gathered negatives (an all-reduce inside backward) it gave
    wrong updates on gloo — tests/test_ddp_equivalence.py fails with it: the two replicas held
    different weights after one step, and the loss rose from 2.83 to 3.90 where one process gets
    2.79."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False)


def compile_model(model: G2DModel) -> None:
    """``train.compile``: compile the image encoder and decoder in place. The text tower stays
    eager (its frozen prefix switches grad mode inside the forward, which would break graphs)."""
    model.image_encoder.compile()
    if model.decoder is not None and model.segmentation_head is not None:
        model.decoder.compile()
        model.segmentation_head.compile()


def param_groups(model: G2DModel, cfg: G2DConfig) -> list[dict[str, Any]]:
    """The trainable parameters; the text backbone's at ``lr * train.text_lr_scale`` (the schedule's
    LambdaLR multiplies each group's initial rate by the same factor)."""
    text = [p for p in model.text_encoder.backbone.parameters() if p.requires_grad]
    ids = {id(p) for p in text}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest, "lr": cfg.train.lr}]
    if text and cfg.train.text_lr_scale != 1.0:
        groups.append({"params": text, "lr": cfg.train.lr * cfg.train.text_lr_scale})
    else:
        groups[0]["params"] = rest + text
    return groups


class Pretrainer:
    """Owns the model, optimiser, data and run folder of one pre-training run."""

    def __init__(self, cfg: G2DConfig, out_dir: str | Path, dist_info: DistInfo | None = None,
                 progress: bool = True, tensorboard: bool = True, device: str = "auto"):
        # the run's own copy: resuming (the checkpoint's model/loss win) and the tiny text tower's path
        # change it, never the caller's object
        self.cfg = copy.deepcopy(cfg).validate()
        self.out = Path(out_dir)
        self.dist = dist_info or init_distributed(device, timeout_s=self.cfg.train.dist_timeout_s)
        self.progress = progress and self.dist.is_main
        self.tensorboard = tensorboard
        self.ckpt_dir = self.out / CHECKPOINT_DIR

    # --------------------------------------------------------------------------------- set-up

    def setup(self, resume: str | None = None) -> None:
        cfg, d = self.cfg, self.dist
        resume_path = self._resume_path(resume)
        state = load_checkpoint(resume_path) if resume_path else None
        if state is not None:
            saved = config_from_dict(state["config"])
            if saved.model != cfg.model or saved.loss != cfg.loss:
                log.warning("resuming with the checkpoint's model/loss config (%s); command-line "
                            "values for model.* and loss.* are ignored", resume_path)
                cfg.model, cfg.loss = saved.model, saved.loss
        else:  # a wrong weights file fails here, before any data is read or the run folder made
            check_image_weights(cfg.model.image)
        self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.train.seed + d.rank)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)

        self.dataset: Any = build_pretrain_dataset(cfg, train=True)  # DataError for an unusable table or store
        if len(self.dataset) < cfg.train.batch_size * d.world_size:
            raise DataError(f"dataset has {len(self.dataset)} samples, fewer than one global batch "
                            f"({cfg.train.batch_size} x {d.world_size})")
        if self.cfg.model.text.model == "tiny":  # the main rank builds it, the others wait and point there
            if d.is_main:
                prepare_text_model(cfg, self.out, dataset_texts(self.dataset))
            barrier()
            prepare_text_model(cfg, self.out, [], build=False)
        if d.is_main:
            save_config(cfg, self.out / "config.yaml")

        build_cfg = cfg
        if state is not None:  # the checkpoint's weights replace any initial image weights
            build_cfg = copy.deepcopy(cfg)
            build_cfg.model.image.weights = "none"
        self.model = create_model(build_cfg).to(d.device)
        # channels_last on CPU too: oneDNN convolutions are faster in it (paper model, batch 8,
        # 224 px, 2-core Xeon: step 4.11 -> 3.75 s, benchmarks/bench_step.py g2d_channels_last)
        self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            compile_model(self.model)
        self.collate = self._prefix_collate()
        self.forward: Any = wrap_ddp(self.model, d.device) if d.distributed else self.model
        # fused kernels on CUDA; multi-tensor (foreach) on CPU, several times faster than the default
        fused = d.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.train.lr,
                                           betas=cfg.train.betas, weight_decay=cfg.train.weight_decay,
                                           fused=fused or None, foreach=None if fused else True)
        self.sampler = EpochSampler(len(self.dataset), d.rank, d.world_size, cfg.train.seed)
        self._dl: DataLoader | None = None
        self.batches_per_epoch = self.sampler.per_rank // cfg.train.batch_size
        self.steps_per_epoch = self.batches_per_epoch // cfg.train.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError("an epoch holds less than one optimizer step: lower train.batch_size "
                             "or train.grad_accum")
        self.global_batch = cfg.train.batch_size * d.world_size * cfg.train.grad_accum
        self.total_steps = self._planned_steps(d.world_size)
        # The schedule is planned in steps of the first run's global batch; a run resumed with another
        # world size keeps that plan and maps its steps onto it by samples consumed (_load_state)
        self.plan_batch, self.plan_steps = self.global_batch, self.total_steps
        if state is not None and self._saved_plan(state)[0] != self.global_batch:
            self.plan_batch, self.plan_steps = self._saved_plan(state)
            self.total_steps = round(self.plan_steps * self.plan_batch / self.global_batch)
        self.scheduler = build_scheduler(self.optimizer, self.plan_steps, cfg.train,
                                         self.global_batch / self.plan_batch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=d.device.type == "cuda"
                                           and cfg.train.precision == "fp16")
        self.step, self.epoch, self.batch_in_epoch, self.skipped, self.samples_done = 0, 0, 0, 0, 0
        self.probe: tuple[torch.Tensor, torch.Tensor, Any] | None = None
        if d.is_main and cfg.train.probe_every and cfg.data.spec == "synthetic":
            # held out: the generator's samples depend on (seed, index), so another seed is other images
            self.probe = synthetic_probe(cfg.train.probe_images, cfg.model.image_size,
                                         cfg.data.synthetic_seed + 1)
        if state is not None:
            self._load_state(state)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, self.step,
                     self.epoch, self.batch_in_epoch)

    def _prefix_collate(self) -> PrefixCollate:
        """The loader's collate: tokenization in the workers, and the stored frozen text prefix
        (:mod:`g2d.train.text_prefix`) where ``train.text_prefix_store`` is on and the prefix is frozen.
        One process per machine writes the store; the others wait for it."""
        encoder, t = self.model.text_encoder, self.cfg.train
        store = None
        if t.text_prefix_store != "off" and encoder.prefix_storable:
            root = default_store_root() if t.text_prefix_store == "auto" else Path(t.text_prefix_store)
            device = self.dist.device
            compute = "fp32" if isinstance(_autocast(self.cfg, device), contextlib.nullcontext) else \
                f"{device.type}-{t.precision}"
            store = TextPrefixStore(root / prefix_identity(encoder, t.text_prefix_dtype, compute))
            if self.dist.local_rank == 0:
                store.add(encoder, dataset_texts(self.dataset), t.text_prefix_dtype, progress=self.progress,
                          autocast=lambda: _autocast(self.cfg, device))
            barrier()
            store.reload()
        return PrefixCollate(collate_pairs, ReportTokenizer(encoder.tokenizer, encoder.cfg), store)

    def _planned_steps(self, world_size: int) -> int:
        """The run's optimizer steps with ``world_size`` processes: every epoch, or ``train.max_steps``."""
        t = self.cfg.train
        per_epoch = math.ceil(len(self.dataset) / world_size) // t.batch_size // t.grad_accum
        return min(t.epochs * per_epoch, t.max_steps) if t.max_steps else t.epochs * per_epoch

    def _saved_plan(self, state: dict[str, Any]) -> tuple[int, int]:
        """(global batch, steps) the checkpoint's schedule was planned with; a checkpoint from before
        the plan was stored (2026-12-07) planned it with its own world size."""
        if "schedule" in state:
            return int(state["schedule"]["global_batch"]), int(state["schedule"]["total_steps"])
        t, world = self.cfg.train, int(state["world_size"])
        return t.batch_size * world * t.grad_accum, self._planned_steps(world)

    def _run_probe(self) -> dict[str, float]:
        """Attention diagnostics of the head-mean map on the probe batch (main rank only; no
        collectives, eval mode, the model's mode restored)."""
        assert self.probe is not None
        images, masks, _ = self.probe
        attention = collect_attention(self.model, images)
        diag = diagnose_attention(attention, images, masks, self.cfg.model.pseudo_mask)
        return dataclasses.asdict(diag.mean)

    def _resume_path(self, resume: str | None) -> Path | None:
        if not resume:
            return None
        path = self.ckpt_dir / LAST if resume == "latest" else Path(resume)
        if not path.is_file():
            if resume == "latest":
                log.info("no checkpoint in %s: starting from scratch", self.ckpt_dir)
                return None
            raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
        return path

    def _loader(self) -> DataLoader:
        """One DataLoader for the whole run: with workers, they persist across epochs (no re-spawn
        and re-import per epoch). The sampler, iterated in this process, carries epoch and offset."""
        if self._dl is None:
            cfg = self.cfg
            workers = cfg.data.num_workers
            # Its own generator: building an iterator must not draw from the global RNG, or a
            # resumed run would diverge from an uninterrupted one. Augmentations do not depend on
            # it (SeededSamples seeds each sample by epoch and index).
            gen = torch.Generator().manual_seed(cfg.train.seed * 7919)
            self._dl = DataLoader(SeededSamples(self.dataset, cfg.train.seed), batch_size=cfg.train.batch_size,
                                  sampler=self.sampler, num_workers=workers, collate_fn=self.collate,
                                  drop_last=True, pin_memory=self.dist.device.type == "cuda", generator=gen,
                                  persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
        return self._dl

    # ---------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_steps": self.skipped,
            "world_size": self.dist.world_size,
            "samples_done": self.samples_done,  # global samples of the optimizer steps taken
            "schedule": {"global_batch": self.plan_batch, "total_steps": self.plan_steps},
            "rng": _rng_state(),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.skipped = state["batch_in_epoch"], state["skipped_steps"]
        old_world = int(state["world_size"])
        t = self.cfg.train
        self.samples_done = int(state.get("samples_done", self.step * t.batch_size * old_world * t.grad_accum))
        if old_world == self.dist.world_size:
            self.scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            return
        # Another world size reshards the epoch: it restarts at the same global sample count, and the
        # step count and learning rate continue from the samples consumed (the plan is kept).
        self.batch_in_epoch = self.batch_in_epoch * old_world // self.dist.world_size
        self.step = self.samples_done // self.global_batch
        if self.samples_done % self.global_batch:
            log.warning("%d samples done is not a whole number of steps of %d: continuing at step %d",
                        self.samples_done, self.global_batch, self.step)
        self.scheduler.last_epoch = self.step
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.step)
        log.warning("resuming with %d processes instead of %d: %d samples done, continuing at step %d of %d "
                    "(the learning-rate schedule follows the samples consumed)", self.dist.world_size, old_world,
                    self.samples_done, self.step, self.total_steps)

    def save(self, name: str = LAST) -> None:
        if self.dist.is_main:
            save_checkpoint(self.state_dict(), self.ckpt_dir / name)

    # -------------------------------------------------------------------------------- the loop

    def train(self, interrupt_after: int | None = None, max_nonfinite: int | None = None) -> TrainResult:
        """Run until ``total_steps``. ``interrupt_after`` stops (without the final save/export)
        after that many optimizer steps, as a crash would; tests use it to check resumption.
        A step whose loss is non-finite on any rank is skipped on all of them (no update, counted
        in ``skipped_steps``); ``max_nonfinite`` (default ``train.max_consecutive_nonfinite``) in a
        row raise :class:`NonFiniteLossError`, leaving the last checkpoint as it was."""
        cfg, d = self.cfg, self.dist
        max_nonfinite = max_nonfinite or cfg.train.max_consecutive_nonfinite
        writer = None
        if d.is_main and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"))
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", unit="step",
                       dynamic_ncols=True)
        result = TrainResult(self.out, self.step)
        acc_steps, nonfinite_run = cfg.train.grad_accum, 0
        # BatchNorm statistics move in the forward pass; a skipped step puts them back, so a NaN
        # batch cannot poison them (one fused copy per step).
        buffers = list(self.model.buffers())
        kept = [b.clone() for b in buffers]
        t_last, samples_since = time.perf_counter(), 0
        sums: dict[str, torch.Tensor] = {}
        count = 0
        done = self.step >= self.total_steps
        finished_before = done  # a resumed run that had already finished: nothing new to export
        self.model.train()
        # the whole accumulated batch as contrastive negatives (train.accum_negatives, objective.py)
        cache_negatives = acc_steps > 1 and cfg.train.accum_negatives == "batch"
        while not done and self.epoch < cfg.train.epochs:
            self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch * cfg.train.batch_size)
            pending: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []  # a partial step at epoch end is dropped
            for batch in self._loader():
                if "requested" in batch and hasattr(self.dataset, "note_served"):
                    self.dataset.note_served(batch["requested"], batch["index"])
                images = batch["image"].to(d.device, non_blocking=True)
                images = images.contiguous(memory_format=torch.channels_last)
                pending.append((images, tokens_to(batch["tokens"], d.device)))
                self.batch_in_epoch += 1
                samples_since += images.shape[0] * d.world_size
                if len(pending) < acc_steps:
                    continue
                micro_batches, pending = pending, []
                if buffers:
                    torch._foreach_copy_(kept, buffers)
                cached = None
                if cache_negatives:
                    with _autocast(cfg, d.device):
                        cached = cache_embeddings(self.model, micro_batches)
                    if buffers:  # the caching pass leaves BatchNorm statistics as they were
                        torch._foreach_copy_(buffers, kept)
                finite = torch.ones((), dtype=torch.bool, device=d.device)
                for micro, (images, tokens) in enumerate(micro_batches):
                    sync = micro + 1 == acc_steps or not d.distributed
                    ctx = self.forward.no_sync() if not sync and d.distributed else contextlib.nullcontext()
                    with ctx:
                        with _autocast(cfg, d.device):
                            losses = compute_losses(self.model, images, tokens, cfg, self.step, self.forward,
                                                    micro_batches=acc_steps, cached=cached, index=micro)
                        if nan_fault(self.step, d.rank):  # testing hook (docs/reliability.md); inert by default
                            losses.total = losses.total * float("nan")
                            losses.objective = losses.objective * float("nan")
                        self.scaler.scale(losses.objective).backward()
                    for k, term in losses.terms.items():  # whatever the objective names
                        sums[k] = sums.get(k, 0) + term.float()
                    count += 1
                    finite &= torch.isfinite(losses.total.detach())  # every micro-batch of the step
                step_ok = all_ranks_true(finite)
                if not step_ok:
                    self.optimizer.zero_grad(set_to_none=True)
                    if buffers:
                        torch._foreach_copy_(buffers, kept)
                    self.skipped += 1
                    nonfinite_run += 1
                    log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.step,
                                nonfinite_run)
                    if nonfinite_run >= max_nonfinite:
                        raise NonFiniteLossError(
                            f"{nonfinite_run} consecutive non-finite losses at step {self.step}; "
                            f"last good checkpoint: {self.ckpt_dir / LAST}")
                    continue
                nonfinite_run = 0
                if cfg.train.clip_grad:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.clip_grad)
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses, for the log
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                self.samples_done += self.global_batch
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    means = {k: (v / count).item() for k, v in sums.items()}
                    sums, count = {}, 0
                    now = time.perf_counter()
                    rate = samples_since / max(now - t_last, 1e-9)
                    t_last, samples_since = now, 0
                    result.history.append({"step": self.step, "lr": lr, "samples_per_s": rate, **means})
                    shown = " ".join(f"{k} {v:.4f}" for k, v in means.items())
                    if bar is not None:
                        bar.set_postfix({**{k: f"{v:.3f}" for k, v in means.items()}, "sps": f"{rate:.1f}"})
                    if writer is not None:
                        for k, mean in means.items():
                            writer.add_scalar(f"train/{k}", mean, self.step)
                        writer.add_scalar("train/lr", lr, self.step)
                        writer.add_scalar("train/samples_per_s", rate, self.step)
                    if d.is_main and not self.progress:
                        log.info("step %d/%d %s lr %.2e %.1f samples/s", self.step, self.total_steps, shown, lr, rate)
                if self.probe is not None and (self.step % cfg.train.probe_every == 0
                                               or self.step == self.total_steps):
                    probe = self._run_probe()
                    result.probes.append({"step": self.step, **probe})
                    if writer is not None:
                        for k, score in probe.items():
                            writer.add_scalar(f"attention/{k}", score, self.step)
                    log.info("step %d attention: collapse r %.3f, pointing %.3f (prior %.3f), "
                             "pseudo-mask IoU %.3f (prior %.3f)", self.step, probe["collapse_r"],
                             probe["pointing"], probe["pointing_prior"], probe["iou"], probe["iou_prior"])
                if self.step % cfg.train.ckpt_every == 0:
                    self.save()
                fault_point(self.step, d.rank)  # testing hooks (docs/reliability.md); inert by default
                if interrupt_after is not None and self.step >= interrupt_after:
                    if bar is not None:
                        bar.close()
                    if writer is not None:
                        writer.close()
                    result.steps, result.skipped_steps = self.step, self.skipped
                    return result
                if self.step >= self.total_steps:
                    done = True
                    break
            if not done or self.batch_in_epoch >= self.batches_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
            self.save()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if not finished_before:
            self.save()
        result.steps, result.skipped_steps = self.step, self.skipped
        if hasattr(self.dataset, "bad_indices"):  # each rank saw only its own shard's bad images
            self.dataset.mark_bad(union_over_ranks(self.dataset.bad_indices()))
        if d.is_main:  # what was skipped, by count and reason only (no report text, no ids)
            data_summary = getattr(self.dataset, "summary", None)
            log.info("run summary: %d optimizer steps, %d skipped for a non-finite loss%s", self.step,
                     self.skipped, f"; data {data_summary()}" if callable(data_summary) else "")
            export = self.out / "export"
            if finished_before and (export / "model.safetensors").is_file():
                result.export_dir = export  # unchanged weights: keep the files (and their stamps)
            else:
                result.export_dir = export_model(self.model, self.cfg.to_dict(), export)
        barrier()
        return result


def pretrain(cfg: G2DConfig, out_dir: str | Path, resume: str | None = None, progress: bool = True,
             device: str = "auto", interrupt_after: int | None = None) -> TrainResult:
    """Pre-train G2D and export the model to ``out_dir/export``.

    :param resume: ``"latest"`` (``out_dir/checkpoints/last.pt`` if present) or a checkpoint path.
    """
    trainer = Pretrainer(cfg, out_dir, progress=progress, device=device)
    trainer.setup(resume)
    return trainer.train(interrupt_after=interrupt_after)
