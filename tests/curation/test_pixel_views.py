"""Pixel views (the ``pixels`` sidecar) and copy-dedup with ``pixel_threshold``: crops, re-encodes and
resizes found from pixels where the embedding threshold finds nothing."""
from __future__ import annotations

import numpy as np
import pytest

from photos import jpeg_bytes, make_photo
from webcurate.shards.dataset import Dataset


def _crop(arr: np.ndarray, share: float) -> np.ndarray:
    h, w = arr.shape[:2]
    dy, dx = int(round(h * (1 - share) / 2)), int(round(w * (1 - share) / 2))
    return arr[dy:h - dy, dx:w - dx]


def test_a_crops_whole_view_meets_its_originals_zoomed_view_not_an_unrelated_photo():
    from webcurate.curation.pixel_views import DEFAULT_ZOOMS, views

    photo = make_photo(7, size=(256, 256))
    original = views(jpeg_bytes(photo))
    other = views(jpeg_bytes(make_photo(8, size=(256, 256))))
    assert original.shape == (len(DEFAULT_ZOOMS), 16 * 16 * 3)
    assert np.allclose(np.linalg.norm(original, axis=1), 1.0, atol=1e-5)
    crop = views(jpeg_bytes(_crop(photo, 0.81)))
    assert crop[0] @ original[2] > 0.97  # the crop covers 81 % of the side: zoom 0.81
    assert crop[0] @ original[0] < 0.7
    # Crops between two zooms of the ladder still meet one of its views (the ladder's point).
    for share in (0.95, 0.85, 0.77, 0.7):
        assert (views(jpeg_bytes(_crop(photo, share))) @ original.T).max() > 0.97, share
    assert (other @ original.T).max() < 0.8


def test_a_blank_image_has_no_pixel_descriptor():
    from webcurate.curation.pixel_views import views

    v = views(jpeg_bytes(np.full((64, 64, 3), 128, np.uint8)))
    assert not v.any()


def test_pixels_sidecar_has_a_row_per_sample_and_a_failed_row_with_its_reason(search_pool):
    from webcurate.curation.pixel_views import STAGE, run_pixels

    got = run_pixels(search_pool.root)
    rows = {r["key"]: r for r in Dataset(search_pool.root).read_sidecar(STAGE).to_pylist()}
    assert set(rows) == set(search_pool.keys)
    broken = rows[search_pool.broken[0]]
    assert broken["status"] == "failed" and broken["error"].startswith("decode:") and broken["embedding"] is None
    assert got["counts"] == {"total": len(search_pool.keys), "ok": len(search_pool.keys) - 1, "failed": 1}
    assert got["dim"] == 16 * 16 * 3 and got["views"] == 5
    again = run_pixels(search_pool.root)
    assert again["shards_done"] == [] and again["shards_skipped"] == got["shards_done"]


def test_copy_dedup_with_pixel_threshold_finds_the_copies_an_embedding_threshold_misses(search_pool):
    from webcurate.curation.dedup import run_dedup

    # 0.9999: the random-init embedding joins nothing, so every copy found below came from pixels.
    bare = run_dedup(search_pool.root, method="copy", threshold=0.9999, summary=False)
    assert bare.totals.get("removed:copy", 0) == 0
    result = run_dedup(search_pool.root, method="copy", threshold=0.9999, pixel_threshold=0.9, summary=False)
    rows = {r["key"]: r for r in Dataset(search_pool.root).read_sidecar("dedup").to_pylist()}
    copies = {k: r["duplicate_of"] for k, r in rows.items() if r["reason"] == "copy"}
    assert copies == search_pool.near, sorted(set(copies.items()) ^ set(search_pool.near.items()))
    assert all(rows[o]["keep"] for o in search_pool.originals)
    assert result.info["pixel_only_edges"] >= len(search_pool.near)


@pytest.mark.parametrize("options, message", [
    ({"method": "semdedup", "pixel_threshold": 0.9}, "needs method copy"),
    ({"method": "copy", "pixel_threshold": 1.5}, "pixel_threshold"),
    ({"method": "copy", "pixel_zooms": [1.0, 0.1]}, "in [0.25, 1]"),
])
def test_pixel_options_are_checked(options, message):
    from webcurate.shards.errors import ConfigError
    from webcurate.shards.params import parse
    from webcurate.curation.stage_params import DedupParams

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse(DedupParams, options, "dedup")
