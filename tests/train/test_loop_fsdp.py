"""FSDP2 sharding (run.fsdp) trains exactly like DDP, its checkpoints restore exactly, and DDP runs
without iBOT (2 gloo processes)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

WORKER = textwrap.dedent("""
    import copy, sys, torch, torch.distributed as dist
    rank, tmp = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    from webcurate.train.checkpoint import training_state
    from webcurate.train.config import load_config
    from webcurate.train.models import prepare_models
    from webcurate.train.schedules import Schedules
    from webcurate.train.step import TrainStep
    TINY = ["model.name=vit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=2", "model.drop_path_rate=0", "dino.n_prototypes=64", "dino.hidden_dim=32",
            "dino.bottleneck_dim=16", "loader.global_size=32", "loader.local_size=16", "loader.n_local=2",
            "loader.batch_size=4", "optim.epochs=1", "optim.warmup_epochs=0.1", "teacher.warmup_temp_epochs=0.5",
            "optim.freeze_last_layer_epochs=0.1"]
    dev = torch.device("cpu")

    def batch(i):
        g = torch.Generator().manual_seed(100 * i + rank)
        return {"global_crops": torch.randn(8, 3, 32, 32, generator=g),
                "local_crops": torch.randn(8, 3, 16, 16, generator=g), "masks": torch.rand(8, 16, generator=g) < 0.3}

    out = {}
    for fsdp in (False, True):
        cfg = load_config(None, TINY + [f"run.fsdp={str(fsdp).lower()}"])
        sched = Schedules.from_config(cfg, 10)
        tr = prepare_models(cfg, dev, distributed=True)
        step = TrainStep(cfg, tr.model, tr.student, tr.teacher, tr.optimizer, tr.objective, dev, ema=tr.ema)
        losses = [float(step(batch(i), sched.at(i + 2))["loss"]) for i in range(2)]
        state = copy.deepcopy(training_state(cfg, tr))  # DDP's state dicts alias live weights
        saved = {k: {n: v.clone() for n, v in state[k].items()} for k in ("student", "teacher")} if rank == 0 else {}
        # Continue in the same models, and in fresh models restored from the state: same third step.
        cont = float(step(batch(2), sched.at(4))["loss"])
        t2 = prepare_models(cfg, dev, distributed=True, state=state)
        restored = float(TrainStep(cfg, t2.model, t2.student, t2.teacher, t2.optimizer, t2.objective, dev,
                                   ema=t2.ema)(batch(2), sched.at(4))["loss"])
        out[fsdp] = {"losses": losses, "cont": cont, "restored": restored, **saved}
    # Without iBOT the mask token takes no part: DDP must not wait for its gradient.
    cfg = load_config(None, TINY + ["ibot.loss_weight=0"])
    tr = prepare_models(cfg, dev, distributed=True)
    out["no_ibot"] = [float(TrainStep(cfg, tr.model, tr.student, tr.teacher, tr.optimizer, tr.objective, dev,
                                      ema=tr.ema)(batch(i), Schedules.from_config(cfg, 10).at(i))["loss"])
                      for i in range(2)]
    if rank == 0:
        torch.save(out, f"{tmp}/out.pt")
    dist.barrier()
    dist.destroy_process_group()
""")


def test_fsdp_matches_ddp_and_restores_from_its_checkpoint_state(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log.decode()[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    ddp, fsdp = out[False], out[True]
    assert all(abs(a - b) < 1e-5 for a, b in zip(ddp["losses"], fsdp["losses"])), (ddp["losses"], fsdp["losses"])
    for part in ("student", "teacher"):
        for k, v in ddp[part].items():
            assert torch.allclose(v, fsdp[part][k], atol=1e-5), f"{part}.{k}"
    for mode in (ddp, fsdp):
        assert abs(mode["cont"] - mode["restored"]) < 1e-5, mode
    assert len(out["no_ibot"]) == 2
