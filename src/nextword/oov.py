"""Out-of-vocabulary words: how many typed words a word vocabulary lacks, and how many of them an engine completes.

A word model can never suggest a word outside its vocabulary; a subword
model can (:mod:`nextword.subword`). The counts come from the keystroke
simulation (:mod:`nextword.keystrokes`, given the vocabulary): every word
token that the vocabulary lacks is counted, and counts as completed when the
strip, which shows again the words passed over, shows it before it is typed
in full.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Collection, Iterable

import pandas as pd

from nextword.engine import Engine
from nextword.keystrokes import Conversation, Savings, simulate_batched


@dataclass
class OovReport:
    words: int  # word tokens typed
    oov_words: int  # of them, not in the word vocabulary
    oov_rate: float
    completed: int  # of those, shown by the strip before they were typed in full
    completed_share: float

    @classmethod
    def from_savings(cls, savings: Savings) -> "OovReport":
        """The report of a simulation that was given the vocabulary."""
        words, oov, completed = savings.words, savings.oov_words, savings.oov_completed
        return cls(words, oov, oov / words if words else 0.0, completed, completed / oov if oov else 0.0)

    def to_dict(self) -> dict:
        return asdict(self)


def oov_report(engine: Engine, conversations: pd.DataFrame | Iterable[Conversation], vocabulary: Collection[str],
               k: int = 3, max_conversations: int | None = None, processes: int = 1) -> OovReport:
    """Type ``conversations`` through ``engine``; count the words outside ``vocabulary`` and those it completes."""
    return OovReport.from_savings(simulate_batched(engine, conversations, k, max_conversations,
                                                   processes=processes, vocabulary=vocabulary))
