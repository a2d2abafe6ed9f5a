"""Training checkpoints: their format, what a resumed run needs to continue exactly, and where they live.

A checkpoint is a folder ``<output>/train/checkpoint_<step:08d>/`` written through
Ray Train (``ray.train.report``) to the run's storage path (local or S3):

- ``state.pt`` (rank 0; ``torch.load(weights_only=True)``-safe): ``format``
  (``CHECKPOINT_FORMAT``), ``step`` (optimiser steps done), ``data_epoch`` /
  ``data_batch`` (loader position: epoch and batches already consumed in it),
  ``plan`` (the run length and schedule sizes), student and teacher state dicts,
  optimizer state, the objective's buffers (DINO centers, MoCo/SwAV queues),
  ``backbone_meta`` (the exported-backbone metadata) and the config;
- ``rng-rank<r>.pt`` (every rank, also ``weights_only``-safe): torch (CPU and
  CUDA), numpy and Python RNG states, since drop-path and mask draws differ per worker;
- ``backbone.safetensors``: the backbone at this step in the exported-backbone
  contract (``shards/backbone_format.py``), so any checkpoint embeds like a finished run;
- ``meta.json``: step and positions, for people and listings.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
from typing import Any

import numpy as np
import torch

from webcurate.shards.backbone_format import BACKBONE_FILE

CHECKPOINT_FORMAT = "webcurate-train-checkpoint/2"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
RUN_NAME = "train"  # Ray Train run name: checkpoints land in <output>/train/
_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{int(step):08d}"


def list_checkpoints(output: str) -> list[tuple[int, str]]:
    """``[(step, uri)]`` of complete checkpoints under a run output (or its ``train/`` folder), oldest first.

    Complete = holds ``state.pt`` and ``meta.json`` (a folder cut short by a
    crash during upload is skipped).
    """
    from webcurate.shards import storage

    found: list[tuple[int, str]] = []
    for base in (storage.join(output, RUN_NAME), output):
        for e in storage.list_dir(base):
            m = _CKPT_RE.match(e.name)
            if not (m and e.is_dir):
                continue
            names = {x.name for x in storage.list_dir(e.uri)}
            if STATE_FILE in names and META_FILE in names:
                found.append((int(m.group(1)), e.uri))
        if found:
            break
    return sorted(found)


# -- model / optimiser state --------------------------------------------------------------
def training_state(cfg, trainee) -> dict[str, Any]:
    """Models, optimizer and objective buffers as full (unsharded, CPU-loadable) state dicts.

    Under FSDP every rank must call this (it gathers the shards).
    """
    student, teacher, optimizer = trainee.student, trainee.teacher, trainee.optimizer
    if cfg.run.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        s_sd = get_model_state_dict(student, options=opts)
        t_sd = get_model_state_dict(teacher, options=opts) if teacher is not None else {}
        o_sd = get_optimizer_state_dict(student, optimizer, options=opts)
    else:
        s_sd = student.state_dict()
        t_sd = teacher.state_dict() if teacher is not None else {}
        o_sd = optimizer.state_dict()
    return {"student": s_sd, "teacher": t_sd, "optimizer": o_sd, "objective": trainee.objective.state_dict(),
            "method": cfg.method, "backbone_meta": student.backbone.meta.to_strings(),
            "config": json.dumps(cfg.to_dict())}


def load_training_state(cfg, state: dict[str, Any], trainee) -> None:
    """Inverse of ``training_state`` (FSDP: scatters the full state dicts onto the shards)."""
    if state.get("method", cfg.method) != cfg.method:
        raise ValueError(f"checkpoint was trained with method {state.get('method')}, not {cfg.method}")
    student, teacher, optimizer = trainee.student, trainee.teacher, trainee.optimizer
    if cfg.run.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        # Rank 0's copy is scattered: other ranks may hold an empty dict (as training_state gives them).
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(student, state["student"], options=opts)
        if teacher is not None:
            set_model_state_dict(teacher, state["teacher"], options=opts)
        set_optimizer_state_dict(student, optimizer, state["optimizer"], options=opts)
    else:
        student.load_state_dict(state["student"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
    trainee.objective.load_state_dict(state["objective"])


# -- RNG ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU/CUDA, numpy, Python), in types that
    ``torch.load(weights_only=True)`` accepts: tensors, tuples, ints, floats, strings."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


# -- files ----------------------------------------------------------------------------------
def write_checkpoint(folder: str, *, rank: int, state: dict[str, Any] | None, meta: dict[str, Any],
                     backbone: tuple[dict[str, torch.Tensor], Any] | None = None) -> None:
    """Write this rank's part of a checkpoint into a local ``folder``.

    Rank 0 passes ``state`` and ``backbone`` = ``(timm state dict, BackboneMeta)``.
    """
    from webcurate.shards.backbone_format import write_backbone

    os.makedirs(folder, exist_ok=True)
    torch.save(rng_state(), os.path.join(folder, f"rng-rank{rank}.pt"))
    if state is not None:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, os.path.join(folder, STATE_FILE))
        if backbone is not None:
            write_backbone(backbone[0], backbone[1], os.path.join(folder, BACKBONE_FILE))
        with open(os.path.join(folder, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)


def checkpoint_uri(ckpt: Any) -> str:
    """The local path or ``s3://`` URI of a ``ray.train.Checkpoint``."""
    import pyarrow.fs as pafs

    if isinstance(ckpt.filesystem, pafs.LocalFileSystem):
        return ckpt.path
    if isinstance(ckpt.filesystem, pafs.S3FileSystem):
        return "s3://" + ckpt.path.lstrip("/")
    raise ValueError(f"checkpoint on an unsupported filesystem {ckpt.filesystem.type_name!r}: {ckpt.path}")


def read_checkpoint(uri: str, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state, rng state of ``rank`` or None when that rank did not exist) of the checkpoint at ``uri``.

    Read object by object into memory rather than through ``Checkpoint.as_directory``:
    Ray's shared per-node download folder can be re-downloaded by one worker while
    another is still reading it (a torn ``state.pt``), and each rank needs only
    ``state.pt`` and its own RNG file.
    """
    state = load_object(uri, STATE_FILE)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{uri} is not a {CHECKPOINT_FORMAT} training checkpoint "
                         f"(format {state.get('format')!r})")
    try:
        return state, load_object(uri, f"rng-rank{rank}.pt")
    except FileNotFoundError:
        return state, None


def load_object(uri: str, name: str) -> Any:
    """``torch.load`` (pickle-safe: weights only) of ``<uri>/<name>``, read whole into memory."""
    from webcurate.shards import storage

    data = io.BytesIO(storage.read_bytes(storage.join(uri, name)))
    return torch.load(data, map_location="cpu", weights_only=True)


__all__ = ["CHECKPOINT_FORMAT", "STATE_FILE", "META_FILE", "RUN_NAME", "checkpoint_dir_name", "list_checkpoints",
           "training_state", "load_training_state", "rng_state", "set_rng_state", "write_checkpoint",
           "read_checkpoint", "checkpoint_uri", "load_object"]
