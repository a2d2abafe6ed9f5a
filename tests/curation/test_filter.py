"""`webcurate filter`: every row kept with its reasons, a mass-removal guard, errors that name the field."""
from __future__ import annotations

import os
import shutil

import pytest
from click.testing import CliRunner

from helpers import load_helper
from webcurate.curation import quality
from webcurate.curation.filter import STAGE, FilterError, filtered_keys, run_filter
from webcurate.curation.quality_params import FilterParams
from webcurate.shards.dataset import Dataset
from webcurate.shards.errors import ConfigError
from webcurate.shards.params import parse

qd = load_helper(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality_data.py"))


@pytest.fixture(scope="module")
def scored(tmp_path_factory, ray_local):
    """The junk dataset with its quality sidecar computed once (copy it before writing)."""
    root = str(tmp_path_factory.mktemp("filter") / "pool")
    expect = qd.junk_dataset(root)
    quality.run_quality(root, summary=False)
    return root, expect


@pytest.fixture
def pool(scored, tmp_path):
    root, expect = scored
    dst = str(tmp_path / "pool")
    shutil.copytree(root, dst)
    return dst, expect


def _decisions(root: str) -> dict[str, tuple[bool, str | None]]:
    t = Dataset(root).read_sidecar(STAGE)
    return {k: (kp, r) for k, kp, r in zip(t["key"].to_pylist(), t["keep"].to_pylist(), t["reason"].to_pylist())}


def test_filter_keeps_every_row_with_its_reasons_and_refuses_mass_removal_until_allowed(pool):
    root, expect = pool
    quality_parts = {s: os.path.getmtime(Dataset(root).sidecar_uri(quality.STAGE, s)) for s in range(4)}
    p = FilterParams(min_colorfulness=2.0, max_caption_repeats=3)
    with pytest.raises(FilterError, match=r"would remove 19 of 27 samples .*over --max-removed 0\.5.*allow-mass"):
        run_filter(root, p, summary=False)
    # Refused decisions stay on disk for the report, but no stage applies them.
    assert len(_decisions(root)) == 27
    with pytest.raises(FilterError, match="was refused"):
        filtered_keys(Dataset(root))
    res = run_filter(root, p.model_copy(update={"allow_mass_removal": True}), summary=False)
    assert res["shards_done"] == [] and res["counts"]["removed"] == 19  # the guard re-decides nothing
    got = _decisions(root)
    for key, reason in expect.items():
        keep, why = got[key]
        assert keep == (reason == ""), (key, why)
        assert reason in (why or "").split(",") if reason else why is None
    assert filtered_keys(Dataset(root)) == {k for k, r in expect.items() if r}
    assert res["counts"]["removed:caption_duplicate"] == 4
    # The images were scored once: the quality parts were never rewritten.
    assert quality_parts == {s: os.path.getmtime(Dataset(root).sidecar_uri(quality.STAGE, s)) for s in range(4)}


def test_other_thresholds_re_decide_from_the_stored_scores(pool):
    root, expect = pool
    run_filter(root, FilterParams(allow_mass_removal=True), summary=False)
    first = _decisions(root)
    assert first["c_dup0"] == (True, None) and first["j_gray"] == (True, None)  # 4 repeats <= 10; gray allowed
    res = run_filter(root, FilterParams(skip=["blurry", "caption_junk"], min_blur=10_000, allow_mass_removal=True),
                     summary=False)
    assert sorted(res["shards_done"]) == [0, 1, 2, 3]
    got = _decisions(root)
    # Blurry is off now, but a blur that strong also looks upscaled: still removed, for that reason only.
    assert got["j_blurry"] == (False, "upscaled")
    assert got["c_file"] == (True, None) and got["g000"] == (True, None)


def test_a_pool_where_every_image_fails_is_an_error_that_keeps_the_decisions(pool):
    root, _ = pool
    with pytest.raises(FilterError, match=r"removes every one of the 27 samples .*low_information 26"):
        run_filter(root, FilterParams(min_entropy=8, allow_mass_removal=True), summary=False)
    assert all(not keep for keep, _ in _decisions(root).values())
    with pytest.raises(FilterError, match="refused"):
        filtered_keys(Dataset(root))


def test_out_of_range_thresholds_name_the_option_or_field_before_any_work(tmp_path):
    from webcurate.pipeline.cli import main

    r = CliRunner().invoke(main, ["filter", "--input", str(tmp_path), "--min-brightness", "300"])
    assert isinstance(r.exception, ConfigError) and "--min-brightness" in str(r.exception)
    r = CliRunner().invoke(main, ["filter", "--input", str(tmp_path), "--min-score", "aesthetic"])
    assert isinstance(r.exception, ConfigError) and "NAME=VALUE" in str(r.exception)
    r = CliRunner().invoke(main, ["filter", "--input", str(tmp_path), "--skip", "everything"])
    assert r.exit_code == 2 and "everything" in r.output
    with pytest.raises(ConfigError, match=r"^curate.yaml: filter.min_entropy: .*less than or equal to 8"):
        parse(FilterParams, {"min_entropy": 9}, "curate.yaml", section="filter")
    with pytest.raises(ConfigError, match="min_brightness .* must be below max_brightness"):
        parse(FilterParams, {"min_brightness": 200, "max_brightness": 100}, "curate.yaml", section="filter")
    assert parse(FilterParams, {"min_score": {"aesthetic": 0.5}, "min_blur": None}, "c.yaml").score_floors == \
        {"aesthetic": 0.5}


def test_the_report_shows_histograms_and_the_worst_removed_samples_escaped(pool):
    from webcurate.curation.report import build_report

    root, _ = pool
    run_filter(root, FilterParams(max_caption_repeats=3, allow_mass_removal=True), summary=False)
    page = build_report(root)
    section = page[page.index('id="sec-quality-filters"'):]
    assert section.count("<svg") >= 10 and "&lt; 20" in section  # one histogram per score; dark threshold
    assert "dark: 1 removed, worst first" in section and "brightness 4.7" in section
    assert "caption_duplicate: 4 removed" in section and "&lt;b&gt;Click&lt;/b&gt;" in section
    assert "<b>Click</b>" not in page
    assert "undecodable (1)" in section and "j_broken" in section


def test_later_stages_leave_filtered_samples_out_and_a_new_filter_recomputes_them(pool):
    from webcurate.curation.cluster import run_cluster
    from webcurate.curation.embed import run_embed
    from webcurate.curation.filter import removed_in_shard
    from webcurate.curation.embedding_parts import read_embeddings

    root, expect = pool
    run_embed(root, "test_resnet", random_init=True, image_size=32, batch_size=16, summary=False)
    assert read_embeddings(root).filtered == 0
    run_filter(root, FilterParams(allow_mass_removal=True), summary=False)
    removed = filtered_keys(Dataset(root))
    emb = read_embeddings(root)
    assert emb.filtered == len(removed) - 1 and not removed & set(emb.keys)  # the undecodable one has no vector
    assert "filter" in emb.fingerprint()
    assert set().union(*(removed_in_shard(root, s) for s in range(4))) == removed
    run_cluster(root, levels="2", resampling_steps="0", summary=False)
    clustered = set(Dataset(root).read_sidecar("clusters")["key"].to_pylist())
    assert clustered and not clustered & removed
    # Other thresholds: other decisions, and the vectors' fingerprint changes with them.
    run_filter(root, FilterParams(skip=["noise"], allow_mass_removal=True), summary=False)
    assert read_embeddings(root).fingerprint()["filter"] != emb.fingerprint()["filter"]
    assert "j_noise" in read_embeddings(root).keys


def test_the_curate_filter_step_is_off_unless_configured_and_its_errors_name_the_field():
    from webcurate.curation.curate import load_config

    base = {"input": "pool", "embed": False, "sample": False, "export": False}
    assert load_config(base)["filter"] is None
    assert load_config({**base, "filter": {"min_blur": 40, "skip": ["aspect"]}})["filter"]["min_blur"] == 40
    assert load_config({**base, "filter": True})["filter"] == FilterParams().as_record()
    with pytest.raises(ConfigError, match=r"^config: filter.min_blurr: unknown key; allowed: .*min_blur"):
        load_config({**base, "filter": {"min_blurr": 40}})
    with pytest.raises(ConfigError, match=r"filter.max_noise: Input should be less than or equal to 2"):
        load_config({**base, "filter": {"max_noise": 5}})
