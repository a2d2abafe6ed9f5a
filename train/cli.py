"""``webcurate train``: self-supervised pretraining on Ray Train (imports only click at module level)."""
from __future__ import annotations

import click

METHODS = ("dinov2", "dino", "ibot", "simclr", "moco_v2", "moco_v3", "byol", "simsiam", "swav", "vicreg",
           "barlow_twins", "mae")


@click.command("train", context_settings={"show_default": True})
@click.option("--data", required=True, metavar="URI",
              help="Dataset to train on: a folder or s3:// prefix made by `webcurate shard` (or a curated export).")
@click.option("--output", required=True, metavar="URI",
              help="Where checkpoints (train/checkpoint_*), per-step metrics (metrics/*.jsonl), train_config.yaml and "
                   "backbone.safetensors go: a folder or s3:// prefix.")
@click.option("--config", "config_path", default=None, metavar="YAML",
              help="Training config (method and sections model, dino, ibot, teacher, head, <method>, optim, run, "
                   "loader). Default: DINOv2 on GPUs; on a CPU-only cluster a small CPU recipe (it says which). "
                   "See docs/examples/train*.yaml.")
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="Self-supervised method (method=NAME); its published views and momentum come with it.")
@click.option("--time-budget", default=None, metavar="DURATION",
              help="Wall-clock budget such as 15m or 1h: measures s/step in the first steps, sizes every schedule "
                   "to the steps that fit, stops on time and exports (run.time_budget).")
@click.option("--epochs", type=float, default=None,
              help="Run length in epochs; warm-ups and decays complete inside it (run.epochs).")
@click.option("--max-steps", type=int, default=None,
              help="Run length in optimiser steps; schedules are sized to it (run.max_steps).")
@click.option("--model", default=None, metavar="NAME",
              help="timm ViT or ConvNet, e.g. vit_small_patch14_dinov2 or resnet18 (model.name=NAME).")
@click.option("--num-workers", type=int, default=None,
              help="Ray Train workers (one per GPU on GPU clusters); run.num_workers=N.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --output from its newest checkpoint, with the same batches in the "
                   "same order as an uninterrupted run. Without it, an --output holding a run is refused.")
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
def train(data: str, output: str, config_path: str | None, method: str | None, time_budget: str | None,
          epochs: float | None, max_steps: int | None, model: str | None, num_workers: int | None, resume: bool,
          overrides: tuple[str, ...]) -> None:
    """Pretrain a backbone with a self-supervised method (DINOv2 by default on GPUs) on a dataset.

    Runs on Ray Train: locally by default, on a cluster through RAY_ADDRESS; DDP
    over CPUs or GPUs (bf16 on GPU). Prints the plan (steps, epochs, images)
    before training. Overrides set any config option, e.g.

    \b
      webcurate train --data s3://b/curated --output s3://b/runs/vits14 \\
          --config docs/examples/train.yaml --num-workers 8 optim.epochs=50 loader.batch_size=64
      webcurate train --data cifar-train --output runs/byol --method byol --time-budget 15m \\
          --config docs/examples/train_cpu_byol.yaml

    The exported backbone.safetensors loads with `webcurate embed --checkpoint`,
    `webcurate eval` and in stock timm (see webcurate.shards.backbone_format).
    """
    from webcurate.shards.progress import print_table

    from .config import load_config
    from .driver import train as run_train

    ov = list(overrides)
    for flag, value in (("method", method), ("run.time_budget", time_budget), ("run.epochs", epochs),
                        ("run.max_steps", max_steps), ("model.name", model), ("run.num_workers", num_workers)):
        if value is not None:
            ov.append(f"{flag}={value}")
    source = config_path
    if config_path is None and method is None and not any(o.startswith("method=") for o in ov) and not resume:
        source = _cpu_recipe_if_no_gpu()
    cfg = load_config(source, ov)
    # A TrainError (a RunError) ends as one line, exit 1, in webcurate's entry point.
    summary = run_train(data, output, cfg, resume=resume)
    rows = [(k, _fmt(summary[k])) for k in (
        "method", "step", "max_steps", "plan_source", "loss", "dino_global_loss", "ibot_loss", "koleo_loss",
        "teacher_entropy", "kl_to_uniform", "embedding_std", "effective_rank", "alignment", "uniformity", "collapse",
        "stopped_on_time", "img_per_s", "seconds", "workers", "checkpoint", "backbone",
    ) if k in summary]
    print_table(f"train: {data} -> {output}", rows, ("what", "value"))


def _cpu_recipe_if_no_gpu():
    """The CPU recipe (a dict) when the Ray cluster has no GPU, else None (DINOv2 defaults)."""
    import os

    from .recipes import CPU_RECIPE_NAME, cpu_recipe

    if os.environ.get("RAY_ADDRESS"):  # a cluster: ask it
        from webcurate.shards.ray_runtime import cluster_gpus, init_ray

        init_ray()
        has_gpu = cluster_gpus() > 0
    else:  # the local Ray sees this machine's GPUs; no need to start it for that
        import torch

        has_gpu = torch.cuda.is_available()
    if has_gpu:
        return None
    click.echo(f"note: no --config and no GPU in the Ray cluster: using the CPU recipe {CPU_RECIPE_NAME} "
               "(DINOv2 at 224 px is the default on GPUs); pass --config or --method to choose", err=True)
    return cpu_recipe()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


from .eval_cli import COMMANDS as _EVAL_COMMANDS  # noqa: E402 - after train, the group's first command

COMMANDS: list[click.Command] = [train, *_EVAL_COMMANDS]
