"""The README's second command, `webcurate demo`, end to end in a fresh process
(local Ray, local disk), with a short training run to keep the suite fast."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from webcurate.shards import Dataset

WEBCURATE = str(pathlib.Path(sys.executable).parent / "webcurate")

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_flow_and_says_where_the_outputs_are(tmp_path):
    work = tmp_path / "demo"
    env = dict(os.environ, WEBCURATE_QUIET="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([WEBCURATE, "demo", "--workdir", str(work), "--max-steps", "4"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "webcurate demo finished" in proc.stdout and "pseudo-labels vs the corpus's hidden true labels" in out
    raw = Dataset(str(work / "data" / "raw"))
    counts = raw.manifest["counts"]
    assert counts["failed"] >= 4, "the broken links are recorded as failures"
    assert counts["total"] == counts.get("ok", 0) + counts["failed"] + counts.get("duplicate", 0)
    curated = Dataset(str(work / "data" / "curated"))
    assert curated.manifest["parent"] == str(work / "data" / "raw")
    assert 0 < len(curated.ok_keys()) < counts["ok"]
    assert (work / "runs" / "tiny-dino" / "backbone.safetensors").exists()
    labelled = Dataset(str(work / "data" / "labelled"))
    assert labelled.ok_keys() and set(labelled.ok_keys()) <= set(curated.ok_keys())
    curation_page = (work / "data" / "curated" / "report.html").read_text()
    assert curation_page.count("<img") >= 10 and 'id="sec-labelling-functions"' in curation_page
    label_page = (work / "data" / "labelled" / "report.html").read_text()
    assert 'id="sec-pseudo-labels"' in label_page and "LF analysis of this run" in label_page
    # Self-training leaves the distractor banners unlabelled and keeps the photos of the classes.
    line = re.search(r"selftrain: distractors left unlabelled (\d+)/(\d+), photos of the classes labelled (\d+)/(\d+)",
                     proc.stdout)
    assert line, out[-3000:]
    rejected, distractors, covered, photos = map(int, line.groups())
    assert distractors >= 5 and rejected / distractors >= 0.9 and covered / photos >= 0.9, line.group(0)
    st_page = (work / "data" / "selftrained" / "report.html").read_text()
    assert "Self-training rounds" in st_page and "rejected as none of the classes" in st_page
