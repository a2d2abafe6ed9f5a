"""`webcurate embed`: real timm models on real JPEGs through Ray Data actors."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from webcurate.shards.errors import ConfigError
from webcurate.shards.dataset import Dataset

MODEL, SIZE = "convnext_atto", 64


def test_embed_writes_normalised_float16_parts_with_model_in_manifest(search_pool):
    ds = Dataset(search_pool.root)
    assert ds.sidecar_completed("embeddings") == [0, 1, 2]
    part = ds.read_sidecar_part("embeddings", 0)
    assert part.schema.field("embedding").type == pa.list_(pa.float16(), 320)
    assert part.column_names == ["key", "embedding", "status", "error"]
    # Rows follow tar order, so identical inputs give identical parts.
    assert part["key"].to_pylist() == search_pool.keys[:16]

    from webcurate.curation.embedding_parts import read_embeddings

    emb = read_embeddings(search_pool.root)
    keys, x = emb.keys, emb.vectors
    assert x.dtype == np.float32 and x.shape == (len(search_pool.keys) - 1, 320)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    entry = ds.manifest["stages"]["embeddings"]
    assert entry["model"] == MODEL and entry["dim"] == 320
    assert entry["weights_sha256"].startswith("random-init:") and entry["weights_source"] == "random-init"
    assert search_pool.embed_result.totals == {"total": 39, "ok": 38, "failed": 1, "failed:decode": 1}


def test_undecodable_image_is_a_failed_row_with_null_embedding(search_pool):
    table = Dataset(search_pool.root).read_sidecar("embeddings")
    rows = {r["key"]: r for r in table.to_pylist()}
    [broken] = search_pool.broken
    assert rows[broken]["status"] == "failed"
    assert rows[broken]["embedding"] is None
    assert rows[broken]["error"].startswith("decode:")
    from webcurate.curation.embedding_parts import read_embeddings

    keys = read_embeddings(search_pool.root).keys
    assert broken not in keys and len(keys) == len(set(keys))


def test_rerun_skips_finished_shards_and_redoes_a_missing_part(search_pool):
    from webcurate.curation.embed import run_embed

    ds = Dataset(search_pool.root)
    before = ds.read_sidecar_part("embeddings", 1)
    os.unlink(ds.sidecar_uri("embeddings", 1))  # as if killed before shard 1 landed
    result = run_embed(search_pool.root, MODEL, random_init=True, image_size=SIZE, batch_size=8, summary=False)
    assert sorted(result.done) == [1] and result.skipped == [0, 2]
    after = ds.read_sidecar_part("embeddings", 1)
    assert after["key"].to_pylist() == before["key"].to_pylist()
    a = np.array([v if v is not None else [0.0] * 320 for v in after["embedding"].to_pylist()], np.float32)
    b = np.array([v if v is not None else [0.0] * 320 for v in before["embedding"].to_pylist()], np.float32)
    # Same seeded weights in a fresh actor; a different batch size may move the last float16 bit.
    np.testing.assert_allclose(a, b, atol=2e-3)


def test_refuses_without_weights_and_names_random_init(tmp_path):
    from webcurate.curation.embed import run_embed

    with pytest.raises(ConfigError, match="--random-init"):
        run_embed(str(tmp_path), MODEL)
    with pytest.raises(ConfigError, match="not both"):
        run_embed(str(tmp_path), MODEL, weights="a.safetensors", checkpoint="b.pt")
    with pytest.raises(ConfigError, match=r"embed: image_size: .*'big'"):
        run_embed(str(tmp_path), MODEL, random_init=True, image_size="big")


def test_unknown_architecture_is_a_clear_error():
    from webcurate.curation.embedding_models import BackboneSpec, build_backbone

    with pytest.raises(ConfigError, match="unknown timm architecture 'convnext_attoo'.*convnext_atto"):
        build_backbone(BackboneSpec("convnext_attoo", random_init=True, image_size=SIZE))


def _random_state(name: str, **kw):
    import timm
    import torch

    torch.manual_seed(7)
    return timm.create_model(name, pretrained=False, **kw).state_dict()


def test_weights_from_safetensors_and_wrapped_state_dict_give_the_same_model(tmp_path):
    import torch
    from safetensors.torch import save_file

    from webcurate.curation.embedding_models import BackboneSpec, build_backbone, file_sha256

    state = _random_state(MODEL)  # includes the classifier head, which embedding drops
    st_path = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, st_path)
    pt_path = str(tmp_path / "w.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, pt_path)

    m1, i1 = build_backbone(BackboneSpec(MODEL, weights=st_path, image_size=SIZE))
    m2, i2 = build_backbone(BackboneSpec(MODEL, weights=pt_path, image_size=SIZE))
    assert i1.weights_sha256 == file_sha256(st_path) and i1.dim == 320 and i1.source == "weights"
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        f1, f2 = m1(x), m2(x)
    assert f1.shape == (2, 320)
    torch.testing.assert_close(f1, f2)
    assert torch.equal(m1.stem[0].weight, state["stem.0.weight"])


def test_weights_of_another_architecture_are_refused(tmp_path):
    from safetensors.torch import save_file

    from webcurate.curation.embedding_models import BackboneSpec, build_backbone

    path = str(tmp_path / "resnet.safetensors")
    save_file({k: v.contiguous() for k, v in _random_state("resnet10t").items()}, path)
    with pytest.raises(ConfigError, match="does not fit timm architecture"):
        build_backbone(BackboneSpec(MODEL, weights=path, image_size=SIZE))


def test_pickled_objects_in_a_weights_file_are_refused(tmp_path):
    import pickle

    from webcurate.curation.embedding_models import BackboneSpec, build_backbone

    path = str(tmp_path / "evil.pt")
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": object()}}, f)
    with pytest.raises(ConfigError, match="weights_only=True"):
        build_backbone(BackboneSpec(MODEL, weights=path, image_size=SIZE))


def test_vit_weights_at_224_load_at_another_image_size(tmp_path):
    import torch
    from safetensors.torch import save_file

    from webcurate.curation.embedding_models import BackboneSpec, build_backbone

    path = str(tmp_path / "vit.safetensors")
    save_file({k: v.contiguous() for k, v in _random_state("vit_tiny_patch16_224").items()}, path)
    model, info = build_backbone(BackboneSpec("vit_tiny_patch16_224", weights=path, image_size=64))
    assert info.dim == 192 and any("position embedding resampled" in n for n in info.notes)
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 192)


def test_embed_reads_an_s3_dataset_with_s3_weights(s3_bucket, ray_local, search_data, tmp_path):
    from safetensors.torch import save_file

    from webcurate.curation.embed import run_embed
    from webcurate.curation.embedding_parts import read_embeddings
    from webcurate.shards import storage

    root = f"{s3_bucket}/pool"
    items = [search_data.Item(f"k{i}", search_data.jpeg_bytes(search_data.make_photo(i))) for i in range(5)]
    items.append(search_data.Item("copy", search_data.near_duplicate(search_data.make_photo(0), "quality")))
    search_data.write_dataset(root, items, shard_size=3)
    _add_shard_without_images(root)
    local = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in _random_state(MODEL).items()}, local)
    storage.put_file(local, f"{s3_bucket}/weights/w.safetensors")

    result = run_embed(root, MODEL, weights=f"{s3_bucket}/weights/w.safetensors", image_size=SIZE,
                       dtype="float32", summary=False)
    assert sorted(result.done) == [0, 1, 2] and result.totals["ok"] == 6
    # The shard whose every sample failed at ingest has an empty part, so it counts as done.
    assert Dataset(root).read_sidecar_part("embeddings", 2).num_rows == 0
    assert result.info["weights_source"] == "weights" and len(result.info["weights_sha256"]) == 64
    emb = read_embeddings(root)
    assert emb.keys == [it.key for it in items] and emb.dim == 320
    sims = emb.vectors @ emb.vectors[0]
    assert sims[emb.keys.index("copy")] > 0.9 > float(np.max(sims[1:5]))

    # dedup and retrieve read and write their sidecars on S3 just the same.
    from webcurate.curation.dedup import run_dedup
    from webcurate.curation.retrieve import run_retrieve

    run_dedup(root, threshold=0.9, k=4, summary=False)
    rows = {r["key"]: r for r in Dataset(root).read_sidecar("dedup").to_pylist()}
    assert not rows["copy"]["keep"] and rows["copy"]["duplicate_of"] == "k0"
    assert sum(r["keep"] for r in rows.values()) == 5
    res = run_retrieve(root, [root], k=1, summary=False)  # each kept sample finds itself
    assert res.totals["selected"] == 5 and Dataset(root).sidecar_completed("retrieve") == [0, 1, 2]


def test_a_training_export_loads_through_the_backbone_contract_with_its_own_architecture_and_size(tmp_path):
    import timm
    import torch

    from webcurate.curation.embedding_models import BackboneSpec, build_backbone, file_sha256
    from webcurate.shards.backbone_format import BACKBONE_FILE, BackboneMeta, write_backbone

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 0}
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    run = tmp_path / "run"  # what `webcurate train --output run` leaves behind
    path = write_backbone(vit.state_dict(), BackboneMeta("vit_tiny_patch16_224", kwargs, 32), str(run / BACKBONE_FILE))
    # --model names something else and --image-size is the CLI default: the export's own win; the
    # run folder resolves to its backbone.safetensors.
    for given in (path, str(run)):
        model, info = build_backbone(BackboneSpec("convnext_atto", checkpoint=given, image_size=224))
        assert (info.model, info.dim, info.image_size, info.source) == ("vit_tiny_patch16_224", 64, 32, "checkpoint")
        assert info.weights_sha256 == file_sha256(path) and "trained at 32px" in info.notes[0]
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), vit.eval()(x))


def test_a_small_image_convnet_export_and_a_folder_without_export(tmp_path):
    import timm
    import torch

    from webcurate.curation.embedding_models import BackboneSpec, build_backbone
    from webcurate.shards.backbone_format import BackboneMeta, apply_small_image_stem, write_backbone

    torch.manual_seed(1)
    net = apply_small_image_stem(timm.create_model("resnet18", pretrained=False, num_classes=0))
    meta = BackboneMeta("resnet18", {"num_classes": 0}, 32, stem="small_image")
    path = write_backbone(net.state_dict(), meta, str(tmp_path / "b.safetensors"))
    model, info = build_backbone(BackboneSpec("resnet18", checkpoint=path, image_size=32))
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), net.eval()(x))
    (tmp_path / "checkpoint_000010").mkdir()
    with pytest.raises(ConfigError, match="holds no backbone.safetensors.*--output folder"):
        build_backbone(BackboneSpec("resnet18", checkpoint=str(tmp_path / "checkpoint_000010"), image_size=32))


def _add_shard_without_images(root: str) -> None:
    """Append shard 2 holding only a failed download (an empty tar), as ingest can produce."""
    from webcurate.shards import manifest as manifest_mod
    from webcurate.shards.writer import ShardWriter

    w = ShardWriter(root, 2)
    w.add_failure("gone", {"source": "http://x/gone.jpg"}, "failed", "http_404: not found")
    stats = w.commit()
    m = manifest_mod.load(root)
    m["num_shards"] = 3
    manifest_mod.save(root, m)
    manifest_mod.record_shard(root, 2, stats)


def test_cli_help_explains_every_option():
    from click.testing import CliRunner

    from webcurate.curation.cli import dedup, embed, retrieve

    for cmd, options in ((embed, ["--weights", "--checkpoint", "--random-init", "--num-gpus", "--concurrency",
                                  "--calibration-samples"]),
                         (dedup, ["--method", "--against", "--threshold", "--keep", "--allow-mass-removal",
                                  "--memory-per-task"]),
                         (retrieve, ["--seeds", "--mode", "--per-cluster", "--min-seed-per-cluster"])):
        out = CliRunner().invoke(cmd, ["--help"])
        assert out.exit_code == 0
        for opt in options:
            assert opt in out.output, (cmd.name, opt)
