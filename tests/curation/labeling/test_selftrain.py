"""`webcurate selftrain`: rounds of pseudo-labels on frozen embeddings, open-set rejection,
the label output format, resume after a killed round, and the bad inputs it must name."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from webcurate.curation.labeling.cli import selftrain
from webcurate.curation.labeling.params import SelfTrainParams
from webcurate.curation.labeling.selftrain_stage import run_selftrain
from webcurate.curation.labeling.workflow import run_label
from webcurate.shards.dataset import Dataset
from webcurate.shards.errors import USER_ERRORS

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "docs", "examples",
                       "lfs_example.py")


@pytest.fixture
def world(tmp_path, gen):
    """Pool: 90 class items + 10 distractors (3 shards); 15 seeds; dev: 45 items + 6 'none' examples."""
    items = gen.make_items(90, seed=1) + gen.make_distractors(10, seed=5)
    np.random.default_rng(0).shuffle(items)
    paths = {k: str(tmp_path / k) for k in ("pool", "seed", "dev")}
    gen.write_dataset(paths["pool"], items, shard_size=34)
    gen.write_dataset(paths["seed"], gen.make_items(15, seed=11), shard_size=15, labelled=True)
    gen.write_dataset(paths["dev"], gen.make_items(45, seed=12) + gen.make_distractors(6, seed=6), shard_size=51,
                      labelled=True)
    truth = {it["key"]: (gen.CLASSES[it["y"]] if it["y"] >= 0 else None) for it in items}
    return paths, truth


def _params(world, tmp_path, **kw):
    paths, _ = world
    return SelfTrainParams(**{"input": paths["pool"], "seed": paths["seed"], "dev": paths["dev"],
                              "output": str(tmp_path / "out"), "max_rounds": 3, **kw})


def test_selftrain_writes_the_label_format_and_leaves_distractors_unlabelled(world, tmp_path, ray_local):
    paths, truth = world
    labels = str(tmp_path / "labels")  # the label model's output: the prior, and what agreement is measured with
    run_label(paths["pool"], EXAMPLE, labels, quiet=True)
    out = str(tmp_path / "out")
    args = ["--input", paths["pool"], "--seed", paths["seed"], "--dev", paths["dev"], "--labels", labels,
            "--output", out, "--max-rounds", "3"]
    res = CliRunner().invoke(selftrain, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "selftrain: rounds" in res.output and "rejected as no class" in res.output

    ds = Dataset(out)
    assert ds.manifest["stage"] == "selftrain" and ds.manifest["parent"] == paths["pool"]
    samples = [s for sh in ds.completed_shards() for s in ds.iter_samples(sh)]
    for s in samples:
        m = s.meta
        assert len(m["label_prob"]) == 3 and abs(sum(m["label_prob"]) - 1) < 1e-4
        assert m["label_model"] == "selftrain" and m["label_sources"][0].startswith("selftrain:")
    real = [k for k, v in truth.items() if v is not None]
    labelled = {s.key: s.meta["label"] for s in samples}
    assert sum(labelled.get(k) == truth[k] for k in real) / len(real) >= 0.9  # covered and right
    distractors = [k for k, v in truth.items() if v is None]
    assert sum(k not in labelled for k in distractors) / len(distractors) >= 0.9
    assert any(s.meta["label_sources"] == ["selftrain:round_1"] for s in samples)

    table = pq.read_table(os.path.join(out, "pseudo_labels.parquet")).to_pylist()
    assert len(table) == 100 and sum(r["rejected"] for r in table) >= 9
    result = json.loads(open(os.path.join(out, "selftrain.json")).read())
    r1 = result["rounds"][0]
    assert r1["round"] == 1 and r1["added"] == sum(r1["added_per_class"].values()) > 0
    assert r1["dev_accuracy"] >= 0.9 and result["rejection"]["rejected"] >= 9
    assert result["classes"] == ["cat", "dog", "bird"], "the class order of the --labels run"
    assert r1["label_model_agreement"] >= 0.6

    from webcurate.curation.labeling import report_section  # noqa: F401 - registers the sections
    from webcurate.curation.report import build_report

    page = build_report(out)
    assert "Self-training rounds" in page and "rejected as none of the classes" in page
    assert "this section failed" not in page

    # As a step of `webcurate run`: the same section finds the output complete.
    from webcurate.pipeline.config_run import run_pipeline

    sec = {"input": paths["pool"], "seed": paths["seed"], "dev": paths["dev"], "labels": labels, "output": out,
           "max_rounds": 3}
    (step,) = [r for r in run_pipeline({"selftrain": sec}) if r.step == "selftrain"]
    assert step.outcome == "complete already"


def _data_files(root):
    """The dataset's bytes: shards, index and the pseudo-label table (not timings or bookkeeping)."""
    out = {"pseudo_labels.parquet": open(os.path.join(root, "pseudo_labels.parquet"), "rb").read()}
    for sub in ("shards", "index"):
        for f in sorted(os.listdir(os.path.join(root, sub))):
            out[f"{sub}/{f}"] = open(os.path.join(root, sub, f), "rb").read()
    return out


def test_a_killed_round_resumes_and_ends_identically(world, tmp_path, ray_local):
    whole = str(tmp_path / "whole")
    first = run_selftrain(_params(world, tmp_path, output=whole), quiet=True)
    last = first.state.rounds_done
    assert last >= 2
    # What a kill during the last round leaves behind: the saved state of the rounds before it.
    out = str(tmp_path / "killed")
    shutil.copytree(os.path.join(whole, "_selftrain"), os.path.join(out, "_selftrain"))
    os.remove(os.path.join(out, "_selftrain", f"round-{last:04d}.npz"))
    again = run_selftrain(_params(world, tmp_path, output=out), quiet=True)
    assert again.resumed_after == last - 1
    assert [s["added"] for s in again.state.summaries] == [s["added"] for s in first.state.summaries]
    a, b = _data_files(whole), _data_files(out)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "resumed output differs"
    # Other parameters with the same output are refused rather than mixed in.
    with pytest.raises(USER_ERRORS, match="holds a self-training run of other parameters"):
        run_selftrain(_params(world, tmp_path, output=out, threshold=0.8), quiet=True)


def test_bad_inputs_are_one_line_errors_naming_the_field(world, tmp_path, gen):
    paths, _ = world
    one = str(tmp_path / "one")
    gen.write_dataset(one, [it for it in gen.make_items(20, seed=3) if it["y"] == 0], shard_size=20, labelled=True)
    with pytest.raises(USER_ERRORS, match=r"seed dataset .*one: field `label` holds 1 class\(es\) \(cat\)"):
        run_selftrain(_params(world, tmp_path, seed=one, output=None), quiet=True)

    wide = str(tmp_path / "wide")
    items = gen.make_items(15, seed=11)
    for it in items:
        it["embedding"] = np.concatenate([it["embedding"], it["embedding"]])
    gen.write_dataset(wide, items, shard_size=15, labelled=True)
    with pytest.raises(USER_ERRORS, match=r"seed dataset .*wide: field `embedding` has dimension 32, the pool's .* 16"):
        run_selftrain(_params(world, tmp_path, seed=wide, output=None), quiet=True)

    other = str(tmp_path / "other")
    gen.write_dataset(other, gen.make_items(15, seed=11), shard_size=15, labelled=True, model="resnet50")
    with pytest.raises(USER_ERRORS, match=r"field `embeddings.model` is 'resnet50', the pool's is 'test'"):
        run_selftrain(_params(world, tmp_path, seed=other, output=None), quiet=True)

    with pytest.raises(USER_ERRORS, match=r"threshold 0.9999 keeps no pool sample in round 1"):
        run_selftrain(_params(world, tmp_path, threshold=0.9999, output=None, dev=None), quiet=True)

    bad_dev = str(tmp_path / "bad_dev")
    dev_items = gen.make_items(10, seed=4)
    dev_items[0]["label"] = "horse"
    gen.write_dataset(bad_dev, dev_items, shard_size=10, labelled=True)
    with pytest.raises(USER_ERRORS, match=r"dev dataset .*bad_dev: field `label` has class names not in the class "
                                          r"list \['bird', 'cat', 'dog'\]: \['horse'\]"):
        run_selftrain(_params(world, tmp_path, dev=bad_dev, output=None), quiet=True)

    with pytest.raises(USER_ERRORS, match=r"selftrain.threshold_mode: Input should be 'fixed' or 'top_percent'"):
        from webcurate.shards.params import parse

        parse(SelfTrainParams, {"input": "a", "seed": "b", "threshold_mode": "best"}, "run.yaml", section="selftrain")


def test_top_percent_adds_the_most_confident_share_of_each_class(world, tmp_path):
    run = run_selftrain(_params(world, tmp_path, output=None, threshold_mode="top_percent", top_percent=50,
                                max_rounds=1), quiet=True)
    added = run.state.summaries[0]["added_per_class"]
    kept = run.final.in_set >= run.final.abstain_below
    predicted = np.bincount(run.final.probs[kept].argmax(axis=1), minlength=3)
    for c, name in enumerate(run.classes):  # half (rounded up) of each class's candidates
        assert abs(added[name] - np.ceil(predicted[c] / 2)) <= 3


def test_pseudo_labels_that_lower_dev_accuracy_are_left_out(world, tmp_path):
    from webcurate.curation.labeling.selftrain import RoundState, SelfTrainer
    from webcurate.curation.labeling.selftrain_data import load_inputs

    p = _params(world, tmp_path, output=None)
    data, _ = load_inputs(p.input, p.seed, p.dev, None, None, "none")
    trainer = SelfTrainer(data, p)
    empty = RoundState.empty(len(data.pool_keys))
    seeds_only = trainer.fit(empty, 1)
    # A round whose pseudo-labels are all wrong: every pool sample called `bird` (a fifth of them are).
    wrong = RoundState(np.full(len(data.pool_keys), 0), np.ones(len(data.pool_keys), np.int64),
                       [{"round": 1, "added": len(data.pool_keys), "dev_accuracy": seeds_only.dev_accuracy}])
    f, used = trainer.final(wrong)
    assert (used.label < 0).all(), "the harmful round is not used"
    assert f.dev_accuracy == seeds_only.dev_accuracy
    assert RoundState(wrong.label, wrong.round, wrong.summaries + [{"dev_accuracy": 0.2}]).dev_dropped
    assert trainer.l2 in (1e-3, 1e-2, 1e-1, 1.0)  # picked on the dev set
