"""Caption rules for URL lists with captions: length, junk, duplicates.

Language-agnostic on purpose: no word lists and no language model, only
what holds in every script. A caption is *junk* when it

- is only URLs (``https://…``, ``www.…``), or
- looks like a file name the uploader never changed (``IMG_1234.jpg``,
  ``DSC01234``, ``Screenshot 2021-03-04 at 10.11.12.png``, ``image.png``), or
- holds no letter of any script (only digits, punctuation, emoji…).

Duplicates are counted over the whole dataset with ``caption_hash``: a
64-bit hash of the caption case-folded, NFKC-normalised and with runs of
whitespace collapsed, so "Click  to Enlarge" and "click to enlarge" count as
one text. The per-sample features go into the ``quality`` sidecar
(``caption_features``); the ``filter`` stage applies the thresholds.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

JUNK_URL = "url_only"
JUNK_FILENAME = "filename"
JUNK_NO_LETTERS = "no_letters"

_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|www\.)\S+$", re.IGNORECASE)
_IMAGE_EXT = r"(?:jpe?g|png|gif|webp|bmp|tiff?|heic|heif|avif|raw|cr2|nef|dng)"
# One token ending in an image extension (any stem), or a camera / phone default name.
_FILENAME = re.compile(
    rf"^(?:[\w\-. ()\[\]~+]*\.{_IMAGE_EXT}"
    r"|(?:img|dsc|dscn|dscf|dcim|pict|pxl|mvimg|photo|image|gopr|sam|wp)[_\- ]?\d[\d_\- ]*(?:\(\d+\))?"
    r"|(?:screen ?shot|screenshot|capture|snapshot)[\w\-. ]*)$",
    re.IGNORECASE,
)
_SPACE = re.compile(r"\s+")


def normalise(caption: str) -> str:
    """The caption as duplicates are compared: NFKC, case-folded, whitespace collapsed, stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", caption).casefold()).strip()


def caption_hash(caption: str) -> int:
    """Signed 64-bit hash of ``normalise(caption)`` (stable across runs and machines)."""
    digest = hashlib.blake2b(normalise(caption).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def junk_reason(caption: str) -> str | None:
    """``url_only`` / ``filename`` / ``no_letters`` when the caption says nothing, else None."""
    text = _SPACE.sub(" ", unicodedata.normalize("NFKC", caption)).strip()
    if not text:
        return JUNK_NO_LETTERS
    tokens = text.split(" ")
    if all(_URL.match(t) for t in tokens):
        return JUNK_URL
    if _FILENAME.match(text):
        return JUNK_FILENAME
    if not any(unicodedata.category(ch).startswith("L") for ch in text):
        return JUNK_NO_LETTERS
    return None


def caption_features(caption: str | None) -> dict[str, Any]:
    """Per-sample columns: caption_chars, caption_words, caption_junk, caption_hash (all None without a caption)."""
    if caption is None or not str(caption).strip():
        return {"caption_chars": None, "caption_words": None, "caption_junk": None, "caption_hash": None}
    text = str(caption).strip()
    return {"caption_chars": len(text), "caption_words": len(text.split()),
            "caption_junk": junk_reason(text), "caption_hash": caption_hash(text)}
