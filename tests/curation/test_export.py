"""`webcurate export`: the latest selection copied byte-exact into a new dataset, fields merged."""
from __future__ import annotations

import hashlib
import math
import pathlib
import shutil

import pytest

from helpers import load_helper
from webcurate.shards.dataset import Dataset, DatasetError


cd = load_helper(pathlib.Path(__file__).with_name("cluster_data.py"))


@pytest.fixture(scope="module")
def curated_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    info = cd.build_curated(str(base / "pool"), str(base / "seeds"))
    return str(base / "pool"), info


@pytest.fixture
def curated(curated_base, tmp_path):
    root, info = curated_base
    dst = str(tmp_path / "pool")
    shutil.copytree(root, dst)
    return dst, info


def _images(root: str) -> dict[str, tuple[str, dict]]:
    ds = Dataset(root)
    return {s.key: (hashlib.sha256(s.image).hexdigest(), s.meta)
            for shard in ds.completed_shards() for s in ds.iter_samples(shard)}


def test_export_copies_the_sample_selection_byte_exact_with_merged_fields(curated, tmp_path, ray_local):
    from webcurate.curation.export_selection import run_export

    root, info = curated
    out = str(tmp_path / "curated")
    res = run_export(root, out, summary=False)
    assert res.info["selection"] == "sample" and res.info["exported"] == len(info["sampled"]) == 25
    src, dst = _images(root), _images(out)
    assert sorted(dst) == sorted(info["sampled"])
    for key, (sha, meta) in dst.items():
        assert sha == src[key][0]  # bytes copied, not re-encoded
        assert meta["curation_selection"] == "sample"
        assert isinstance(meta["cluster_level_1"], int) and 0 <= meta["cluster_level_1"] < 6
        assert 0 <= meta["cluster_level_2"] < 2 and meta["cluster_distance"] >= 0
        assert meta["dedup_keep"] is True
        # The kept original of each planted copy records how many copies were dropped.
        assert meta["dedup_removed"] == sum(1 for d in info["dropped"].values() if d == key)
        if key in info["retrieved"]:
            assert meta["retrieval_selected"] is True and 0.5 < meta["retrieval_score"] <= 0.9
            assert meta["retrieval_seed_key"] in info["seed_keys"]
        else:
            assert meta["retrieval_selected"] is False and math.isnan(meta["retrieval_score"])
    m = Dataset(out).manifest
    assert m["parent"] == root and m["stage"] == "export"
    assert m["parameters"]["selection"] == "sample"
    # The index carries the merged fields as typed columns, across shards.
    idx = Dataset(out).index()
    assert {"cluster_level_1", "cluster_distance", "dedup_removed", "retrieval_score"} <= set(idx.column_names)
    assert idx.num_rows == 25


def test_explicit_selection_exports_dedup_survivors(curated, tmp_path, ray_local):
    from webcurate.curation.export_selection import run_export

    root, info = curated
    out = str(tmp_path / "survivors")
    res = run_export(root, out, selection="dedup", summary=False)
    assert res.info["selection"] == "dedup"
    assert sorted(_images(out)) == sorted(k for k in info["keys"] if k not in info["dropped"])


def test_rerunning_an_export_is_a_no_op_and_a_foreign_output_is_refused(curated, tmp_path, ray_local):
    from webcurate.curation.export_selection import run_export

    root, _ = curated
    out = str(tmp_path / "curated")
    run_export(root, out, summary=False)
    before = Dataset(out).manifest["completed_shards"]
    again = run_export(root, out, summary=False)
    assert again.info["exported"] == 25 and not again.ran
    assert Dataset(out).manifest["completed_shards"] == before
    with pytest.raises(DatasetError, match="another dataset"):
        run_export(root, out, selection="dedup", summary=False)


def test_nothing_selected_yet_is_a_clear_error(tmp_path):
    from webcurate.curation.export_selection import run_export

    root = str(tmp_path / "raw")
    cd.write_dataset(root, 4, shard_size=4)
    with pytest.raises(DatasetError, match="nothing selected to export"):
        run_export(root, str(tmp_path / "out"), summary=False)
    with pytest.raises(DatasetError, match="webcurate sample"):
        run_export(root, str(tmp_path / "out"), selection="sample", summary=False)
