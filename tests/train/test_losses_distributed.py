"""Sinkhorn-Knopp and centering across 2 real gloo processes equal one process on the whole batch."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from webcurate.train.losses import DINOLoss, iBOTPatchLoss, sinkhorn_knopp

WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from webcurate.train.losses import DINOLoss, iBOTPatchLoss, sinkhorn_knopp
    rank, tmp = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    data = torch.load(f"{tmp}/inputs.pt", weights_only=True)
    dino = data["dino"].chunk(2)[rank]
    ibot = data["ibot"][:10] if rank == 0 else data["ibot"][10:]  # unequal masked-patch counts
    out = {"dino_sk": sinkhorn_knopp(dino, 0.05, 3), "ibot_sk": sinkhorn_knopp(ibot, 0.05, 3),
           "wide_sk": sinkhorn_knopp(data["wide"].chunk(2)[rank], 0.04, 3)}  # the log-domain path
    dl = DINOLoss(dino.shape[1]); dl.update_center(dino); out["dino_center"] = dl.center
    il = iBOTPatchLoss(ibot.shape[1]); il.update_center(ibot if rank == 0 else ibot[:0]); out["ibot_center"] = il.center
    torch.save(out, f"{tmp}/out{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
""")


def test_sinkhorn_and_centers_over_two_gloo_workers_equal_single_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    dino = torch.tanh(torch.randn(12, 48, generator=g))
    ibot = torch.tanh(torch.randn(13, 48, generator=g))
    wide = torch.randn(12, 48, generator=g) * 40.0
    torch.save({"dino": dino, "ibot": ibot, "wide": wide}, tmp_path / "inputs.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-2000:]
    r0, r1 = (torch.load(tmp_path / f"out{r}.pt", weights_only=True) for r in (0, 1))

    assert torch.allclose(torch.cat([r0["dino_sk"], r1["dino_sk"]]), sinkhorn_knopp(dino, 0.05, 3), atol=1e-6)
    assert torch.allclose(torch.cat([r0["ibot_sk"], r1["ibot_sk"]]), sinkhorn_knopp(ibot, 0.05, 3), atol=1e-6)
    assert torch.allclose(torch.cat([r0["wide_sk"], r1["wide_sk"]]), sinkhorn_knopp(wide, 0.04, 3), atol=1e-6)

    single = DINOLoss(48)
    single.update_center(dino)
    assert torch.allclose(r0["dino_center"], single.center, atol=1e-6)
    assert torch.allclose(r1["dino_center"], single.center, atol=1e-6)

    only_rank0 = iBOTPatchLoss(48)
    only_rank0.update_center(ibot[:10])  # the worker without masked patches must not drag the center
    assert torch.allclose(r0["ibot_center"], only_rank0.center, atol=1e-6)
    assert torch.allclose(r1["ibot_center"], only_rank0.center, atol=1e-6)
