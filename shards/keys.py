"""Stable sample keys derived from the sample's source (URL or relative path).

A key is the first 16 hex digits of SHA-1 over the source string: the same
source gives the same key on every run and every machine, and keys carry no
dots or slashes, so WebDataset's ``<key>.<ext>`` split never breaks them.
"""
from __future__ import annotations

import hashlib

KEY_LENGTH = 16


def make_key(source: str) -> str:
    """Stable key for a source URL or path."""
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def unique_keys(sources: list[str]) -> list[str]:
    """Keys for a list of sources; a source repeated in the list gets ``#n``
    appended before hashing for its n-th repeat, so keys stay unique and
    still depend only on the input list."""
    seen: dict[str, int] = {}
    out = []
    for s in sources:
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.append(make_key(s if n == 0 else f"{s}#{n}"))
    return out
