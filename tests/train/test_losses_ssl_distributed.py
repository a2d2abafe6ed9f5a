"""The SSL losses that gather across workers, on 2 real gloo processes, equal one process on the whole batch.

One pair of processes runs every case (start-up is most of the cost). Convention pinned here (see
``webcurate.train.losses._dist``): the mean over workers of the per-worker loss is the single-process
loss on the concatenated batch, and each worker's input gradient divided by the world size (DDP
averages) is the single-process gradient of its rows.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from webcurate.train import losses as L

W = 2
WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from webcurate.train import losses as L
    rank, tmp = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    data = torch.load(f"{tmp}/inputs.pt", weights_only=True)
    mine = lambda t: t.chunk(2)[rank].clone().requires_grad_()

    def run(loss_fn, *tensors):
        xs = [mine(t) for t in tensors]
        loss = loss_fn(*xs)
        loss.backward()
        return {"loss": loss.detach(), "grads": [x.grad for x in xs]}

    out = {}
    out["simclr"] = run(L.NTXentLoss(0.2), *data["two_views"])
    moco = L.MoCoV2Loss(16, queue_size=12)
    out["moco_v2"] = [dict(run(moco, q, k), queue=moco.queue.clone()) for q, k in data["moco_v2_steps"]]
    out["moco_v3"] = run(L.MoCoV3Loss(0.2), *data["four_views"])
    out["vicreg"] = run(L.VICRegLoss(), *data["two_views"])
    out["barlow_twins"] = run(L.BarlowTwinsLoss(), *data["two_views"])
    swav = L.SwAVLoss(queue_length=4, embed_dim=16)  # this worker's 4 samples of a step
    protos = data["swav_prototypes"]
    swav_fn = lambda *c: swav([x @ protos.t() for x in c], embeddings=c[:2], prototypes=protos)
    out["swav"] = [run(swav_fn, *crops) for crops in data["swav_steps"]]
    torch.save(out, f"{tmp}/out{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
""")


def _fixed(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


INPUTS = {
    "two_views": [_fixed((8, 16), 1), _fixed((8, 16), 2, 2.0)],
    "four_views": [_fixed((8, 16), s) for s in (3, 4, 5, 6)],
    "moco_v2_steps": [[_fixed((8, 16), 10 + s), _fixed((8, 16), 20 + s)] for s in range(2)],
    # 2 steps of 2 high-res + 2 low-res crops (unit embeddings) against 10 unit prototypes
    "swav_steps": [[torch.nn.functional.normalize(_fixed((8, 16), 30 + 4 * s + c), dim=1) for c in range(4)]
                   for s in range(2)],
    "swav_prototypes": torch.nn.functional.normalize(_fixed((10, 16), 40), dim=1),
}


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Outputs of rank 0 and rank 1 for every case."""
    tmp = tmp_path_factory.mktemp("dist")
    torch.save(INPUTS, tmp / "inputs.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(tmp)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(W)]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out.decode()[-3000:]
    return [torch.load(tmp / f"out{r}.pt", weights_only=True) for r in range(W)]


def single(loss_fn, *tensors):
    xs = [t.clone().requires_grad_() for t in tensors]
    loss = loss_fn(*xs)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


def assert_matches_single(outs, case, loss_fn, tensors, atol=1e-5):
    """``outs``: each worker's result of one case (loss and input gradients)."""
    want_loss, want_grads = single(loss_fn, *tensors)
    got_loss = sum(o["loss"] for o in outs) / W
    assert torch.allclose(got_loss, want_loss, atol=atol), (case, got_loss, want_loss)
    for i, g in enumerate(want_grads):
        if g is None:  # a stop-gradient input (keys, targets)
            assert all(o["grads"][i] is None for o in outs), (case, i)
            continue
        got = torch.cat([o["grads"][i] for o in outs]) / W
        assert torch.allclose(got, g, atol=atol), (case, i, (got - g).abs().max())


def test_nt_xent_gathers_negatives_from_all_workers(workers):
    assert_matches_single([w["simclr"] for w in workers], "simclr", L.NTXentLoss(0.2), INPUTS["two_views"])
    # Without the other worker's negatives the loss would differ: the gather is what makes it equal.
    local = L.NTXentLoss(0.2)(*(t[:4] for t in INPUTS["two_views"]))
    assert not torch.allclose(workers[0]["simclr"]["loss"], local)


def test_moco_v2_enqueues_the_keys_of_all_workers_and_keeps_one_queue(workers):
    moco = L.MoCoV2Loss(16, queue_size=12)
    for step, (q, k) in enumerate(INPUTS["moco_v2_steps"]):
        # step 1 scores against the keys both workers enqueued at step 0
        assert_matches_single([w["moco_v2"][step] for w in workers], f"moco_v2 step {step}", moco, [q, k])
        for w in workers:
            assert torch.allclose(w["moco_v2"][step]["queue"], moco.queue, atol=1e-6), step


def test_moco_v3_scores_queries_against_the_keys_of_all_workers(workers):
    assert_matches_single([w["moco_v3"] for w in workers], "moco_v3", L.MoCoV3Loss(0.2), INPUTS["four_views"])


@pytest.mark.parametrize("case, loss_fn", [("vicreg", L.VICRegLoss()), ("barlow_twins", L.BarlowTwinsLoss())])
def test_batch_statistics_losses_use_the_global_batch_on_every_worker(workers, case, loss_fn):
    assert_matches_single([w[case] for w in workers], case, loss_fn, INPUTS["two_views"])
    want = loss_fn(*INPUTS["two_views"])
    for w in workers:  # not just on average: each worker computes the global-batch loss
        assert torch.allclose(w[case]["loss"], want, atol=1e-5)


def test_swav_codes_balance_over_the_queues_and_batches_of_all_workers(workers):
    swav = L.SwAVLoss(queue_length=8, embed_dim=16)  # one process holds both workers' queues
    protos = INPUTS["swav_prototypes"]

    def swav_fn(*c):
        return swav([x @ protos.t() for x in c], embeddings=c[:2], prototypes=protos)

    for step, crops in enumerate(INPUTS["swav_steps"]):  # step 1 uses the (full) queues
        assert_matches_single([w["swav"][step] for w in workers], f"swav step {step}", swav_fn, crops)
