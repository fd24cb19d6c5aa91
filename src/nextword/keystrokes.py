"""Keystroke savings, next-word accuracy and latency, measured the way keyboard makers measure them.

The protocol is the one of the Presage predictive-text simulator, so figures
are comparable with other engines:

* Every message of every conversation is typed, in conversation order, with
  everything before it committed as context; each conversation starts a
  fresh session. A message is fed exactly as training streams are built
  (speaker tag, ``<BOS>``, its tokens, ``<EOS>``; see ``windows.message_tokens``).
* Only word tokens are typed and counted (already lowercased by the
  tokenizer); punctuation tokens are committed to the context but neither
  typed nor counted.
* For a word ``w``, after its first ``i`` characters (``i = 0 .. len(w) - 1``)
  the engine shows ``k`` suggestions (three). At the first ``i`` where ``w``
  is among them the word costs ``i + 1`` keystrokes (``i`` characters and one
  to accept, which also inserts the space); if it never appears, or is out of
  the vocabulary, it costs ``len(w) + 1``, as it does without prediction.
  The engine is asked as the strip of someone typing (``typing=True``), with
  its own ``skip_rejected`` setting.
* KSR = 1 - sum(cost) / sum(len(w) + 1).
* The simulated typist reads the strip after every letter. That is
  optimistic, and more so with ``skip_rejected``, which hides the words shown
  at a shorter prefix on the assumption that they were seen and passed over:
  a person typing quickly does not look after every letter, and would miss
  the likeliest completion. So both figures are reported from the same run:
  ``ksr_show_rejected`` (the strip never hides a word: the honest figure, and
  the engine's default) and ``ksr_skip_rejected`` (the optimistic one); ``ksr``
  is the one of the engine's own setting.

Top-1/top-3 accuracy is over word tokens, from the suggestions at ``i = 0``.
Latency is per keystroke: the time from a keystroke to its suggestions being
ready, on one CPU thread, as wall-clock time and as the thread's CPU time
(which a busy, shared machine does not inflate). The keystroke that commits a word (or the start of a
message) pays for running the committed tokens through the model; one inside
a word pays only for the prefix lookup.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from nextword.engine import Engine
from nextword.text import is_word, tokenize
from nextword.vocab import SPEAKER_TAG

Conversation = Sequence[tuple[str, str]]  # (speaker, text) messages in order


@dataclass
class KeystrokeReport:
    conversations: int
    messages: int
    words: int
    keystrokes: int  # with prediction, with the engine's own skip_rejected setting
    keystrokes_without: int  # sum of len(w) + 1
    ksr: float  # with the engine's own skip_rejected setting
    ksr_show_rejected: float  # the strip never hides a word it showed before
    ksr_skip_rejected: float  # it hides them, for a typist who read it after every letter
    top1: float
    top3: float
    latency_p50_ms: float  # wall-clock time
    latency_p99_ms: float
    cpu_p50_ms: float  # CPU time of this thread: the wall time on an otherwise idle machine
    cpu_p99_ms: float
    latency_keystrokes: int  # how many keystrokes were timed

    def to_dict(self) -> dict:
        return asdict(self)


def word_cost(word: str, suggestions_after: Callable[[str], Sequence[str]]) -> int:
    """Keystrokes to enter ``word`` when ``suggestions_after(prefix)`` is shown after each prefix.

    The first ``i`` whose suggestions contain ``word`` costs ``i + 1``; never: ``len(word) + 1``.
    """
    for i in range(len(word)):
        if word in suggestions_after(word[:i]):
            return i + 1
    return len(word) + 1


def conversations_from_table(messages: pd.DataFrame) -> list[list[tuple[str, str]]]:
    """(speaker, text) lists per conversation from a messages table, in conversation and turn order.

    The table is the one ``nextword.messages.load_messages`` returns; it is
    already ordered, and a stable sort by turn keeps the file order of
    several messages within one turn.
    """
    out = []
    for _, conversation in messages.groupby("conversation_id", sort=False):
        conversation = conversation.sort_values("turn", kind="stable")
        out.append(list(zip(conversation["speaker"], conversation["text"])))
    return out


def simulate(
    engine: Engine,
    conversations: pd.DataFrame | Iterable[Conversation],
    k: int = 3,
    max_conversations: int | None = None,
) -> KeystrokeReport:
    """Type every message of ``conversations`` with ``k`` suggestions shown; see the module docstring."""
    if isinstance(conversations, pd.DataFrame):
        conversations = conversations_from_table(conversations)
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    warm = engine.session()  # the first calls into torch are slow; keep them out of the timings
    for speaker in SPEAKER_TAG:
        warm.start_message(speaker)
        warm.suggest("", k)
    latencies: list[int] = []
    cpu_times: list[int] = []
    n_conversations = n_messages = words = cost = cost_without = top1 = top3 = 0
    skip = engine.options.skip_rejected
    cost_other = 0  # with the other skip_rejected setting: the strips are lookups in the same distributions
    for conversation in conversations:
        if max_conversations is not None and n_conversations >= max_conversations:
            break
        n_conversations += 1
        session = engine.session()
        for speaker, text in conversation:
            if speaker not in SPEAKER_TAG:
                raise ValueError(f"speaker {speaker!r} is not 'user' or 'agent'")
            n_messages += 1
            session.start_message(speaker)
            for token in tokenize(text):
                if is_word(token):
                    shown_first: list[str] = []

                    def suggestions_after(prefix: str) -> list[str]:
                        start, cpu_start = clock(), cpu_clock()
                        shown = [s.word for s in session.suggest(prefix, k, typing=True)]
                        latencies.append(clock() - start)
                        cpu_times.append(cpu_clock() - cpu_start)
                        if not prefix:
                            shown_first[:] = shown
                        return shown

                    words += 1
                    cost += word_cost(token, suggestions_after)
                    cost_other += word_cost(token, lambda prefix: [
                        s.word for s in session.suggest(prefix, k, typing=True, skip_rejected=not skip)])
                    cost_without += len(token) + 1
                    top1 += bool(shown_first) and shown_first[0] == token
                    top3 += token in shown_first
                session.feed(token)  # run through the model when the next suggestions are shown
            session.end_message()
    def ratio(keystrokes: int) -> float:
        return 1 - keystrokes / cost_without if cost_without else 0.0

    lat = np.array(latencies, dtype=np.float64) / 1e6
    cpu = np.array(cpu_times, dtype=np.float64) / 1e6
    return KeystrokeReport(
        conversations=n_conversations,
        messages=n_messages,
        words=words,
        keystrokes=cost,
        keystrokes_without=cost_without,
        ksr=ratio(cost),
        ksr_show_rejected=ratio(cost_other if skip else cost),
        ksr_skip_rejected=ratio(cost if skip else cost_other),
        top1=top1 / words if words else 0.0,
        top3=top3 / words if words else 0.0,
        latency_p50_ms=float(np.percentile(lat, 50)) if len(lat) else 0.0,
        latency_p99_ms=float(np.percentile(lat, 99)) if len(lat) else 0.0,
        cpu_p50_ms=float(np.percentile(cpu, 50)) if len(cpu) else 0.0,
        cpu_p99_ms=float(np.percentile(cpu, 99)) if len(cpu) else 0.0,
        latency_keystrokes=len(lat),
    )



@dataclass
class Agreement:
    keystrokes: int  # strips compared: one per prefix of every word typed
    top1: float  # the fraction of them whose first suggestion is the same
    positions: int  # next-token distributions compared: one per word start
    max_prob_difference: float  # the largest difference of one token's probability between the two

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(reference: Engine, other: Engine, conversations: Iterable[Conversation], k: int = 3) -> Agreement:
    """How often ``other`` shows the first suggestion ``reference`` shows, typing the same conversations.

    Both engines type every word letter by letter, as :func:`simulate` does, and
    the strip of ``k`` suggestions after every prefix (the empty one too) is
    compared by its first word; the whole next-token distributions are compared
    at the start of every word.
    """
    keystrokes = same = positions = 0
    largest = 0.0
    for conversation in conversations:
        sessions = reference.session(), other.session()
        for speaker, text in conversation:
            for session in sessions:
                session.start_message(speaker)
            for token in tokenize(text):
                if is_word(token):
                    a, b = (np.exp(s.log_probs.astype(np.float64)) for s in sessions)
                    largest = max(largest, float(np.abs(a - b).max()))
                    positions += 1
                    for i in range(len(token)):
                        first = [s.suggest(token[:i], k, typing=True)[:1] for s in sessions]
                        keystrokes += 1
                        same += [x.word for x in first[0]] == [x.word for x in first[1]]
                for session in sessions:
                    session.feed(token)
            for session in sessions:
                session.end_message()
    return Agreement(keystrokes, same / keystrokes if keystrokes else 0.0, positions, largest)
