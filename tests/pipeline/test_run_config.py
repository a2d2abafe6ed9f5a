"""`webcurate run` validates every section before any work starts (issue 17.6).

A wrong-typed value anywhere in the pipeline YAML is one line naming the
section and field, exit 2, and nothing is written: no dataset, no Ray start.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from webcurate.pipeline.config_run import load_pipeline, run_pipeline
from webcurate.shards.errors import ConfigError

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "docs" / "examples"


def _pipeline(tmp_path, **changes):
    """A small local pipeline whose steps all reach validation; ``changes`` patch ``step.key``."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    cfg = {
        "shard": {"input": str(images), "output": str(tmp_path / "ds"), "shard_size": 10},
        "curate": {"output": str(tmp_path / "cur"), "embed": {"model": "resnet18", "random_init": True},
                   "dedup": {"k": 8}, "sample": {"target": 5}},
        "train": {"output": str(tmp_path / "run"), "config": str(EXAMPLES / "train_cifar_tiny.yaml"),
                  "max_steps": 2},
        "label": {"lfs": str(EXAMPLES / "lfs_example.py"), "output": str(tmp_path / "lab")},
    }
    for dotted, value in changes.items():
        step, key = dotted.split("__", 1)
        node = cfg[step]
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


@pytest.mark.parametrize("change, named", [
    ({"shard__image_size": "big"}, "shard.image_size"),
    ({"shard__retries": "two"}, "shard.retries"),
    ({"curate__dedup__k": "lots"}, "dedup.k"),
    ({"curate__sample__target": -3}, "sample.target"),
    ({"train__max_steps": "many"}, "train.max_steps"),
    ({"train__overrides": ["loader.batch_size=huge"]}, "loader.batch_size"),
    ({"label__min_confidence": "high"}, "label.min_confidence"),
])
def test_a_wrong_typed_value_in_any_step_is_refused_before_any_work(tmp_path, change, named):
    cfg = _pipeline(tmp_path, **change)
    with pytest.raises(ConfigError) as e:
        run_pipeline(cfg)
    assert named in str(e.value)
    assert not (tmp_path / "ds").exists(), "the shard step ran before the config was checked"


def test_unknown_keys_in_a_step_are_refused_with_the_field(tmp_path):
    cfg = _pipeline(tmp_path)
    cfg["train"]["max_step"] = 3
    with pytest.raises(ConfigError, match=r"train\.max_step: unknown key"):
        run_pipeline(cfg)


def test_the_example_pipeline_validates():
    raw = load_pipeline(str(EXAMPLES / "pipeline.yaml"))
    assert {"shard", "curate", "train", "label"} <= set(raw)


def test_the_cli_shows_one_line_and_exits_2(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_pipeline(tmp_path, shard__image_size="big")))
    exe = os.path.join(os.path.dirname(sys.executable), "webcurate")
    r = subprocess.run([exe, "run", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "shard.image_size" in lines[0]
    assert "Traceback" not in r.stderr
