"""One optimisation step, the same for every method (the method's objective supplies the loss).

targets (teacher forward, no grad) -> student forward (DDP/FSDP) -> loss ->
backward -> gradient clipping per sub-module -> optimiser step -> EMA update
of the teacher -> the objective's own updates (queues) -> collapse monitors.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .ema import EMAUpdater
from .methods.base import Objective, SSLModel
from .monitors import embedding_monitors
from .optim import apply_schedule, clip_gradients
from .schedules import StepValues


class TrainStep:
    """Callable running one step; holds models, objective, optimizer and EMA.

    ``student`` may be wrapped (DDP/FSDP); ``student_module`` is the bare
    ``SSLModel`` used for clipping. ``teacher`` is the EMA copy (None for methods
    without a momentum branch). ``autocast_dtype`` (bfloat16 on GPU) enables
    autocast around the forwards; losses are computed in float32.
    """

    def __init__(self, cfg, student: nn.Module, student_module: SSLModel, teacher: SSLModel | None,
                 optimizer: torch.optim.Optimizer, objective: Objective, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, ema: EMAUpdater | None = None):
        self.cfg = cfg
        self.student = student
        self.student_module = student_module
        self.teacher = teacher
        self.optimizer = optimizer
        self.objective = objective
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.ema = ema if ema is not None or teacher is None else EMAUpdater(student_module, teacher)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def __call__(self, batch: dict[str, Any], values: StepValues) -> dict[str, torch.Tensor]:
        """Run one step on ``batch`` with this step's scheduled ``values``; returns detached metrics."""
        apply_schedule(self.optimizer, values.lr, values.wd, values.last_layer_lr)
        inputs = self.objective.prepare(batch, self.device)
        with self._autocast():
            with torch.no_grad():
                targets = self.objective.targets(self.teacher, inputs, values)
            out = self.student(**inputs)
        result = self.objective.loss(out, targets, inputs, values)
        metrics = dict(result.metrics)
        metrics["loss"] = result.total.detach()

        self.optimizer.zero_grad(set_to_none=True)
        result.total.backward()
        metrics.update(clip_gradients(self.student_module.submodules().items(), self.cfg.optim.clip_grad))
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(values.momentum)
        self.objective.after_step(out, targets)
        if result.views is not None:
            metrics.update(embedding_monitors(*result.views))
        return metrics


__all__ = ["TrainStep"]
