"""The DALI multi-crop loader on real shards: shapes, masks, determinism, resume, sharding, S3, failures."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import load_helper
from webcurate.shards.dataset import DatasetError
from webcurate.train.data.config import LoaderConfig
from webcurate.train.data.loader import LoaderError, batches_per_epoch, make_loader


H = load_helper(Path(__file__).with_name("loader_data.py"))

# Small crops keep the CPU pipeline fast; patch 8 on 64 px gives an 8x8 mask grid.
SMALL = dict(global_size=64, local_size=32, n_local=3, patch_size=8, batch_size=4, shuffle_buffer=64,
             num_threads=2, device="cpu")


def cfg_for(tmp_path, **kw) -> LoaderConfig:
    return LoaderConfig(**{**SMALL, "cache_dir": str(tmp_path / "idx-cache"), **kw})


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> list[str]:
    """24 photo-like JPEGs of varied aspect in 3 shards of a webcurate dataset."""
    root = str(tmp_path_factory.mktemp("photos"))
    samples = [(f"p{i:03d}", H.jpeg_bytes(H.make_photo(i, (120 + 7 * i, 100 + 3 * i))), None) for i in range(24)]
    return H.write_dataset(root, samples, shard_size=8)


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory) -> list[str]:
    """40 flat-colour JPEGs whose colour encodes the sample id, in 4 shards."""
    root = str(tmp_path_factory.mktemp("ids"))
    samples = []
    for i in range(40):
        arr = np.zeros((48, 48, 3), np.uint8)
        arr[:] = H.id_colour(i)
        samples.append((f"s{i:03d}", H.jpeg_bytes(arr, quality=98), None))
    return H.write_dataset(root, samples, shard_size=10)


def plain(cfg: LoaderConfig, **kw) -> LoaderConfig:
    """No photometric change: crops of a flat image keep its colour."""
    return dataclasses.replace(cfg, **{"color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "blur_p_local": 0.0,
                                       "solarize_p": 0.0, **kw})


def unnormalise(x: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x * std + mean) * 255.0


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ("global_crops", "local_crops", "masks"):
            assert torch.equal(x[k], y[k]), k


def test_batches_have_multicrop_shapes_normalised_values_and_ibot_masks(photo_shards, tmp_path):
    cfg = cfg_for(tmp_path)
    loader = make_loader(photo_shards, cfg, seed=3)
    batches = list(loader)
    assert loader.num_samples == 24
    assert len(batches) == batches_per_epoch(24, cfg, 1) == 6
    B, n_tokens = cfg.batch_size, (64 // 8) ** 2
    lo = min((0 - m) / s for m, s in zip(cfg.mean, cfg.std)) - 1e-3
    hi = max((1 - m) / s for m, s in zip(cfg.mean, cfg.std)) + 1e-3
    ratios = []
    for b in batches:
        assert b["n_images"] == B
        assert b["global_crops"].shape == (2 * B, 3, 64, 64) and b["global_crops"].dtype == torch.float32
        assert b["local_crops"].shape == (3 * B, 3, 32, 32) and b["local_crops"].dtype == torch.float32
        assert b["masks"].shape == (2 * B, n_tokens) and b["masks"].dtype == torch.bool
        for x in (b["global_crops"], b["local_crops"]):
            assert torch.isfinite(x).all() and lo <= x.min() and x.max() <= hi
            assert x.std() > 0.2  # real image content, not a constant placeholder
        per_crop = b["masks"].float().mean(1)
        assert int((per_crop > 0).sum()) == int(2 * B * cfg.mask_probability)  # mask probability 0.5
        ratios += per_crop[per_crop > 0].tolist()
    assert max(ratios) <= 0.5 + 1e-6 and min(ratios) > 0.0
    assert 0.15 < float(np.mean(ratios)) < 0.45  # stratified over [0.1, 0.5]


def test_crop_windows_follow_random_resized_crop_scales_aspects_and_flips(tmp_path):
    # Pixel colour encodes position (red = x, green = y): each crop's corner colours give
    # the window it was cut from.
    W, Hh = 200, 150
    xs = np.linspace(0, 255, W)[None, :].repeat(Hh, 0)
    ys = np.linspace(0, 255, Hh)[:, None].repeat(W, 1)
    arr = np.stack([xs, ys, np.full_like(xs, 128)], -1).round().astype(np.uint8)
    samples = [(f"g{i}", H.jpeg_bytes(arr, 98), None) for i in range(8)]
    shards = H.write_dataset(str(tmp_path / "ds"), samples, shard_size=8)
    cfg = plain(cfg_for(tmp_path, batch_size=8))
    windows = {"global": [], "local": []}
    for epoch in range(3):
        b = next(iter(make_loader(shards, cfg, epoch=epoch)))
        for kind, crops in (("global", b["global_crops"]), ("local", b["local_crops"])):
            rgb = unnormalise(crops, cfg)
            for c in rgb:
                size = c.shape[-1]
                left, right = float(c[0, :, 0].mean()), float(c[0, :, -1].mean())
                top, bottom = float(c[1, 0, :].mean()), float(c[1, -1, :].mean())
                # column/row centres sit half an output pixel inside the window
                w = abs(right - left) / 255 * size / (size - 1)
                h = abs(bottom - top) / 255 * size / (size - 1)
                windows[kind].append((w * h, (w * W) / (h * Hh), right < left))
    for kind, (lo, hi) in (("global", cfg.global_scale), ("local", cfg.local_scale)):
        area = np.array([a for a, _, _ in windows[kind]])
        aspect = np.array([r for _, r, _ in windows[kind]])
        flipped = np.mean([f for _, _, f in windows[kind]])
        assert area.min() > lo * 0.9 and area.max() < hi * 1.05, (kind, area.min(), area.max())
        assert aspect.min() > 0.75 * 0.93 and aspect.max() < 4 / 3 * 1.07, (kind, aspect.min(), aspect.max())
        assert 0.2 < flipped < 0.8
    assert np.mean([a for a, _, _ in windows["global"]]) > 3 * np.mean([a for a, _, _ in windows["local"]])


def test_same_seed_repeats_the_epoch_and_another_seed_or_epoch_changes_it(photo_shards, tmp_path):
    cfg = cfg_for(tmp_path)
    a = list(make_loader(photo_shards, cfg, seed=5))
    b = list(make_loader(photo_shards, cfg, seed=5))
    assert_same(a, b)
    c = next(iter(make_loader(photo_shards, cfg, seed=6)))
    assert not torch.equal(a[0]["global_crops"], c["global_crops"])
    d = next(iter(make_loader(photo_shards, cfg, seed=5, epoch=1)))
    assert not torch.equal(a[0]["global_crops"], d["global_crops"])


def test_skip_batches_resumes_exactly_where_an_uninterrupted_run_is(photo_shards, tmp_path):
    cfg = cfg_for(tmp_path)
    full = list(make_loader(photo_shards, cfg, seed=11, epoch=2))
    resumed_loader = make_loader(photo_shards, cfg, seed=11, epoch=2, skip_batches=4)
    assert len(resumed_loader) == 2
    assert_same(full[4:], list(resumed_loader))


def test_ranks_read_disjoint_samples_that_cover_the_epoch(id_shards, tmp_path):
    cfg = plain(cfg_for(tmp_path, n_local=0, shard_chunk=3))  # chunks straddle the split between ranks
    seen: dict[int, list[int]] = {}
    for rank in range(2):
        ids = []
        loader = make_loader(id_shards, cfg, rank=rank, world_size=2, seed=1)
        assert len(loader) == batches_per_epoch(40, cfg, 2) == 5
        for b in loader:
            assert b["local_crops"] is None  # no local crops: the batch says so
            first = unnormalise(b["global_crops"][: cfg.batch_size], cfg)  # crop 0 of every image
            second = unnormalise(b["global_crops"][cfg.batch_size:], cfg)  # crop 1, same images in order
            for x, y in zip(first, second):
                assert H.colour_id(x.mean((1, 2)).numpy()) == H.colour_id(y.mean((1, 2)).numpy())
                ids.append(H.colour_id(x.mean((1, 2)).numpy()))
        seen[rank] = ids
    assert len(set(seen[0])) == len(seen[0]) == 20 and len(set(seen[1])) == 20  # no repeats within an epoch
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(40))


def test_shuffled_order_mixes_shards_and_changes_per_epoch(id_shards, tmp_path):
    # A small buffer: mixing must come from visiting shard chunks in a random order.
    cfg = plain(cfg_for(tmp_path, n_local=0, batch_size=8, shard_chunk=2, shuffle_buffer=4))
    orders = []
    for epoch in range(2):
        ids = []
        for b in make_loader(id_shards, cfg, epoch=epoch, seed=0):
            crops = unnormalise(b["global_crops"][: cfg.batch_size], cfg)
            ids += [H.colour_id(x.mean((1, 2)).numpy()) for x in crops]
        orders.append(ids)
        assert sorted(ids) == list(range(40))
    assert orders[0] != orders[1]
    assert orders[0] != sorted(orders[0])
    for start in (0, 8, 16):
        assert len({i // 10 for i in orders[0][start:start + 8]}) >= 3  # every batch spans several shards


def test_samples_not_ok_in_the_index_are_not_trained_on(tmp_path):
    samples = [(f"s{i:03d}", H.jpeg_bytes(np.full((32, 32, 3), H.id_colour(i), np.uint8), 98), None)
               for i in range(12)]
    shards = H.write_dataset(str(tmp_path / "ds"), samples, shard_size=6,
                             statuses={"s001": "duplicate", "s007": "opted_out"})
    cfg = plain(cfg_for(tmp_path, n_local=0, batch_size=2))
    loader = make_loader(shards, cfg)
    assert loader.num_samples == 10 and loader.dropped == {"status_not_ok": 2}
    ids = set()
    for b in loader:
        ids |= {H.colour_id(x.mean((1, 2)).numpy()) for x in unnormalise(b["global_crops"][:2], cfg)}
    assert ids == set(range(12)) - {1, 7}


def test_undecodable_images_are_dropped_or_replaced_without_stopping_the_epoch(tmp_path):
    good = [(f"g{i:03d}", H.jpeg_bytes(H.make_photo(i, (64, 64))), None) for i in range(11)]
    truncated = H.jpeg_bytes(H.make_photo(99, (64, 64)))[:400]  # cut-off download: no end marker
    # Passes the signature check (SOI ... EOI) but is no JPEG: only the decoder finds out.
    corrupt = b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 900, dtype=np.uint8)) + b"\xff\xd9"
    samples = good[:5] + [("bad_trunc", truncated, None), ("bad_corrupt", corrupt, None)] + good[5:]
    shards = H.write_dataset(str(tmp_path / "ds"), samples, shard_size=13)
    cfg = cfg_for(tmp_path, batch_size=4, shard_chunk=5)
    loader = make_loader(shards, cfg, seed=2)
    assert loader.num_samples == 12 and loader.dropped == {"truncated_jpeg": 1}
    batches = list(loader)
    assert len(batches) == 3  # the full epoch despite the corrupt image
    assert loader.decode_failures == 1 and loader.dropped["decode_failed"] == 1
    # The replacement keeps count and order: a fresh loader gives the same epoch.
    again = make_loader(shards, cfg, seed=2)
    assert_same(batches, list(again))
    assert again.decode_failures == 0


def test_reference_blur_bug_option_inverts_blur_of_first_global_crop(tmp_path):
    # Sharp 3-px checker images: blur shows as a large drop of neighbour differences.
    rng = np.random.default_rng(0)
    samples = []
    for i in range(8):
        cells = rng.integers(0, 2, (24, 24, 1), dtype=np.uint8) * 255
        samples.append((f"c{i}", H.jpeg_bytes(np.repeat(np.repeat(np.repeat(cells, 3, 0), 3, 1), 3, 2), 98), None))
    shards = H.write_dataset(str(tmp_path / "ds"), samples, shard_size=8)

    def sharpness(reference_blur_bug: bool) -> float:
        # DINOv2: always blur global crop 1 (the released code never does)
        cfg = plain(cfg_for(tmp_path, n_local=0, global_size=72, patch_size=8, global_scale=(0.95, 1.0),
                            blur_sigma=(1.5, 2.0), reference_blur_bug=reference_blur_bug), blur_p=(1.0, 0.0))
        b = next(iter(make_loader(shards, cfg, seed=0)))
        x = b["global_crops"][: cfg.batch_size]
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    assert sharpness(False) < 0.5 * sharpness(True)


def test_bad_inputs_fail_with_messages_naming_them(photo_shards, tmp_path):
    cfg = cfg_for(tmp_path)
    with pytest.raises(LoaderError, match="no full batch"):
        make_loader(photo_shards, cfg_for(tmp_path, batch_size=64))
    missing = str(tmp_path / "nope" / "shards" / "00000.tar")
    with pytest.raises(DatasetError, match="nope"):  # LoaderError and index errors are DatasetErrors
        make_loader([missing], cfg)
    not_tar = tmp_path / "x.tar"
    not_tar.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(DatasetError, match="x.tar"):
        make_loader([str(not_tar)], cfg)
    with pytest.raises(ValueError, match="rank"):
        make_loader(photo_shards, cfg, rank=2, world_size=2)
    with pytest.raises(ValueError, match="global_size"):
        LoaderConfig(global_size=100, patch_size=16)
    with pytest.raises(ValueError, match="unknown loader option"):
        LoaderConfig.from_dict({"globl_size": 3})


def test_reads_s3_shards_from_the_loopback_server_like_local_ones(photo_shards, s3_bucket, tmp_path):
    from webcurate.shards import storage

    root = os.path.dirname(os.path.dirname(photo_shards[0]))
    s3_root = f"{s3_bucket}/photos"
    for name in sorted(os.listdir(os.path.join(root, "shards"))):
        storage.put_file(os.path.join(root, "shards", name), f"{s3_root}/shards/{name}")
    for name in sorted(os.listdir(os.path.join(root, "index"))):
        storage.put_file(os.path.join(root, "index", name), f"{s3_root}/index/{name}")
    s3_shards = [f"{s3_root}/shards/{os.path.basename(p)}" for p in photo_shards]
    cfg = cfg_for(tmp_path)
    from_s3 = list(make_loader(s3_shards, cfg, seed=4))
    assert len(from_s3) == 6
    assert_same(from_s3, list(make_loader(photo_shards, cfg, seed=4)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for DALI mixed decoding")
def test_gpu_decoding_gives_cuda_batches_like_the_cpu_path(photo_shards, tmp_path):
    cfg = cfg_for(tmp_path, device="gpu")
    batches = list(make_loader(photo_shards, cfg, seed=3))
    assert len(batches) == 6
    b = batches[0]
    assert b["global_crops"].is_cuda and b["local_crops"].is_cuda and b["masks"].is_cuda
    cpu = next(iter(make_loader(photo_shards, cfg_for(tmp_path, device="cpu"), seed=3)))
    assert torch.equal(b["masks"].cpu(), cpu["masks"])
    # Same crops and draws; the decoders and resamplers differ in rounding only.
    diff = (b["global_crops"].cpu() - cpu["global_crops"]).abs()
    assert float(diff.mean()) < 0.05


def test_a_dali_index_beside_the_tar_is_used_instead_of_scanning_it(tmp_path):
    from wds2idx import IndexCreator  # DALI's own index tool

    from webcurate.train.data.wds_index import shard_index

    samples = [(f"s{i}", H.jpeg_bytes(H.make_photo(i, (32, 32))), None) for i in range(6)]
    (tar,) = H.write_dataset(str(tmp_path / "ds"), samples, shard_size=6, statuses={"s1": "duplicate"})
    scanned = shard_index(tar, str(tmp_path / "c1"))
    with IndexCreator(tar, tar[:-4] + ".idx", verbose=False) as ic:
        ic.create_index()
    lines = Path(tar[:-4] + ".idx").read_text().splitlines()
    assert len(lines) == 7 and "json" in lines[1]  # DALI's tool lists every component
    published = shard_index(tar, str(tmp_path / "c2"))
    # Same sample list (image components only, status filter applied) without reading the tar.
    assert Path(published.idx_path).read_text() == Path(scanned.idx_path).read_text()
    assert scanned.num_samples == published.num_samples == 5
    Path(tar[:-4] + ".idx").write_text("v1.2 5\n" + "\n".join(lines[1:6]) + "\n")  # drop the last sample
    assert shard_index(tar, str(tmp_path / "c3")).num_samples == 4
