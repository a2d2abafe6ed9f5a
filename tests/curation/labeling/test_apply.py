"""Applying LFs over shards as real Ray tasks: the votes sidecar, per-sample
LF errors, per-LF error counts, resume."""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np

from webcurate.curation.labeling.apply import STAGE, apply_lfs, read_votes
from webcurate.curation.labeling.lf import load_lf_file
from webcurate.shards.dataset import Dataset

LFS = '''
from webcurate.curation.labeling import labeling_function, ABSTAIN
from webcurate.curation.labeling import factories as F
CLASSES = ["cat", "dog", "bird"]
kw = F.keyword_lfs({"cat": ["cat", "kitten"], "dog": ["dog", "puppy"], "bird": ["bird", "sparrow"]}, CLASSES)
domain = F.domain_lf({"cats.example.org": "cat", "dogs.example.com": "dog", "birds.example.net": "bird"}, CLASSES)

@labeling_function()
def fragile(x):
    # Breaks on captions of odd-numbered items: a bug in the LF, not the data.
    if int(x.caption.split("#")[1]) % 2:
        raise ZeroDivisionError("odd item")
    return "bird" if x.width > x.height else ABSTAIN
'''


def lf_file(tmp_path, text=LFS, name="lfs.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def part_mtimes(root):
    d = os.path.join(root, STAGE)
    return {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in sorted(os.listdir(d)) if f.startswith("part-")}


def test_votes_sidecar_has_a_column_per_lf_and_errors_per_sample(pets, tmp_path, ray_local):
    root, items = pets
    lfset = load_lf_file(lf_file(tmp_path))
    summary = apply_lfs(root, lfset, lfset.classes, summary=False)
    votes = read_votes(root, lfset.names)
    assert votes.L.shape == (90, 5) and votes.keys == [it["key"] for it in items]
    by_key = {it["key"]: it for it in items}
    for i, key in enumerate(votes.keys):
        it = by_key[key]
        n = int(it["caption"].split("#")[1])
        if n % 2:
            assert votes.L[i, 4] == -1
            assert json.loads(votes.errors[i]) == {"fragile": "ZeroDivisionError: odd item"}
        else:
            assert votes.L[i, 4] == (2 if it["y"] == 2 else -1)  # wide images are birds
            assert votes.errors[i] is None
        if "example.org" in it["source"] or "example.net" in it["source"] or "dogs." in it["source"]:
            assert votes.L[i, 3] == it["y"]
    assert summary.total == 90
    assert summary.errors == {"keyword_cat": 0, "keyword_dog": 0, "keyword_bird": 0, "domain": 0, "fragile": 45}
    assert summary.first_errors == {"fragile": "ZeroDivisionError: odd item"}
    m = Dataset(root).reload().manifest["stages"][STAGE]
    assert m["completed_shards"] == [0, 1, 2] and m["counts"]["errors:fragile"] == 45
    assert m["parameters"]["sidecars"] == ["embeddings"]


def test_rerun_resumes_missing_shards_only_and_a_changed_lf_file_restarts(pets, tmp_path, ray_local):
    root, _ = pets
    path = lf_file(tmp_path)
    lfset = load_lf_file(path)
    apply_lfs(root, lfset, lfset.classes, summary=False)
    first = part_mtimes(root)
    # A killed run: shard 1's part never got written.
    os.unlink(os.path.join(root, STAGE, "part-00001.parquet"))
    apply_lfs(root, lfset, lfset.classes, summary=False)
    second = part_mtimes(root)
    assert second["part-00000.parquet"] == first["part-00000.parquet"]
    assert second["part-00002.parquet"] == first["part-00002.parquet"]
    assert "part-00001.parquet" in second
    # Same file again: nothing to do.
    apply_lfs(root, lfset, lfset.classes, summary=False)
    assert part_mtimes(root) == second
    # Edited LF file: every shard is redone and has the new LF's column.
    path2 = lf_file(tmp_path, LFS + "\nextra = F.size_lf('cat', CLASSES, max_aspect=1.0, name='square_cat')\n",
                    name="lfs2.py")
    lfset2 = load_lf_file(path2)
    apply_lfs(root, lfset2, lfset2.classes, summary=False)
    third = part_mtimes(root)
    assert all(third[p] != second[p] for p in third)
    votes = read_votes(root, lfset2.names)
    assert votes.lf_names[-1] == "square_cat" and (votes.L[:, -1] != -1).sum() > 0


def test_snorkel_style_lf_file_runs_on_ray_workers(pets, tmp_path, ray_local):
    root, items = pets
    lfset = load_lf_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "snorkel_style_lfs.py"))
    apply_lfs(root, lfset, lfset.classes, summary=False)
    votes = read_votes(root, lfset.names)
    caps = {it["key"]: it["caption"].lower() for it in items}
    expect_cat = np.array(["cat" in caps[k] for k in votes.keys])
    assert np.array_equal(votes.L[:, 0] == 0, expect_cat)
