import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from g2d.config import LossCfg
from g2d.losses import attention_concentration_loss, contrastive_loss, dice_loss, pixel_alignment_loss


def _reference_infonce(img, txt, scale):
    """Eq. 1 both ways, written with plain Python arithmetic."""
    n = len(img)
    sim = [[scale * sum(a * b for a, b in zip(img[i], txt[j])) for j in range(n)] for i in range(n)]
    i2t = -sum(sim[i][i] - math.log(sum(math.exp(s) for s in sim[i])) for i in range(n)) / n
    t2i = -sum(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)) / n
    return i2t, t2i


def test_contrastive_loss_matches_hand_computation():
    img = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    txt = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    i2t, t2i = _reference_infonce(img, txt, 1 / 0.07)
    args = (torch.tensor(img), torch.tensor(txt), torch.tensor(1 / 0.07))
    mean = contrastive_loss(*args, LossCfg())
    summed = contrastive_loss(*args, LossCfg(contrastive_reduction="sum"))
    assert mean.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    assert summed.item() == pytest.approx(i2t + t2i, rel=1e-5)


def test_dice_and_bce_match_hand_computation():
    logits = torch.tensor([[[[0.0, 2.0], [-2.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    p = [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2)), 0.5]
    t = [1, 1, 0, 0]
    dice = 1 - (2 * sum(a * b for a, b in zip(p, t)) + 1e-5) / (sum(p) + sum(t) + 1e-5)
    bce = -sum(b * math.log(a) + (1 - b) * math.log(1 - a) for a, b in zip(p, t)) / 4
    assert dice_loss(logits, target).item() == pytest.approx(dice, rel=1e-6)
    assert pixel_alignment_loss(logits, target, LossCfg()).item() == pytest.approx(0.5 * (dice + bce), rel=1e-6)
    # the release's variant: Dice on raw logits, plus 0.2 BCE
    z = [0.0, 2.0, -2.0, 0.0]
    dice_logits = 1 - (2 * sum(a * b for a, b in zip(z, t)) + 1e-5) / (sum(z) + sum(t) + 1e-5)
    release = LossCfg(dice_input="logits", dice_weight=1.0, bce_weight=0.2)
    assert pixel_alignment_loss(logits, target, release).item() == pytest.approx(dice_logits + 0.2 * bce, rel=1e-5)


def test_attention_concentration_by_hand():
    """One cell: 0. Uniform on h x w: (1 - 1/h^2) / 12 + (1 - 1/w^2) / 12. Two cells at the ends of a
    row: var_x = ((w - 1) / (2 w))^2."""
    one = torch.zeros(2, 3, 4, 4)
    one[..., 1, 2] = 1
    assert attention_concentration_loss(one).item() == 0.0
    uniform = torch.full((1, 2, 4, 8), 0.5)  # unnormalised: the loss renormalises
    expected = (1 - 1 / 16) / 12 + (1 - 1 / 64) / 12
    assert math.isclose(attention_concentration_loss(uniform).item(), expected, rel_tol=1e-6)
    ends = torch.zeros(1, 1, 4, 4)
    ends[0, 0, 2, 0] = ends[0, 0, 2, 3] = 0.5
    assert math.isclose(attention_concentration_loss(ends).item(), (3 / 8) ** 2, rel_tol=1e-6)


def test_attention_concentration_is_off_by_default_and_adds_to_the_total(tiny_cfg):
    from g2d.factory import create_model
    from g2d.objective import compute_losses

    assert LossCfg().attention_concentration == 0.0
    torch.manual_seed(0)
    model = create_model(tiny_cfg)
    images = torch.rand(4, 1, 64, 64)
    tokens = model.tokenize(["a", "b", "c", "d"])
    totals = []
    for weight in (0.0, 2.0):
        tiny_cfg.loss.attention_concentration = weight
        torch.manual_seed(1)
        totals.append(compute_losses(model.eval(), images, tokens, tiny_cfg, step=0).total)
    with torch.no_grad():
        conc = attention_concentration_loss(model.image_forward(images, decode=False).attention)
    assert conc > 0
    torch.testing.assert_close(totals[1] - totals[0], 2.0 * conc)


def test_soft_dice_is_minimal_at_the_target():
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    good = dice_loss(target * 20 - 10, target)
    bad = dice_loss(-(target * 20 - 10), target)
    assert good.item() < 1e-3 < 0.99 < bad.item()


def _worker(rank, world, init_file, img, txt, negatives, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = img.shape[0] // world
        mine_i = img[rank * b:(rank + 1) * b].clone().requires_grad_(True)
        mine_t = txt[rank * b:(rank + 1) * b].clone().requires_grad_(True)
        loss = contrastive_loss(F.normalize(mine_i, dim=-1), F.normalize(mine_t, dim=-1),
                                torch.tensor(1 / 0.07), LossCfg(negatives=negatives))
        loss.backward()
        torch.save({"loss": loss.detach(), "gi": mine_i.grad, "gt": mine_t.grad}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("negatives", ["global", "local"])
def test_gathered_negatives_equal_single_process(tmp_path, negatives):
    torch.manual_seed(0)
    world, n = 2, 8
    img, txt = torch.randn(n, 16), torch.randn(n, 16)
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), img, txt, negatives, str(tmp_path / "out")),
             nprocs=world, join=True)
    parts = [torch.load(tmp_path / f"out.{r}") for r in range(world)]
    # DDP averages gradients over ranks; the mean of the rank losses is what is optimised.
    mean_loss = sum(p["loss"] for p in parts) / world
    gi = torch.cat([p["gi"] for p in parts]) / world
    gt = torch.cat([p["gt"] for p in parts]) / world

    ref_i, ref_t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    if negatives == "global":
        ref = contrastive_loss(F.normalize(ref_i, dim=-1), F.normalize(ref_t, dim=-1),
                               torch.tensor(1 / 0.07), LossCfg())
    else:  # the release: each half is its own contrastive problem
        halves = [contrastive_loss(F.normalize(ref_i[s], dim=-1), F.normalize(ref_t[s], dim=-1),
                                   torch.tensor(1 / 0.07), LossCfg()) for s in (slice(0, 4), slice(4, 8))]
        ref = sum(halves) / 2
    ref.backward()
    torch.testing.assert_close(mean_loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gi, ref_i.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gt, ref_t.grad, rtol=1e-4, atol=1e-6)
    if negatives == "local":
        full = contrastive_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(1 / 0.07), LossCfg())
        assert not torch.allclose(full, mean_loss)


# ------------------------------------------------------------------- gradient accumulation (case 21)


def _step_grads(model, cfg, images, texts, parts: int, cached: bool):
    """Gradients and reported contrastive loss of one optimizer step over ``images`` split into
    ``parts`` micro-batches, as the trainer runs it (objective.py)."""
    from g2d.objective import cache_embeddings, compute_losses

    model.zero_grad(set_to_none=True)
    size = len(images) // parts
    micro = [(images[k * size:(k + 1) * size], model.tokenize(texts[k * size:(k + 1) * size])) for k in range(parts)]
    cache = cache_embeddings(model, micro) if cached else None
    vla = []
    for j, (x, tok) in enumerate(micro):
        out = compute_losses(model, x, tok, cfg, step=10**6, micro_batches=parts, cached=cache, index=j)
        out.objective.backward()
        vla.append(out.vla.item())
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                       for p in model.parameters() if p.requires_grad])
    return grads, vla


@pytest.mark.parametrize("mode", ["reconstruction", "pseudo"])
def test_accumulated_step_with_cached_negatives_equals_the_whole_batch(tiny_cfg, mode):
    """Batch 8 in one step vs 2 x 4 micro-batches with train.accum_negatives=batch: the same
    contrastive loss (the whole batch's, chance ln 8) and the same gradients; per-micro-batch
    negatives (the option) give another loss (chance ln 4) and other gradients. Eval mode: BatchNorm
    normalises each micro-batch by its own statistics in train mode, as any accumulation does."""
    from g2d.data.synthetic import SyntheticCXR, SyntheticCXRCfg
    from g2d.factory import create_model

    tiny_cfg.model.decoder.mode = mode
    torch.manual_seed(0)
    model = create_model(tiny_cfg).eval()
    data = SyntheticCXR(SyntheticCXRCfg(num_samples=8, image_size=64, seed=11))
    images = torch.stack([data[i]["image"] for i in range(8)])
    texts = [data[i]["text"] for i in range(8)]
    whole, v8 = _step_grads(model, tiny_cfg, images, texts, 1, cached=False)
    cached, v44 = _step_grads(model, tiny_cfg, images, texts, 2, cached=True)
    micro, vm = _step_grads(model, tiny_cfg, images, texts, 2, cached=False)
    assert v44 == pytest.approx([v8[0]] * 2, rel=1e-5)
    # pseudo masks threshold the attention: a 1e-8 change of a map can flip a pixel at the threshold
    tol = 1e-4 if mode == "reconstruction" else 2e-3
    assert ((cached - whole).norm() / whole.norm()).item() < tol
    assert ((micro - whole).norm() / whole.norm()).item() > 0.05
    assert vm != pytest.approx([v8[0]] * 2, rel=1e-3)


def test_accum_negatives_is_a_named_choice_defaulting_to_the_whole_batch():
    from g2d.config import get_config
    from g2d.errors import ConfigError

    assert get_config("paper").train.accum_negatives == "batch"
    assert get_config("tiny", {"train.accum_negatives": "micro"}).train.accum_negatives == "micro"
    with pytest.raises(ConfigError, match="accum_negatives"):
        get_config("tiny", {"train.accum_negatives": "all"}).validate(check_paths=False)
