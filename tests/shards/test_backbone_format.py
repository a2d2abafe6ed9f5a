"""The exported-backbone contract (shards/backbone_format.py): what train writes, curation reads."""
from __future__ import annotations

import json
import os

import pytest
import torch

from webcurate.shards.backbone_format import (BACKBONE_FILE, FORMAT, STEM_SMALL_IMAGE, BackboneFormatError,
                                              BackboneMeta, build_timm_backbone, create_timm_model,
                                              load_backbone_file, read_backbone, read_metadata, write_backbone)

VIT_KW = {"num_classes": 0, "img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2,
          "global_pool": "token"}
RESNET_KW = {"num_classes": 0, "channels": [16, 32, 64, 128], "stem_width": 16}


def _roundtrip(tmp_path, meta: BackboneMeta, size: int):
    torch.manual_seed(0)
    src = create_timm_model(meta).eval()
    path = write_backbone(src.state_dict(), meta, str(tmp_path / BACKBONE_FILE))
    model, got = load_backbone_file(path)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    return path, model, got


def test_vit_export_loads_in_stock_timm_with_the_documented_recipe(tmp_path):
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    meta = BackboneMeta("vit_small_patch16_224", VIT_KW, 32, extra={"method": "dino"})
    path, model, got = _roundtrip(tmp_path, meta, 32)
    assert got == meta and model.num_features == 48
    raw = safe_open(path, "pt").metadata()  # the recipe in the module docstring, no webcurate involved
    assert raw["format"] == FORMAT and raw["image_size"] == "32" and raw["method"] == "dino"
    stock = timm.create_model(raw["model_name"], pretrained=False, **json.loads(raw["model_kwargs"]))
    stock.load_state_dict(load_file(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(stock.eval()(x), model(x))


def test_small_image_resnet_keeps_full_resolution_and_roundtrips(tmp_path):
    meta = BackboneMeta("resnet18", RESNET_KW, 32, stem=STEM_SMALL_IMAGE)
    _, model, got = _roundtrip(tmp_path, meta, 32)
    assert got.stem == STEM_SMALL_IMAGE
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    feats = model.forward_features(torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 128, 4, 4)  # only the three stride-2 stages: 32 / 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_s3_roundtrip(s3_bucket, tmp_path):
    meta = BackboneMeta("resnet18", RESNET_KW, 32, stem=STEM_SMALL_IMAGE)
    src = create_timm_model(meta).eval()
    uri = write_backbone(src.state_dict(), meta, f"{s3_bucket}/runs/a/{BACKBONE_FILE}")
    assert read_metadata(uri)["stem"] == STEM_SMALL_IMAGE
    state, got = read_backbone(uri)
    model = build_timm_backbone(got, state, uri)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_metadata_without_num_classes_zero_or_with_unknown_stem_is_refused():
    with pytest.raises(BackboneFormatError, match="num_classes=0"):
        BackboneMeta("resnet18", {"num_classes": 1000}, 32)
    with pytest.raises(BackboneFormatError, match="unknown stem"):
        BackboneMeta("resnet18", RESNET_KW, 32, stem="tiny")
    with pytest.raises(BackboneFormatError, match="reserved"):
        BackboneMeta("resnet18", RESNET_KW, 32, extra={"model_name": "x"})


def test_tensors_of_another_architecture_fail_naming_the_file(tmp_path):
    meta = BackboneMeta("resnet18", RESNET_KW, 32, stem=STEM_SMALL_IMAGE)
    state = create_timm_model(meta).state_dict()
    wrong = BackboneMeta("resnet18", {**RESNET_KW, "channels": [8, 16, 32, 64], "stem_width": 8}, 32,
                         stem=STEM_SMALL_IMAGE)
    path = write_backbone(state, wrong, str(tmp_path / BACKBONE_FILE))
    with pytest.raises(BackboneFormatError, match=rf"{BACKBONE_FILE} does not fit resnet18.*size mismatch"):
        load_backbone_file(path)
    # The standard stem's 7x7 conv does not take small-stem weights: strict, never silently partial.
    std = BackboneMeta("resnet18", RESNET_KW, 32)
    with pytest.raises(BackboneFormatError, match="does not fit"):
        build_timm_backbone(std, state)


def test_files_that_are_not_our_exports_are_refused(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"model_name": "resnet18"})
    with pytest.raises(BackboneFormatError, match="not a webcurate backbone export"):
        read_backbone(str(foreign))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(BackboneFormatError, match="not a safetensors file"):
        read_backbone(str(junk))
    with pytest.raises(FileNotFoundError):
        read_backbone(str(tmp_path / "missing.safetensors"))


def test_a_failed_write_leaves_no_file(tmp_path):
    meta = BackboneMeta("resnet18", RESNET_KW, 32)
    target = tmp_path / BACKBONE_FILE
    shared = torch.zeros(4)
    with pytest.raises(Exception):  # safetensors refuses tensors sharing memory
        write_backbone({"a": shared, "b": shared[:2]}, meta, str(target))
    assert not target.exists() and os.listdir(tmp_path) == []
