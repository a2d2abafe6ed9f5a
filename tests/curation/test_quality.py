"""Per-image quality scores: each planted defect fails its own filter, photos pass, the sidecar resumes."""
from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import load_helper
from webcurate.curation import quality
from webcurate.curation.filter import decide
from webcurate.curation.quality_params import FilterParams

qd = load_helper(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality_data.py"))


def _table(images: dict[str, bytes]):
    rows = []
    for key, data in images.items():
        try:
            rows.append({"key": key, "status": "ok", **quality.image_scores(data)})
        except Exception as e:
            rows.append({"key": key, "status": "failed", "error": str(e)})
    return quality.rows_table(rows)


def test_each_planted_defect_fails_its_own_filter_and_default_thresholds_keep_photos():
    planted = qd.defects()
    images = {k: d for k, (d, _) in planted.items()} | {f"g{i}": qd.jpeg_bytes(qd.photo(i)) for i in range(6)}
    table = _table(images)
    keep, reasons = decide(table, FilterParams(min_colorfulness=2.0), np.zeros(0, np.int64))
    got = dict(zip(table["key"].to_pylist(), reasons))
    for key, (_, reason) in planted.items():
        assert reason in (got[key] or "").split(","), (key, got[key])
    assert all(got[f"g{i}"] is None for i in range(6)), got
    # Off by default: grayscale photos are photos.
    keep, reasons = decide(table, FilterParams(), np.zeros(0, np.int64))
    assert dict(zip(table["key"].to_pylist(), reasons))["j_gray"] is None


def test_scores_are_size_independent_and_ordered_by_the_defect():
    base = qd.photo(7, (320, 240))
    big, small = quality.image_scores(qd.jpeg_bytes(base)), quality.image_scores(
        qd.jpeg_bytes(np.asarray(qd.Image.fromarray(base).resize((160, 120)))))
    assert abs(big["brightness"] - small["brightness"]) < 2 and abs(big["entropy"] - small["entropy"]) < 0.2
    blurs = [quality.image_scores(qd.jpeg_bytes(np.asarray(qd.Image.fromarray(base).filter(
        qd.ImageFilter.GaussianBlur(r)))))["blur"] for r in (0.5, 2, 5)]
    assert blurs[0] > blurs[1] > blurs[2]
    blocks = [quality.image_scores(qd.jpeg_bytes(base, quality=q))["blockiness"] for q in (95, 20, 3)]
    assert blocks[0] < blocks[1] < blocks[2]


@pytest.fixture(scope="module")
def junk(tmp_path_factory, ray_local):
    root = str(tmp_path_factory.mktemp("quality") / "pool")
    return root, qd.junk_dataset(root)


def test_quality_stage_writes_one_row_per_sample_with_failures_as_rows_and_resumes(junk):
    from webcurate.shards.dataset import Dataset

    root, expect = junk
    first = quality.run_quality(root, summary=False)
    ds = Dataset(root)
    t = ds.read_sidecar(quality.STAGE)
    assert sorted(t["key"].to_pylist()) == sorted(expect)
    rows = {r["key"]: r for r in t.to_pylist()}
    assert rows["j_broken"]["status"] == "failed" and rows["j_broken"]["error"].startswith("decode:")
    assert rows["j_broken"]["blur"] is None and rows["g000"]["blur"] > 25
    assert rows["c_file"]["caption_junk"] == "filename" and rows["g000"]["caption_words"] == 8
    assert first["counts"] == {"total": len(expect), "ok": len(expect) - 1, "failed": 1}
    before = {s: open(ds.sidecar_uri(quality.STAGE, s), "rb").read() for s in ds.sidecar_completed(quality.STAGE)}
    again = quality.run_quality(root, summary=False)
    assert again["shards_done"] == [] and again["shards_skipped"] == sorted(before)
    # A part lost on disk is redone, byte for byte.
    os.unlink(ds.sidecar_uri(quality.STAGE, 1))
    third = quality.run_quality(root, summary=False)
    assert third["shards_done"] == [1]
    assert open(ds.sidecar_uri(quality.STAGE, 1), "rb").read() == before[1]
