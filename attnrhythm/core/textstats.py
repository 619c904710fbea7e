"""Text statistics of the perturbation study (docs/method.md section 5, Table 1).

Content words: the lower-cased word and number tokens of a decoded text, minus English stop
words (the maintained list of the ``stop-words`` package) and punctuation.  Numbers are always
kept, even the few the stop list contains ("10", "39"), because in arithmetic reasoning they carry
the content.  Jaccard overlap compares two such sets (the Table 1 intervals over problems come from
``core/bootstrap.py``).
"""
from __future__ import annotations

import functools
import re

# numbers with internal separators ("3.5", "1,000") are one token; words may contain an
# apostrophe or a hyphen ("don't", "no-one"); everything else (punctuation, LaTeX) splits
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+(?:['-][^\W\d_]+)*")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")


@functools.lru_cache(maxsize=1)
def stop_words() -> frozenset[str]:
    from stop_words import get_stop_words  # imported here: only the perturbation study needs it

    return frozenset(w.lower() for w in get_stop_words("en"))


def word_tokens(text: str) -> list[str]:
    """Lower-cased word and number tokens in order; "1,000" becomes "1000"."""
    text = text.lower().replace("\u2019", "'")
    return [t.replace(",", "") if _THOUSANDS.fullmatch(t) else t for t in _TOKEN.findall(text)]


def content_words(text: str) -> set[str]:
    """The set of content words of ``text``: word tokens that are numbers or not stop words."""
    stops = stop_words()
    return {t for t in word_tokens(text) if t[0].isdigit() or t not in stops}


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|.  *Decision*: two empty sets are identical, so their overlap is 1.0."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def content_jaccard(text_a: str, text_b: str) -> float:
    return jaccard(content_words(text_a), content_words(text_b))
