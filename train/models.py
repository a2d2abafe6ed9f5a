"""What a worker trains with: backbone, student, EMA teacher, objective, optimiser, DDP/FSDP wrapping.

``resolve_config`` checks that the method fits the backbone (patch masking
needs a ViT) and aligns the loader's patch size with the model's, before any
worker starts. ``prepare_models`` builds everything on a device, restoring a
checkpoint's state when given one (``webcurate.train.checkpoint``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from webcurate.shards.errors import ConfigError

from .config import TrainConfig
from .methods.base import Objective, SSLModel


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Check the method/backbone fit and align ``loader.patch_size`` with the ViT's; returns ``cfg``."""
    from .backbone import is_vit_name, model_patch_size

    spec = cfg.spec
    vit = is_vit_name(cfg.model.name)
    if spec.needs_vit and not vit:
        raise ConfigError(f"method={cfg.method} masks image patches and needs a ViT; model.name={cfg.model.name} "
                          "is a ConvNet (use a timm vit_* model, or a method without masking such as dino, "
                          "simclr or byol)")
    if cfg.model.stem == "small_image" and vit:
        raise ConfigError(f"model.stem=small_image is a ConvNet option; {cfg.model.name} is a ViT")
    if cfg.run.fsdp and not vit:
        raise ConfigError("run.fsdp shards ViT blocks; ConvNet backbones train with DDP (run.fsdp=false)")
    if not vit:
        return cfg
    ps = model_patch_size(cfg.model, cfg.loader.global_size)
    if cfg.loader.patch_size != ps:
        if cfg.loader.global_size % ps:
            raise ConfigError(f"loader.global_size={cfg.loader.global_size} is not a multiple of the patch size "
                              f"{ps} of model {cfg.model.name}")
        cfg.loader.patch_size = ps
    if cfg.loader.n_local and cfg.loader.local_size % ps:
        raise ConfigError(f"loader.local_size={cfg.loader.local_size} is not a multiple of the patch size {ps} "
                          f"of model {cfg.model.name} (DINOv2 uses 98 for patch 14, 96 for patch 16)")
    return cfg


def build_models(cfg: TrainConfig, device: torch.device) -> tuple[SSLModel, SSLModel | None, Objective]:
    """``(student, teacher or None, objective)`` of ``cfg.method`` on ``device`` (random init)."""
    from .backbone import build_backbone
    from .ema import teacher_from_student
    from .methods import build_method

    backbone = build_backbone(cfg.model, cfg.loader.global_size)
    if backbone.kind == "convnet" and cfg.run.channels_last:
        backbone.use_channels_last()
    student, objective = build_method(cfg, backbone)
    student = student.to(device)
    teacher = teacher_from_student(student) if cfg.spec.momentum else None
    return student, teacher, objective.to(device)


@dataclass
class Trainee:
    """Everything a worker trains: ``model`` is the DDP-wrapped student (or the student itself)."""

    model: nn.Module
    student: SSLModel
    teacher: SSLModel | None
    optimizer: torch.optim.Optimizer
    objective: Objective
    ema: Any

    @property
    def exported(self) -> SSLModel:
        """The model whose backbone is exported: DINO evaluates its teacher, the others their online network."""
        dino = self.objective.cfg.spec.family == "dino"
        return self.teacher if self.teacher is not None and dino else self.student


def _shard_fsdp(model: SSLModel, reshard_root: bool = False) -> None:
    """FSDP2 per backbone unit (ViT block) plus the root.

    The teacher needs ``reshard_root``: FSDP2 keeps a root's gathered parameters after
    forward (for the backward that follows), and the teacher has no backward, so its
    next forward would use stale copies of the parameters the EMA just updated.
    """
    from torch.distributed.fsdp import fully_shard

    for unit in model.backbone.shard_units():
        fully_shard(unit)
    fully_shard(model, reshard_after_forward=True) if reshard_root else fully_shard(model)


def prepare_models(cfg: TrainConfig, device: torch.device, *, distributed: bool,
                   state: dict[str, Any] | None = None) -> Trainee:
    """Everything a worker trains with, restored from ``state`` (a checkpoint's state.pt) if given.

    With ``run.fsdp`` student and teacher are sharded alike (FSDP2, per block) before the
    optimizer is built on the sharded parameters; otherwise, when ``distributed``, the
    student is wrapped in DDP.
    """
    from .checkpoint import load_training_state
    from .ema import EMAUpdater
    from .optim import build_optimizer, param_groups

    # Same seed on every rank: identical initial weights without relying on a broadcast.
    torch.manual_seed(cfg.run.seed)
    student, teacher, objective = build_models(cfg, device)
    if cfg.run.fsdp:
        _shard_fsdp(student)
        if teacher is not None:
            _shard_fsdp(teacher, reshard_root=True)
    o = cfg.optim
    groups = param_groups(student.submodules(), o.layerwise_decay, o.patch_embed_lr_mult)
    optimizer = build_optimizer(groups, o.beta1, o.beta2, name=o.name, momentum=o.sgd_momentum)
    trainee = Trainee(student, student, teacher, optimizer, objective, None)
    if state is not None:
        load_training_state(cfg, state, trainee)
    trainee.ema = EMAUpdater(student, teacher) if teacher is not None else None
    if distributed and not cfg.run.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        trainee.model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None,
                            gradient_as_bucket_view=True)
    return trainee


__all__ = ["resolve_config", "build_models", "prepare_models", "Trainee"]
