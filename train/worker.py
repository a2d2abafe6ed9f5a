"""The per-worker training loop that Ray Train's ``TorchTrainer`` runs on every worker.

Each worker builds the method's student (and EMA teacher), streams its share of
the shards through the loader (``webcurate.train.data.loader``), and runs
``TrainStep`` per batch. Decisions that every rank must take alike (the plan of
a time budget, stopping on time, a non-finite loss) are made from values
gathered from all ranks each step, so DDP never waits on a rank that left.

Exact resume: a checkpoint holds the optimiser step, the loader position
(epoch, batches consumed in it), the plan, models, optimizer, the objective's
buffers and every rank's RNG state; the loader restarts at that position, so a
resumed run sees the same batches in the same order as an uninterrupted one.
``ray.train.report`` costs ~2 s, so it runs every ``run.report_every`` steps and
at checkpoints, never per step.
"""
from __future__ import annotations

import collections
import math
import tempfile
import time
from typing import Any

from .config import TrainConfig
from .metrics import batch_digest, format_line, truncate_metrics, write_metrics
from .plan import (CALIBRATION_STEPS, REFINE_STEPS, BudgetTooShort, Plan, budget_plan, fixed_plan, refine_at,
                   reserve_seconds)
from .precision import use_bf16


def _gather_floats(values: list[float], device) -> list[list[float]]:
    """Every rank's ``values`` (same length on all ranks), rank order."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [values]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [p.tolist() for p in parts]


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


def _seconds_per_step(durations: list[float], since: int = 1) -> float:
    """Median step time of ``durations[since:]`` (default: all but the first, which pays lazy init)."""
    timed = sorted(durations[since:]) or durations
    return timed[len(timed) // 2]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the last checkpoint is kept."""


def worker_loop(config: dict[str, Any]) -> None:
    """The per-worker training function run by ``TorchTrainer`` (see the module docstring)."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from .checkpoint import checkpoint_dir_name, read_checkpoint, set_rng_state, training_state, write_checkpoint
    from .ema import teacher_mode
    from .export_backbone import backbone_state, export_backbone
    from .models import prepare_models
    from .schedules import Schedules
    from .step import TrainStep

    _quiet_ray_train_reports()
    cfg = TrainConfig.from_dict(config["cfg"])
    make_loader = config.get("loader_factory")
    if make_loader is None:
        from webcurate.train.data.loader import make_loader
    output: str = config["output"]
    quiet: bool = config.get("quiet", False)
    deadline: float | None = config.get("deadline")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_num_threads(cfg.run.torch_threads or max(1, int(config.get("cpus_per_worker") or 1)))
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    amp = use_bf16(cfg.run.precision, device.type, cfg.model.name)

    step, data_epoch, data_batch, rng, state, plan = 0, 0, 0, None, None, None
    if config.get("resume_from"):  # our own listing, not Ray's snapshot (which may be missing)
        state, rng = read_checkpoint(config["resume_from"], rank)
        step, data_epoch, data_batch = int(state["step"]), int(state["data_epoch"]), int(state["data_batch"])
        plan = Plan.from_dict(state["plan"]) if state.get("plan") else None
        if rng is None and rank == 0:
            print(f"[train] checkpoint has no RNG state for rank {rank}: drop-path draws will differ")
    trainee = prepare_models(cfg, device, distributed=distributed, state=state)
    del state
    if rng is not None:
        set_rng_state(rng)
    else:
        # Different drop-path and mask draws per rank, reproducible from the seed and the step.
        torch.manual_seed(cfg.run.seed * 1_000_003 + rank * 7919 + step)

    epoch_length = int(config["epoch_length"])
    calibrating = plan is None and cfg.run.time_budget is not None
    if plan is None:
        plan = fixed_plan(cfg, epoch_length)
    schedules = Schedules.from_config(cfg, plan.total_steps)
    step_fn = TrainStep(cfg, trainee.model, trainee.student, trainee.teacher, trainee.optimizer, trainee.objective,
                        device, autocast_dtype=torch.bfloat16 if amp else None, ema=trainee.ema)
    if rank == 0:
        truncate_metrics(output, step)
    records: list[dict[str, Any]] = []  # not yet flushed
    recent: collections.deque = collections.deque(maxlen=10)  # for the collapse verdict

    def save(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        if rank == 0 and records:
            write_metrics(output, records)  # before the checkpoint: a resume always finds its history
            records.clear()
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        full = training_state(cfg, trainee)  # FSDP: every rank takes part in the gather
        exported = trainee.exported
        part = "teacher" if exported is trainee.teacher else "student"
        bb = (backbone_state(exported, full[part] if cfg.run.fsdp else None), exported.backbone.meta)
        full.update(step=step, data_epoch=data_epoch, data_batch=data_batch, plan=plan.to_dict())
        with tempfile.TemporaryDirectory(prefix="webcurate-ckpt-") as tmp:
            write_checkpoint(tmp, rank=rank, state=full if rank == 0 else None, backbone=bb if rank == 0 else None,
                             meta={"step": step, "data_epoch": data_epoch, "data_batch": data_batch,
                                   "max_steps": plan.total_steps, "world_size": world, "method": cfg.method})
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(step))

    if rank == 0 and not quiet:
        n_params = sum(p.numel() for p in trainee.student.backbone.parameters())
        print(f"[train] {cfg.method} on {cfg.model.name} ({n_params / 1e6:.2f}M backbone params), {world} "
              f"worker(s), {device.type}{' bf16' if amp else ''}, start at step {step}, epoch {data_epoch} batch "
              f"{data_batch}", flush=True)
        if not calibrating:
            print(f"[train] {plan.describe()}", flush=True)

    stop_at = min(plan.total_steps, cfg.run.stop_at_step if cfg.run.stop_at_step is not None else plan.total_steps)
    last_metrics: dict[str, Any] = {"step": step}
    durations: list[float] = []
    refine: int | None = None  # len(durations) at which a time-budget plan is measured again
    stopped_on_time = False
    trainee.student.train()
    if trainee.teacher is not None:
        teacher_mode(trainee.teacher)
    t_last = time.perf_counter()
    while step < stop_at:
        produced = 0
        batch_epoch = data_epoch
        for batch in make_loader(config["shard_uris"], cfg.loader, rank=rank, world_size=world,
                                 epoch=data_epoch, seed=cfg.run.seed, skip_batches=data_batch):
            produced += 1
            values = schedules.at(step)
            m = step_fn(batch, values)
            loss = float(m["loss"])
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            left = deadline - time.time() if deadline is not None else math.inf
            # One gather per step: batch digests (resume checks), losses and time left of every rank.
            gathered = _gather_floats(batch_digest(batch) + [loss, min(left, 1e12), dt], device)
            step += 1
            data_batch += 1
            if data_batch >= epoch_length:  # position "end of epoch e" is stored as "start of e + 1"
                data_epoch, data_batch = data_epoch + 1, 0
            bad = [g[-3] for g in gathered if not math.isfinite(g[-3])]
            if bad:
                raise NonFiniteLossError(f"the {cfg.method} loss is {bad[0]} at step {step}: lower optim.base_lr "
                                    f"(now {cfg.optim.base_lr:g}) or raise optim.warmup_epochs; checkpoints so far "
                                    "are kept (--resume continues from the last)")
            durations.append(max(g[-1] for g in gathered))
            n_img = cfg.global_batch_size()
            rec = {"step": step, "max_steps": plan.total_steps, "epoch": batch_epoch, "lr": values.lr, "wd": values.wd,
                   "momentum": values.momentum, "teacher_temp": values.teacher_temp,
                   "last_layer_lr": values.last_layer_lr, "img_per_s": n_img / max(dt, 1e-9), "step_seconds": dt,
                   "batch_digest": [g[:-3] for g in gathered]}
            rec.update({k: float(v) for k, v in m.items()})
            last_metrics = {k: v for k, v in rec.items() if k != "batch_digest"}
            recent.append(last_metrics)
            first = calibrating and len(durations) >= CALIBRATION_STEPS
            if first or (refine is not None and len(durations) >= refine):
                # Planned twice: the calibration's warm-up steps run slower than the steps after them.
                sps = _seconds_per_step(durations, since=1 if first else len(durations) - REFINE_STEPS)
                try:
                    resized = budget_plan(cfg, epoch_length, sps, step, min(g[-2] for g in gathered))
                except BudgetTooShort:
                    if first:
                        raise
                    resized = None  # slower than planned: the deadline check below stops the run on time
                calibrating, refine = False, refine_at(resized, len(durations)) if first else None
                if resized is not None:
                    plan = resized
                    schedules = Schedules.from_config(cfg, plan.total_steps)
                    stop_at = min(plan.total_steps, cfg.run.stop_at_step or plan.total_steps)
                    rec["max_steps"] = last_metrics["max_steps"] = plan.total_steps
                    if rank == 0 and not quiet:
                        print(f"[train] {'' if first else 're-measured '}{plan.describe()}", flush=True)
            out_of_time = deadline is not None and not calibrating and \
                min(g[-2] for g in gathered) < reserve_seconds(cfg, _seconds_per_step(durations))
            if rank == 0:
                records.append(rec)
                if not quiet and (step % cfg.run.log_every == 0 or step >= stop_at):
                    print(format_line(rec), flush=True)
            done = step >= stop_at or out_of_time
            if done:
                stopped_on_time = out_of_time and step < stop_at
                last_metrics.update(_summary(cfg, plan, recent, stopped_on_time))
            if done or step % cfg.run.checkpoint_every == 0:
                save(last_metrics, with_checkpoint=True)
                refine = None  # a resume from this checkpoint keeps its plan: so does this run
            elif step % cfg.run.report_every == 0:
                save(last_metrics, with_checkpoint=False)
            t_last = time.perf_counter()  # img/s measures loading + the step, not reports/checkpoints
            if done or data_epoch != batch_epoch:
                break
        if produced == 0:
            raise RuntimeError(f"the loader yielded no batch for epoch {data_epoch} (skipping {data_batch}) "
                               f"on rank {rank} of {world}")
        if stopped_on_time or step >= stop_at:
            break
        if data_epoch == batch_epoch:  # the loader ran short of its announced count
            data_epoch, data_batch = data_epoch + 1, 0

    if step < plan.total_steps and not stopped_on_time:
        if rank == 0:
            write_metrics(output, records)
        return  # paused at run.stop_at_step: no export, --resume continues
    full_state = None
    exported = trainee.exported
    if cfg.run.fsdp:  # every rank joins the gather of the sharded model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full_state = get_model_state_dict(exported, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        write_metrics(output, records)
        from webcurate.shards import storage

        export_backbone(exported, storage.join(output, "backbone.safetensors"), full_state=full_state,
                        extra={"method": cfg.method, "step": str(step)})


def _summary(cfg: TrainConfig, plan: Plan, recent, stopped_on_time: bool) -> dict[str, Any]:
    """What the final report adds: the plan, stop reason and the collapse verdict."""
    from .monitors import collapse_verdict

    verdict = collapse_verdict(recent)
    return {"plan_steps": plan.total_steps, "plan_source": plan.source, "method": cfg.method,
            "stopped_on_time": stopped_on_time, "collapse": verdict or "no collapse detected"}


__all__ = ["worker_loop", "NonFiniteLossError"]
