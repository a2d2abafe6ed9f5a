"""`webcurate label` end to end: LF file -> votes (Ray) -> label model ->
pseudo-labelled dataset; and the bad inputs it must explain in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from webcurate.curation.labeling.cli import label
from webcurate.curation.labeling.workflow import run_label
from webcurate.shards.errors import USER_ERRORS
from webcurate.shards import storage
from webcurate.shards.dataset import Dataset

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "..", "..", "docs", "examples", "lfs_example.py")


def seeded_lfs(tmp_path, seed_root):
    """The example LF file with its seed dataset filled in (kNN + prototype LFs)."""
    text = open(EXAMPLE).read().replace("SEED_DATASET = None", f"SEED_DATASET = {seed_root!r}")
    p = tmp_path / "lfs.py"
    p.write_text(text)
    return str(p)


@pytest.fixture
def seed_and_dev(tmp_path, gen):
    seed = str(tmp_path / "seed")
    gen.write_dataset(seed, gen.make_items(15, seed=11), shard_size=15, labelled=True)
    dev = str(tmp_path / "dev")
    dev_items = gen.make_items(45, seed=12)
    gen.write_dataset(dev, dev_items, shard_size=15, labelled=True)
    return seed, dev


def test_label_command_writes_the_pseudo_labelled_dataset(pets, seed_and_dev, tmp_path, ray_local, gen):
    root, items = pets
    seed, dev = seed_and_dev
    out = str(tmp_path / "labelled")
    args = ["--input", root, "--lfs", seeded_lfs(tmp_path, seed), "--output", out, "--dev", dev,
            "--min-confidence", "0.7", "--per-class-cap", "30"]
    res = CliRunner().invoke(label, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "LF analysis" in res.output and "knn_seed" in res.output and "emp_accuracy" in res.output

    truth = {it["key"]: gen.CLASSES[it["y"]] for it in items}
    out_ds = Dataset(out)
    assert out_ds.manifest["parent"] == root and out_ds.manifest["stage"] == "label"
    samples = [s for sh in out_ds.completed_shards() for s in out_ds.iter_samples(sh)]
    assert 40 <= len(samples) <= 90
    per_class: dict[str, int] = {}
    for s in samples:
        m = s.meta
        assert m["label"] in gen.CLASSES and len(m["label_prob"]) == 3
        assert abs(sum(m["label_prob"]) - 1) < 1e-4 and m["label_confidence"] >= 0.7
        assert m["label_prob"][gen.CLASSES.index(m["label"])] == m["label_confidence"]
        assert isinstance(m["label_sources"], list)
        per_class[m["label"]] = per_class.get(m["label"], 0) + 1
    assert max(per_class.values()) <= 30
    acc = np.mean([s.meta["label"] == truth[s.key] for s in samples])
    assert acc >= 0.85
    # Every input item is listed in the side table, selected or not.
    table = pq.read_table(os.path.join(out, "pseudo_labels.parquet")).to_pylist()
    assert len(table) == 90 and sum(r["selected"] for r in table) == len(samples)
    model = json.loads(storage.read_bytes(os.path.join(out, "label_model.json")))
    assert model["classes"] == gen.CLASSES and model["dev"]["labelmodel_accuracy"] >= 0.8

    # The HTML report gets LF stats with example images per vote, and the pseudo-label grid.
    from webcurate.curation.labeling import report_section  # registers the sections
    from webcurate.curation.report import build_report

    page = build_report(root)
    assert 'id="sec-labelling-functions"' in page and "knn_seed" in page and "votes bird" in page
    assert page.count("<img") >= 20
    page = build_report(out)
    assert 'id="sec-pseudo-labels"' in page and "most / least confident" in page and "this section failed" not in page
    assert "LF analysis of this run" in page and "dev accuracy" in page, "the report shows the LFs' dev accuracy"
    knn_row = next(st for st in model["lf_stats"] if st["name"] == "knn_seed")
    assert knn_row["emp_accuracy"] is not None and f"{knn_row['emp_accuracy']:.3f}" in page
    assert report_section.lf_section(Dataset(out)) is None


def test_majority_model_and_class_list_from_config(pets, tmp_path, ray_local, gen):
    root, items = pets
    lfs = tmp_path / "lfs.py"
    lfs.write_text(textwrap.dedent('''
        from webcurate.curation.labeling import factories as F
        kw = F.keyword_lfs({"cat": ["cat"], "dog": ["dog"], "bird": ["bird"]}, ["cat", "dog", "bird"])
    '''))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("classes: [cat, dog, bird]\n")
    run = run_label(root, str(lfs), str(tmp_path / "o"), config=str(cfg), model="majority", quiet=True)
    assert run.classes == gen.CLASSES
    named = {it["key"]: any(w in it["caption"].split() for w in gen.CLASSES) for it in items}
    assert np.array_equal(run.pred >= 0, [named[k] for k in run.keys])
    # Keyword LFs never conflict here except on wrong captions: majority = the single vote.
    single = (run.L != -1).sum(axis=1) == 1
    assert np.array_equal(run.pred[single], run.L[single].max(axis=1))


def _lf(tmp_path, body, classes=("cat", "dog", "bird")):
    p = tmp_path / "lfs.py"
    p.write_text("from webcurate.curation.labeling import labeling_function, ABSTAIN\n"
                 f"CLASSES = {list(classes)!r}\n" + textwrap.dedent(body))
    return str(p)


def test_lf_file_that_does_not_import_is_a_one_line_user_error(pets, tmp_path):
    root, _ = pets
    path = _lf(tmp_path, "import not_a_module_abc\n")
    with pytest.raises(USER_ERRORS, match=r"lfs.py does not import: ModuleNotFoundError: .*not_a_module_abc"):
        run_label(root, path, str(tmp_path / "o"), quiet=True)


def test_all_lfs_abstaining_is_a_clear_error(pets, tmp_path, ray_local):
    root, _ = pets
    path = _lf(tmp_path, '''
        @labeling_function()
        def never(x):
            return ABSTAIN
    ''')
    with pytest.raises(USER_ERRORS, match=r"all 1 LFs abstain on all 90 items"):
        run_label(root, path, str(tmp_path / "o"), quiet=True)


def test_lf_out_of_range_stops_the_run_naming_the_lf(pets, tmp_path, ray_local):
    root, _ = pets
    path = _lf(tmp_path, '''
        @labeling_function()
        def ok_lf(x):
            return 0 if "cat" in x.caption else ABSTAIN

        @labeling_function()
        def bad_index(x):
            return 3
    ''')
    with pytest.raises(USER_ERRORS, match=r"LF `bad_index` failed on 90 of 90 samples \(first error: ValueError: "
                                          r"LF `bad_index` returned 3, not a class index in \[-1, 2\]"):
        run_label(root, path, str(tmp_path / "o"), quiet=True)
    # Allowed to go on, the broken LF just abstains everywhere.
    run = run_label(root, path, None, max_lf_error_rate=1.0, quiet=True)
    assert (run.L[:, 1] == -1).all() and (run.L[:, 0] != -1).any()


def test_dev_set_with_unknown_class_names_names_the_field(pets, tmp_path, ray_local, gen):
    root, _ = pets
    dev = str(tmp_path / "dev")
    items = gen.make_items(10, seed=3)
    gen.write_dataset(dev, items, shard_size=10, labelled=True)
    path = _lf(tmp_path, '''
        @labeling_function()
        def cat(x):
            return 0 if "cat" in x.caption else ABSTAIN
    ''', classes=["cat", "dog", "fish"])
    with pytest.raises(USER_ERRORS, match=r"dev dataset .*: field `label` has class names not in the class list "
                                          r"\['cat', 'dog', 'fish'\]: \['bird'\]"):
        run_label(root, path, None, dev=dev, quiet=True)


def test_label_on_s3_in_a_fresh_process(s3_bucket, tmp_path, gen):
    """Input, votes sidecar and output on a real S3 endpoint, run as a user
    would (its own process and its own local Ray, which inherits the S3 env)."""
    root = f"{s3_bucket}/pets"
    gen.write_dataset(root, gen.make_items(40, seed=2), shard_size=20)
    out = f"{s3_bucket}/labelled"
    code = "import sys; from webcurate.curation.labeling.cli import label; label(sys.argv[1:])"
    env = dict(os.environ, WEBCURATE_QUIET="1")
    proc = subprocess.run([sys.executable, "-c", code, "--input", root, "--lfs", EXAMPLE, "--output", out,
                           "--workers", "2"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out_ds = Dataset(out)
    assert out_ds.completed_shards() == [0, 1]
    assert Dataset(root).sidecar_completed("lf_votes") == [0, 1]
    labels = out_ds.index(columns=["label"])["label"].to_pylist()
    assert len(labels) >= 30 and set(labels) <= set(gen.CLASSES)
    assert storage.exists(f"{out}/pseudo_labels.parquet")


def test_auto_model_takes_the_more_accurate_on_dev(pets, seed_and_dev, tmp_path, ray_local):
    root, _ = pets
    seed, dev = seed_and_dev
    run = run_label(root, seeded_lfs(tmp_path, seed), None, dev=dev, model="auto", quiet=True)
    best = "labelmodel" if run.dev["labelmodel_accuracy"] > run.dev["majority_accuracy"] else "majority"
    assert run.dev["chosen_model"] == best and run.dev["chosen_by"] == "dev accuracy"
    assert type(run.model).__name__ == {"majority": "MajorityVote", "labelmodel": "LabelModel"}[best]
    run = run_label(root, seeded_lfs(tmp_path, seed), None, model="auto", quiet=True)
    assert run.dev["chosen_by"].startswith("held-out LF agreement")
    z = run.dev["held_out_z"]
    assert run.dev["chosen_model"] == ("labelmodel" if z > 2 else "majority")
