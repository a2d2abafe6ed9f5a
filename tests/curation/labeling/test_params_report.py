"""The label stage's parameters declared once (CLI, YAML section, errors naming the field),
the report templates' autoescape, and the LF-link forest helpers on scipy's graph routines."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from webcurate.curation.labeling.cli import label, lf_analysis
from webcurate.curation.labeling.lf_links import components, orient_forest, topological
from webcurate.curation.labeling.params import LabelParams
from webcurate.curation.labeling.report_section import render
from webcurate.shards.errors import ConfigError
from webcurate.shards.params import parse


def test_cli_options_come_from_the_model_and_keep_comma_lists():
    r = CliRunner().invoke(label, ["--help"])
    assert r.exit_code == 0
    out = " ".join(r.output.split())  # click wraps long help lines
    for text in ("--max-lf-error-rate", "[default: 0.5]", "--model [labelmodel|majority|auto]", "--class-balance"):
        assert text in out
    assert "--min-confidence" not in CliRunner().invoke(lf_analysis, ["--help"]).output
    p = parse(LabelParams, {"input": "d", "lfs": "f.py", "classes": "cat, dog", "class_balance": "1,3"})
    assert p.classes == ["cat", "dog"] and p.class_balance == [1.0, 3.0]


def test_bad_label_section_names_the_field():
    with pytest.raises(ConfigError, match=r"run.yaml: label.min_confidence: .*less than or equal to 1"):
        parse(LabelParams, {"input": "d", "lfs": "f.py", "min_confidence": 1.5}, "run.yaml", section="label")
    with pytest.raises(ConfigError, match=r"label.class_balance: .*comma-separated numbers"):
        parse(LabelParams, {"input": "d", "lfs": "f.py", "class_balance": "a,b"}, "run.yaml", section="label")
    with pytest.raises(ConfigError, match=r"label.lfs: required"):
        parse(LabelParams, {"input": "d"}, "run.yaml", section="label")
    r = CliRunner().invoke(label, ["--input", "d", "--lfs", "f.py", "--output", "o", "--model", "best"])
    assert r.exit_code == 2 and "--model" in r.output


def test_report_templates_escape_names_from_the_data():
    page = render("label_section.html.j2", lf_rows=[], lf_headers=(), dev_rows=[("<b>x</b>", "1")],
                  extra_tables=[], class_rows=[("<script>alert(1)</script>", 3, "0.9")], groups=[])
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page


def test_lf_forest_is_rooted_at_the_widest_lf_of_each_tree():
    edges = [(0, 1), (1, 2), (4, 3)]
    comp = components(5, edges)
    assert comp[0] == comp[1] == comp[2] != comp[3] and comp[3] == comp[4]
    parents = orient_forest(5, edges, root_score=np.array([1.0, 5.0, 2.0, 0.5, 0.5]))
    assert parents == [1, -1, 1, -1, 3]  # LF 1 covers most; ties go to the lower index
    order = topological(parents)
    assert all(order.index(p) < order.index(j) for j, p in enumerate(parents) if p >= 0)
