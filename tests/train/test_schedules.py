"""Schedules, optimizer parameter groups and the training config."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from webcurate.shards.errors import ConfigError
from webcurate.train.backbone import build_backbone
from webcurate.train.config import ModelConfig, load_config, to_yaml
from webcurate.train.methods.dino import build_dino_model
from webcurate.train.optim import apply_schedule, build_optimizer, param_groups
from webcurate.train.schedules import CosineSchedule, Schedules


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(n for n in os.listdir(os.path.join(ROOT, "docs", "examples")) if n.startswith("train") and n.endswith(".yaml"))


def ref_cosine(base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0, freeze_iters=0):
    """DINOv2's dinov2/utils/utils.py CosineScheduler.schedule."""
    freeze_schedule = np.zeros((freeze_iters))
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total_iters - warmup_iters - freeze_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((freeze_schedule, warmup_schedule, schedule))


@pytest.mark.parametrize("args", [(0.004, 1e-6, 100, 10, 0.0, 0), (0.04, 0.4, 57, 0, 0, 0), (1.0, 0.5, 30, 5, 0.2, 3)])
def test_cosine_schedule_equals_dinov2(args):
    ours = CosineSchedule(*args)
    assert np.allclose(ours.schedule, ref_cosine(*args), atol=1e-12)
    assert ours[args[2] + 5] == args[1]  # past the end: the final value


def sched(**kw):
    base = dict(total_steps=50, peak_lr=1e-3, min_lr=1e-6, warmup_steps=10, weight_decay=0.04,
                weight_decay_end=0.4, momentum=0.992, final_momentum=1.0, teacher_temp=0.07,
                warmup_teacher_temp=0.04, warmup_teacher_temp_steps=20, freeze_last_layer_steps=10)
    return Schedules(**{**base, **kw})


def test_recipe_schedules_warm_up_decay_and_freeze_the_last_layer():
    s = sched()
    assert s.total_steps == 50
    assert s.at(0).lr == 0.0 and math.isclose(s.at(9).lr, 1e-3)
    assert s.at(49).lr < 3e-6 and s.at(50).lr == 1e-6 and s.at(10).lr > s.at(30).lr > s.at(49).lr
    assert all(s.at(i).last_layer_lr == 0.0 for i in range(10)) and s.at(10).last_layer_lr > 0
    assert math.isclose(s.at(0).teacher_temp, 0.04) and math.isclose(s.at(19).teacher_temp, 0.07)
    assert s.at(10).teacher_temp < 0.07 and s.at(35).teacher_temp == 0.07
    assert math.isclose(s.at(0).momentum, 0.992) and s.at(49).momentum > 0.9999 and s.at(50).momentum == 1.0
    assert math.isclose(s.at(0).wd, 0.04) and s.at(49).wd > 0.39


@pytest.mark.parametrize("total", [40, 1000])
def test_every_warm_up_is_the_same_fraction_of_any_run_length(total):
    # The recipe: 100 epochs, lr warm-up 10, teacher temperature warm-up 30, prototypes frozen for 2.
    cfg = load_config(None, ["optim.epochs=100", "optim.warmup_epochs=10", "teacher.warmup_temp_epochs=30",
                             "optim.freeze_last_layer_epochs=2.5"])
    s = Schedules.from_config(cfg, total)
    warm, t_warm, frozen = total // 10, total * 3 // 10, total // 40
    assert s.total_steps == total
    assert s.at(warm - 1).lr == pytest.approx(cfg.scaled_lr()) and s.at(warm - 2).lr < cfg.scaled_lr()
    assert s.at(total - 1).lr < 0.01 * cfg.scaled_lr()  # the cosine decay completes inside the run
    assert s.at(total).lr == cfg.optim.min_lr and s.at(total).momentum == 1.0
    assert s.at(t_warm - 2).teacher_temp < 0.07 and s.at(t_warm).teacher_temp == pytest.approx(0.07)
    assert s.at(frozen - 1).last_layer_lr == 0.0 and s.at(frozen).last_layer_lr > 0


def tiny_student():
    torch.manual_seed(0)
    cfg = load_config(None, ["dino.n_prototypes=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16"])
    bb = build_backbone(ModelConfig(name="vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=3, num_heads=2), 32)
    return build_dino_model(cfg, bb)


def test_param_groups_apply_layer_decay_patch_embed_mult_and_no_decay_on_norms():
    student = tiny_student()
    groups = param_groups(student.submodules(), layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.model.blocks.2.attn.qkv.weight"]["lr_multiplier"] == 0.5  # last block: decay^1
    assert by_name["backbone.model.blocks.0.attn.qkv.weight"]["lr_multiplier"] == 0.125  # first block: decay^3
    assert by_name["backbone.model.pos_embed"]["lr_multiplier"] == 0.0625  # embeddings: decay^4
    assert by_name["backbone.mask_token"]["lr_multiplier"] == 0.0625
    assert math.isclose(by_name["backbone.model.patch_embed.proj.weight"]["lr_multiplier"], 0.0625 * 0.2)
    assert by_name["backbone.model.norm.weight"]["lr_multiplier"] == 1.0
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    for n in ("backbone.model.blocks.1.norm1.weight", "backbone.model.blocks.1.attn.qkv.bias", "dino_head.mlp.0.bias",
              "backbone.model.blocks.0.ls1.gamma"):
        assert by_name[n]["wd_multiplier"] == 0.0, n
    assert by_name["backbone.model.blocks.1.attn.qkv.weight"]["wd_multiplier"] == 1.0
    last = [n for n, g in by_name.items() if g["is_last_layer"]]
    assert last and all("dino_head.last_layer" in n for n in last)
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))


def test_frozen_last_layer_does_not_move_while_the_rest_trains():
    student = tiny_student()
    opt = build_optimizer(param_groups(student.submodules(), 0.9, 0.2))
    apply_schedule(opt, lr=1e-2, wd=0.04, last_layer_lr=0.0)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    out = student(torch.randn(4, 3, 32, 32), torch.randn(8, 3, 16, 16))
    (out["global_logits"].logsumexp(-1).sum() + out["local_logits"].logsumexp(-1).sum()).backward()
    opt.step()
    for n, p in student.named_parameters():
        if "last_layer" in n:
            assert torch.equal(p, before[n]), n
    assert not torch.equal(student.dino_head.mlp[0].weight, before["heads.dino_head.mlp.0.weight"])


def test_config_yaml_round_trip_and_overrides(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("model:\n  name: vit_small_patch14_dinov2\noptim:\n  epochs: 3\n  warmup_epochs: 0.5\nteacher:\n  warmup_temp_epochs: 1\nloader:\n  global_size: 98\n")
    cfg = load_config(str(p), ["optim.base_lr=1e-3", "loader.global_scale=[0.4, 1.0]", "teacher.centering=sinkhorn_knopp"])
    assert cfg.model.name == "vit_small_patch14_dinov2" and cfg.optim.epochs == 3
    assert cfg.optim.base_lr == 1e-3 and cfg.loader.global_scale == (0.4, 1.0)
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(str(again)) == cfg
    assert math.isclose(cfg.scaled_lr(), 1e-3 * math.sqrt(64 / 1024))


def test_patch14_model_gets_98px_local_crops_unless_the_config_sets_them():
    cfg = load_config(None, ["model.name=vit_small_patch14_dinov2"])
    assert (cfg.loader.patch_size, cfg.loader.local_size) == (14, 98)
    cfg = load_config(None, ["model.name=vit_small_patch14_dinov2", "loader.local_size=112"])
    assert cfg.loader.local_size == 112
    assert load_config(None, []).loader.local_size == 96, "patch 16 keeps DINOv2's 96 px"


@pytest.mark.parametrize("override, match", [
    ("optim.bogus=1", "optim.bogus: unknown key; allowed: base_lr"),
    ("nosection.x=1", "unknown key.*nosection; allowed: method, model"),
    ("teacher.centering=mean", "teacher.centering: Input should be 'centering' or 'sinkhorn_knopp'"),
    ("loader.batch_size=0", "loader.batch_size must be > 0"),
    ("method=supervised", "method: unknown method 'supervised'; known: dinov2, dino"),
    ("run.time_budget=soon", "run.time_budget: .*not a duration like 15m"),
    ("optim.base_lr=fast", "optim.base_lr: Input should be a valid number"),
    ("optim.warmup_epochs=200", "warmup_epochs .* exceeds"),
    ("dino.n_prototypes", "not of the form"),
])
def test_bad_config_values_name_the_option(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_configs_load(name):
    cfg = load_config(os.path.join(ROOT, "docs", "examples", name))
    from webcurate.train.backbone import model_patch_size
    from webcurate.train.models import resolve_config

    resolve_config(cfg)
    ps = model_patch_size(cfg.model, cfg.loader.global_size)
    if ps is not None:  # ViTs: the loader's masks are per patch
        assert cfg.loader.patch_size == ps and cfg.loader.global_size % ps == 0
