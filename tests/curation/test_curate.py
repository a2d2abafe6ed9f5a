"""`webcurate curate`: the whole flow on an s3:// dataset, config validation, resume."""
from __future__ import annotations

import hashlib
import pathlib

import pytest

from helpers import load_helper
from webcurate.shards.errors import ConfigError
from webcurate.shards.dataset import Dataset

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "examples" / "curate.yaml"


cd = load_helper(pathlib.Path(__file__).with_name("cluster_data.py"))


def test_example_config_is_valid_and_documents_every_key():
    import re

    from webcurate.curation.curate import load_config, sections

    cfg = load_config(str(EXAMPLE))
    assert cfg["cluster"]["levels"] == [10000, 1000, 100] and cfg["dedup"]["threshold"] == "auto"
    text = EXAMPLE.read_text()
    for section, model in sections().items():
        # Every key is set or shown commented out (alternatives such as embed.checkpoint, the filter section).
        start = re.search(rf"^#?\s*{section}:", text, re.M)
        assert start, f"docs/examples/curate.yaml has no `{section}` section"
        block = text[start.start():].split("\n\n", 1)[0]
        for key in model.model_fields:
            assert re.search(rf"^#?\s*#?\s*{key}:", block, re.M), \
                f"docs/examples/curate.yaml does not document {section}.{key}"


EMBED = {"model": "m", "random_init": True}


@pytest.mark.parametrize("config, match", [
    ({"output": "o"}, "`input`"),
    ({"input": "i", "output": "o", "embed": EMBED, "sample": {"target": 5}, "clustr": {}}, "clustr"),
    ({"input": "i", "output": "o", "embed": EMBED, "sample": {"target": 5}, "cluster": {"level": [3]}},
     "cluster.level: unknown key"),
    ({"input": "i", "output": "o", "embed": EMBED}, "sample.target: required"),
    ({"input": "i", "embed": EMBED, "sample": {"target": 5}}, "`output`"),
    ({"input": "i", "output": "o", "embed": {}, "sample": {"target": 5}}, "embed.model: required"),
    ({"input": "i", "output": "o", "embed": {"model": "m"}, "sample": {"target": 5}}, "embed: .*no weights"),
    # Wrong types name the field and what was given, before any work starts (issue 17 #6).
    ({"input": "i", "output": "o", "embed": EMBED, "sample": {"target": 5}, "dedup": {"k": "lots"}},
     r"dedup\.k: Input should be a valid integer.*'lots'"),
    ({"input": "i", "output": "o", "embed": {**EMBED, "image_size": "big"}, "sample": {"target": 5}},
     r"embed\.image_size: .*'big'"),
    ({"input": "i", "output": "o", "embed": EMBED, "sample": {"target": "ten"}}, r"sample\.target: .*'ten'"),
    ({"input": "i", "output": "o", "embed": EMBED, "sample": {"target": 5}, "dedup": {"threshold": 1.5}},
     r"dedup\.threshold"),
    ({"input": "i", "output": "o", "embed": EMBED, "sample": {"target": 5}, "cluster": {"levels": "10,x"}},
     r"cluster\.levels: .*comma-separated"),
    ({"input": "i", "output": "o", "embed": EMBED, "sample": {"target": 5}, "resources": {"memory_per_task": "lots"}},
     r"resources\.memory_per_task: .*2GiB"),
    ({"input": "i", "output": "o", "embed": EMBED, "sample": {"target": 5}, "dedup": {"method": "none"}},
     r"dedup: .*against"),
])
def test_bad_configs_are_refused_naming_the_key(config, match):
    from webcurate.curation.curate import load_config

    with pytest.raises(ConfigError, match=match):
        load_config(config)


def test_a_wrong_type_stops_curate_before_any_work(tmp_path):
    from webcurate.curation.curate import run_curate

    root = str(tmp_path / "pool")
    cd.write_dataset(root, 4, shard_size=4)
    with pytest.raises(ConfigError, match=r"dedup\.k"):
        run_curate({"input": root, "output": str(tmp_path / "o"), "embed": EMBED, "sample": {"target": 2},
                    "dedup": {"k": "lots"}}, summary=False)
    assert not (tmp_path / "pool" / "embeddings").exists() and not (tmp_path / "o").exists()


def test_full_curate_on_s3_then_rerun_skips_every_step(s3_bucket, ray_local, tmp_path, capsys):
    """embed (random-init ViT) -> dedup -> retrieve -> cluster -> sample -> export -> report, all on S3."""
    from webcurate.curation.curate import run_curate
    from webcurate.shards import storage

    pool, seeds, out = f"{s3_bucket}/pool", f"{s3_bucket}/seeds", f"{s3_bucket}/curated"
    # 30 pictures + 4 re-encoded copies of pictures 0..3 (planted near-duplicates), in 2 shards.
    copies = {30 + i: i for i in range(4)}
    keys = cd.write_dataset(pool, 34, shard_size=17, copies=copies)
    cd.write_dataset(seeds, 3, shard_size=3, prefix="s")
    config = tmp_path / "curate.yaml"
    config.write_text(f"""
input: {pool}
output: {out}
embed: {{model: vit_tiny_patch16_224, random_init: true, image_size: 32, batch_size: 16, dtype: float32}}
dedup: {{method: copy, k: 8, threshold: 0.97}}  # copies ~0.997, distinct pictures <= 0.90
retrieve: {{seeds: [{seeds}], k: 6}}
cluster: {{levels: [6, 2], resampling_steps: 2}}
sample: {{target: 8}}
""")
    res = run_curate(str(config), verbose=False)
    steps = {s["step"]: s for s in res["steps"]}
    assert [s["step"] for s in res["steps"]] == ["embed", f"embed {seeds}", "filter", "dedup", "retrieve", "cluster",
                                                  "sample", "export", "report"]
    assert all(s["outcome"] == "ran" for s in res["steps"] if s["step"] != "filter")
    ds = Dataset(pool)
    for stage in ("embeddings", "dedup", "retrieve", "clusters", "sample"):
        assert ds.sidecar_completed(stage) == [0, 1], stage
    # Every planted copy lost against its original (or the other way round): one survivor per pair.
    dd = {r["key"]: r for r in ds.read_sidecar("dedup").to_pylist()}
    for copy, orig in copies.items():
        assert dd[keys[copy]]["keep"] + dd[keys[orig]]["keep"] == 1
    # Clustering worked on the retrieved samples; the sample is a subset of them.
    retrieved = {r["key"] for r in ds.read_sidecar("retrieve").to_pylist() if r["selected"]}
    sampled = {r["key"] for r in ds.read_sidecar("sample").to_pylist() if r["selected"]}
    assert len(sampled) == min(8, len(retrieved)) and sampled <= retrieved
    # Export: the sample, bytes identical, fields merged, parent recorded.
    out_ds = Dataset(out)
    assert out_ds.manifest["parent"] == pool
    src = {s.key: s.image for sh in ds.completed_shards() for s in ds.iter_samples(sh)}
    exported = {s.key: s for sh in out_ds.completed_shards() for s in out_ds.iter_samples(sh)}
    assert set(exported) == sampled
    for k, s in exported.items():
        assert hashlib.sha256(s.image).digest() == hashlib.sha256(src[k]).digest()
        assert s.meta["curation_selection"] == "sample" and s.meta["retrieval_selected"] is True
        assert s.meta["retrieval_seed_dataset"] == seeds and "cluster_level_2" in s.meta
    # Report on S3, with the stage sections.
    assert res["report"] == f"{pool}/report.html"
    page = storage.read_bytes(res["report"]).decode()
    for sid in ("sec-overview", "sec-clusters", "sec-cluster-sizes", "sec-duplicates", "sec-retrieval"):
        assert f'id="{sid}"' in page
    assert "curate: " in capsys.readouterr().out  # the summary table

    again = run_curate(str(config), verbose=False)
    outcomes = {s["step"]: s["outcome"] for s in again["steps"]}
    assert outcomes == {**{s: "complete already" for s in steps if s not in ("report", "filter")},
                        "filter": "off", "report": "ran"}
