"""Out-of-vocabulary words: how many typed words a word vocabulary lacks, and how many of them an engine completes.

A word model can never suggest a word outside its vocabulary; a subword
model can (:mod:`nextword.subword`). The report types conversations as the
keystroke simulation does (:mod:`nextword.keystrokes`: every message in
order, everything before it committed), and for every word token that the
word vocabulary lacks asks the engine's strip after each prefix of it. Such
a word counts as completed when the strip shows it before it is typed in full.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Collection, Iterable

import pandas as pd

from nextword.engine import Engine
from nextword.keystrokes import Conversation, conversations_from_table, word_cost
from nextword.text import is_word, tokenize


@dataclass
class OovReport:
    words: int  # word tokens typed
    oov_words: int  # of them, not in the word vocabulary
    oov_rate: float
    completed: int  # of those, shown by the strip before they were typed in full
    completed_share: float

    def to_dict(self) -> dict:
        return asdict(self)


def oov_report(engine: Engine, conversations: pd.DataFrame | Iterable[Conversation], vocabulary: Collection[str],
               k: int = 3, max_conversations: int | None = None) -> OovReport:
    """Type ``conversations`` through ``engine``; count the words outside ``vocabulary`` and those it completes."""
    if isinstance(conversations, pd.DataFrame):
        conversations = conversations_from_table(conversations)
    words = oov = completed = 0
    for n, conversation in enumerate(conversations):
        if max_conversations is not None and n >= max_conversations:
            break
        session = engine.session()
        for speaker, text in conversation:
            session.start_message(speaker)
            for token in tokenize(text):
                if is_word(token):
                    words += 1
                    if token not in vocabulary:
                        oov += 1
                        completed += word_cost(token, lambda prefix: strip(session, prefix, k)) <= len(token)
                session.feed(token)
            session.end_message()
    return OovReport(words, oov, oov / words if words else 0.0, completed, completed / oov if oov else 0.0)


def strip(session, prefix: str, k: int) -> list[str]:
    """The words the strip shows for ``prefix``, to someone typing letter by letter."""
    return [s.word for s in session.suggest(prefix, k, typing=True)]
