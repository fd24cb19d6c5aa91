"""Vocabulary: token <-> id, built from the train split only."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from nextword.config import SPEAKERS
from nextword.files import read_json, write_json

PAD, UNK, BOS, EOS, USER, AGENT = "<PAD>", "<UNK>", "<BOS>", "<EOS>", "<USER>", "<AGENT>"
SPECIALS = (PAD, UNK, BOS, EOS, USER, AGENT)
SPEAKER_TAG = dict(zip(SPEAKERS, (USER, AGENT)))
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass
class Vocab:
    """The model's tokens (ids in list order) and their train counts.

    ``rare`` lists the train split's other tokens, those below ``min_freq`` or beyond ``max_size``, most
    frequent first: the model reads them as ``<UNK>``, and the engine offers the words among them as a
    keyboard's dictionary does, in strip slots that no vocabulary word takes (see nextword.engine).
    """

    tokens: list[str]
    counts: list[int]
    rare: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.index = {tok: i for i, tok in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        return self.index.get(token, UNK_ID)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        index = self.index
        return [index.get(t, UNK_ID) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    @classmethod
    def build(cls, token_lists: Iterable[Iterable[str]], min_freq: int = 1, max_size: int = 20000) -> "Vocab":
        """Specials first, then words by descending count (ties alphabetical, so the order is stable)."""
        counter: Counter[str] = Counter()
        for toks in token_lists:
            counter.update(toks)
        for special in SPECIALS:
            counter.pop(special, None)
        ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
        size = min(sum(n >= min_freq for _, n in ranked), max(0, max_size - len(SPECIALS)))
        kept = ranked[:size]
        return cls(list(SPECIALS) + [t for t, _ in kept], [0] * len(SPECIALS) + [c for _, c in kept],
                   [t for t, _ in ranked[size:]])

    def save(self, path) -> None:
        write_json(path, {"tokens": self.tokens, "counts": self.counts, "rare": self.rare})

    @classmethod
    def load(cls, path) -> "Vocab":
        data = read_json(path)
        return cls(data["tokens"], data["counts"], data.get("rare", []))  # folders written before it: none

    def special_mask(self) -> np.ndarray:
        mask = np.zeros(len(self), dtype=bool)
        mask[: len(SPECIALS)] = True
        return mask
