"""`webcurate report`: a self-contained HTML page with a section per stage that ran."""
from __future__ import annotations

import pathlib
import re

import pytest

from helpers import load_helper
from webcurate.shards.dataset import DatasetError


cd = load_helper(pathlib.Path(__file__).with_name("cluster_data.py"))


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    info = cd.build_curated(str(base / "pool"), str(base / "seeds"))
    return str(base / "pool"), info


def _section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m, f"no section {sid}"
    return m.group(1)


def test_report_has_every_section_with_inline_images_and_charts(curated, tmp_path):
    from webcurate.curation.report import write_report

    root, info = curated
    out = write_report(root, str(tmp_path / "r.html"))
    page = pathlib.Path(out).read_text()
    assert page.startswith("<!DOCTYPE html>")
    # Self-contained: images inline, nothing fetched from elsewhere.
    assert not re.search(r'src="(?!data:)', page)
    overview = _section(page, "sec-overview")
    assert "samples" in overview and "clusters" in overview and "retrieve" in overview
    sizes = _section(page, "sec-cluster-sizes")
    assert sizes.count("<svg") == 2 and "after balanced sampling" in sizes
    grid = _section(page, "sec-clusters")
    assert grid.count('src="data:image/jpeg;base64,') >= 10
    assert "level_2 = " in grid  # grouped by top-level cluster
    dups = _section(page, "sec-duplicates")
    assert f"{len(info['dropped'])} of {len(info['keys'])} samples removed" in dups
    assert "kept" in dups and "copy 0.950" in dups and dups.count("<img") >= 4
    ret = _section(page, "sec-retrieval")
    assert f"{len(info['retrieved'])} of {len(info['keys'])} pool samples retrieved" in ret
    # Each seed shown with its own image (read from the seed dataset) beside its hits.
    assert ret.count('class="seed"') == 4
    assert not re.search(r'class="seed"[^>]*><div class="noimg"', ret)


def test_default_output_is_inside_the_dataset(curated):
    from webcurate.curation.report import write_report

    root, _ = curated
    assert write_report(root) == f"{root}/report.html"
    assert pathlib.Path(root, "report.html").stat().st_size > 10_000


def test_sections_appear_only_for_stages_that_ran(tmp_path):
    from webcurate.curation.report import build_report

    root = str(tmp_path / "raw")
    cd.write_dataset(root, 5, shard_size=5)
    page = build_report(root)
    assert 'id="sec-overview"' in page
    for sid in ("sec-clusters", "sec-cluster-sizes", "sec-duplicates", "sec-retrieval"):
        assert f'id="{sid}"' not in page


def test_registered_sections_are_added_and_their_failures_contained(tmp_path):
    from webcurate.curation import report

    root = str(tmp_path / "raw")
    keys = cd.write_dataset(root, 5, shard_size=5)

    def labels(ds):
        return "<p>label stats</p>" + report.image_tags(ds, keys[:2])

    def broken(ds):
        raise RuntimeError("boom")

    report.register_section("Labels", labels)
    report.register_section("Broken", broken)
    report.register_section("Nothing", lambda ds: None)
    try:
        page = report.build_report(root)
    finally:
        for name in ("Labels", "Broken", "Nothing"):
            report._SECTIONS.pop(name, None)
    assert "label stats" in _section(page, "sec-labels")
    assert _section(page, "sec-labels").count("data:image/jpeg;base64,") == 2
    assert "this section failed: RuntimeError: boom" in _section(page, "sec-broken")
    assert 'id="sec-nothing"' not in page


def test_report_of_a_non_dataset_is_a_clear_error(tmp_path):
    from webcurate.curation.report import write_report

    with pytest.raises(DatasetError, match="not a webcurate dataset"):
        write_report(str(tmp_path / "nothing"))
