"""The training driver: checks, plan, memory estimate, then Ray Train's ``TorchTrainer`` over the workers.

``train`` reads the dataset's shard list, checks the config against the
backbone and the node's memory, and starts one Ray Train worker per
``run.num_workers`` (DDP over gloo on CPU, NCCL on GPU; FSDP2 with
``run.fsdp``) running ``webcurate.train.worker.worker_loop``.

Outputs under ``--output`` (local folder or ``s3://``; Ray's storage path):

- ``train/checkpoint_<step>/``: state.pt (+ per-rank RNG) and the backbone at that
  step, every ``run.checkpoint_every`` steps and at the end (the last
  ``run.keep_checkpoints`` are kept);
- ``metrics/<first>-<last>.jsonl``: one record per step (``metrics.read_metrics``);
- ``train_config.yaml``: the resolved config; ``backbone.safetensors``: the
  trained backbone at the end (``shards/backbone_format.py``).

``--resume`` continues from the newest complete checkpoint in our own listing
(``checkpoint.list_checkpoints``), not from Ray's run snapshot, which a
copied or partly deleted output may lack.
"""
from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Callable, Iterator

from webcurate.shards.errors import ConfigError, RunError

from .checkpoint import RUN_NAME, list_checkpoints
from .config import TrainConfig, to_yaml

CONFIG_FILE = "train_config.yaml"
# Options that may change between a run and its resumption without changing what is computed.
RESUME_MUTABLE = {"run.stop_at_step", "run.time_budget", "run.log_every", "run.report_every",
                  "run.checkpoint_every", "run.keep_checkpoints", "run.cpus_per_worker", "run.torch_threads",
                  "run.check_memory", "loader.num_threads", "loader.prefetch", "loader.cache_dir"}
# S3 settings forwarded to the workers. Credentials are not: a runtime_env is stored in
# Ray's GCS and shown on the dashboard. Workers take keys from their own environment
# (a local Ray inherits the driver's; a cluster node its instance profile or its env),
# or from `webcurate submit --forward-aws`, which the user asks for explicitly.
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")
_OOM = re.compile(r"OutOfMemoryError|running low on memory|memory monitor|killed due to .*memory", re.I)


class TrainError(RunError):
    """Training failed; finished checkpoints are kept and ``--resume`` continues from the last."""


def worker_env_vars(environ: Any) -> dict[str, str]:
    """The environment variables the Train workers' runtime_env sets: S3 settings, never keys."""
    env = {k: environ[k] for k in _AWS_ENV if environ.get(k)}
    env["WEBCURATE_QUIET"] = environ.get("WEBCURATE_QUIET", "0")
    # Ray Train's print patch echoes each worker line twice; plain stdout is forwarded once.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return env


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
    old = TrainConfig.from_dict(yaml.safe_load(storage.read_bytes(uri)), uri)
    a, b = _flat(old.to_dict()), _flat(cfg.to_dict())
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUME_MUTABLE)
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"--resume with a changed config would not continue the same run ({shown}); "
                          f"use the config in {uri} or a new --output")


def dataset_size(data: str) -> tuple[list[str], int]:
    """Shard URIs of a dataset's complete shards and its count of ``ok`` samples."""
    from webcurate.shards.dataset import Dataset, DatasetError
    from webcurate.shards.schema import STATUS_OK

    ds = Dataset(data)
    uris = ds.shard_uris()
    if not uris:
        raise DatasetError(f"{data} has no complete shards to train on")
    return uris, ds.index(columns=["key"], status=STATUS_OK).num_rows


def resume_point(output: str, resume: bool, quiet: bool) -> str | None:
    """The checkpoint URI to resume from (None: start at step 0), or ``ConfigError``."""
    from webcurate.shards import storage

    existing = list_checkpoints(output)
    if existing and not resume:
        raise ConfigError(f"{output} already holds a training run (checkpoint at step {existing[-1][0]}); "
                          "pass --resume to continue it or choose another --output")
    if not resume:
        return None
    if existing:
        return existing[-1][1]
    partial = [e.uri for base in (storage.join(output, RUN_NAME), output) for e in storage.list_dir(base)
               if e.is_dir and e.name.startswith("checkpoint_")]
    if partial:
        raise ConfigError(f"--resume: {output} holds checkpoint folders but none is complete (state.pt and "
                          f"meta.json), e.g. {partial[-1]}; remove them to start over, or use a new --output")
    if not quiet:
        print(f"note: {output} holds no checkpoint yet; --resume starts from step 0")
    return None


def _log_dir() -> str:
    try:
        import ray._private.worker as rw

        return rw._global_node.get_logs_dir_path()
    except Exception:  # a client connection or another Ray layout: name the usual place
        return "/tmp/ray/session_latest/logs"


def _root_cause(e: BaseException) -> str:
    """One line naming what broke: the innermost exception, or the last ``XxxError: ...`` line
    of a worker traceback that Ray carries as text."""
    seen = set()
    while True:
        failures = getattr(e, "worker_failures", None)  # Ray Train's WorkerGroupError: {rank: exception}
        if isinstance(failures, dict) and failures and id(e) not in seen:
            seen.add(id(e))
            e = failures[min(failures)]
            continue
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


def failure_message(e: BaseException, cfg: TrainConfig, output: str) -> str:
    """The one line a failed run ends with: its cause, the last checkpoint, the full log's place."""
    last = list_checkpoints(output)
    where = f"; last checkpoint: step {last[-1][0]} ({last[-1][1]}), continue with --resume" if last else ""
    text = f"{e!r} {e}"
    if _OOM.search(text):
        return (f"training was killed for lack of memory (Ray's memory monitor): lower loader.batch_size (now "
                f"{cfg.loader.batch_size}) or the crops (loader.global_size, loader.n_local){where}; "
                f"full log: {_log_dir()}")
    return f"training failed: {_root_cause(e)}{where}; full log: {_log_dir()}"


def train(data: str, output: str, cfg: TrainConfig, *, resume: bool = False, quiet: bool = False,
          loader_factory: Callable[..., Iterator[dict]] | None = None) -> dict[str, Any]:
    """Train on dataset ``data`` into ``output`` with Ray Train; returns a summary dict.

    ``run.time_budget`` counts from this call: startup, training, the final
    checkpoint and the export all fit in it. ``loader_factory`` replaces
    ``webcurate.train.data.loader.make_loader`` (same signature) for tests and
    benchmarks. Raises ``ConfigError`` for unusable settings (before any worker
    starts), ``TrainError`` when workers fail (checkpoints written so far are kept).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from webcurate.shards import storage
    from webcurate.shards.ray_runtime import cluster_cpus, cluster_gpus, init_ray

    from .data.loader import batches_per_epoch
    from .memory import check_fits, workers_per_node
    from .models import resolve_config

    t0 = time.time()
    data, output = storage.absolute(data), storage.absolute(output)
    deadline = t0 + cfg.run.time_budget if cfg.run.time_budget else None
    cfg = resolve_config(cfg)
    shard_uris, n_samples = dataset_size(data)
    world = cfg.run.num_workers
    loader_epoch = batches_per_epoch(n_samples, cfg.loader, world)
    if loader_epoch <= 0:
        raise ConfigError(f"{data} has {n_samples} samples: fewer than one batch of loader.batch_size="
                          f"{cfg.loader.batch_size} per worker for {world} worker(s)")
    epoch_length = cfg.run.epoch_length or loader_epoch
    resume_from = resume_point(output, resume, quiet)
    if resume:
        _check_resume_config(output, cfg)

    init_ray()
    use_gpu = cfg.run.use_gpu if cfg.run.use_gpu is not None else cluster_gpus() > 0
    if cfg.run.check_memory and not use_gpu:  # GPU memory is another matter: the CPU side is small there
        local = not os.environ.get("RAY_ADDRESS")
        check_fits(cfg, workers_per_node(world, use_gpu), local)
    storage.makedirs(output)
    storage.write_bytes(storage.join(output, CONFIG_FILE), to_yaml(cfg).encode())
    cpus = cfg.run.cpus_per_worker or max(0.25, math.floor(cluster_cpus() / world * 4) / 4)
    resources = {"CPU": cpus, **({"GPU": 1} if use_gpu else {})}
    fs, path = storage.filesystem(output)
    storage_kw = {"storage_path": path, "storage_filesystem": fs} if storage.is_s3(output) else \
        {"storage_path": output}

    loop_config = {
        "cfg": cfg.to_dict(), "shard_uris": shard_uris, "epoch_length": epoch_length, "output": output,
        "quiet": quiet, "cpus_per_worker": cpus, "loader_factory": loader_factory, "deadline": deadline,
        "resume_from": resume_from,
    }
    trainer = _trainer_class()(
        _worker_entry,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RUN_NAME, **storage_kw,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": worker_env_vars(os.environ)},
            # Ray Train logs every report at INFO; our own per-step lines say more in less space.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception; show its cause, keep the checkpoints
        raise TrainError(failure_message(e, cfg, output)) from e
    err = getattr(result, "error", None)
    if err is not None:
        raise TrainError(failure_message(err, cfg, output))
    ckpts = list_checkpoints(output)
    summary = dict(result.metrics or {})
    summary.update({
        "output": output, "seconds": round(time.time() - t0, 1), "epoch_length": epoch_length,
        "samples": n_samples, "workers": world, "use_gpu": use_gpu, "checkpoint": ckpts[-1][1] if ckpts else None,
        "backbone": storage.join(output, "backbone.safetensors"),
    })
    return summary


def _local_ray_without_dashboard() -> bool:
    """Whether this process runs the in-process Ray of ``init_ray`` (no dashboard, so no State API)."""
    try:
        import ray._private.worker as rw

        node = rw._global_node
        return node is not None and node.head and not node.address_info.get("webui_url")
    except Exception:  # another Ray layout: keep Ray's defaults
        return False


def _trainer_class():
    """``TorchTrainer``, minus Ray Train's placement-group cleaner where the State API is missing.

    The cleaner (a detached actor that frees the workers' placement group if the
    controller dies) polls the State API every second; without a dashboard each poll
    fails and logs a warning, a line per second for the whole run. On the in-process
    Ray the placement group dies with the driver anyway, so the cleaner has nothing to do.
    """
    from ray.train.torch import TorchTrainer

    if not _local_ray_without_dashboard():
        return TorchTrainer

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return LocalTorchTrainer


def _worker_entry(config: dict[str, Any]) -> None:
    from .worker import worker_loop

    worker_loop(config)


__all__ = ["train", "dataset_size", "resume_point", "failure_message", "worker_env_vars", "TrainError",
           "CONFIG_FILE", "RESUME_MUTABLE"]
