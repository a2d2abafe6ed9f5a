"""Backbone wrappers (ViT, ConvNet with the small-image stem), DINO head, and backbone export/loading."""
from __future__ import annotations

import json

import pytest
import torch

from webcurate.shards.errors import ConfigError
from webcurate.train.backbone import build_backbone
from webcurate.train.config import DinoConfig, IbotConfig, ModelConfig
from webcurate.shards.backbone_format import read_metadata
from webcurate.train.export_backbone import export_backbone, load_backbone
from webcurate.train.heads import DINOHead, build_heads

TINY = dict(name="vit_tiny_patch16_224", patch_size=8, embed_dim=64, depth=2, num_heads=2, drop_path_rate=0.0)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def images(n, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_backbone_returns_cls_and_patch_tokens_matching_timm():
    torch.manual_seed(0)
    bb = build_backbone(tiny(), 32).eval()
    x = images(3)
    out = bb(x)
    assert out["cls"].shape == (3, 64) and out["patch"].shape == (3, 16, 64) and out["reg"].shape == (3, 0, 64)
    assert torch.allclose(out["cls"], bb.model(x), atol=1e-6)  # timm's pooled output is the same CLS


def test_masked_patches_ignore_their_pixels():
    torch.manual_seed(0)
    bb = build_backbone(tiny(layerscale=None), 32).eval()
    with torch.no_grad():
        bb.mask_token.normal_()
    x = images(2)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, :4] = True  # patches 0..3 = the top row of 8x8 patches
    y = x.clone()
    y[:, :, :8, :] = torch.randn(2, 3, 8, 32)  # change only the masked top row
    a, b = bb(x, masks), bb(y, masks)
    assert torch.allclose(a["cls"], b["cls"], atol=1e-5)
    assert not torch.allclose(bb(x)["cls"], bb(y)["cls"], atol=1e-3)  # unmasked, the pixels matter


def test_mask_token_gets_a_gradient_only_through_masked_patches():
    torch.manual_seed(0)
    bb = build_backbone(tiny(layerscale=None), 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    r = torch.randn(64)  # a plain sum of a LayerNorm output has no gradient: project instead
    (bb(images(2), masks)["cls"] @ r).sum().backward()
    assert bb.mask_token.grad is not None and bb.mask_token.grad.abs().sum() == 0  # in the graph, zero grad
    bb.zero_grad()
    masks[0, 5] = True
    (bb(images(2), masks)["cls"] @ r).sum().backward()
    assert bb.mask_token.grad.abs().sum() > 0


def test_local_crops_of_another_size_and_register_tokens():
    bb = build_backbone(tiny(reg_tokens=2), 32)
    out = bb(images(2, size=16))
    assert out["patch"].shape == (2, 4, 64) and out["reg"].shape == (2, 2, 64)


def test_wrong_mask_shape_is_a_clear_error():
    bb = build_backbone(tiny(), 32)
    with pytest.raises(ValueError, match=r"masks must be \(B, N\) = \(2, 16\)"):
        bb(images(2), torch.zeros(2, 15, dtype=torch.bool))


def test_layerscale_and_uniform_drop_path_follow_the_config():
    from timm.layers import DropPath

    bb = build_backbone(tiny(drop_path_rate=0.2, layerscale=1e-5), 32)
    assert all(isinstance(b.drop_path1, DropPath) and b.drop_path1.drop_prob == 0.2 for b in bb.model.blocks)
    assert torch.allclose(bb.model.blocks[0].ls1.gamma, torch.full((64,), 1e-5))
    plain = build_backbone(tiny(layerscale=None), 32)
    assert not any("gamma" in n for n, _ in plain.named_parameters())


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="not a timm model"):
        build_backbone(tiny(name="vit_nonexistent_patch3"), 32)


def test_dino_head_shapes_and_weight_normalised_prototypes():
    head = DINOHead(64, n_prototypes=300, hidden_dim=128, bottleneck_dim=32, n_layers=3)
    y = head(torch.randn(5, 64))
    assert y.shape == (5, 300)
    assert y.abs().max() <= 1.0 + 1e-5  # unit-norm input . unit-norm prototypes (gain 1)
    names = [n for n, _ in head.named_parameters()]
    assert any("last_layer" in n for n in names)
    heads = build_heads(64, DinoConfig(n_prototypes=100), IbotConfig(separate_head=True, n_prototypes=50))
    assert heads["ibot_head"](torch.randn(2, 64)).shape == (2, 50)


def test_exported_safetensors_load_in_stock_timm(tmp_path):
    import timm
    from safetensors.torch import load_file

    torch.manual_seed(0)
    bb = build_backbone(tiny(reg_tokens=1), 32).eval()
    path = export_backbone(_Holder(bb), str(tmp_path / "backbone.safetensors"))
    meta = read_metadata(path)
    model = timm.create_model(meta["model_name"], **json.loads(meta["model_kwargs"])).eval()
    model.load_state_dict(load_file(path))  # stock timm + safetensors, from the local file only
    x = images(2)
    with torch.no_grad():
        assert torch.allclose(model(x), bb(x)["cls"], atol=1e-6)
        loaded = load_backbone(path)
        assert torch.allclose(loaded(x), bb(x)["cls"], atol=1e-6)
    assert loaded.webcurate_info["dim"] == 64


def test_load_backbone_from_plain_state_dict_needs_a_model_name(tmp_path):
    torch.manual_seed(0)
    bb = build_backbone(tiny(), 32).eval()
    p = tmp_path / "sd.pt"
    torch.save({"model": {f"module.backbone.model.{k}": v for k, v in bb.model.state_dict().items()}}, p)
    with pytest.raises(ValueError, match="pass model_name"):
        load_backbone(str(p))
    # A bare name gets timm's default architecture: the tiny weights do not fit it, and the error says so.
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone(str(p), model_name="vit_small_patch16_224")


def test_small_image_resnet_exports_through_the_contract_and_loads_in_stock_timm(tmp_path):
    import timm
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg = ModelConfig(name="resnet18", stem="small_image", drop_path_rate=0.0,
                      timm_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8})
    bb = build_backbone(cfg, 32).eval()
    assert bb.kind == "convnet" and bb.embed_dim == 64 and bb.model.conv1.stride == (1, 1)
    path = export_backbone(_Holder(bb), str(tmp_path / "backbone.safetensors"),
                           extra={"method": "byol"})
    meta = read_metadata(path)
    assert meta["stem"] == "small_image" and meta["image_size"] == "32" and meta["method"] == "byol"
    stock = timm.create_model(meta["model_name"], pretrained=False, **json.loads(meta["model_kwargs"]))
    stock.conv1 = torch.nn.Conv2d(3, stock.conv1.out_channels, 3, 1, 1, bias=False)  # the documented stem patch
    stock.maxpool = torch.nn.Identity()
    stock.load_state_dict(load_file(path))
    x = images(2)
    with torch.no_grad():
        assert torch.allclose(stock.eval()(x), bb(x)["cls"], atol=1e-6)
        loaded = load_backbone(str(tmp_path))  # a run folder: its backbone.safetensors
        assert torch.allclose(loaded(x), bb(x)["cls"], atol=1e-6)
    assert loaded.webcurate_info["image_size"] == 32 and loaded.webcurate_info["dim"] == 64


def test_vit_options_on_a_convnet_and_a_convnet_stem_on_a_vit_are_config_errors():
    with pytest.raises(ConfigError, match="model.patch_size is a ViT option"):
        build_backbone(ModelConfig(name="resnet18", patch_size=4), 32)
    with pytest.raises(ConfigError, match="model.stem=small_image is a ConvNet option"):
        build_backbone(tiny(stem="small_image"), 32)


class _Holder(torch.nn.Module):
    """The smallest training wrapper: what ``export_backbone`` reads (``.backbone``)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def test_load_backbone_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_backbone(str(tmp_path / "nope.safetensors"))
