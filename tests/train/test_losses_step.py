"""The full step combines the losses exactly as DINOv2's SSLMetaArch.forward_backward, and does not collapse."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from webcurate.train.config import load_config
from webcurate.train.models import build_models
from webcurate.train.optim import build_optimizer, param_groups
from webcurate.train.schedules import Schedules
from webcurate.train.step import TrainStep

TINY = ["model.name=vit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=64", "model.depth=2",
        "model.num_heads=2", "model.drop_path_rate=0", "model.layerscale=null", "dino.n_prototypes=256",
        "dino.hidden_dim=128", "dino.bottleneck_dim=32", "loader.global_size=32", "loader.local_size=16",
        "loader.n_local=3", "loader.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0.1",
        "teacher.warmup_temp_epochs=0.5", "optim.freeze_last_layer_epochs=0.1"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny models only lose time to thread hand-offs (and the CPU is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_step(overrides, seed=0):
    cfg = load_config(None, TINY + list(overrides))
    torch.manual_seed(seed)
    student, teacher, objective = build_models(cfg, torch.device("cpu"))
    opt = build_optimizer(param_groups(student.submodules(), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult))
    return cfg, TrainStep(cfg, student, student, teacher, opt, objective, torch.device("cpu"))


def fixed_batch(B=8, n_local=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(2 * B, 16, generator=g) < 0.3
    masks[0] = False
    return {"global_crops": torch.randn(2 * B, 3, 32, 32, generator=g),
            "local_crops": torch.randn(n_local * B, 3, 16, 16, generator=g), "masks": masks}


def reference_losses(step: TrainStep, batch, teacher_temp, centering):
    """SSLMetaArch.forward_backward's arithmetic on the same modules (DINOv2, world size 1)."""
    s, t = copy.deepcopy(step.student_module), copy.deepcopy(step.teacher)
    gc, lc, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
    n_local, n_g = lc.shape[0] // (gc.shape[0] // 2), 2
    mask_indices = masks.flatten().nonzero().flatten()
    n_masked = mask_indices.numel()
    with torch.no_grad():
        out = t.backbone(gc)
        tc = out["cls"].chunk(2)
        tc = torch.cat((tc[1], tc[0]))
        tp = out["patch"].flatten(0, 1).index_select(0, mask_indices)
        after = t.dino_head(torch.cat([tc, tp]))
        t_cls, t_patch = after[: tc.shape[0]], after[tc.shape[0]:]
        assert centering == "centering"  # first step: the centers are zero
        t_dino = F.softmax(t_cls / teacher_temp, dim=-1).view(2, -1, t_cls.shape[-1])
        t_ibot = F.softmax(t_patch / teacher_temp, dim=-1)
    so_g = s.backbone(gc, masks)
    so_l = s.backbone(lc)
    s_local = s.dino_head(so_l["cls"])
    s_global = s.dino_head(so_g["cls"])
    s_patch = s.dino_head(so_g["patch"].flatten(0, 1).index_select(0, mask_indices))

    def dino(student_list, teacher_list):
        total = 0
        for x in student_list:
            lsm = F.log_softmax(x / 0.1, dim=-1)
            for y in teacher_list:
                total -= torch.sum(y * lsm, dim=-1).mean()
        return total

    n_local_terms = max(n_local * n_g, 1)
    n_global_terms = (n_g - 1) * n_g
    local = dino(s_local.chunk(n_local), list(t_dino)) / (n_global_terms + n_local_terms)
    glob = dino([s_global], [t_dino.flatten(0, 1)]) * 2 / (n_global_terms + n_local_terms)

    def koleo(x, eps=1e-8):
        x = F.normalize(x, eps=eps, p=2, dim=-1)
        dots = x @ x.t()
        dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
        _, idx = torch.max(dots, dim=1)
        return -torch.log(torch.nn.PairwiseDistance(2, eps=eps)(x, x[idx]) + eps).mean()

    ko = 0.1 * sum(koleo(p) for p in so_g["cls"].chunk(2))
    w = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    ib = -(torch.sum(t_ibot * F.log_softmax(s_patch / 0.1, dim=-1), dim=-1)[:n_masked] * w).sum() / masks.shape[0]
    ib = ib * 2 * (1.0 / n_g)
    return {"dino_local_loss": local, "dino_global_loss": glob, "koleo_loss": ko, "ibot_loss": ib,
            "loss": local + glob + ko + ib}


def test_step_loss_terms_equal_dinov2_forward_backward():
    cfg, step = make_step([])
    batch = fixed_batch()
    values = Schedules.from_config(cfg, 10).at(0)
    want = reference_losses(step, batch, values.teacher_temp, "centering")
    got = step(batch, values)
    for k, v in want.items():
        assert math.isclose(got[k].item(), v.item(), rel_tol=1e-5, abs_tol=1e-5), k


def test_step_updates_teacher_by_ema_of_the_student():
    cfg, step = make_step([])
    t0 = {n: p.detach().clone() for n, p in step.teacher.named_parameters()}
    values = Schedules.from_config(cfg, 10).at(3)
    step(fixed_batch(), values)
    m = values.momentum
    for (n, s_p), (_, t_p) in zip(step.student_module.named_parameters(), step.teacher.named_parameters()):
        assert torch.allclose(t_p, m * t0[n] + (1 - m) * s_p.detach(), atol=1e-6), n


def synthetic_views(step_idx: int, B=16, n_local=3):
    """Two classes of smooth images (stripes vs blobs) with random crops: something to learn."""
    g = torch.Generator().manual_seed(1000 + step_idx)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 48), indexing="ij")
    imgs = []
    for i in range(B):
        f = 2 + 6 * torch.rand(1, generator=g)
        phase = torch.rand(3, 1, 1, generator=g) * 6.28
        if i % 2:
            img = torch.sin(f * 3.14 * xx + phase)
        else:
            img = torch.exp(-((xx - 0.3 * torch.randn(1, generator=g)) ** 2 + yy ** 2) * f) * 2 - 1 + 0 * phase
        imgs.append(img.expand(3, 48, 48) if img.ndim == 2 else img)
    imgs = torch.stack(imgs)

    def crops(size, scale, n):
        out = []
        for _ in range(n):
            c = int(48 * scale * (0.7 + 0.3 * torch.rand(1, generator=g)))
            y0, x0 = (torch.randint(0, 48 - c + 1, (2,), generator=g)).tolist()
            out.append(F.interpolate(imgs[:, :, y0:y0 + c, x0:x0 + c], size=(size, size), mode="bilinear",
                                     align_corners=False))
        return torch.cat(out)

    masks = torch.rand(2 * B, 16, generator=g) < 0.3
    return {"global_crops": crops(32, 0.9, 2), "local_crops": crops(16, 0.4, n_local), "masks": masks}


GUARD = ["optim.base_lr=0.02", "optim.epochs=1", "teacher.warmup_temp_epochs=0.6",
         "optim.freeze_last_layer_epochs=0.04"]


def run_50_steps(overrides):
    cfg, step = make_step(GUARD + list(overrides))
    sched = Schedules.from_config(cfg, 50)
    history = []
    for i in range(50):
        m = step(synthetic_views(i), sched.at(i))
        history.append({k: float(v) for k, v in m.items()})
        assert math.isfinite(history[-1]["loss"]), f"step {i}: loss {history[-1]['loss']}"
    return math.log(cfg.dino.n_prototypes), history


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_teacher_entropy_stays_above_a_floor_over_50_steps(centering):
    log_k, history = run_50_steps([f"teacher.centering={centering}"])
    # Collapse to one prototype = the batch-mean teacher distribution concentrating. The first steps
    # are skipped: at random init every image looks alike and centering needs a few steps to act.
    for i, h in enumerate(history[10:], start=10):
        assert h["teacher_marginal_entropy"] > 0.5 * log_k, (i, h)
        assert h["embedding_std"] > 0.2, (i, h)
    # Nor trivially uniform: the teacher's per-image targets end sharper than uniform.
    assert history[-1]["teacher_entropy"] < log_k - 0.1, history[-1]


def test_collapse_guard_catches_a_teacher_without_centering():
    # center_momentum=1 freezes the center at 0: DINO without its anti-collapse term.
    log_k, history = run_50_steps(["teacher.centering=centering", "dino.center_momentum=1.0",
                                   "ibot.center_momentum=1.0"])
    assert min(h["teacher_marginal_entropy"] for h in history[10:]) < 0.5 * log_k
