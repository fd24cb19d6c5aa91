"""Tokenizer: lowercase, then words (apostrophes kept inside) and the marks . , ! ? ;"""

from __future__ import annotations

import re

TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[.,!?;]")
PUNCTUATION = frozenset(".,!?;")


def tokenize(text: str) -> list[str]:
    return TOKEN_RE.findall(text.lower())


def is_word(token: str) -> bool:
    """A typed word, as opposed to punctuation or a special like ``<EOS>``."""
    return token not in PUNCTUATION and not token.startswith("<")


def detokenize(tokens: list[str]) -> str:
    """Join tokens for display: punctuation attaches to the word before it."""
    out = ""
    for tok in tokens:
        if tok in PUNCTUATION or not out:
            out += tok
        else:
            out += " " + tok
    return out
