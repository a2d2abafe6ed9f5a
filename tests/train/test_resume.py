"""Resumed runs continue exactly: 2 workers on S3 (DINOv2), and locally without Ray's snapshot (MoCo v2)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from webcurate.shards import storage


def _metrics(output):
    from webcurate.train.metrics import read_metrics

    return read_metrics(output)


def _final_state(output, tmp_path, name):
    from webcurate.train.checkpoint import list_checkpoints

    step, uri = list_checkpoints(output)[-1]
    local = storage.copy_to_local(storage.join(uri, "state.pt"), str(tmp_path / f"{name}.pt"))
    return step, torch.load(local, weights_only=True)


def test_resumed_two_worker_run_on_s3_sees_the_same_batches_and_weights(s3_bucket, ray_local, tmp_path,
                                                                          train_helpers):
    from webcurate.shards.ingest import ingest_folder
    from webcurate.train.config import load_config
    from webcurate.train.driver import train
    from webcurate.train.export_backbone import load_backbone

    src = train_helpers.image_tree(str(tmp_path / "images"))
    local = str(tmp_path / "dataset")
    ingest_folder(src, local, shard_size=8, labels_from_dirs=True, summary=False)
    # Shard locally, then upload: the session's Ray may predate the S3 test server's credentials.
    data = f"{s3_bucket}/dataset"
    for dirpath, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), local)
            storage.put_file(os.path.join(dirpath, name), storage.join(data, *rel.split(os.sep)))
    # 24 images / 2 workers / batch 4 = 3 steps per epoch: 4 steps cross an epoch boundary.
    tiny = train_helpers.TINY + ["run.checkpoint_every=2"]

    whole = f"{s3_bucket}/run-whole"
    train(data, whole, load_config(None, tiny + ["run.max_steps=4"]), quiet=True)

    cut = f"{s3_bucket}/run-cut"
    train(data, cut, load_config(None, tiny + ["run.max_steps=4", "run.stop_at_step=2"]), quiet=True)
    assert [r["step"] for r in _metrics(cut)] == [1, 2]
    assert not storage.exists(storage.join(cut, "backbone.safetensors"))  # paused, not finished
    summary = train(data, cut, load_config(None, tiny + ["run.max_steps=4"]), resume=True, quiet=True)
    assert summary["step"] == 4

    a, b = _metrics(whole), _metrics(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["epoch"] for r in b] == [0, 0, 0, 1]
    for ra, rb in zip(a, b):
        assert ra["batch_digest"] == rb["batch_digest"], f"step {ra['step']}: a different batch after resume"
        assert len(ra["batch_digest"]) == 2  # one digest per worker
        assert abs(ra["loss"] - rb["loss"]) < 1e-5, ra["step"]

    step_a, sa = _final_state(whole, tmp_path, "whole")
    step_b, sb = _final_state(cut, tmp_path, "cut")
    assert step_a == step_b == 4 and (sa["data_epoch"], sa["data_batch"]) == (1, 1)
    for part in ("student", "teacher"):
        for k, v in sa[part].items():
            assert torch.allclose(v, sb[part][k], atol=1e-6), f"{part}.{k} differs after resume"
    assert torch.allclose(sa["objective"]["dino_loss.center"], sb["objective"]["dino_loss.center"], atol=1e-6)
    assert sa["plan"]["total_steps"] == 4 and sa["plan"]["source"] == "run.max_steps"

    # The exported teacher backbone on S3 loads as a plain timm model.
    local = storage.copy_to_local(storage.join(cut, "backbone.safetensors"), str(tmp_path / "bb.safetensors"))
    model = load_backbone(local)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 48)
    assert os.path.getsize(local) > 0


def test_checkpoint_reads_straight_from_its_s3_uri_without_a_shared_download_folder(s3_bucket, tmp_path):
    """Each rank reads ``state.pt`` and its own RNG file from the checkpoint's URI; a rank
    that did not exist when it was written gets ``None`` (Ray's per-node download folder
    was shared by ranks and could be rewritten under a reader)."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from webcurate.train.checkpoint import checkpoint_uri, read_checkpoint, write_checkpoint

    local = str(tmp_path / "checkpoint_00000003")
    write_checkpoint(local, rank=0, state={"step": 3, "w": torch.arange(5.0)}, meta={"step": 3})
    remote = f"{s3_bucket}/run/train/checkpoint_00000003"
    for name in os.listdir(local):
        storage.put_file(os.path.join(local, name), storage.join(remote, name))

    s3_ckpt = Checkpoint(remote[len("s3://"):], filesystem=pafs.S3FileSystem(
        endpoint_override=storage.endpoint_url(), region="us-east-1"))
    assert checkpoint_uri(s3_ckpt) == remote
    assert checkpoint_uri(Checkpoint.from_directory(local)) == local
    for uri in (remote, local):
        state, rng = read_checkpoint(uri, rank=0)
        assert state["step"] == 3 and torch.equal(state["w"], torch.arange(5.0))
        assert set(rng) == {"torch", "cuda", "numpy", "python"}
        state, rng = read_checkpoint(uri, rank=1)
        assert rng is None and state["step"] == 3


MOCO_RESNET = ["method=moco_v2", "model.name=resnet18", "model.stem=small_image", "model.drop_path_rate=0",
               "model.timm_kwargs={channels: [8, 16, 32, 64], stem_width: 8}", "head.proj_hidden_dim=32",
               "head.proj_dim=16", "moco.queue_size=32", "loader.global_size=32", "loader.batch_size=4",
               "loader.num_threads=1", "loader.shuffle_buffer=8", "optim.epochs=2", "optim.warmup_epochs=0.5",
               "run.num_workers=2", "run.report_every=100", "run.torch_threads=1", "run.checkpoint_every=2",
               "run.max_steps=4"]


def test_resume_without_rays_run_snapshot_continues_from_our_checkpoint_listing(tiny_dataset, tmp_path,
                                                                              monkeypatch):
    """Issue 17.8: the checkpoint folders are there but Ray's snapshot is gone (a copied or pruned
    output): --resume continues at the last checkpoint, exactly (a two-view method with a queue,
    an EMA branch and BatchNorm), instead of silently starting at step 0. The cut run is given
    relative paths, as a user types them: the workers do not share the driver's working folder."""
    from webcurate.train.config import load_config
    from webcurate.train.driver import train

    whole = str(tmp_path / "whole")
    train(tiny_dataset, whole, load_config(None, MOCO_RESNET), quiet=True)
    monkeypatch.chdir(tmp_path)
    train(os.path.relpath(tiny_dataset), "cut", load_config(None, MOCO_RESNET + ["run.stop_at_step=2"]),
          quiet=True)
    cut = str(tmp_path / "cut")
    # The output copied without Ray's run snapshot (checkpoint_manager_snapshot.json): our files only.
    copied = tmp_path / "copied"
    shutil.copytree(os.path.join(cut, "train", "checkpoint_00000002"), copied / "train" / "checkpoint_00000002")
    shutil.copytree(os.path.join(cut, "metrics"), copied / "metrics")
    shutil.copy(os.path.join(cut, "train_config.yaml"), copied / "train_config.yaml")
    cut = str(copied)
    summary = train(tiny_dataset, cut, load_config(None, MOCO_RESNET), resume=True, quiet=True)
    assert summary["step"] == 4
    a, b = _metrics(whole), _metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["batch_digest"] == rb["batch_digest"] and abs(ra["loss"] - rb["loss"]) < 1e-5, ra["step"]
    _, sa = _final_state(whole, tmp_path, "whole")
    _, sb = _final_state(cut, tmp_path, "cut")
    assert torch.equal(sa["objective"]["loss_fn.queue"], sb["objective"]["loss_fn.queue"])
    for part in ("student", "teacher"):
        for k, v in sa[part].items():
            assert torch.allclose(v.float(), sb[part][k].float(), atol=1e-6), f"{part}.{k} differs after resume"


def test_resume_refuses_checkpoint_folders_that_are_all_incomplete(tiny_dataset, tmp_path):
    from webcurate.shards.errors import ConfigError
    from webcurate.train.config import load_config
    from webcurate.train.driver import train

    out = tmp_path / "run"
    (out / "train" / "checkpoint_00000002").mkdir(parents=True)
    (out / "train" / "checkpoint_00000002" / "rng-rank0.pt").write_bytes(b"")  # cut short before state.pt
    with pytest.raises(ConfigError, match="holds checkpoint folders but none is complete"):
        train(tiny_dataset, str(out), load_config(None, MOCO_RESNET), resume=True, quiet=True)
