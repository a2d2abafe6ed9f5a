"""Stable sample keys derived from the sample's source (URL or relative path).

A key is the first 16 hex digits of SHA-1 over the source string: the same
source gives the same key on every run and every machine, and keys carry no
dots or slashes, so WebDataset's ``<key>.<ext>`` split never breaks them.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

KEY_LENGTH = 16


def make_key(source: str) -> str:
    """Stable key for a source URL or path."""
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def unique_keys(sources: list[str], used: Iterable[str] | None = None) -> list[str]:
    """Keys for a list of sources, unique by construction (also against ``used``).

    A source's key is ``make_key(source)`` unless that key is taken (a repeat of
    the source, a literal ``u#1`` meeting the repeat of ``u``, a hash
    collision): then the n-th candidate ``make_key(source + "\\x00" + n)`` is
    tried until one is free. Candidates are visited in input order, so the keys
    depend only on the list (and ``used``).
    """
    taken = set(used or ())
    out = []
    for s in sources:
        key, n = make_key(s), 0
        while key in taken:
            n += 1
            key = make_key(f"{s}\x00{n}")
        taken.add(key)
        out.append(key)
    return out
