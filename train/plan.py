"""The run's plan: how many optimiser steps it takes, decided once and kept for resumes.

The length comes from the first of these that is set:

- ``run.time_budget`` (``--time-budget 15m``): the workers run ``CALIBRATION_STEPS``
  steps, measure seconds per step (the slowest worker's median, loading included,
  plus the amortised cost of reports and checkpoints), and plan the steps that fit
  in what is left of the budget after a reserve for the final checkpoint and the
  export (``budget_plan``); ``run.max_steps`` then caps it. The first steps are slow
  (kernel selection, allocator and loader warm-up: ~1.0 s against ~0.64 s for the
  CIFAR ResNet on 2 CPU cores, which left a third of a 15-minute budget unused), so
  the plan is measured once more over the next ``REFINE_STEPS`` steps and re-sized
  (``refine_at``), unless a checkpoint was written in between (a resume keeps the
  plan its checkpoint holds);
- ``run.max_steps`` (``--max-steps``);
- ``run.epochs`` (``--epochs``);
- ``optim.epochs``, the recipe's own length.

The schedules (``schedules.Schedules.from_config``) span exactly the planned
steps. A resumed run reads the plan from its checkpoint and never re-plans.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

CALIBRATION_STEPS = 6  # steps run before a time-budget plan; the first is not timed (lazy init)
REFINE_STEPS = 40  # steps timed after the first plan before it is re-sized once
REPORT_SECONDS = 2.0  # what a ray.train.report costs (see worker.py)
CHECKPOINT_SECONDS = 6.0  # a checkpoint's write and upload, small models


@dataclass
class Plan:
    """``total_steps`` of ``epoch_length`` steps per epoch; ``source`` names the option that set it."""

    total_steps: int
    epoch_length: int
    images_per_step: int
    source: str
    seconds_per_step: float | None = None

    @property
    def epochs(self) -> float:
        return self.total_steps / self.epoch_length

    @property
    def images(self) -> int:
        return self.total_steps * self.images_per_step

    def describe(self) -> str:
        """The plan line printed before training: steps, epochs, images seen."""
        how = f" ({self.seconds_per_step:.3f} s/step measured)" if self.seconds_per_step else ""
        return (f"plan: {self.total_steps} steps = {self.epochs:.2f} epochs of {self.epoch_length} steps, "
                f"{self.images:,} images seen, {self.images_per_step} per step; length from {self.source}{how}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        return cls(**d)


def fixed_plan(cfg, epoch_length: int) -> Plan:
    """The plan of a run without a time budget (or before its calibration)."""
    images = cfg.global_batch_size()
    if cfg.run.max_steps is not None:
        return Plan(max(1, cfg.run.max_steps), epoch_length, images, "run.max_steps")
    if cfg.run.epochs is not None:
        return Plan(max(1, round(cfg.run.epochs * epoch_length)), epoch_length, images, "run.epochs")
    return Plan(max(1, round(cfg.optim.epochs * epoch_length)), epoch_length, images, "optim.epochs")


def overhead_per_step(cfg) -> float:
    """Seconds per step of reports and checkpoints, amortised."""
    return REPORT_SECONDS / cfg.run.report_every + CHECKPOINT_SECONDS / cfg.run.checkpoint_every


def reserve_seconds(cfg, seconds_per_step: float) -> float:
    """Time kept back at the end of a budget: the final checkpoint, the export and one step of slack."""
    return CHECKPOINT_SECONDS + REPORT_SECONDS + seconds_per_step + 0.02 * (cfg.run.time_budget or 0)


def refine_at(plan: Plan, steps_timed: int) -> int | None:
    """The count of timed steps at which a time-budget ``plan`` made after ``steps_timed`` steps is
    measured again; None when the run is too short for a second measurement to pay."""
    at = steps_timed + REFINE_STEPS
    return at if plan.total_steps >= 2 * at else None


class BudgetTooShort(ValueError):
    """The time budget does not leave room for one training step."""


def budget_plan(cfg, epoch_length: int, seconds_per_step: float, steps_done: int, seconds_left: float) -> Plan:
    """The plan for a time budget: ``steps_done`` plus the steps that fit in ``seconds_left``.

    Raises ``BudgetTooShort`` (naming ``run.time_budget``) when not one more step fits.
    """
    per_step = seconds_per_step * 1.03 + overhead_per_step(cfg)  # 3 %: steps slow down as the cache warms
    usable = seconds_left - reserve_seconds(cfg, seconds_per_step)
    more = math.floor(usable / per_step) if usable > 0 else 0
    if more < 1:
        raise BudgetTooShort(
            f"run.time_budget={cfg.run.time_budget:g}s is too short: a step takes {seconds_per_step:.2f} s and "
            f"{max(seconds_left, 0):.0f} s were left after startup and {steps_done} calibration steps; "
            f"give at least {math.ceil(cfg.run.time_budget - usable + 10 * per_step)} s")
    total = steps_done + more
    if cfg.run.max_steps is not None:
        total = min(total, cfg.run.max_steps)
    return Plan(total, epoch_length, cfg.global_batch_size(), "run.time_budget", seconds_per_step)


__all__ = ["Plan", "fixed_plan", "budget_plan", "refine_at", "BudgetTooShort", "CALIBRATION_STEPS", "REFINE_STEPS",
           "reserve_seconds", "overhead_per_step"]
