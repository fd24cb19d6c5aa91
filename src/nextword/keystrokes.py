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
  to accept, which also inserts the space); if it never appears it costs
  ``len(w) + 1``, as it does without prediction. A word outside the
  vocabulary is ranked with the vocabulary's words once the conversation
  committed it (:meth:`nextword.engine.Engine.ranked`), and otherwise appears
  only in a slot that no other word takes (:meth:`nextword.engine.Engine.fill`).
  The engine is asked as the strip of someone typing (``typing=True``), with
  its own ``skip_rejected`` setting. That strip never offers the word the
  letters typed already spell (:func:`nextword.engine.typed_word`): accepting
  it would cost the keystroke the space bar costs, so it can save none.
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

Conversations are independent, and what is committed before a word is the
conversation's own text, so :func:`simulate_batched` works out the model's
state before every word of many conversations side by side, then scores the
words in full batches: the output layer, the n-gram and the cache are mixed
in for the whole batch, and a word's cost is read
from its rank among the words that start with each prefix (with
``skip_rejected``, less the words shown at shorter prefixes), not from one
strip after another (except for a word outside the vocabulary, and for one
that the conversation's own words outside it outrank: their strips are
worked out one by one, as the session shows them).
It gives exactly the counts :func:`simulate` gives, which asks the engine's
sessions as a person would, because every row of the
batched steps is bit for bit the step of that stream alone: that holds for the
PyTorch step with int8 weights (:mod:`nextword.quantize`, the engine's
default), and with any other the conversations are typed one at a time.

Latency is per keystroke: the time from a keystroke to its suggestions being
ready, on one CPU thread, as wall-clock time and as the thread's CPU time
(which a busy, shared machine does not inflate). The keystroke that commits a word (or the start of a
message) pays for running the committed tokens through the model; one inside
a word pays only for the prefix lookup.
"""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Collection, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from nextword.engine import Engine, _Cache, best, typed_word
from nextword.errors import NextwordError
from nextword.forked import forked_map
from nextword.text import is_word, tokenize
from nextword.vocab import SPEAKER_TAG
from nextword.windows import MESSAGE_END, message_head

Conversation = Sequence[tuple[str, str]]  # (speaker, text) messages in order


@dataclass
class Savings:
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
    oov_words: int  # words outside the vocabulary given to the simulation (none given: 0)
    oov_completed: int  # of those, shown by the strip before they were typed in full (words passed over shown)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class KeystrokeReport(Savings):
    """The savings, and the latency of each keystroke, from typing one conversation at a time."""

    latency_p50_ms: float  # wall-clock time
    latency_p99_ms: float
    cpu_p50_ms: float  # CPU time of this thread: the wall time on an otherwise idle machine
    cpu_p99_ms: float
    latency_keystrokes: int  # how many keystrokes were timed

    def savings(self) -> Savings:
        return Savings(**{f.name: getattr(self, f.name) for f in fields(Savings)})


@dataclass
class _Tally:
    """Counts of a simulation, summed word by word."""

    skip_rejected: bool  # the engine's own setting, which ``keystrokes`` and ``ksr`` follow
    vocabulary: Collection[str] | None = None  # words outside it are counted apart (see nextword.oov)
    conversations: int = 0
    messages: int = 0
    words: int = 0
    cost_show: int = 0  # keystrokes when the strip shows rejected words again
    cost_skip: int = 0  # when it skips them
    cost_without: int = 0
    top1: int = 0
    top3: int = 0
    oov_words: int = 0
    oov_completed: int = 0

    def word(self, word: str, cost_show: int, cost_skip: int, top1: bool, top3: bool) -> None:
        self.words += 1
        self.cost_show += cost_show
        self.cost_skip += cost_skip
        self.cost_without += len(word) + 1
        self.top1 += top1
        self.top3 += top3
        if self.vocabulary is not None and word not in self.vocabulary:
            self.oov_words += 1
            self.oov_completed += cost_show <= len(word)

    @classmethod
    def total(cls, tallies: list["_Tally"], skip_rejected: bool) -> "_Tally":
        total = cls(skip_rejected)
        for name in (f.name for f in fields(cls) if f.name not in ("skip_rejected", "vocabulary")):
            setattr(total, name, sum(getattr(t, name) for t in tallies))
        return total

    def savings(self) -> Savings:
        def ratio(keystrokes: int) -> float:
            return 1 - keystrokes / self.cost_without if self.cost_without else 0.0

        words = self.words
        return Savings(self.conversations, self.messages, words,
                       self.cost_skip if self.skip_rejected else self.cost_show, self.cost_without,
                       ratio(self.cost_skip if self.skip_rejected else self.cost_show),
                       ratio(self.cost_show), ratio(self.cost_skip),
                       self.top1 / words if words else 0.0, self.top3 / words if words else 0.0,
                       self.oov_words, self.oov_completed)


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
    vocabulary: Collection[str] | None = None,
) -> KeystrokeReport:
    """Type every message of ``conversations`` with ``k`` suggestions shown, one conversation at a time.

    This asks the engine's sessions as the keyboard does, and times every keystroke on this thread;
    see the module docstring. With a ``vocabulary``, the words outside it are counted apart too.
    """
    if isinstance(conversations, pd.DataFrame):
        conversations = conversations_from_table(conversations)
    warm = engine.session()  # the first calls into torch are slow; keep them out of the timings
    for speaker in SPEAKER_TAG:
        warm.start_message(speaker)
        warm.suggest("", k)
    latencies: list[int] = []
    cpu_times: list[int] = []
    tally = _typed(engine, itertools.islice(conversations, max_conversations), k, vocabulary, latencies, cpu_times)
    lat = np.array(latencies, dtype=np.float64) / 1e6
    cpu = np.array(cpu_times, dtype=np.float64) / 1e6
    return KeystrokeReport(
        **tally.savings().to_dict(),
        latency_p50_ms=float(np.percentile(lat, 50)) if len(lat) else 0.0,
        latency_p99_ms=float(np.percentile(lat, 99)) if len(lat) else 0.0,
        cpu_p50_ms=float(np.percentile(cpu, 50)) if len(cpu) else 0.0,
        cpu_p99_ms=float(np.percentile(cpu, 99)) if len(cpu) else 0.0,
        latency_keystrokes=len(lat),
    )


def _typed(engine: Engine, conversations: Iterable[Conversation], k: int, vocabulary: Collection[str] | None,
           latencies: list[int], cpu_times: list[int]) -> "_Tally":
    """The tally of typing ``conversations`` through the engine's sessions, timing each strip into the lists."""
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    skip = engine.options.skip_rejected
    tally = _Tally(skip, vocabulary)
    for conversation in conversations:
        tally.conversations += 1
        session = engine.session()
        for speaker, text in conversation:
            _check_speaker(speaker)
            tally.messages += 1
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

                    cost = word_cost(token, suggestions_after)
                    cost_other = word_cost(token, lambda prefix: [
                        s.word for s in session.suggest(prefix, k, typing=True, skip_rejected=not skip)])
                    tally.word(token, cost_other if skip else cost, cost if skip else cost_other,
                               bool(shown_first) and shown_first[0] == token, token in shown_first)
                session.feed(token)  # run through the model when the next suggestions are shown
            session.end_message()
    return tally


def _one_at_a_time(engines: Sequence[Engine], conversations: list[Conversation], k: int, batch_size: int,
                   vocabulary: Collection[str] | None) -> list["_Tally"]:
    """:func:`_typed` of each engine, untimed: what :func:`simulate_batched` does with an engine that is not
    batch-invariant."""
    return [_typed(engine, conversations, k, vocabulary, [], []) for engine in engines]


def _check_speaker(speaker: str) -> None:
    if speaker not in SPEAKER_TAG:
        raise NextwordError(f"speaker {speaker!r} is not 'user' or 'agent'")


def simulate_batched(
    engine: Engine,
    conversations: pd.DataFrame | Iterable[Conversation],
    k: int = 3,
    max_conversations: int | None = None,
    batch_size: int = 128,
    processes: int = 1,
    vocabulary: Collection[str] | None = None,
) -> Savings:
    """:func:`simulate`'s counts, typing many conversations at once and scoring ``batch_size`` words at a time
    (no latency).

    ``processes`` > 1 shares the conversations among that many forked processes, each batching its
    own. With a backend that is not batch-invariant (float32 weights, ONNX Runtime) or a subword
    engine, each process types its conversations one at a time, through the engine's sessions.
    """
    return _simulate([engine], conversations, k, max_conversations, batch_size, processes, vocabulary)[0]


def simulate_mixes(
    engine: Engine,
    mixes: Sequence[dict],
    conversations: pd.DataFrame | Iterable[Conversation],
    k: int = 3,
    max_conversations: int | None = None,
    batch_size: int = 128,
    processes: int = 1,
) -> list[Savings]:
    """:func:`simulate_batched` of ``engine.remixed(**mix)`` for each of ``mixes``, the model run once.

    The mixes differ only in what is mixed into the model's next-token distribution, so one batched
    model step serves them all: each mixes and scores the same log-probabilities, and counts what
    typing with it alone would. (An engine that is not batch-invariant types once per mix.)
    """
    engines = [engine.remixed(**mix) for mix in mixes]
    return _simulate(engines, conversations, k, max_conversations, batch_size, processes, None)


def _simulate(engines: list[Engine], conversations, k: int, max_conversations: int | None, batch_size: int,
              processes: int, vocabulary: Collection[str] | None) -> list[Savings]:
    if isinstance(conversations, pd.DataFrame):
        conversations = conversations_from_table(conversations)
    conversations = list(itertools.islice(conversations, max_conversations))
    typed = _batched if all(e.batch_invariant for e in engines) else _one_at_a_time
    # Dealt out longest first, so that each process gets as much typing, and its longest conversations early.
    by_length = sorted(conversations, key=lambda c: sum(len(text) for _, text in c), reverse=True)
    processes = max(1, min(processes, len(conversations)))
    shares = [by_length[i::processes] for i in range(processes)]
    tallies = forked_map(_typed_share, (typed, engines, k, batch_size, vocabulary), shares, processes)
    return [_Tally.total([share[i] for share in tallies], e.options.skip_rejected).savings()
            for i, e in enumerate(engines)]


def _typed_share(shared: tuple, conversations: list[Conversation]) -> list["_Tally"]:
    typed, engines, k, batch_size, vocabulary = shared
    return typed(engines, conversations, k, batch_size, vocabulary)


def _batched(engines: Sequence[Engine], conversations: list[Conversation], k: int, batch_size: int,
             vocabulary: Collection[str] | None = None) -> list["_Tally"]:
    """The tally of each engine typing ``conversations`` in this process, ``batch_size`` words at a time.

    What is committed before a word is the conversation's own text, whatever the strip showed, so the
    model's features before each word are worked out first, for a group of conversations at once
    (:meth:`~nextword.backends.TorchStep.stream_features`); then the words are scored ``batch_size`` at
    a time, in conversation order, each with what a session would hold before it: the output layer,
    the mix and the scorer run on full batches however long the longest conversation is.

    The engines are mixes of one (:meth:`Engine.remixed`): the first one's model step serves them all.
    They share the n-gram, so each conversation keeps one history, as long as the longest an engine
    reads (an engine without the n-gram reads none), and one cache (an engine whose cache weights are
    zero mixes none of it).
    """
    tallies = [_Tally(e.options.skip_rejected, vocabulary) for e in engines]
    scorers = [_Scorer(e, k) for e in engines]
    lead = max(engines, key=lambda e: e.history)  # whose history is the longest
    caching = any(e.caching for e in engines)
    scripts = [script for script in (_script(lead, c, tallies) for c in conversations) if script]
    batch: list[tuple] = []  # (features, history, cache, the conversation's words outside the vocabulary, word)

    def score() -> None:
        log_probs = lead.backend.output(torch.stack([row[0] for row in batch]))
        histories, caches, unknowns, words = ([row[i] for row in batch] for i in range(1, 5))
        for engine, scorer, tally in zip(engines, scorers, tallies):
            scorer.score(engine.mix_rows(log_probs, histories, caches), words, tally, unknowns)
        batch.clear()

    for group in _groups(scripts, GROUP_WORDS):
        streams = [[i for ids, _ in script for i in ids] for script in group]
        ends = [np.cumsum([len(ids) for ids, _ in script]) - 1 for script in group]
        for script, features in zip(group, lead.backend.stream_features(streams, ends)):
            history, cache, unknown = (), _Cache(), {}
            for (ids, word), feature in zip(script, features):
                history = lead.extend_history(history, ids)
                if caching:
                    cache = cache.extended(ids, lead.blocked_suggest)
                batch.append((feature, history, cache, unknown, word))
                if caching and lead.fills(word):  # committed: a session's cache keeps it outside the vocabulary
                    unknown = unknown | {word: unknown.get(word, 0) + 1}
                if len(batch) == batch_size:
                    score()
    if batch:
        score()
    return tallies


# About how many words' features one stream_features call holds (512 floats each: 128 MB).
GROUP_WORDS = 65536


def _groups(scripts: list, words: int) -> Iterable[list]:
    """``scripts`` in groups of about ``words`` words, longest first: a group's steps are its longest one's."""
    group, count = [], 0
    for script in sorted(scripts, key=len, reverse=True):
        group.append(script)
        count += len(script)
        if count >= words:
            yield group
            group, count = [], 0
    if group:
        yield group


def _script(engine: Engine, conversation: Conversation, tallies: list[_Tally]) -> list[tuple[list[int], str]]:
    """The words of a conversation, each with the ids committed before it, as a session queues them."""
    vocab, steps, pending = engine.vocab, [], []
    for speaker, text in conversation:
        _check_speaker(speaker)
        pending += [vocab.id(t) for t in message_head(speaker, engine.speaker_tags)]
        for token in tokenize(text):
            if is_word(token):
                steps.append((pending, token))
                pending = []
            pending.append(vocab.id(token))
        pending.append(vocab.id(MESSAGE_END))
    for tally in tallies:
        tally.conversations += 1
        tally.messages += len(conversation)
    return steps


class _Scorer:
    """The cost of each word of a batch, read from the next-token distributions.

    A word of ``k`` suggestions is shown after a prefix when fewer than ``k``
    words that start with the prefix rank above it (higher log-probability, or
    equal and a lower id, the order of ``engine.best``); with ``skip_rejected``
    the words shown at shorter prefixes, which all rank above it, leave their
    places free, so they are worked out (by ``best``, as the session does).
    """

    def __init__(self, engine: Engine, k: int):
        self.engine, self.k = engine, k
        self.words: dict[str, tuple[int, list[tuple[int, int]]]] = {}

    def word(self, word: str) -> tuple[int, list[tuple[int, int]]]:
        """Where ``word`` sits among the suggestable words (-1: not one), and the range each prefix's strip
        ranks (:meth:`Engine.strip_range`)."""
        found = self.words.get(word)
        if found is None:
            sorted_words = self.engine.sorted_words
            at = bisect.bisect_left(sorted_words, word)
            at = at if at < len(sorted_words) and sorted_words[at] == word else -1
            found = self.words[word] = (at, [self.engine.strip_range(word[:i]) for i in range(len(word))])
        return found

    def score(self, log_probs: np.ndarray, words: list[str], tally: _Tally, unknowns: list[dict]) -> None:
        engine, k, ids = self.engine, self.k, self.engine.sorted_ids
        unknowns = unknowns if engine.caching else [{}] * len(words)
        places = [self.word(w) for w in words]
        rows = []
        for row, word in enumerate(words):
            at = places[row][0]
            unknown = engine.unknown_log_probs(log_probs[row], unknowns[row])
            # Out of the vocabulary or never suggested (only the conversation's words or a free slot show it),
            # or outranked by a word outside the vocabulary: the strips are worked out one by one. (A word
            # outside it that ranks below this one is in no strip before this word is shown, nor in its place.)
            if at < 0 or (unknown and max(unknown.values()) > log_probs[row, ids[at]]):
                self._strip_costs(word, at, log_probs[row], unknowns[row], unknown, tally)
            else:
                rows.append(row)
        if not rows:
            return
        at = np.array([places[row][0] for row in rows])
        scores = np.take(log_probs[rows], ids, axis=1)
        own = scores[np.arange(len(rows)), at][:, None]
        above = scores > own
        tied = scores == own
        if np.count_nonzero(tied) > len(rows):  # a word ties with the one typed: the lower id ranks above
            above |= tied & (ids[None, :] < ids[at][:, None])
        first = np.count_nonzero(above, axis=1)  # rank before the first letter
        # The k-th highest score of each row, for the first strip that skip_rejected hides words from.
        behind = np.flatnonzero(first >= k)
        last = {}
        if len(behind) and k < len(ids):
            top = torch.topk(torch.from_numpy(scores[behind]), k, dim=1).values[:, -1].numpy()
            last = dict(zip(behind.tolist(), top.tolist()))
        for i, row in enumerate(rows):
            word, ranges = words[row], places[row][1]
            ranks = [int(first[i])]  # at each prefix, until the word is shown (skipping words shows it no later)
            while ranks[-1] >= k and len(ranks) < len(ranges):
                lo, hi = ranges[len(ranks)]
                ranks.append(int(np.count_nonzero(above[i, lo:hi])))
            shown = len(ranks) if ranks[-1] < k else len(word) + 1
            skipped = self._skip_cost(scores[i], ranks, ranges, len(word) + 1, last.get(i))
            tally.word(word, shown, skipped, ranks[0] == 0, ranks[0] < k)

    def _strip_costs(self, word: str, at: int, log_probs: np.ndarray, unknown: dict, unknown_scores: dict,
                     tally: _Tally) -> None:
        """Tally a word from the strips a session shows (:meth:`Engine.strip`), worked out one after another:
        a word outside the vocabulary (``at`` -1), one never suggested (typed in full), or one that the
        conversation's words outside the vocabulary (``unknown``, scored ``unknown_scores``) may outrank."""
        engine, k, without = self.engine, self.k, len(word) + 1
        if at < 0 and (not engine.fills(word) or not (engine.rare or unknown)):
            tally.word(word, without, without, False, False)
            return
        shown, skipped, first, rejected = without, without, [], set()
        for i in range(len(word)):
            typed = typed_word(word[:i])
            if shown == without:
                strip = engine.strip(log_probs, word[:i], k, typed, unknown, unknown_scores)
                if i == 0:  # nothing is passed over yet: the strip of the word's start either way
                    first = strip
                if word in strip:
                    shown = i + 1
            if skipped == without:
                if i:
                    strip = engine.strip(log_probs, word[:i], k, rejected | typed, unknown, unknown_scores)
                if word in strip:
                    skipped = i + 1
                rejected.update(strip)
            if shown < without and skipped < without:
                break
        tally.word(word, shown, skipped, first[:1] == [word], word in first[:k])

    def _skip_cost(self, scores: np.ndarray, ranks: list[int], ranges, without: int, last: float | None) -> int:
        k, ids = self.k, self.engine.sorted_ids
        rejected: list[int] = []  # places of the words shown so far, all ranked above the word typed
        for j, ((lo, hi), rank) in enumerate(zip(ranges, ranks)):
            inside = sum(lo <= place < hi for place in rejected)
            if rank - inside < k:
                return j + 1
            top = lo + best(scores[lo:hi], ids[lo:hi], k + inside, last if j == 0 else None)
            rejected += [place for place in top.tolist() if place not in rejected][:k]
        return without


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
