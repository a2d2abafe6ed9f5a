"""Built-in recipes: what ``webcurate train`` uses when it is given no config.

On GPUs the default is DINOv2 (``TrainConfig``'s own defaults). On a CPU-only
cluster, DINOv2's ViT-S at 224 px with 65536 prototypes does not fit a laptop's
memory (a 24 GiB machine was OOM-killed) nor learn in a CPU budget, so
``webcurate train`` without ``--config``/``--method`` takes ``CPU_RECIPE``: a
narrow ResNet-18 with the small-image stem on 32 px two-view crops, sized so
compute, not memory, is the limit (docs/examples/train_cpu_*.yaml hold the
tuned recipes of every family, with the figures they reach).
"""
from __future__ import annotations

from typing import Any

CPU_RECIPE_NAME = "cpu-simclr-resnet18w32-32px"
CPU_RECIPE: dict[str, Any] = {
    "method": "simclr",
    "model": {"name": "resnet18", "stem": "small_image", "drop_path_rate": 0.0,
              "timm_kwargs": {"channels": [32, 64, 128, 256], "stem_width": 32}},
    "head": {"proj_hidden_dim": 512, "proj_dim": 128},
    "simclr": {"temperature": 0.2},
    "optim": {"name": "sgd", "epochs": 20, "base_lr": 0.3, "scaling_rule": "linear_wrt_256", "warmup_epochs": 1,
              "weight_decay": 5e-4, "weight_decay_end": 5e-4, "min_lr": 0.0, "clip_grad": 0.0},
    "run": {"log_every": 10, "report_every": 100, "checkpoint_every": 1000},
    "loader": {"global_size": 32, "global_scale": [0.2, 1.0], "batch_size": 128, "num_threads": 1,
               "interpolation": "bilinear"},
}


def cpu_recipe() -> dict[str, Any]:
    """A copy of ``CPU_RECIPE`` (callers apply overrides on top)."""
    import copy

    return copy.deepcopy(CPU_RECIPE)


__all__ = ["CPU_RECIPE", "CPU_RECIPE_NAME", "cpu_recipe"]
