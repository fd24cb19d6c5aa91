"""Whole-word suggestions from a subword model: a short beam search over pieces, up to a word boundary.

A model trained on SentencePiece pieces (:mod:`nextword.tokenizer`) predicts
pieces, but the strip shows words. The next word is found by a beam search
from the state after everything committed: the first piece starts a word (it
carries the mark ``▁``), the next ones continue it, and a word ends where
the model's next piece is a boundary: a piece that starts a word (punctuation
included) or the end of the message. A word's probability is that of its
pieces times the probability of a boundary after them, summed over the
segmentations the search reached. While a word is typed, only pieces that
agree with the typed letters are expanded, so a prefix is completed to words
the word vocabulary never had, as long as their characters were seen.

The engine's parts work at the level they belong to: the n-gram (fitted on
piece ids) is mixed into every piece distribution of the search; the
conversation cache counts whole words, and is mixed into the words' scores
the way :meth:`nextword.engine.Engine.mix` mixes it into a word model's:
``(1 - c) P_model + c P_cache``, then the bigram part with ``b``. A word of the
cache that the search did not reach gets the cache's share alone: that is
how a name used earlier in the conversation is completed even when the model
gives its pieces little probability. Banned words are left out of what is
shown, and a completed line stops before one.

A suggestion's probability is the word's score over the sum of the scores of
the words found for the letters typed: the search sees only the likeliest
words, so it is relative to them. Every search result and model step is kept
for the position until the next word is committed, so a keystroke inside a
word runs the model only for the pieces that its letters newly allow.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from nextword import decoding
from nextword.backends import TorchStep
from nextword.engine import Engine, Session, Suggestion, _Distribution
from nextword.text import PUNCTUATION, is_word
from nextword.tokenizer import WORD_START, Tokenizer
from nextword.vocab import AGENT, BOS, EOS, PAD, SPECIALS, UNK, USER

BEAM_WIDTH = 8  # hypotheses kept at each piece of the search, at least k + the rejected words
MAX_PIECES = 12  # the longest word the search builds, in pieces


class _PieceTable:
    """Pieces of one kind (word starts or continuations) sorted by their text, for prefix lookups."""

    def __init__(self, entries: list[tuple[str, int]]):
        entries.sort()
        self.texts = [text for text, _ in entries]
        self.ids = np.array([i for _, i in entries], dtype=np.int64)
        self.by_text = {text: i for text, i in entries}

    def agreeing(self, rest: str) -> np.ndarray:
        """Ids of the pieces that agree with the letters still to be matched: the piece starts with
        ``rest`` (and may go on), or is a shorter part of it (the empty word start included)."""
        if not rest:
            return self.ids
        lo = bisect.bisect_left(self.texts, rest)
        hi = bisect.bisect_left(self.texts, rest + "\U0010ffff", lo)
        shorter = [self.by_text[rest[:end]] for end in range(len(rest)) if rest[:end] in self.by_text]
        return np.concatenate([self.ids[lo:hi], np.array(shorter, dtype=np.int64)])


class SubwordEngine(Engine):
    """An :class:`Engine` over a SentencePiece model's pieces that suggests and completes whole words."""

    def __init__(self, model, vocab, config: dict, banned: set[str], ngram, options, tokenizer: Tokenizer,
                 backend=None):
        super().__init__(model, vocab, config, banned, ngram, options, backend)
        self.tokenizer = tokenizer
        self.special_ids = {token: vocab.id(token) for token in SPECIALS}
        starts, continuations = [], []
        self.piece_text = [""] * len(vocab)
        for i, piece in enumerate(vocab.tokens):
            if piece in self.special_ids:
                continue
            if piece.startswith(WORD_START):
                text = self.piece_text[i] = piece[len(WORD_START):]
                if text not in PUNCTUATION:  # a word (or the bare mark before one), not a punctuation mark
                    starts.append((text, i))
            else:
                self.piece_text[i] = piece
                continuations.append((piece, i))
        self.starts, self.continuations = _PieceTable(starts), _PieceTable(continuations)
        # What may follow the last piece of a word: the next word or mark, or the message's layout.
        self.boundary_ids = np.array([i for i, piece in enumerate(vocab.tokens) if piece.startswith(WORD_START)]
                                     + [vocab.id(t) for t in (EOS, BOS, USER, AGENT)], dtype=np.int64)
        self.continues_word = np.zeros(len(vocab), dtype=bool)
        self.continues_word[self.continuations.ids] = True
        # A completed line is pieces and its end; banned words are cut off after decoding (see complete).
        self.blocked_complete = np.zeros(len(vocab), dtype=bool)
        self.blocked_complete[[vocab.id(t) for t in (PAD, UNK, BOS, USER, AGENT)]] = True

    @property
    def batch_invariant(self) -> bool:
        """False: the batched keystroke simulation ranks whole-word ids in one step, and a word here is a
        search over pieces, so :func:`nextword.keystrokes.simulate_batched` types one stream at a time."""
        return False

    @property
    def caching(self) -> bool:
        return False  # no cache of piece ids: the session keeps one of whole words

    @property
    def word_caching(self) -> bool:
        return bool(self.options.cache_weight or self.options.cache_bigram_weight)

    def mix(self, log_probs: np.ndarray, history: tuple[int, ...], cache) -> np.ndarray:
        return super().mix(log_probs, history, None)  # the cache is mixed in over words (SubwordSession)

    def ids(self, token: str) -> list[int]:
        """The ids of one committed token: a special's own, or the pieces of a word or mark."""
        special = self.special_ids.get(token)
        if special is not None:
            return [special]
        return self.vocab.encode(self.tokenizer.pieces([token]))

    def session(self) -> "SubwordSession":
        return SubwordSession(self)

    def step_many(self, token_ids: list[int], states: list) -> list:
        """:meth:`Engine.step` for several (token, state) pairs: in one model call with the PyTorch backend."""
        if not isinstance(self.backend, TorchStep) or len(token_ids) == 1:
            return [self.step(token, state) for token, state in zip(token_ids, states)]
        model_states = [model_state for model_state, _ in states]
        with torch.no_grad():  # one output layer for the whole batch: the costly part of a step
            feats, batched = self.model.features(torch.tensor(token_ids)[:, None], _concatenate(model_states))
            log_probs = self.model.log_probs(feats[:, -1]).numpy()
        out = []
        for row, (token, (_, history)) in enumerate(zip(token_ids, states)):
            history = self.extend_history(history, [token])
            out.append((self.mix(log_probs[row], history, None), (_row(batched, row), history)))
        return out


def _concatenate(states: list):
    """Recurrent states of batch 1 (a tensor, or a tuple for an LSTM) as one state of their batch."""
    if isinstance(states[0], tuple):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*states))
    return torch.cat(states, dim=1)


def _row(state, row: int):
    """One row of a batched recurrent state, as a state of batch 1."""
    if isinstance(state, tuple):
        return tuple(part[:, row:row + 1] for part in state)
    return state[:, row:row + 1]


@dataclass(frozen=True)
class _WordCache:
    """The session's conversation cache over whole words, as strings: the word engine's
    (:class:`nextword.engine._Cache`) counts ids, and a word here has no id of its own.

    ``words`` counts the words, ``followers[w]`` the words that came right after ``w``; ``last`` is the last token.
    """

    words: dict = field(default_factory=dict)
    followers: dict = field(default_factory=dict)
    last: str | None = None


def _remember(cache: _WordCache, token: str, countable: bool) -> _WordCache:
    """The word cache after ``token`` is committed (in new dicts: snapshots and forks keep the old one)."""
    words, followers = cache.words, cache.followers
    if countable:
        words = dict(words)
        words[token] = words.get(token, 0) + 1
        if cache.last is not None:
            followers = dict(followers)
            after = followers[cache.last] = dict(followers.get(cache.last, {}))
            after[token] = after.get(token, 0) + 1
    return _WordCache(words, followers, token)


class SubwordSession(Session):
    """A :class:`Session` whose suggestions are whole words found by a search over pieces.

    Its ``_cache`` counts whole words (strings), not ids; everything else is the word session's.
    """

    engine: SubwordEngine

    def __init__(self, engine: SubwordEngine):
        super().__init__(engine)
        self._cache = _WordCache()
        self._searched: _Distribution | None = None  # the position whose model steps and searches are kept
        self._nodes: dict = {}
        self._ends: dict = {}  # the log-probability of a word boundary after a node's pieces
        self._found: dict = {}

    def suggest(self, prefix: str = "", k: int = 3, typing: bool = False,
                skip_rejected: bool | None = None, right: str = "") -> list[Suggestion]:
        """The word session's strip, from the left context only: ``right`` is not read.

        Fill-in-the-middle rescores whole-word candidates token by token, which
        the search over pieces does not do yet; the text after the cursor is
        ignored rather than refused, so the page and the API keep working
        while someone edits inside a message.
        """
        return super().suggest(prefix, k, typing, skip_rejected)

    def feed(self, token: str) -> None:
        engine = self.engine
        self._pending.extend(engine.ids(token))
        if engine.word_caching:
            self._cache = _remember(self._cache, token, is_word(token) and token not in engine.banned)

    # -- the search -----------------------------------------------------------------------------------

    def _node(self, ids: tuple[int, ...]):
        """(next-piece log-probs, decoder state) after the pieces ``ids`` of the word being searched."""
        node = self._nodes.get(ids)
        if node is None:
            _, state = self._node(ids[:-1])
            node = self._nodes[ids] = self.engine.step(ids[-1], state)
        return node

    def _run(self, hypotheses: list[tuple[int, ...]]) -> None:
        """Compute the nodes of the hypotheses not yet run, whose parents are, in one batch."""
        new = [ids for ids in dict.fromkeys(hypotheses) if ids not in self._nodes]
        if new:
            steps = self.engine.step_many([ids[-1] for ids in new], [self._nodes[ids[:-1]][1] for ids in new])
            self._nodes.update(zip(new, steps))

    def _end(self, ids: tuple[int, ...]) -> float:
        """The log-probability that the word ends after the pieces ``ids``: a boundary piece comes next."""
        end = self._ends.get(ids)
        if end is None:
            at_boundary = self._node(ids)[0][self.engine.boundary_ids].astype(np.float64)
            top = at_boundary.max()
            end = self._ends[ids] = float(top + np.log(np.exp(at_boundary - top).sum())) if np.isfinite(top) else top
        return end

    def _words(self, dist: _Distribution, prefix: str, want: int) -> dict[str, float]:
        """Words that start with ``prefix`` and the model's probability of each, from the beam search."""
        if self._searched is not dist:  # a new position: new dicts, so a fork at the old one keeps its own
            self._searched, self._found, self._ends = dist, {}, {}
            self._nodes = {(): (dist.log_probs, (self._state, self._history))}
        key = (prefix, want)
        if key in self._found:
            return self._found[key]
        engine = self.engine
        width = max(BEAM_WIDTH, want)
        found: dict[str, float] = {}
        frontier = [(0.0, (), "")]  # (log-probability of the pieces, piece ids, the text they spell)
        for depth in range(MAX_PIECES + 1):
            self._run([ids for _, ids, _ in frontier])
            grown = []
            for log_p, ids, text in frontier:
                log_probs, _ = self._node(ids)
                if text and text.startswith(prefix) and is_word(text) and text not in engine.banned:
                    found[text] = found.get(text, 0.0) + float(np.exp(log_p + self._end(ids)))
                if depth == MAX_PIECES:
                    continue
                table = engine.continuations if ids else engine.starts
                agreeing = table.agreeing(prefix[len(text):])
                if not len(agreeing):
                    continue
                scores = log_probs[agreeing]
                top = np.argsort(-scores, kind="stable")[:width] if len(agreeing) > width else range(len(agreeing))
                grown += [(log_p + float(scores[j]), ids + (int(agreeing[j]),),
                           text + engine.piece_text[agreeing[j]]) for j in top]
            grown.sort(key=lambda h: -h[0])
            frontier = [h for h in grown[:width] if np.isfinite(h[0])]
            if not frontier:
                break
            # A longer word is no more probable than its pieces so far: stop once none can enter the top.
            if len(found) >= want and np.exp(frontier[0][0]) < sorted(found.values())[-want]:
                break
        self._found[key] = found
        return found

    def _top(self, dist: _Distribution, prefix: str, k: int, rejected) -> list[Suggestion]:
        scores = dict(self._words(dist, prefix, k + len(rejected)))
        options, cache = self.engine.options, self._cache
        parts = [(options.cache_weight, cache.words), (options.cache_bigram_weight, cache.followers.get(cache.last))]
        for weight, counts in parts:
            if not weight or not counts:
                continue
            total = sum(counts.values())
            for word in scores:
                scores[word] *= 1 - weight
            for word, n in counts.items():
                if word.startswith(prefix):
                    scores[word] = scores.get(word, 0.0) + weight * n / total
        ranked = sorted(((p, w) for w, p in scores.items() if w not in rejected and p > 0), key=lambda s: (-s[0], s[1]))
        total = sum(p for p, _ in ranked)
        return [Suggestion(w, p / total) for p, w in ranked[:k]]

    # -- whole lines ----------------------------------------------------------------------------------

    def complete(self, strategy: str = "greedy", max_words: int = 20, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, beam_size: int = 4, seed: int = 0,
                 prefix: str = "") -> list[str]:
        """As :meth:`Session.complete`, over pieces: the line's words and marks, up to ``max_words`` of them.

        A partly typed word is first completed to the top suggestion; the line then stops before
        any banned word the pieces spell.
        """
        engine = self.engine
        session = copy.copy(self)
        first: list[str] = []
        if prefix:
            top = session.suggest(prefix, 1)
            if not top:
                return []
            first = [top[0].word]
            session.feed(first[0])
        state, log_probs = (session.state, session._history), session._distribution().log_probs
        # The committed word is whole: the line goes on with a new word, a mark or the end of the message.
        log_probs = decoding.masked(log_probs, engine.continues_word)
        args = (engine.step, state, log_probs, engine.blocked_complete, engine.vocab.id(EOS),
                max(max_words - len(first), 0) * MAX_PIECES)
        if strategy == "beam":
            ids = decoding.beam_search(*args, beam_size=beam_size)
        else:
            ids = decoding.sample_line(*args, strategy=strategy, rng=np.random.default_rng(seed),
                                       temperature=temperature, top_k=top_k, top_p=top_p)
        words = first + engine.tokenizer.words(engine.vocab.decode(ids))
        return _before_banned(words[:max_words], engine.banned)


def _before_banned(words: Sequence[str], banned: frozenset[str]) -> list[str]:
    """``words`` up to the first banned one."""
    out = []
    for word in words:
        if word in banned:
            break
        out.append(word)
    return out
