"""Caption rules: junk that carries no description in any language, length, duplicate texts."""
from __future__ import annotations

import pytest

from webcurate.curation.captions import caption_features, caption_hash, junk_reason


@pytest.mark.parametrize("caption,reason", [
    ("IMG_1234.jpg", "filename"), ("DSC01234", "filename"), ("IMG_20200101_123456", "filename"),
    ("Screenshot 2021-03-04 at 10.11.12.png", "filename"), ("holiday photo.JPEG", "filename"),
    ("https://example.com/a.jpg", "url_only"), ("www.shop.com http://a.b/c", "url_only"),
    ("12345 !!!", "no_letters"), ("😀😀😀", "no_letters"), ("2020-01-01", "no_letters"),
])
def test_junk_captions_are_named_by_rule(caption, reason):
    assert junk_reason(caption) == reason


@pytest.mark.parametrize("caption", [
    "a cat asleep on a sofa", "一只猫在沙发上睡觉", "Кошка спит на диване", "قطة نائمة", "photo of my dog",
    "see www.shop.com for more", "IMG of the week: a sunset",
])
def test_real_descriptions_in_any_script_are_not_junk(caption):
    assert junk_reason(caption) is None


def test_duplicate_texts_hash_alike_across_case_width_and_spacing():
    assert caption_hash("Click  to Enlarge") == caption_hash("click to enlarge ") == caption_hash("ＣＬＩＣＫ to enlarge")
    assert caption_hash("click to enlarge") != caption_hash("click to enlarge!")


def test_features_count_characters_and_words_and_leave_missing_captions_null():
    f = caption_features("  two words ")
    assert (f["caption_chars"], f["caption_words"], f["caption_junk"]) == (9, 2, None)
    assert isinstance(f["caption_hash"], int) and -(2 ** 63) <= f["caption_hash"] < 2 ** 63
    assert set(caption_features(None).values()) == {None} == set(caption_features("   ").values())
