"""Fill-in-the-middle accuracy: restore a word taken out of the middle of held-out messages.

The protocol (``nextword evaluate --fim``):

* Conversations are read in order, each in a fresh session, every message
  committed as context for the next ones, as in :mod:`nextword.keystrokes`.
* In each message with a word that has a word before it and a word after it
  (in the message), one such word is picked at random (seeded) and removed,
  until ``max_messages`` messages are tested.
* The words before the gap are typed, with the cursor after the space that
  follows them; the engine then suggests ``k`` words from the left context
  alone, and again with the rest of the message as ``right`` (the engine's
  fill-in-the-middle: ``FIM_CANDIDATES`` words rescored with up to
  ``FIM_RIGHT_TOKENS`` tokens of it, see :mod:`nextword.engine`).
* Top-1 / top-3: the share of gaps whose word is the first suggestion / among
  the first three. A removed word outside the vocabulary counts as a miss
  (``oov`` says how many there were).
* Latency: the time of the suggestion with the right context, once the left
  context's distribution is ready (what a keystroke costs on top of the plain
  strip), on one thread, wall-clock and the thread's CPU time.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

from nextword.engine import FIM_CANDIDATES, FIM_RIGHT_TOKENS, Engine
from nextword.keystrokes import Conversation
from nextword.errors import NextwordError
from nextword.text import is_word, tokenize


@dataclass
class FimReport:
    messages: int  # messages tested, one gap each
    oov: int  # removed words outside the vocabulary (misses with either strip)
    top1_left: float  # the left context alone
    top3_left: float
    top1: float  # with the right context
    top3: float
    latency_p50_ms: float  # the suggestion with the right context, wall-clock
    latency_p99_ms: float
    cpu_p50_ms: float  # the same, CPU time of this thread
    cpu_p99_ms: float
    candidates: int  # FIM_CANDIDATES
    right_tokens: int  # FIM_RIGHT_TOKENS

    def to_dict(self) -> dict:
        return asdict(self)


def gaps(tokens: list[str]) -> list[int]:
    """Positions of the words with a word somewhere before them and somewhere after them."""
    words = [i for i, token in enumerate(tokens) if is_word(token)]
    return words[1:-1]


def evaluate_fim(engine: Engine, conversations: Iterable[Conversation], max_messages: int = 2000,
                 k: int = 3, seed: int = 0) -> FimReport:
    """Remove one middle word from up to ``max_messages`` messages and score both strips at restoring it."""
    rng = np.random.default_rng(seed)
    hits = {"top1_left": 0, "top3_left": 0, "top1": 0, "top3": 0}
    wall, cpu = [], []
    tested = oov = 0
    for conversation in conversations:
        if tested >= max_messages:
            break
        session = engine.session()
        for speaker, text in conversation:
            tokens = tokenize(text)
            positions = gaps(tokens)
            if positions and tested < max_messages:
                gap = positions[rng.integers(len(positions))]
                word = tokens[gap]
                oov += word not in engine.vocab.index
                trial = copy.copy(session)
                trial.type_text(speaker, " ".join(tokens[:gap]) + " ")
                left = [s.word for s in trial.suggest("", k)]  # also computes the left distribution
                right = " " + " ".join(tokens[gap + 1:])
                started, started_cpu = time.perf_counter(), time.thread_time()
                both = [s.word for s in trial.suggest("", k, right=right)]
                cpu.append(time.thread_time() - started_cpu)
                wall.append(time.perf_counter() - started)
                hits["top1_left"] += left[:1] == [word]
                hits["top3_left"] += word in left
                hits["top1"] += both[:1] == [word]
                hits["top3"] += word in both
                tested += 1
            session.add_message(speaker, text)
            session.log_probs  # run the message now, so that the next trial's fork does not run it again
    if not tested:
        raise NextwordError("no message has a word between two others to remove")
    wall_ms, cpu_ms = 1000 * np.array(wall), 1000 * np.array(cpu)
    return FimReport(
        messages=tested, oov=oov, **{name: count / tested for name, count in hits.items()},
        latency_p50_ms=float(np.percentile(wall_ms, 50)), latency_p99_ms=float(np.percentile(wall_ms, 99)),
        cpu_p50_ms=float(np.percentile(cpu_ms, 50)), cpu_p99_ms=float(np.percentile(cpu_ms, 99)),
        candidates=FIM_CANDIDATES, right_tokens=FIM_RIGHT_TOKENS)
