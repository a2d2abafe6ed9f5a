"""The self-supervised methods: declarative specs (``registry``) and the code of each family.

``build_method(cfg, backbone)`` gives the student model and the objective of
``cfg.method``; the teacher (momentum methods) is an EMA copy of the student,
made by ``webcurate.train.models``.
"""
from __future__ import annotations

from torch import nn

from .base import Objective, SSLModel, StepLoss
from .registry import METHODS, MethodSpec, get_method


def build_method(cfg, backbone: nn.Module) -> tuple[SSLModel, Objective]:
    """``(student, objective)`` of ``cfg.method`` around ``backbone`` (random init)."""
    family = cfg.spec.family
    if family == "dino":
        from .dino import DinoObjective, build_dino_model

        student, objective = build_dino_model(cfg, backbone), DinoObjective(cfg)
    elif family == "siamese":
        from .siamese import SiameseObjective, build_siamese_model

        student, objective = build_siamese_model(cfg, backbone), SiameseObjective(cfg)
    elif family == "swav":
        from .swav import SwAVObjective, build_swav_model

        student, objective = build_swav_model(cfg, backbone), SwAVObjective(cfg)
    elif family == "mae":
        from .mae import MAEObjective, build_mae_model

        student, objective = build_mae_model(cfg, backbone), MAEObjective(cfg, backbone.patch_size)
    else:  # pragma: no cover - the registry names only the families above
        raise ValueError(f"method family {family!r} has no implementation")
    if hasattr(backbone, "mask_token") and not cfg.spec.masks:
        # No patch masks in this method: a parameter without gradient would stall DDP's reducer.
        backbone.mask_token.requires_grad_(False)
    if family == "dino" and cfg.ibot.loss_weight <= 0 and hasattr(backbone, "mask_token"):
        backbone.mask_token.requires_grad_(False)
    objective.bind(student)
    return student, objective


__all__ = ["build_method", "METHODS", "MethodSpec", "get_method", "Objective", "SSLModel", "StepLoss"]
