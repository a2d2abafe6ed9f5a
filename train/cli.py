"""``webcurate train``: DINOv2/iBOT pretraining on Ray Train (imports only click at module level)."""
from __future__ import annotations

import click


@click.command("train", context_settings={"show_default": True})
@click.option("--data", required=True, metavar="URI",
              help="Dataset to train on: a folder or s3:// prefix made by `webcurate shard` (or a curated export).")
@click.option("--output", required=True, metavar="URI",
              help="Where checkpoints (train/checkpoint_*), per-step metrics (metrics/*.jsonl), train_config.yaml and "
                   "backbone.safetensors go: a folder or s3:// prefix.")
@click.option("--config", "config_path", default=None, metavar="YAML",
              help="Training config (sections model, dino, ibot, teacher, optim, run, loader); "
                   "default: the DINOv2 recipe. See docs/examples/train.yaml.")
@click.option("--max-steps", type=int, default=None,
              help="Stop after this many optimiser steps in total (schedules keep the length set by "
                   "optim.epochs). Same as run.max_steps=N.")
@click.option("--model", default=None, metavar="NAME",
              help="timm ViT architecture, e.g. vit_small_patch14_dinov2 (model.name=NAME).")
@click.option("--num-workers", type=int, default=None,
              help="Ray Train workers (one per GPU on GPU clusters); run.num_workers=N.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --output from its newest checkpoint, with the same batches in the "
                   "same order as an uninterrupted run. Without it, an --output holding a run is refused.")
@click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
def train(data: str, output: str, config_path: str | None, max_steps: int | None, model: str | None,
          num_workers: int | None, resume: bool, overrides: tuple[str, ...]) -> None:
    """Pretrain a ViT backbone with DINOv2 (DINO + iBOT + KoLeo, EMA teacher) on a dataset.

    Runs on Ray Train: locally by default, on a cluster through RAY_ADDRESS; DDP
    over CPUs or GPUs (bf16 on GPU). Overrides set any config option, e.g.

    \b
      webcurate train --data s3://b/curated --output s3://b/runs/vits14 \\
          --config docs/examples/train.yaml --num-workers 8 optim.epochs=50 loader.batch_size=64

    The exported backbone.safetensors loads with `webcurate embed --checkpoint`
    and in stock timm (see webcurate.train.export).
    """
    from webcurate.shards.progress import print_table

    from .config import load_config
    from .loop import TrainError
    from .loop import train as run_train

    ov = list(overrides)
    if max_steps is not None:
        ov.append(f"run.max_steps={max_steps}")
    if model is not None:
        ov.append(f"model.name={model}")
    if num_workers is not None:
        ov.append(f"run.num_workers={num_workers}")
    cfg = load_config(config_path, ov)
    try:
        summary = run_train(data, output, cfg, resume=resume)
    except TrainError as e:  # the workers' own error, already reduced to its cause: no traceback
        raise click.ClickException(str(e)) from e
    rows = [(k, _fmt(summary[k])) for k in (
        "step", "max_steps", "loss", "dino_global_loss", "ibot_loss", "koleo_loss", "teacher_entropy",
        "kl_to_uniform", "embedding_std", "img_per_s", "seconds", "workers", "checkpoint", "backbone",
    ) if k in summary]
    print_table(f"train: {data} -> {output}", rows, ("what", "value"))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


COMMANDS: list[click.Command] = [train]

try:  # the evaluation commands live in their own module (training part 2); either may land first
    import importlib as _importlib

    _eval_cli = _importlib.import_module("webcurate.train.eval_cli")
except ModuleNotFoundError as _e:
    if _e.name != "webcurate.train.eval_cli":
        raise
else:
    for _cmd in getattr(_eval_cli, "COMMANDS", []):
        if _cmd not in COMMANDS:
            COMMANDS.append(_cmd)
