"""Distributed DINOv2/iBOT training on Ray Train (``TorchTrainer``), resumable exactly.

The driver (``train``) reads the dataset's shard list, sizes the schedules,
and starts one Ray Train worker per ``run.num_workers`` (DDP over gloo on CPU,
NCCL on GPU; FSDP2 sharding with ``run.fsdp``, meant for large models on GPUs and
verified equal to DDP on CPU). Each worker
(``worker_loop``) builds student and EMA teacher, streams its share of the
shards through the multi-crop loader (``webcurate.train.data.loader``), and
runs ``TrainStep`` per batch.

Outputs under ``--output`` (local folder or ``s3://``; Ray's storage path):

- ``train/checkpoint_<step>/``: state.pt (+ per-rank RNG), every
  ``run.checkpoint_every`` steps and at the end; the last ``run.keep_checkpoints``
  are kept;
- ``metrics/<first>-<last>.jsonl``: one record per step (losses, lr, wd,
  momentum, teacher temp, img/s, collapse monitors, a digest of each worker's
  batch), one part per report; ``read_metrics(output)`` joins them;
- ``train_config.yaml``: the resolved config; ``backbone.safetensors``: the
  teacher backbone at the end (stock-timm loadable, see ``export``).

Exact resume: a checkpoint holds the optimiser step, the loader position
(epoch, batches consumed in it), models, optimizer, loss centers and every
rank's RNG state; ``--resume`` restarts the loader at that position, so the
resumed run sees the same batches in the same order as an uninterrupted one.
``ray.train.report`` costs ~2 s, so it runs every ``run.report_every`` steps
and at checkpoints, never per step.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Iterator

from webcurate.shards.errors import ConfigError, RunError

from .checkpoint import RUN_NAME, checkpoint_dir_name, list_checkpoints
from .config import TrainConfig, to_yaml

CONFIG_FILE = "train_config.yaml"
METRICS_DIR = "metrics"  # <output>/metrics/<first step>-<last step>.jsonl, one part per flush
# Options that may change between a run and its resumption without changing what is computed.
RESUME_MUTABLE = {"run.max_steps", "run.log_every", "run.report_every", "run.checkpoint_every",
                  "run.keep_checkpoints", "run.cpus_per_worker", "run.torch_threads", "loader.num_threads",
                  "loader.prefetch", "loader.cache_dir"}
# S3 settings forwarded to the workers. Credentials are not: a runtime_env is stored in
# Ray's GCS and shown on the dashboard. Workers take keys from their own environment
# (a local Ray inherits the driver's; a cluster node its instance profile or its env),
# or from `webcurate submit --forward-aws`, which the user asks for explicitly.
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


def worker_env_vars(environ: Any) -> dict[str, str]:
    """The environment variables the Train workers' runtime_env sets: S3 settings, never keys."""
    env = {k: environ[k] for k in _AWS_ENV if environ.get(k)}
    env["WEBCURATE_QUIET"] = environ.get("WEBCURATE_QUIET", "0")
    # Ray Train's print patch echoes each worker line twice; plain stdout is forwarded once.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return env


class TrainError(RunError):
    """Training failed; finished checkpoints are kept and ``--resume`` continues from the last."""


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "timm_kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _check_resume_config(output: str, cfg: TrainConfig) -> None:
    """Refuse to resume with settings that would change the computation."""
    import yaml

    from webcurate.shards import storage

    uri = storage.join(output, CONFIG_FILE)
    if not storage.exists(uri):
        return
    old = TrainConfig.from_dict(yaml.safe_load(storage.read_bytes(uri)))
    a, b = _flat(old.to_dict()), _flat(cfg.to_dict())
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUME_MUTABLE)
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"--resume with a changed config would not continue the same run ({shown}); "
                          f"use the config in {uri} or a new --output")


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Align the loader's patch size with the model's (iBOT masks are per patch)."""
    from .backbone import model_patch_size

    ps = model_patch_size(cfg.model, cfg.loader.global_size)
    if cfg.loader.patch_size != ps:
        if cfg.loader.global_size % ps:
            raise ConfigError(f"loader.global_size={cfg.loader.global_size} is not a multiple of the patch size "
                              f"{ps} of model {cfg.model.name}")
        cfg.loader.patch_size = ps
    if cfg.loader.local_size % ps:
        raise ConfigError(f"loader.local_size={cfg.loader.local_size} is not a multiple of the patch size {ps} "
                          f"of model {cfg.model.name} (DINOv2 uses 98 for patch 14, 96 for patch 16)")
    return cfg


def dataset_size(data: str) -> tuple[list[str], int]:
    """Shard URIs of a dataset's complete shards and its count of ``ok`` samples."""
    from webcurate.shards.dataset import Dataset, DatasetError
    from webcurate.shards.schema import STATUS_OK

    ds = Dataset(data)
    uris = ds.shard_uris()
    if not uris:
        raise DatasetError(f"{data} has no complete shards to train on")
    n = ds.index(columns=["key"], status=STATUS_OK).num_rows
    return uris, n


def train(data: str, output: str, cfg: TrainConfig, *, resume: bool = False, quiet: bool = False,
          loader_factory: Callable[..., Iterator[dict]] | None = None) -> dict[str, Any]:
    """Train on dataset ``data`` into ``output`` with Ray Train; returns a summary dict.

    ``loader_factory`` replaces ``webcurate.train.data.loader.make_loader`` (same
    signature); it exists for tests and benchmarks, training uses the DALI loader.

    Raises ``ConfigError`` for unusable settings, ``TrainError`` when workers
    fail (checkpoints written so far are kept).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from webcurate.shards.ray_runtime import cluster_cpus, cluster_gpus, init_ray
    from webcurate.shards import storage

    from .data.loader import batches_per_epoch

    cfg = resolve_config(cfg)
    shard_uris, n_samples = dataset_size(data)
    world = cfg.run.num_workers
    loader_epoch = batches_per_epoch(n_samples, cfg.loader, world)
    if loader_epoch <= 0:
        raise ConfigError(f"{data} has {n_samples} samples: fewer than one batch of loader.batch_size="
                          f"{cfg.loader.batch_size} per worker for {world} worker(s)")
    epoch_length = cfg.run.epoch_length or loader_epoch

    existing = list_checkpoints(output)
    if existing and not resume:
        raise ConfigError(f"{output} already holds a training run (checkpoint at step {existing[-1][0]}); "
                          "pass --resume to continue it or choose another --output")
    if resume:
        _check_resume_config(output, cfg)
        if not existing and not quiet:
            print(f"note: {output} holds no checkpoint yet; --resume starts from step 0")
    storage.makedirs(output)
    storage.write_bytes(storage.join(output, CONFIG_FILE), to_yaml(cfg).encode())

    init_ray()
    use_gpu = cfg.run.use_gpu if cfg.run.use_gpu is not None else cluster_gpus() > 0
    cpus = cfg.run.cpus_per_worker or max(0.25, math.floor(cluster_cpus() / world * 4) / 4)
    resources = {"CPU": cpus}
    if use_gpu:
        resources["GPU"] = 1

    if storage.is_s3(output):
        fs, path = _ray_s3_filesystem(output)
        storage_kw = {"storage_path": path, "storage_filesystem": fs}
    else:
        storage_kw = {"storage_path": os.path.abspath(output)}
    env = worker_env_vars(os.environ)

    loop_config = {
        "cfg": cfg.to_dict(), "shard_uris": shard_uris, "epoch_length": epoch_length,
        "loader_epoch_length": loader_epoch, "output": output, "quiet": quiet, "cpus_per_worker": cpus,
        "loader_factory": loader_factory,
    }
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RUN_NAME, **storage_kw,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": env},
            # Ray Train logs every report at INFO; our own per-step lines say more in less space.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception; show its cause, keep the checkpoints
        last = list_checkpoints(output)
        where = f"; last checkpoint: step {last[-1][0]} ({last[-1][1]}), continue with --resume" if last else ""
        raise TrainError(f"training failed: {_root_cause(e)}{where}") from e
    seconds = time.time() - t0
    err = getattr(result, "error", None)
    if err is not None:
        raise TrainError(f"training failed: {_root_cause(err)}")
    ckpts = list_checkpoints(output)
    summary = dict(result.metrics or {})
    summary.update({
        "output": output, "seconds": round(seconds, 1), "epoch_length": epoch_length, "samples": n_samples,
        "workers": world, "use_gpu": use_gpu,
        "checkpoint": ckpts[-1][1] if ckpts else None,
        "backbone": storage.join(output, "backbone.safetensors"),
    })
    return summary


def _ray_s3_filesystem(uri: str):
    """A pyarrow S3 filesystem for Ray's storage path, configured like ``shards.storage``'s.

    ``allow_delayed_open`` makes small objects a single PutObject: without it pyarrow
    writes even Ray's empty marker files as multipart uploads with no parts, which
    S3-compatible servers (moto, some MinIO versions) reject.
    """
    import pyarrow.fs as pafs

    from webcurate.shards import storage

    kw: dict[str, Any] = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                          "allow_delayed_open": True,
                          "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5)}
    endpoint = storage.endpoint_url()
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https", force_virtual_addressing=False)
    bucket, key = storage.split_s3(uri)
    return pafs.S3FileSystem(**kw), f"{bucket}/{key}".rstrip("/")


def _root_cause(e: BaseException) -> str:
    """One line naming what broke: the innermost exception, or the last ``XxxError: ...`` line
    of a worker traceback that Ray carries as text."""
    import re

    seen = set()
    while True:
        nxt = getattr(e, "cause", None) or e.__cause__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(e))
        e = nxt
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", ln)]
    if errs:
        return errs[-1][:600]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:600]


# ----------------------------------------------------------------------------------------------
# worker
# ----------------------------------------------------------------------------------------------
def _metric_parts(output: str) -> list[tuple[int, int, str]]:
    """``(first, last, uri)`` of the metrics parts under ``output``, by first step."""
    from webcurate.shards import storage

    parts = []
    for e in storage.list_dir(storage.join(output, METRICS_DIR)):
        stem = e.name[:-len(".jsonl")] if e.name.endswith(".jsonl") else ""
        first, _, last = stem.partition("-")
        if first.isdigit() and last.isdigit():
            parts.append((int(first), int(last), e.uri))
    return sorted(parts)


def read_metrics(output: str, upto_step: int | None = None) -> list[dict[str, Any]]:
    """The per-step records of a run (``metrics/*.jsonl``), in step order, up to ``upto_step``."""
    from webcurate.shards import storage

    by_step: dict[int, dict[str, Any]] = {}
    for _, _, uri in _metric_parts(output):
        for line in storage.read_bytes(uri).decode().splitlines():
            if line.strip():
                r = json.loads(line)
                if upto_step is None or r["step"] <= upto_step:
                    by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]


def _truncate_metrics(output: str, step: int) -> None:
    """Drop records past ``step`` (written by a run that died after its last checkpoint)."""
    from webcurate.shards import storage

    for first, last, uri in _metric_parts(output):
        if first > step:
            storage.delete(uri)
        elif last > step:
            keep = [ln for ln in storage.read_bytes(uri).decode().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= step]
            _write_metrics(output, [json.loads(ln) for ln in keep])
            storage.delete(uri)


def _write_metrics(output: str, records: list[dict[str, Any]]) -> None:
    """Write ``records`` (consecutive steps) as one part; appending a whole file per flush keeps
    long runs from rewriting their history (S3 objects cannot be appended to)."""
    from webcurate.shards import storage

    if not records:
        return
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    name = f"{records[0]['step']:08d}-{records[-1]['step']:08d}.jsonl"
    storage.write_bytes(storage.join(output, METRICS_DIR, name), data)


def _batch_digest(batch: dict[str, Any]) -> list[float]:
    """A cheap fingerprint of a batch (sums of crops and masks) to compare batch order across runs."""
    import torch

    out = [float(batch["global_crops"].double().sum())]
    lc = batch.get("local_crops")
    out.append(float(lc.double().sum()) if lc is not None and lc.numel() else 0.0)
    m = batch.get("masks")
    out.append(float(m.sum()) if m is not None else 0.0)
    del torch
    return out


def _gather_floats(values: list[float], device) -> list[list[float]]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [values]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [p.tolist() for p in parts]


def _fmt_line(rec: dict[str, Any]) -> str:
    keys = [("loss", ".4f"), ("dino_local_loss", ".4f"), ("dino_global_loss", ".4f"), ("ibot_loss", ".4f"),
            ("koleo_loss", ".4f"), ("lr", ".2e"), ("wd", ".3f"), ("momentum", ".4f"), ("teacher_temp", ".3f"),
            ("img_per_s", ".1f"), ("teacher_entropy", ".3f"), ("kl_to_uniform", ".3f"), ("embedding_std", ".3f")]
    parts = [f"step {rec['step']}/{rec['max_steps']}", f"ep {rec['epoch']}"]
    parts += [f"{k}={rec[k]:{f}}" for k, f in keys if k in rec and isinstance(rec[k], (int, float))]
    return "[train] " + " ".join(parts)


def build_models(cfg: TrainConfig, device):
    """Student ``SSLModel``, frozen teacher copy, DINO and iBOT losses on ``device``."""
    from .backbone import build_backbone
    from .ema import teacher_from_student
    from .heads import build_heads
    from .losses import DINOLoss, iBOTPatchLoss
    from .step import SSLModel

    backbone = build_backbone(cfg.model, cfg.loader.global_size)
    if cfg.ibot.loss_weight <= 0:
        # No masking without iBOT: a parameter without gradient would stall DDP's reducer.
        backbone.mask_token.requires_grad_(False)
    student = SSLModel(backbone, build_heads(backbone.embed_dim, cfg.dino, cfg.ibot)).to(device)
    teacher = teacher_from_student(student)
    dino_loss = DINOLoss(cfg.dino.n_prototypes, cfg.dino.student_temp, cfg.dino.center_momentum).to(device)
    ibot_loss = None
    if cfg.ibot.loss_weight > 0:
        k = cfg.ibot.n_prototypes if cfg.ibot.separate_head else cfg.dino.n_prototypes
        ibot_loss = iBOTPatchLoss(k, cfg.ibot.student_temp, cfg.ibot.center_momentum).to(device)
    return student, teacher, dino_loss, ibot_loss


def _shard_fsdp(model, reshard_root: bool = False) -> None:
    """FSDP2 per transformer block plus the root.

    The teacher needs ``reshard_root``: FSDP2 keeps a root's gathered parameters after
    forward (for the backward that follows), and the teacher has no backward, so its
    next forward would use stale copies of the parameters the EMA just updated.
    """
    from torch.distributed.fsdp import fully_shard

    for blk in model.backbone.vit.blocks:
        fully_shard(blk)
    fully_shard(model, reshard_after_forward=True) if reshard_root else fully_shard(model)


def prepare_models(cfg: TrainConfig, device, *, distributed: bool, state: dict[str, Any] | None = None):
    """Everything a worker trains with, restored from ``state`` (a checkpoint's state.pt) if given.

    Returns ``(model, student, teacher, optimizer, dino_loss, ibot_loss, ema)``; ``model``
    is the DDP-wrapped student when ``distributed`` (and not FSDP), else the student.
    With ``run.fsdp`` student and teacher are sharded alike (FSDP2, per block), before the
    optimizer is built on the sharded parameters.
    """
    import torch

    from .ema import EMAUpdater
    from .optim import build_optimizer, param_groups

    # Same seed on every rank: identical initial weights without relying on a broadcast.
    torch.manual_seed(cfg.run.seed)
    student, teacher, dino_loss, ibot_loss = build_models(cfg, device)
    if cfg.run.fsdp:
        _shard_fsdp(student)
        _shard_fsdp(teacher, reshard_root=True)
    groups = param_groups(student.submodules(), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    optimizer = build_optimizer(groups, cfg.optim.beta1, cfg.optim.beta2)
    if state is not None:
        load_training_state(cfg, state, student, teacher, optimizer, dino_loss, ibot_loss)
    ema = EMAUpdater(student, teacher)
    model = student
    if distributed and not cfg.run.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    return model, student, teacher, optimizer, dino_loss, ibot_loss, ema


def training_state(cfg: TrainConfig, student, teacher, optimizer, dino_loss, ibot_loss) -> dict[str, Any]:
    """Models, optimizer and loss centers as full (unsharded, CPU-loadable) state dicts.

    Under FSDP every rank must call this (it gathers the shards).
    """
    if cfg.run.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        s_sd = get_model_state_dict(student, options=opts)
        t_sd = get_model_state_dict(teacher, options=opts)
        o_sd = get_optimizer_state_dict(student, optimizer, options=opts)
    else:
        s_sd, t_sd, o_sd = student.state_dict(), teacher.state_dict(), optimizer.state_dict()
    return {"student": s_sd, "teacher": t_sd, "optimizer": o_sd, "dino_loss": dino_loss.state_dict(),
            "ibot_loss": ibot_loss.state_dict() if ibot_loss is not None else {},
            "model_name": student.backbone.model_name, "model_kwargs": student.backbone.model_kwargs,
            "config": json.dumps(cfg.to_dict(), default=list)}


def load_training_state(cfg: TrainConfig, state: dict[str, Any], student, teacher, optimizer, dino_loss,
                        ibot_loss) -> None:
    """Inverse of ``training_state`` (FSDP: scatters the full state dicts onto the shards)."""
    if cfg.run.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        # Rank 0's copy is scattered: other ranks may hold an empty dict (as training_state gives them).
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(student, state["student"], options=opts)
        set_model_state_dict(teacher, state["teacher"], options=opts)
        set_optimizer_state_dict(student, optimizer, state["optimizer"], options=opts)
    else:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
    dino_loss.load_state_dict(state["dino_loss"])
    if ibot_loss is not None and state.get("ibot_loss"):
        ibot_loss.load_state_dict(state["ibot_loss"])


def _quiet_ray_train_reports() -> None:
    """Drop Ray Train's per-report INFO line (it dumps every metric; our step lines say it better).

    That logger is named after its file, outside ``ray.train``, so ``LoggingConfig`` misses it.
    """
    import logging

    try:
        from ray.train.v2._internal.execution import context as _ctx

        logging.getLogger(_ctx.__file__).setLevel(logging.WARNING)
    except Exception:  # another Ray layout: keep its logs rather than fail
        pass


def worker_loop(config: dict[str, Any]) -> None:
    """The per-worker training function run by ``TorchTrainer`` (see the module docstring)."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from .checkpoint import checkpoint_uri, read_checkpoint, set_rng_state, write_checkpoint
    from .schedules import Schedules
    from .step import TrainStep

    _quiet_ray_train_reports()
    cfg = TrainConfig.from_dict(config["cfg"])
    make_loader = config.get("loader_factory")
    if make_loader is None:
        from webcurate.train.data.loader import make_loader
    output: str = config["output"]
    quiet: bool = config.get("quiet", False)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    threads = cfg.run.torch_threads or max(1, int(config.get("cpus_per_worker") or 1))
    torch.set_num_threads(threads)
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    amp = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
    autocast_dtype = torch.bfloat16 if amp else None

    step, data_epoch, data_batch, rng, state = 0, 0, 0, None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        state, rng = read_checkpoint(checkpoint_uri(ckpt), rank)
        step, data_epoch, data_batch = int(state["step"]), int(state["data_epoch"]), int(state["data_batch"])
        if rng is None and rank == 0:
            print(f"[train] checkpoint has no RNG state for rank {rank}: drop-path draws will differ")
    model, student, teacher, optimizer, dino_loss, ibot_loss, ema = prepare_models(
        cfg, device, distributed=distributed, state=state)
    del state
    if rng is not None:
        set_rng_state(rng)
    else:
        # Different drop-path draws per rank, reproducible from the seed and the step.
        torch.manual_seed(cfg.run.seed * 1_000_003 + rank * 7919 + step)

    schedules = Schedules.from_config(cfg, config["epoch_length"])
    max_steps = cfg.run.max_steps if cfg.run.max_steps is not None else schedules.total_steps
    step_fn = TrainStep(cfg, model, student, teacher, optimizer, dino_loss, ibot_loss, device,
                        autocast_dtype=autocast_dtype, ema=ema)
    if rank == 0:
        _truncate_metrics(output, step)
    records: list[dict[str, Any]] = []  # not yet flushed

    def full_state() -> dict[str, Any]:
        return {**training_state(cfg, student, teacher, optimizer, dino_loss, ibot_loss),
                "step": step, "data_epoch": data_epoch, "data_batch": data_batch}

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        if rank == 0 and records:
            _write_metrics(output, records)  # before the checkpoint: a resume always finds its history
            records.clear()
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        state = full_state()  # FSDP: every rank takes part in the gather
        with tempfile.TemporaryDirectory(prefix="webcurate-ckpt-") as tmp:
            write_checkpoint(tmp, rank=rank, state=state if rank == 0 else None,
                             meta={"step": step, "data_epoch": data_epoch, "data_batch": data_batch,
                                   "max_steps": max_steps, "world_size": world})
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(step))

    if rank == 0 and not quiet:
        n_params = sum(p.numel() for p in student.backbone.parameters())
        print(f"[train] {cfg.model.name} ({n_params / 1e6:.2f}M backbone params) on {world} worker(s), "
              f"{device.type}{' bf16' if amp else ''}, start at step {step}/{max_steps}, "
              f"epoch {data_epoch} batch {data_batch}, epoch length {config['epoch_length']}")

    last_metrics: dict[str, Any] = {"step": step}
    per_epoch = int(config["loader_epoch_length"])
    student.train()
    teacher.eval()
    t_last = time.perf_counter()
    while step < max_steps:
        produced = 0
        batch_epoch = data_epoch
        for batch in make_loader(config["shard_uris"], cfg.loader, rank=rank, world_size=world,
                                 epoch=data_epoch, seed=cfg.run.seed, skip_batches=data_batch):
            produced += 1
            values = schedules.at(step)
            digest = _gather_floats(_batch_digest(batch), device)
            m = step_fn(batch, values)
            step += 1
            data_batch += 1
            if data_batch >= per_epoch:  # position "end of epoch e" is stored as "start of e + 1"
                data_epoch, data_batch = data_epoch + 1, 0
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            n_img = batch["global_crops"].shape[0] // 2 * world
            rec = {"step": step, "max_steps": max_steps, "epoch": batch_epoch, "lr": values.lr, "wd": values.wd,
                   "momentum": values.momentum, "teacher_temp": values.teacher_temp,
                   "last_layer_lr": values.last_layer_lr, "img_per_s": n_img / max(dt, 1e-9),
                   "step_seconds": dt, "batch_digest": digest}
            rec.update({k: float(v) for k, v in m.items()})
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"loss is {rec['loss']} at step {step}; the last checkpoint is kept")
            last_metrics = {k: v for k, v in rec.items() if k != "batch_digest"}
            if rank == 0:
                records.append(rec)
                if not quiet and (step % cfg.run.log_every == 0 or step == max_steps):
                    print(_fmt_line(rec), flush=True)
            if step % cfg.run.checkpoint_every == 0 or step == max_steps:
                report(last_metrics, with_checkpoint=True)
            elif step % cfg.run.report_every == 0:
                report(last_metrics, with_checkpoint=False)
            t_last = time.perf_counter()  # img/s measures loading + the step, not reports/checkpoints
            if step >= max_steps or data_epoch != batch_epoch:
                break
        if produced == 0:
            raise RuntimeError(f"the loader yielded no batch for epoch {data_epoch} (skipping {data_batch}) "
                               f"on rank {rank} of {world}")
        if data_epoch == batch_epoch and step < max_steps:  # the loader ran short of its announced count
            data_epoch, data_batch = data_epoch + 1, 0

    teacher_sd = None
    if cfg.run.fsdp:  # every rank joins the gather of the sharded teacher
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        teacher_sd = get_model_state_dict(teacher, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        _write_metrics(output, records)
        _export_final(teacher, output, teacher_sd)


def _export_final(teacher, output: str, teacher_sd: dict | None = None) -> str:
    """Write the teacher backbone (DINOv2 evaluates the teacher) to ``<output>/backbone.safetensors``."""
    from webcurate.shards import storage

    from .export import BACKBONE_FILE, backbone_metadata, save_safetensors

    bb = teacher.backbone
    if teacher_sd is None:
        state = bb.vit.state_dict()
    else:
        pre = "backbone.vit."
        state = {k[len(pre):]: v for k, v in teacher_sd.items() if k.startswith(pre)}
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    uri = storage.join(output, BACKBONE_FILE)
    return save_safetensors(state, uri, backbone_metadata(bb.model_name, bb.model_kwargs))


__all__ = ["train", "worker_loop", "resolve_config", "dataset_size", "build_models", "TrainError",
           "CONFIG_FILE", "METRICS_DIR", "read_metrics"]
