"""`webcurate shard` parameters are checked before any work (issue 17.6), and a shard of bugs is not "complete"."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from webcurate.shards import manifest as manifest_mod
from webcurate.shards.download import FetchOptions
from webcurate.shards.errors import ConfigError
from webcurate.shards.image_ops import ImageOptions
from webcurate.shards.ingest import ingest_urls
from webcurate.shards.ingest_params import IngestParams
from webcurate.shards.params import parse
from webcurate.shards.stage import StageError


@pytest.mark.parametrize("field, value", [("image_size", "big"), ("retries", "two"), ("shard_size", 0),
                                          ("resize_mode", "squash"), ("threads", -1), ("quality", 101)])
def test_a_wrong_typed_shard_section_names_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        parse(IngestParams, {"input": "urls.txt", "output": "out", field: value}, "pipeline.yaml", section="shard")
    assert str(e.value).startswith(f"pipeline.yaml: shard.{field}:"), e.value


def test_numbers_given_as_text_are_read_as_numbers_and_unknown_keys_refused():
    p = parse(IngestParams, {"input": "u.txt", "output": "o", "shard_size": "10"}, "p.yaml", section="shard")
    assert p.shard_size == 10
    with pytest.raises(ConfigError, match=r"shard.read_timeout: unknown key; allowed: .*\btimeout\b"):
        parse(IngestParams, {"input": "u.txt", "output": "o", "read_timeout": 5}, "p.yaml", section="shard")
    with pytest.raises(ConfigError, match="output is required"):
        parse(IngestParams, {"input": "u.txt"}, "p.yaml", section="shard")


def test_webcurate_run_refuses_a_bad_shard_section_before_writing_anything(tmp_path):
    cfg = tmp_path / "pipeline.yaml"
    out = tmp_path / "ds"
    cfg.write_text(yaml.safe_dump({"shard": {"input": str(tmp_path / "urls.txt"), "output": str(out),
                                             "image_size": "big"}}))
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    env = dict(os.environ, WEBCURATE_QUIET="1")
    env.pop("RAY_ADDRESS", None)
    exe = os.path.join(os.path.dirname(sys.executable), "webcurate")
    r = subprocess.run([exe, "run", str(cfg)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "shard.image_size" in r.stderr and "'big'" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_a_shard_whose_every_row_is_an_internal_error_is_not_recorded_complete(image_server, ray_local, tmp_path):
    # Options that skip validation (as the run config once passed them) make every row a TypeError.
    (tmp_path / "urls.txt").write_text("\n".join(image_server.url(f"/good/{i}.jpg") for i in range(3)) + "\n")
    out = str(tmp_path / "ds")
    with pytest.raises(StageError, match="every sample of shard 00000 failed with an internal error"):
        ingest_urls(str(tmp_path / "urls.txt"), out, image_opts=ImageOptions(image_size="big"),
                    fetch_opts=FetchOptions(allow_private_addresses=True), summary=False)
    assert manifest_mod.completed_ids(out) == []  # a re-run retries it instead of keeping a shard of failures
    assert not os.path.exists(os.path.join(out, "index", "00000.parquet"))
