"""Built-in recipes: what ``webcurate train`` uses when it is given no config.

On GPUs the default is DINOv2 (``TrainConfig``'s own defaults). On a CPU-only
cluster, DINOv2's ViT-S at 224 px with 65536 prototypes does not fit a laptop's
memory (a 24 GiB machine was OOM-killed) nor learn in a CPU budget, so
``webcurate train`` without ``--config``/``--method`` takes ``CPU_RECIPE``: MoCo v2
on a narrow ResNet-10 with the small-image stem on 32 px two-view crops, sized so
compute, not memory, is the limit (docs/examples/train_cpu_*.yaml hold the
tuned recipes of every family, with the figures they reach).
"""
from __future__ import annotations

from typing import Any

CPU_RECIPE_NAME = "cpu-moco_v2-resnet10w32-32px"
# docs/examples/train_cpu_moco_v2.yaml, the best of the 15-minute CIFAR-10 benchmark (bench/results/train.md:
# 48.0 % k-NN, 52.5 % linear; SimCLR 44.6 %, BYOL 37.8 % with the same backbone): a narrow ResNet-10
# (resnet18 with one block per stage, widths 32-256, 1.24M parameters) runs 300-400 img/s on 2 cores.
CPU_RECIPE: dict[str, Any] = {
    "method": "moco_v2",
    "model": {"name": "resnet18", "stem": "small_image", "drop_path_rate": 0.0,
              "timm_kwargs": {"channels": [32, 64, 128, 256], "stem_width": 32, "layers": [1, 1, 1, 1]}},
    "head": {"proj_hidden_dim": 512, "proj_dim": 128, "pred_hidden_dim": 512},
    "moco": {"temperature": 0.1, "queue_size": 4096},
    "optim": {"name": "sgd", "epochs": 20, "base_lr": 0.3, "scaling_rule": "linear_wrt_256", "warmup_epochs": 1,
              "weight_decay": 5e-4, "weight_decay_end": 5e-4, "min_lr": 0.0, "clip_grad": 0.0},
    "run": {"precision": "auto", "channels_last": True, "log_every": 25, "report_every": 200,
            "checkpoint_every": 1000},
    "loader": {"global_size": 32, "local_size": 16, "batch_size": 256, "num_threads": 1},
}


def cpu_recipe() -> dict[str, Any]:
    """A copy of ``CPU_RECIPE`` (callers apply overrides on top)."""
    import copy

    return copy.deepcopy(CPU_RECIPE)


__all__ = ["CPU_RECIPE", "CPU_RECIPE_NAME", "cpu_recipe"]
