"""Real Ray Train runs of the method families not covered by test_resume.py (DINOv2 on S3, MoCo v2 locally):
MAE on a ViT sized by a time budget, and SwAV on a ConvNet from the CLI whose loss turns NaN."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

TINY_VIT = ["model.name=vit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=2", "model.layerscale=null", "model.drop_path_rate=0"]
TINY_RESNET = ["model.name=resnet18", "model.stem=small_image", "model.drop_path_rate=0",
               "model.timm_kwargs={channels: [8, 16, 32, 64], stem_width: 8}"]
COMMON = ["loader.global_size=32", "loader.local_size=16", "loader.batch_size=4", "loader.num_threads=1",
          "loader.shuffle_buffer=8", "run.num_workers=1", "run.torch_threads=1", "run.report_every=1000",
          "optim.epochs=2", "optim.warmup_epochs=0.5"]


class PoisonedLoader:
    """The real loader, with NaN images from global step ``at`` on (a run whose loss diverges)."""

    def __init__(self, at: int, epoch_length: int):
        self.at, self.epoch_length = at, epoch_length

    def __call__(self, shard_uris, cfg, *, rank, world_size, epoch, seed, skip_batches):
        from webcurate.train.data.loader import make_loader

        for i, batch in enumerate(make_loader(shard_uris, cfg, rank=rank, world_size=world_size, epoch=epoch,
                                              seed=seed, skip_batches=skip_batches), start=skip_batches):
            if epoch * self.epoch_length + i + 1 >= self.at:
                batch["global_crops"] = torch.full_like(batch["global_crops"], float("nan"))
            yield batch


def test_mae_run_sized_by_a_time_budget_plans_stops_in_time_and_exports(tiny_dataset, tmp_path):
    from webcurate.shards.backbone_format import load_backbone_file
    from webcurate.train.config import load_config
    from webcurate.train.driver import train
    from webcurate.train.metrics import read_metrics

    budget = 70
    out = str(tmp_path / "mae")
    cfg = load_config(None, TINY_VIT + COMMON + ["method=mae", "mae.decoder_dim=16", "mae.decoder_heads=2",
                                                 "mae.decoder_depth=1", f"run.time_budget={budget}s",
                                                 "run.checkpoint_every=100000"])
    summary = train(tiny_dataset, out, cfg, quiet=True)
    assert summary["plan_source"] == "run.time_budget" and summary["method"] == "mae"
    assert summary["seconds"] <= budget * 1.1, summary["seconds"]
    records = read_metrics(out)
    assert records[-1]["step"] == summary["step"] and summary["step"] > 6
    assert records[-1]["max_steps"] == summary["plan_steps"]  # the schedules span the plan
    assert summary["step"] == summary["plan_steps"] or summary["stopped_on_time"]
    assert records[-1]["lr"] < records[len(records) // 2]["lr"]  # the cosine decays inside the budget
    model, meta = load_backbone_file(os.path.join(out, "backbone.safetensors"))
    assert meta.extra["method"] == "mae" and meta.image_size == 32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_swav_run_from_the_cli_whose_loss_turns_nan_ends_in_one_line_and_keeps_its_checkpoint(
        tiny_dataset, tmp_path, monkeypatch):
    import ray.cloudpickle
    from click.testing import CliRunner

    from webcurate.train import cli
    from webcurate.train.checkpoint import list_checkpoints
    from webcurate.train.driver import TrainError

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    from webcurate.train import driver  # the CLI imports the driver lazily: hand it our loader

    original = driver.train
    monkeypatch.setattr(driver, "train", lambda *a, **k: original(
        *a, **k, loader_factory=PoisonedLoader(at=3, epoch_length=6)))
    out = str(tmp_path / "swav")
    args = ["--data", tiny_dataset, "--output", out, "--method", "swav", "--max-steps", "8",
            *TINY_RESNET, *COMMON, "loader.n_local=2", "head.proj_hidden_dim=32", "head.proj_dim=16",
            "swav.n_prototypes=16", "run.checkpoint_every=2"]
    res = CliRunner().invoke(cli.train, args)
    assert isinstance(res.exception, TrainError), res.output
    msg = str(res.exception)
    assert "\n" not in msg and "the swav loss is nan at step 3: lower optim.base_lr" in msg
    assert "last checkpoint: step 2" in msg and "continue with --resume" in msg and "full log: " in msg
    assert [s for s, _ in list_checkpoints(out)] == [2]


def test_a_ray_oom_kill_reads_as_one_line_naming_the_batch_size_and_the_log():
    import ray.exceptions

    from webcurate.train.config import load_config
    from webcurate.train.driver import failure_message

    e = ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.\n" + "x\n" * 200)
    msg = failure_message(e, load_config(None, ["loader.batch_size=48"]), "/nonexistent/run")
    assert "\n" not in msg and msg.startswith("training was killed for lack of memory")
    assert "loader.batch_size (now 48)" in msg and "full log: " in msg


@pytest.mark.parametrize("left, match", [(5.0, "run.time_budget=20s is too short: a step takes 2.00 s")])
def test_a_budget_too_short_for_a_step_names_the_option(left, match):
    from webcurate.train.config import load_config
    from webcurate.train.plan import BudgetTooShort, budget_plan

    cfg = load_config(None, ["run.time_budget=20s"])
    with pytest.raises(BudgetTooShort, match=match):
        budget_plan(cfg, 10, seconds_per_step=2.0, steps_done=6, seconds_left=left)
    plan = budget_plan(cfg, 10, seconds_per_step=0.1, steps_done=6, seconds_left=60.0)
    assert plan.source == "run.time_budget" and 6 < plan.total_steps < 6 + 600 and math.isfinite(plan.epochs)
