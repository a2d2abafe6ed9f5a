"""Records (what an LF sees) and the built-in LF factories."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

from webcurate.curation.labeling import factories as F
from webcurate.curation.labeling.apply import apply_to_records
from webcurate.curation.labeling.lf import ABSTAIN
from webcurate.curation.labeling.records import Record, RecordBatch, available_sidecars, shard_records
from webcurate.shards.errors import ConfigError
from webcurate.shards import manifest as manifest_mod, storage
from webcurate.shards.dataset import Dataset

CLASSES = ["cat", "dog", "bird"]


def add_sidecar(root, stage, shard, table):
    manifest_mod.record_stage(root, stage, {"test": True})
    Dataset(root).write_sidecar(stage, shard, table)
    manifest_mod.record_shard(root, shard, {"counts": {"total": table.num_rows}}, stage=stage)


def test_record_holds_index_json_caption_url_image_and_sidecars(pets, gen):
    root, items = pets
    ds = Dataset(root)
    keys = [it["key"] for it in items[:30]]
    add_sidecar(root, "clusters", 0, pa.table({"key": keys[:20], "status": ["ok"] * 20,
                                              "level_1": pa.array(np.arange(20) % 4, pa.int32()),
                                              "level_2": pa.array(np.arange(20) % 2, pa.int32()),
                                              "distance": pa.array(np.ones(20), pa.float32())}))
    add_sidecar(root, "retrieve", 0, pa.table({"key": keys[:5], "score": [0.9] * 5, "seed_key": ["s1"] * 5}))
    stages = available_sidecars(ds)
    assert stages == {"embeddings": [0, 1, 2], "clusters": [0], "retrieve": [0]}
    recs = shard_records(ds, 0, sidecars=list(stages))
    assert isinstance(recs, RecordBatch) and len(recs) == 30
    r = recs[1]
    assert r.key == keys[1] and r["caption"] == items[1]["caption"]
    assert r.url == r.source == items[1]["source"]
    assert (r.width, r.height) == items[1]["size"] and r.ext == "jpg"
    np.testing.assert_allclose(r.embedding, items[1]["embedding"], rtol=1e-6)
    assert recs.columns["embedding"].shape == (30, gen.DIM)
    assert (r.level_1, r.level_2, r.cluster_distance) == (1, 1, 1.0)
    assert (r.retrieval_score, r.retrieval_seed_key) == (0.9, "s1")
    assert recs[25].level_1 is None and recs[25].retrieval_score is None  # no row in that sidecar
    assert r.image.size == items[1]["size"]  # decoded lazily from the shard's bytes
    with pytest.raises(AttributeError, match="record has no field 'colour'"):
        r.colour


def test_failed_samples_get_no_record(tmp_path, gen):
    items = gen.make_items(12, seed=5)
    ds = gen.write_dataset(str(tmp_path / "d"), items, shard_size=12, failed_every=4)
    recs = shard_records(ds, 0, sidecars=["embeddings"])
    assert len(recs) == 9
    assert all(r.status == "ok" for r in recs)


def test_keyword_lfs_match_whole_words_case_insensitively():
    cat, dog = F.keyword_lfs({"cat": ["cat", "kitten"], "dog": ["dog"]}, CLASSES)
    assert cat.name == "keyword_cat"
    assert cat(Record(caption="A Kitten sleeping")) == 0
    assert cat(Record(caption="concatenate")) == ABSTAIN  # not a word
    assert dog(Record(caption=None)) == ABSTAIN
    with pytest.raises(ConfigError, match="'cow' is not one of the classes"):
        F.keyword_lfs({"cow": ["moo"]}, CLASSES)


def test_url_and_domain_lfs():
    dom = F.domain_lf({"birds.example.net": "bird", "example.net": "dog"}, CLASSES)
    assert dom(Record(url="https://img.birds.example.net/a.jpg")) == 2  # longest suffix wins
    assert dom(Record(url="http://www.example.net/x")) == 1
    assert dom(Record(url="https://example.com/birds.example.net")) == ABSTAIN
    rx = F.url_regex_lf(r"/cats?/", "cat", CLASSES)
    assert rx(Record(url="https://x.org/cats/1.jpg")) == 0 and rx(Record(url="https://x.org/dogs/1")) == ABSTAIN


def test_size_lf_uses_width_height_and_aspect():
    wide = F.size_lf("bird", CLASSES, min_aspect=1.5, min_width=30)
    assert wide(Record(width=40, height=24)) == 2
    assert wide(Record(width=24, height=24)) == ABSTAIN
    assert wide(Record(width=None, height=None)) == ABSTAIN
    with pytest.raises(ConfigError, match="at least one bound"):
        F.size_lf("bird", CLASSES)


def _seed():
    rng = np.random.default_rng(0)
    centers = np.eye(3, 8, dtype=np.float32)
    emb = np.repeat(centers, 4, axis=0) + 0.05 * rng.normal(size=(12, 8)).astype(np.float32)
    return F.Seed.from_arrays(emb, [c for c in CLASSES for _ in range(4)], CLASSES)


def test_knn_vote_abstains_inside_the_margin_and_batch_matches_single():
    seed = _seed()
    knn = F.knn_lf(seed, k=4, margin=0.5)
    clear = np.array([1, 0.1, 0, 0, 0, 0, 0, 0], np.float32)
    between = np.array([1, 1, 0, 0, 0, 0, 0, 0], np.float32)
    recs = RecordBatch([Record(embedding=clear), Record(embedding=between), Record(embedding=None)])
    single = [knn(r) for r in recs]
    assert single == [0, ABSTAIN, ABSTAIN]
    assert knn.batch(recs).tolist() == single
    recs.columns["embedding"] = np.stack([clear, between, np.full(8, np.nan, np.float32)])
    assert knn.batch(recs).tolist() == single
    # The applier takes the batch path and gets the same votes.
    L, errors = apply_to_records([knn], recs, CLASSES)
    assert L[:, 0].tolist() == single and errors == [None] * 3


def test_prototype_lf_votes_the_nearest_class_mean():
    proto = F.prototype_lf(_seed(), margin=0.1)
    assert proto(Record(embedding=np.array([0, 0, 2, 0, 0, 0, 0, 0.1]))) == 2
    assert proto(Record(embedding=np.array([1, 1, 0, 0, 0, 0, 0, 0]))) == ABSTAIN


def test_cluster_vote_labels_clusters_by_their_seeds():
    seed = _seed()
    centroids = np.eye(4, 8, dtype=np.float32)  # cluster 3 gets no seed
    lf = F.cluster_vote_from_seed(seed, centroids, level=1)
    assert [lf(Record(level_1=c)) for c in (0, 1, 2, 3, None)] == [0, 1, 2, ABSTAIN, ABSTAIN]
    mixed = F.cluster_labels_from_members([5, 5, 5, 6, 6], [0, 0, 1, 1, 2], min_purity=0.6)
    assert mixed == {5: 0}  # cluster 6 is split 1-1, below the purity bar


def test_seed_dataset_loads_and_unknown_class_names_are_named(tmp_path, gen):
    items = gen.make_items(12, seed=7)
    root = str(tmp_path / "seed")
    gen.write_dataset(root, items, shard_size=6, labelled=True)
    seed = F.load_seed(root, gen.CLASSES)
    assert seed.embeddings.shape == (12, gen.DIM)
    np.testing.assert_allclose(np.linalg.norm(seed.embeddings, axis=1), 1, rtol=1e-5)
    assert [gen.CLASSES[i] for i in seed.labels] == [gen.CLASSES[it["y"]] for it in items]
    with pytest.raises(ConfigError, match=r"field `label` has class names not in the class list"):
        F.load_seed(root, ["cat", "dog"])


def test_centroids_file_of_the_cluster_stage_is_read(tmp_path):
    root = str(tmp_path / "d")
    buf = io.BytesIO()
    np.save(buf, np.eye(2, 3, dtype=np.float32))
    storage.write_bytes(storage.join(root, "clusters", "centroids_level_1.npy"), buf.getvalue())
    assert F.load_centroids(root, 1).shape == (2, 3)
    with pytest.raises(ConfigError, match="run `webcurate cluster`"):
        F.load_centroids(root, 2)
