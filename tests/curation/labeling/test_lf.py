"""Labelling functions: the decorator, LF files, vote checking, Snorkel style."""
from __future__ import annotations

import os
import textwrap

import pytest

from webcurate.curation.labeling.apply import apply_to_records
from webcurate.curation.labeling.lf import (
    ABSTAIN, LFError, coerce_vote, is_lf_like, labeling_function, load_lf_file, resolve_classes,
)
from webcurate.curation.labeling.records import Record
from webcurate.shards.errors import ConfigError

CLASSES = ["cat", "dog"]


def write(tmp_path, text, name="lfs.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_decorator_passes_resources_and_runs_preprocessors():
    def lower(x):
        return Record(x, caption=x.caption.lower())

    @labeling_function(name="has_word", resources={"word": "cat"}, pre=[lower])
    def f(x, word):
        return 0 if word in x.caption else ABSTAIN

    assert f.name == "has_word"
    assert f(Record(caption="A CAT")) == 0
    assert f(Record(caption="a dog")) == ABSTAIN


def test_lf_file_gives_its_lfs_in_order_and_its_classes(tmp_path):
    path = write(tmp_path, """
        from webcurate.curation.labeling import labeling_function, ABSTAIN
        from webcurate.curation.labeling import factories as F
        CLASSES = ["cat", "dog"]

        @labeling_function()
        def first(x):
            return ABSTAIN

        kw = F.keyword_lfs({"cat": ["cat"], "dog": ["dog"]}, CLASSES)

        def helper(x):  # not decorated: not an LF
            return 0
    """)
    lfset = load_lf_file(path)
    assert lfset.names == ["first", "keyword_cat", "keyword_dog"]
    assert lfset.classes == CLASSES
    assert lfset.sha == load_lf_file(path).sha


def test_lfs_list_selects_the_lfs(tmp_path):
    path = write(tmp_path, """
        from webcurate.curation.labeling import labeling_function
        @labeling_function()
        def a(x): return 0
        @labeling_function()
        def b(x): return 1
        LFS = [b]
    """)
    assert load_lf_file(path).names == ["b"]


def test_lf_file_with_missing_import_names_file_and_module(tmp_path):
    path = write(tmp_path, "import numpy\nimport no_such_module_xyz\n")
    with pytest.raises(LFError, match=r"lfs.py does not import: ModuleNotFoundError: No module named "
                                      r"'no_such_module_xyz' \(line 2\)"):
        load_lf_file(path)


def test_lf_file_with_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "x = 1\ndef broken(:\n")
    with pytest.raises(LFError, match=r"syntax error at line 2"):
        load_lf_file(path)


def test_lf_file_raising_at_import_is_reported(tmp_path):
    path = write(tmp_path, "CLASSES = ['a']\nraise RuntimeError('seed set missing')\n")
    with pytest.raises(LFError, match="RuntimeError: seed set missing"):
        load_lf_file(path)


def test_missing_lf_file_and_empty_lf_file_are_clear(tmp_path):
    with pytest.raises(LFError, match="does not exist"):
        load_lf_file(str(tmp_path / "nope.py"))
    with pytest.raises(LFError, match="no labelling functions found"):
        load_lf_file(write(tmp_path, "X = 1\n"))


def test_duplicate_and_reserved_lf_names_are_refused(tmp_path):
    dup = write(tmp_path, """
        from webcurate.curation.labeling import labeling_function
        @labeling_function(name="same")
        def a(x): return 0
        @labeling_function(name="same")
        def b(x): return 1
    """, "dup.py")
    with pytest.raises(LFError, match="two LFs are named 'same'"):
        load_lf_file(dup)
    reserved = write(tmp_path, """
        from webcurate.curation.labeling import labeling_function
        @labeling_function(name="key")
        def a(x): return 0
    """, "reserved.py")
    with pytest.raises(LFError, match="'key' is reserved"):
        load_lf_file(reserved)


def test_votes_are_checked_and_name_the_lf():
    assert coerce_vote(1, "f", CLASSES) == 1
    assert coerce_vote("dog", "f", CLASSES) == 1
    assert coerce_vote(None, "f", CLASSES) == ABSTAIN
    with pytest.raises(ValueError, match=r"LF `f` returned 2, not a class index in \[-1, 1\]"):
        coerce_vote(2, "f", CLASSES)
    with pytest.raises(ValueError, match="LF `f` returned 'cow', which is not a class name"):
        coerce_vote("cow", "f", CLASSES)
    with pytest.raises(ValueError, match="returned a bool"):
        coerce_vote(True, "f", CLASSES)
    with pytest.raises(ValueError, match=r"returned 0.5"):
        coerce_vote(0.5, "f", CLASSES)


def test_an_lf_raising_abstains_and_records_the_error_for_that_sample():
    @labeling_function()
    def picky(x):
        if x.caption is None:
            raise KeyError("no caption")
        return 0

    @labeling_function()
    def out_of_range(x):
        return 7

    recs = [Record(caption="a"), Record(caption=None), Record(caption="b")]
    L, errors = apply_to_records([picky, out_of_range], recs, CLASSES)
    assert L[:, 0].tolist() == [0, ABSTAIN, 0]
    assert L[:, 1].tolist() == [ABSTAIN] * 3
    assert errors[0] == {"out_of_range": "ValueError: LF `out_of_range` returned 7, not a class index in "
                                         "[-1, 1] (classes: ['cat', 'dog'])"}
    assert errors[1]["picky"] == "KeyError: 'no caption'"


def test_record_missing_field_error_names_the_field():
    @labeling_function()
    def needs_emb(x):
        return 0 if x.embedding is not None else ABSTAIN

    _, errors = apply_to_records([needs_emb], [Record(caption="x")], CLASSES)
    assert "record has no field 'embedding'; it has: caption" in errors[0]["needs_emb"]


def test_classes_come_from_one_place_or_agree():
    assert resolve_classes(["a", "b"], None, ["a", "b"]) == ["a", "b"]
    assert resolve_classes(None, ["x", "y"], None) == ["x", "y"]
    with pytest.raises(ConfigError, match="class names disagree"):
        resolve_classes(["a", "b"], None, ["b", "a"])
    with pytest.raises(ConfigError, match="no class names"):
        resolve_classes(None, None, None)


SNORKEL_STYLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snorkel_style_lfs.py")


def test_snorkel_style_lfs_run_unchanged(tmp_path):
    """Real Snorkel LFs (``snorkel.labeling.labeling_function``, rows with attribute
    access, ``resources``) load and vote through our records without changes."""
    lfset = load_lf_file(SNORKEL_STYLE)
    assert lfset.names == ["lf_cat", "lf_dog"]
    assert all(is_lf_like(lf) for lf in lfset.lfs)
    assert type(lfset.lfs[0]).__module__.startswith("snorkel"), "the file must use Snorkel's own decorator"
    recs = [Record(caption="My Cat"), Record(caption="a puppy"), Record(caption="a car")]
    L, errors = apply_to_records(lfset.lfs, recs, lfset.classes)
    assert L.tolist() == [[0, -1], [-1, 1], [-1, -1]]
    assert errors == [None, None, None]
