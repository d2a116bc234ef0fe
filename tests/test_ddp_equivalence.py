"""Two gloo processes, each on half of a global batch, make the same update as one process on the
whole batch: the trainer's DDP wrapper (no unused-parameter search), its losses with gathered
negatives (``loss.negatives=global``), gradient accumulation with ``no_sync`` and the whole
accumulated batch as negatives (``train.accum_negatives=batch``: 2 ranks x 2 micro-batches of 2
against one process with one batch of 8), and its optimizer.

BatchNorm layers run in eval mode here: their batch statistics are per rank (no SyncBatchNorm, as
in the paper's and the release's training), the one part of a step that legitimately depends on how
the batch is split. Dropout is off in eval mode too.

The tight comparison uses the decoder's ``reconstruction`` target: every term is continuous in the
weights. With pseudo masks the target is a hard threshold of the attention maps, and a 1e-8
difference in attention (BLAS kernels differ between batch sizes 4 and 8) may flip a pixel tied
at the threshold, so that case gets a loose tolerance. tests/test_losses.py checks the contrastive
loss and its gradients alone.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from g2d.config import G2DConfig, config_from_dict
from g2d.data.synthetic import SyntheticCXR, SyntheticCXRCfg
from g2d.factory import create_model
from g2d.objective import cache_embeddings, compute_losses
from g2d.train.loop import wrap_ddp

GLOBAL_BATCH, STEPS, WORLD = 8, 2, 2


def _model_and_opt(cfg: G2DConfig):
    torch.manual_seed(0)
    model = create_model(cfg).eval()  # see the module docstring: BN batch statistics are per rank
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas,
                            weight_decay=cfg.train.weight_decay, foreach=True)  # as the trainer on CPU
    return model, opt


def _train(cfg, images, texts, rank: int, world: int, accum: int, steps: int):
    """``steps`` optimizer steps; each takes ``accum`` micro-batches of this rank's share of the
    global batch (the trainer's two passes: cached embeddings, then each micro-batch with gradients).
    Returns (losses as the mean over ranks, each step's gradients, final parameters)."""
    model, opt = _model_and_opt(cfg)
    forward = wrap_ddp(model, torch.device("cpu")) if world > 1 else model
    losses, grads = [], []
    share = images.shape[0] // world // accum
    for step in range(steps):
        total = torch.zeros(())
        micro_batches = [(images[(m * world + rank) * share:(m * world + rank + 1) * share],
                          model.tokenize(texts[(m * world + rank) * share:(m * world + rank + 1) * share]))
                         for m in range(accum)]
        cached = cache_embeddings(model, micro_batches) if accum > 1 else None
        for micro, (imgs, tokens) in enumerate(micro_batches):
            ctx = forward.no_sync() if world > 1 and micro + 1 < accum else contextlib.nullcontext()
            with ctx:
                out = compute_losses(model, imgs, tokens, cfg, step, forward, micro_batches=accum, cached=cached,
                                     index=micro)
                out.objective.backward()
            total += out.total.detach() / accum
        if world > 1:
            dist.all_reduce(total)
            total /= world
        losses.append(total)
        grads.append({k: v.grad.clone() for k, v in model.named_parameters() if v.requires_grad})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return torch.stack(losses), grads, {k: v.detach().clone() for k, v in model.named_parameters()}


# (name, decoder mode, micro-batches per step, optimizer steps)
SCENARIOS = (("plain", "reconstruction", 1, STEPS), ("accum", "reconstruction", 2, 1),
             ("pseudo", "pseudo", 1, 1))


def _scenario_cfg(cfg_dict, mode: str) -> G2DConfig:
    cfg = config_from_dict(cfg_dict)
    cfg.model.decoder.mode = mode
    return cfg


def _worker(rank, init_file, cfg_dict, images, texts, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        results = {name: _train(_scenario_cfg(cfg_dict, mode), images, texts, rank, WORLD, accum, steps)
                   for name, mode, accum, steps in SCENARIOS}
        torch.save(results, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tiny_cfg, tmp_path):
    tiny_cfg.train.lr = 1e-3
    cfg_dict = tiny_cfg.to_dict()
    data = SyntheticCXR(SyntheticCXRCfg(num_samples=GLOBAL_BATCH, image_size=tiny_cfg.model.image_size,
                                        seed=3))
    items = [data[i] for i in range(GLOBAL_BATCH)]
    images = torch.stack([it["image"] for it in items])
    texts = [it["text"] for it in items]
    mp.spawn(_worker, args=(str(tmp_path / "init"), cfg_dict, images, texts, str(tmp_path / "out")),
             nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(WORLD)]

    torch.set_num_threads(1)
    for name, mode, _accum, steps in SCENARIOS:
        cfg = _scenario_cfg(cfg_dict, mode)
        # one process, the whole global batch in one step (accumulation: the same batch of 8)
        ref_losses, ref_grads, ref_params = _train(cfg, images, texts, 0, 1, accum=1, steps=steps)
        losses, grads, params = ranks[0][name]
        for n, p in params.items():  # DDP keeps the replicas identical
            torch.testing.assert_close(ranks[1][name][2][n], p, rtol=0, atol=0, msg=f"{name} {n}")
        if mode == "pseudo":
            torch.testing.assert_close(losses, ref_losses, rtol=2e-3, atol=0, msg=name)
            continue
        # the loss after each update (a wrong update shows here) and the averaged gradient that
        # the first update is made from; later gradients are not compared because AdamW's first
        # steps amplify 1e-7 differences of near-zero gradients into +-lr changes
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, msg=name)
        for n, g in ref_grads[0].items():
            torch.testing.assert_close(grads[0][n], g, rtol=1e-4, atol=1e-6, msg=f"{name} grad {n}")
        moved = max((ref_params[n] - p0).abs().max().item()
                    for n, p0 in _model_and_opt(cfg)[0].named_parameters() if p0.requires_grad)
        assert moved > 1e-4  # the steps did change the weights
