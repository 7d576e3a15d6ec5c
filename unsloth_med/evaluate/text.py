"""Words of free-text answers and captions, in any script, for the text metrics (VQA's exact match, recall,
token F1 and BLEU-1; captioning's ROUGE-L).

Medical VQA sets are not all English: SLAKE is bilingual (English and Chinese). Two things break on such text
when it is handled as ASCII: punctuation outside ASCII ("。", "¿") is left in, so "是。" does not match "是";
and Chinese and Japanese write no spaces between words, so splitting on spaces makes a whole answer one token
and token scores fall back to exact match. Here every Unicode punctuation character is a separator, and each
Chinese character or kana is a token of its own (the usual unit of token-level metrics for these scripts).
Text in ASCII is split exactly as before.
"""
from __future__ import annotations

import re
import string
import unicodedata

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana, CJK ideographs (Hangul is spaced: words)
_HAS_CJK = re.compile(f"[{_CJK}]")
_CJK_PIECES = re.compile(f"[{_CJK}]|[^{_CJK}]+")


def strip_punctuation(text: str) -> str:
    """`text` with ASCII punctuation (string.punctuation) and every Unicode punctuation character as spaces."""
    if text.isascii():
        return "".join(" " if c in _ASCII_PUNCTUATION else c for c in text)
    return "".join(" " if c in _ASCII_PUNCTUATION or unicodedata.category(c).startswith("P") else c for c in text)


def tokens(text: str) -> list[str]:
    """The space-separated tokens of `text`, each Chinese character or kana split off as a token of its own."""
    out: list[str] = []
    for token in text.split():
        out += _CJK_PIECES.findall(token) if _HAS_CJK.search(token) else [token]
    return out


class RougeTokenizer:
    """rouge_score's tokenizer (lower case, Porter stems of words over 3 letters) for ASCII text, which it was
    made for; for other text, whose letters it drops as non-alphanumeric (an identical Chinese caption scored 0),
    `tokens` of the lower-cased text without punctuation, stemming only the ASCII words."""

    def __init__(self):
        from rouge_score import tokenizers

        self._ascii = tokenizers.DefaultTokenizer(use_stemmer=True)

    def tokenize(self, text: str) -> list[str]:
        if text.isascii():
            return self._ascii.tokenize(text)
        out: list[str] = []
        for token in tokens(strip_punctuation(text.lower())):
            out += self._ascii.tokenize(token) if token.isascii() else [token]
        return out
