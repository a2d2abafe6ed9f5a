"""Every method trains real steps through the shared TrainStep, on a ViT and (where it can) a ConvNet,
and bad method/backbone combinations fail before any worker starts."""
from __future__ import annotations

import math

import pytest
import torch

from webcurate.shards.errors import ConfigError
from webcurate.train.config import load_config
from webcurate.train.methods import METHODS
from webcurate.train.models import prepare_models, resolve_config
from webcurate.train.schedules import Schedules
from webcurate.train.step import TrainStep

VIT = ["model.name=vit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
       "model.num_heads=2", "model.layerscale=null", "loader.local_size=16", "loader.n_local=2"]
RESNET = ["model.name=resnet18", "model.stem=small_image", "model.timm_kwargs={channels: [8, 16, 32, 64], "
          "stem_width: 8}", "loader.local_size=16"]
SMALL = ["model.drop_path_rate=0", "dino.n_prototypes=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16",
         "loader.global_size=32", "loader.batch_size=6", "optim.epochs=1", "optim.warmup_epochs=0.1",
         "teacher.warmup_temp_epochs=0.5", "optim.freeze_last_layer_epochs=0.1", "head.proj_hidden_dim=32",
         "head.proj_dim=16", "head.pred_hidden_dim=16", "swav.n_prototypes=20", "moco.queue_size=36",
         "mae.decoder_dim=16", "mae.decoder_heads=2", "mae.decoder_depth=1"]
VIT_ONLY = {"dinov2", "ibot", "mae"}
CASES = [(m, "vit") for m in METHODS] + [(m, "resnet") for m in METHODS if m not in VIT_ONLY]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def views_batch(cfg, step: int) -> dict:
    """Two views (and locals, masks) of 6 random images: real augmentation is the loader's business."""
    L, B = cfg.loader, cfg.loader.batch_size
    g = torch.Generator().manual_seed(step)
    base = torch.randn(B, 3, L.global_size, L.global_size, generator=g)
    views = torch.cat([base + 0.1 * torch.randn(base.shape, generator=g) for _ in range(2)])
    n = (L.global_size // L.patch_size) ** 2
    lc = torch.randn(L.n_local * B, 3, L.local_size, L.local_size, generator=g) if L.n_local else None
    return {"global_crops": views, "local_crops": lc, "masks": torch.rand(2 * B, n, generator=g) < 0.3,
            "n_images": B}


def _trainee(method: str, backbone: str):
    cfg = resolve_config(load_config(None, (VIT if backbone == "vit" else RESNET) + SMALL + [f"method={method}"]))
    tr = prepare_models(cfg, torch.device("cpu"), distributed=False)
    step = TrainStep(cfg, tr.model, tr.student, tr.teacher, tr.optimizer, tr.objective, torch.device("cpu"),
                     ema=tr.ema)
    return cfg, tr, step


@pytest.mark.parametrize("method, backbone", CASES)
def test_method_trains_three_steps_with_monitors(method, backbone):
    cfg, tr, step = _trainee(method, backbone)
    sched = Schedules.from_config(cfg, 10)
    before = {n: p.detach().clone() for n, p in tr.student.named_parameters()}
    buffers = {n: b.clone() for n, b in tr.objective.named_buffers()}
    teacher0 = {n: p.detach().clone() for n, p in tr.teacher.named_parameters()} if tr.teacher is not None else {}
    for i in range(3):
        m = step(views_batch(cfg, i), sched.at(i + 2))
        assert math.isfinite(float(m["loss"])), (method, i, m)
    for key in ("embedding_std", "effective_rank", "alignment", "uniformity"):
        assert math.isfinite(float(m[key])), key
    assert 1.0 <= float(m["effective_rank"]) <= cfg.loader.batch_size
    moved = [n for n, p in tr.student.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("backbone.") for n in moved), f"{method}: the backbone did not train"
    assert tr.exported.backbone.kind == ("vit" if backbone == "vit" else "convnet")
    if cfg.spec.momentum:  # the EMA branch follows the student
        assert tr.teacher is not None and tr.ema is not None
        assert any(not torch.equal(p, teacher0[n]) for n, p in tr.teacher.named_parameters())
    else:
        assert tr.teacher is None
    if method == "moco_v2":  # keys of 3 steps x 6 images went into the queue
        assert int(tr.objective.loss_fn.queue_ptr) == 18 and not torch.equal(
            tr.objective.loss_fn.queue, buffers["loss_fn.queue"])


def test_dino_exports_its_teacher_and_byol_its_online_network():
    _, dino, _ = _trainee("dino", "vit")
    _, byol, _ = _trainee("byol", "resnet")
    assert dino.exported is dino.teacher and byol.exported is byol.student


@pytest.mark.parametrize("method", ["mae", "ibot", "dinov2"])
def test_patch_masking_methods_on_a_convnet_are_refused_naming_the_model(method):
    with pytest.raises(ConfigError, match=rf"method={method} masks image patches and needs a ViT; "
                                          r"model.name=resnet18 is a ConvNet"):
        resolve_config(load_config(None, RESNET + SMALL + [f"method={method}"]))


@pytest.mark.parametrize("method", ["simclr", "vicreg", "barlow_twins", "swav", "moco_v3"])
def test_batch_statistics_losses_refuse_a_batch_of_one(method):
    with pytest.raises(ConfigError, match=rf"loader.batch_size=1: method {method} .* use loader.batch_size >= 2"):
        load_config(None, [f"method={method}", "loader.batch_size=1"])
    load_config(None, ["method=byol", "loader.batch_size=1"])  # no batch statistics in the loss itself


def test_a_method_brings_its_published_views_under_the_users_values():
    byol = load_config(None, ["method=byol"])
    assert byol.loader.recipe == "byol" and byol.loader.n_local == 0 and byol.teacher.momentum == 0.99
    assert byol.loader.blur_p == (1.0, 0.1) and byol.loader.solarize_p == (0.0, 0.2)
    simclr = load_config(None, ["method=simclr", "loader.grayscale_p=0.5"])
    assert simclr.loader.color_jitter == (0.8, 0.8, 0.8, 0.2) and simclr.loader.grayscale_p == 0.5
