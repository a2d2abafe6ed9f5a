"""Training-step overhead: a full step of any method vs the bare compute it cannot avoid.

Full step (``webcurate.train.step.TrainStep``): teacher forward + targets (DINO:
centering or Sinkhorn-Knopp), student forward/backward, the method's loss,
per-module gradient clipping, the optimiser, EMA update, collapse monitors.
Bare: the same student forward + backward (a trivial loss on the same outputs)
and the same teacher forward, nothing else. Same shapes, same threads,
alternating measurements; the ratio is full / bare (target <= 1.10).

    .venv/bin/python bench/train_step_overhead.py [--quick] [--config docs/examples/train_cifar_tiny.yaml] [k=v ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_batch(cfg, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, G, L = cfg.loader.batch_size, cfg.loader.global_size, cfg.loader.local_size
    n = (G // cfg.loader.patch_size) ** 2
    masks = torch.zeros(2 * B, n, dtype=torch.bool)
    half = torch.rand(2 * B, generator=g) < (cfg.loader.mask_probability if cfg.loader.masking == "block" else 0)
    for i in torch.nonzero(half).flatten().tolist():  # ~30% of patches in half of the images
        masks[i, torch.randperm(n, generator=g)[: int(0.3 * n)]] = True
    return {"global_crops": torch.randn(cfg.loader.n_global * B, 3, G, G, generator=g),
            "local_crops": torch.randn(cfg.loader.n_local * B, 3, L, L, generator=g) if cfg.loader.n_local else None,
            "masks": masks[: cfg.loader.n_global * B], "n_images": B}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "docs", "examples", "train_cifar_tiny.yaml"))
    ap.add_argument("--steps", type=int, default=20, help="measured steps per side")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="5 steps, batch 32")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from webcurate.train.config import load_config
    from webcurate.train.models import build_models, resolve_config
    from webcurate.train.optim import build_optimizer, param_groups
    from webcurate.train.schedules import Schedules
    from webcurate.train.step import TrainStep

    ov = list(a.overrides) + (["loader.batch_size=32"] if a.quick else [])
    steps = 5 if a.quick else a.steps
    cfg = resolve_config(load_config(a.config, ov))
    dev = torch.device("cpu")
    torch.manual_seed(0)
    student, teacher, objective = build_models(cfg, dev)
    o = cfg.optim
    opt = build_optimizer(param_groups(student.submodules(), o.layerwise_decay, o.patch_embed_lr_mult),
                          o.beta1, o.beta2, name=o.name, momentum=o.sgd_momentum)
    step = TrainStep(cfg, student, student, teacher, opt, objective, dev)
    sched = Schedules.from_config(cfg, 1000)
    batches = [make_batch(cfg, i) for i in range(4)]
    B = cfg.loader.batch_size

    def bare(batch):
        inputs = objective.prepare(batch, dev)
        with torch.no_grad():
            if teacher is not None:
                objective.targets(teacher, inputs, sched.at(100))
        out = student(**inputs)
        loss = sum(v.float().mean() for v in out.values() if v.is_floating_point() and v.requires_grad)
        student.zero_grad(set_to_none=True)
        loss.backward()

    def full(batch, i):
        step(batch, sched.at(100 + i))

    for i in range(a.warmup):
        bare(batches[i % 4])
        full(batches[i % 4], i)
    t_bare, t_full = [], []
    for i in range(steps):  # alternate so drifts in machine load hit both sides alike
        b = batches[i % 4]
        t0 = time.perf_counter(); bare(b); t_bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); full(b, i); t_full.append(time.perf_counter() - t0)
    mb, mf = statistics.median(t_bare), statistics.median(t_full)
    print(f"config: {os.path.relpath(a.config, ROOT)} {' '.join(ov)}")
    print(f"method {cfg.method}, model {cfg.model.name} dim={student.backbone.embed_dim}; batch {B}: "
          f"{cfg.loader.n_global}x{cfg.loader.global_size}px + {cfg.loader.n_local}x{cfg.loader.local_size}px; "
          f"threads={a.threads}")
    print(f"bare student fwd+bwd + teacher fwd: {mb * 1000:8.1f} ms/step  ({B / mb:7.1f} img/s)")
    print(f"full webcurate TrainStep:           {mf * 1000:8.1f} ms/step  ({B / mf:7.1f} img/s)")
    print(f"ratio full/bare: {mf / mb:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    sys.exit(main())
