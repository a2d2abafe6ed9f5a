"""Per-step schedules (DINOv2's ``CosineScheduler`` and ``build_schedulers``), sized to the run's plan.

All schedules are indexed by the global optimiser step and span the run's
planned length (``plan.Plan.total_steps``). Every epoch-valued setting of the
recipe is a *fraction of the recipe's length* ``optim.epochs``: a warm-up of 10
epochs in a 100-epoch recipe is the first 10 % of the run, whether the run is
100 epochs, 3 epochs or what fits in 15 minutes. So a short run still gets
complete warm-ups and decays:

- lr: linear warm-up from 0 over ``optim.warmup_epochs``, then cosine to ``min_lr``;
- last-layer lr (DINO and SwAV prototypes): the lr schedule, 0 during ``freeze_last_layer_epochs``;
- weight decay: cosine from ``weight_decay`` to ``weight_decay_end``;
- EMA momentum: cosine from ``teacher.momentum`` to ``teacher.final_momentum``;
- DINO teacher temperature: linear warm-up ``warmup_temp`` -> ``temp`` over
  ``warmup_temp_epochs``, then constant.

Past the end every schedule holds its final value.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class CosineSchedule:
    """Values for steps 0..total-1: ``freeze`` zeros, linear warm-up, then half-cosine.

    ``schedule[it]`` (numpy float64) equals DINOv2's ``CosineScheduler`` value.
    """

    def __init__(self, base_value: float, final_value: float, total_iters: int, warmup_iters: int = 0,
                 start_warmup_value: float = 0.0, freeze_iters: int = 0):
        total_iters, warmup_iters, freeze_iters = int(total_iters), int(warmup_iters), int(freeze_iters)
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(f"warm-up ({warmup_iters}) + freeze ({freeze_iters}) exceed {total_iters} steps")
        self.final_value = float(final_value)
        self.total_iters = total_iters
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        iters = np.arange(total_iters - warmup_iters - freeze_iters)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
        self.schedule = np.concatenate((freeze, warmup, cosine))

    def __getitem__(self, it: int) -> float:
        if it >= self.total_iters:
            return self.final_value
        return float(self.schedule[it])

    def __len__(self) -> int:
        return self.total_iters


@dataclass
class StepValues:
    """The scheduled values applied at one step."""

    lr: float
    last_layer_lr: float
    wd: float
    momentum: float
    teacher_temp: float


class Schedules:
    """All schedules of a run of ``total_steps``; ``at(step)`` gives that step's ``StepValues``."""

    def __init__(self, *, total_steps: int, peak_lr: float, min_lr: float, warmup_steps: int, weight_decay: float,
                 weight_decay_end: float, momentum: float, final_momentum: float, teacher_temp: float,
                 warmup_teacher_temp: float, warmup_teacher_temp_steps: int, freeze_last_layer_steps: int):
        total = max(1, int(total_steps))
        self.total_steps = total
        warm = min(int(warmup_steps), total)
        self.lr = CosineSchedule(peak_lr, min_lr, total, warmup_iters=warm, start_warmup_value=0.0)
        self.last_layer_lr = CosineSchedule(peak_lr, min_lr, total, warmup_iters=warm, start_warmup_value=0.0)
        freeze = min(int(freeze_last_layer_steps), total)
        self.last_layer_lr.schedule[:freeze] = 0.0  # as DINOv2: the prototypes stay put while the rest settles
        self.wd = CosineSchedule(weight_decay, weight_decay_end, total)
        self.momentum = CosineSchedule(momentum, final_momentum, total)
        t_warm = min(int(warmup_teacher_temp_steps), total)
        # DINOv2 sizes this one to the warm-up only: after it, the final value holds.
        self.teacher_temp = CosineSchedule(teacher_temp, teacher_temp, max(t_warm, 1), warmup_iters=t_warm,
                                           start_warmup_value=warmup_teacher_temp) if t_warm else None
        self._final_teacher_temp = float(teacher_temp)

    def at(self, step: int) -> StepValues:
        tt = self.teacher_temp[step] if self.teacher_temp is not None else self._final_teacher_temp
        return StepValues(lr=self.lr[step], last_layer_lr=self.last_layer_lr[step], wd=self.wd[step],
                          momentum=self.momentum[step], teacher_temp=tt)

    @classmethod
    def from_config(cls, cfg, total_steps: int) -> "Schedules":
        """Schedules of a ``TrainConfig`` over a run of ``total_steps``: every epoch-valued setting
        becomes the same fraction of the run as of the recipe's ``optim.epochs``."""
        o, t = cfg.optim, cfg.teacher
        total = max(1, int(total_steps))

        def steps(epochs: float) -> int:
            return round(total * epochs / o.epochs)

        return cls(total_steps=total, peak_lr=cfg.scaled_lr(), min_lr=o.min_lr, warmup_steps=steps(o.warmup_epochs),
                   weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end, momentum=t.momentum,
                   final_momentum=t.final_momentum, teacher_temp=t.temp, warmup_teacher_temp=t.warmup_temp,
                   warmup_teacher_temp_steps=steps(t.warmup_temp_epochs),
                   freeze_last_layer_steps=steps(o.freeze_last_layer_epochs))


__all__ = ["CosineSchedule", "Schedules", "StepValues"]
