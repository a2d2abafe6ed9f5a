"""Per-worker memory, estimated before any worker starts, against what the node has.

The estimate (``estimate_worker_memory``) builds the method's models on the
driver's CPU and runs the real forward at two tiny batch sizes, counting the
bytes autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``);
the difference gives activation bytes per image at the configured crops. Then:

    worker = PROCESS (torch, DALI, Ray) + parameters * copies (weights, grads, optimiser
             moments, EMA teacher, the checkpoint's CPU copy)
             + batch * (activations per image * BACKWARD_FACTOR + loader bytes per image)

``check_fits`` compares ``workers on the node * worker`` with the node's room
(local Ray: the memory available now, less the 5 % Ray's OOM monitor keeps; a
cluster: the largest node's memory resource) and, when it does not fit, raises
``ConfigError`` naming ``loader.batch_size`` (and the crop sizes) with a value that fits.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from webcurate.shards.errors import ConfigError

GIB = 1 << 30
PROCESS_BYTES = int(1.2 * GIB)  # a Ray Train worker with torch and DALI loaded, measured ~1.0-1.2 GiB
BACKWARD_FACTOR = 1.6  # gradients of activations and allocator slack on top of what autograd saves
OOM_THRESHOLD = 0.95  # Ray's memory monitor kills workers above this share of the node's memory


@dataclass
class MemoryEstimate:
    param_bytes: int  # all parameter-sized copies
    per_image: int  # activations + loader, bytes per image of the worker's batch
    process: int = PROCESS_BYTES

    def worker_bytes(self, batch_size: int) -> int:
        return self.process + self.param_bytes + batch_size * self.per_image

    def largest_batch(self, room: int) -> int:
        return max(0, (room - self.process - self.param_bytes) // max(self.per_image, 1))


def _fake_batch(cfg, b: int) -> dict:
    L = cfg.loader
    g = torch.Generator().manual_seed(0)
    n = (L.global_size // L.patch_size) ** 2
    masks = torch.rand(2 * b, n, generator=g) < 0.3
    lc = torch.randn(L.n_local * b, 3, L.local_size, L.local_size, generator=g) if L.n_local else None
    return {"global_crops": torch.randn(2 * b, 3, L.global_size, L.global_size, generator=g),
            "local_crops": lc, "masks": masks, "n_images": b}


def _saved_bytes(student, teacher, objective, cfg, b: int) -> int:
    """Bytes autograd keeps for the backward of one student forward + loss at batch ``b``."""
    from .schedules import Schedules

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (views of nothing)
            pass
        return t

    values = Schedules.from_config(cfg, 10).at(0)
    inputs = objective.prepare(_fake_batch(cfg, b), torch.device("cpu"))
    with torch.no_grad():
        targets = objective.targets(teacher, inputs, values)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = student(**inputs)
        objective.loss(out, targets, inputs, values).total
    return sum(seen.values())


def estimate_worker_memory(cfg) -> MemoryEstimate:
    """Estimate one worker's memory for ``cfg`` (builds the models on CPU; a second or two)."""
    from .models import build_models

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    torch.manual_seed(cfg.run.seed)
    student, teacher, objective = build_models(cfg, torch.device("cpu"))
    student.train()
    n_params = sum(p.numel() for p in student.parameters())
    n_trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    # weights; grads + optimiser moments (AdamW 2, SGD 1) of trainable ones; teacher; checkpoint's copy
    moments = 2 if cfg.optim.name == "adamw" else 1
    copies = n_params * (1 + (1 if teacher is not None else 0) + 1) + n_trainable * (1 + moments)
    param_bytes = copies * 4
    # Two batch sizes: the difference is per-image. Batch-statistics losses and BatchNorm heads
    # need 2 images; DINO's (large ViT) models are cheaper to probe at 1 and 2.
    small, large = (1, 2) if cfg.spec.family == "dino" else (2, 4)
    a = _saved_bytes(student, teacher, objective, cfg, small)
    b = _saved_bytes(student, teacher, objective, cfg, large)
    act = max(b - a, 0) / (large - small)
    L = cfg.loader
    pixels = 2 * L.global_size ** 2 + L.n_local * L.local_size ** 2
    # float32 crops in the prefetch queue and the batch being assembled, plus DALI's decoded images.
    loader = (L.prefetch + 2) * pixels * 3 * 4 + 3 * 512 * 512 * 3
    del student, teacher, objective
    return MemoryEstimate(param_bytes, int(act * BACKWARD_FACTOR + loader))


def system_memory() -> tuple[int, int]:
    """(total, available) bytes of this machine: /proc/meminfo's MemAvailable, else free pages."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return total, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: free pages are a lower bound
        return total, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def node_room(local: bool) -> tuple[int, str]:
    """(bytes the workers of one node may use, how it was found)."""
    if local:
        total, available = system_memory()
        room = int(available - (1 - OOM_THRESHOLD) * total)
        return room, f"{available / GIB:.1f} GiB available of {total / GIB:.1f} GiB"
    import ray

    mem = [float(n.get("Resources", {}).get("memory", 0.0)) for n in ray.nodes() if n.get("Alive")]
    room = int(max(mem, default=0.0))
    return room, f"{room / GIB:.1f} GiB memory resource on the largest node"


def crops_text(cfg) -> str:
    L = cfg.loader
    text = f"2 x {L.global_size} px"
    if L.n_local:
        text += f" + {L.n_local} x {L.local_size} px"
    return text


def check_fits(cfg, workers_per_node: int, local: bool, estimate: MemoryEstimate | None = None) -> MemoryEstimate:
    """Raise ``ConfigError`` naming ``loader.batch_size`` and a value that fits when the workers of
    one node would not fit in its memory; returns the estimate."""
    est = estimate or estimate_worker_memory(cfg)
    room, how = node_room(local)
    per_worker = room // max(workers_per_node, 1)
    need = est.worker_bytes(cfg.loader.batch_size)
    if need <= per_worker:
        return est
    fits = est.largest_batch(per_worker)
    who = f"{workers_per_node} worker(s) on a node with {how}"
    head = (f"loader.batch_size={cfg.loader.batch_size} with {crops_text(cfg)} crops needs ~{need / GIB:.1f} GiB "
            f"per worker (model and optimiser {est.param_bytes / GIB:.2f} GiB, "
            f"{est.per_image / 2**20:.0f} MiB per image) but {who} leaves {per_worker / GIB:.1f} GiB each")
    if fits >= 2 or (fits >= 1 and not cfg.spec.batch_stats):
        raise ConfigError(f"{head}; loader.batch_size={fits} fits (or use smaller crops: loader.global_size, "
                          "loader.local_size, loader.n_local)")
    raise ConfigError(f"{head}; not even a batch of 2 fits: use a smaller model (model.name), smaller crops "
                      "(loader.global_size, loader.n_local) or fewer workers per node (run.num_workers)")


def workers_per_node(world: int, use_gpu: bool) -> int:
    """How many workers share the busiest node (local Ray: all of them)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return world
    key = "GPU" if use_gpu else "CPU"
    slots = sorted((float(n.get("Resources", {}).get(key, 0.0)) for n in nodes), reverse=True)
    return max(1, min(world, int(slots[0]) if slots and slots[0] >= 1 else math.ceil(world / len(nodes))))


__all__ = ["MemoryEstimate", "estimate_worker_memory", "check_fits", "node_room", "workers_per_node", "system_memory", "GIB"]
