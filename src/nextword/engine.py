"""The suggestion engine: next-word top-k, word completion and line completion as a person types.

The model state is carried (the recurrent state, or the Transformer's KV cache of
the last ``model.context - 1`` tokens: :mod:`nextword.transformer`); the engine
never looks inside it. Committed tokens are queued and run through
the model in one call the next time a distribution is needed, so a committed
word costs one model step (a word and the comma after it, or the end of one
message and the start of the next, still cost one output layer). While a word
is being typed its completions come from the distribution already computed
for that position, looked up by prefix in a sorted array of the suggestable
words, so a keystroke inside a word costs no model work. Specials and banned
words are removed from the distribution before the top k are taken, so k
suggestions still come back.

The next-word distribution is the LSTM's, mixed with two cheap parts that a
keyboard can afford and that the LSTM alone does less well (``EngineParams``
holds the weights; the README gives the keystroke savings of each part):

* the Kneser-Ney n-gram stored in the model folder (``ngram.npz``), fitted by
  the train stage on the same train split: ``(1 - a) P_lstm + a P_ngram``;
* a cache of this conversation so far (Kuhn & De Mori 1990): the words
  committed, as a unigram mixed in with weight ``c``, then the words that
  followed the last token earlier in the conversation, as a bigram mixed in
  with weight ``b`` where that token was seen; people repeat the names,
  topics and phrases of their own conversation.

And while a word is typed, a word the strip already showed for it at a
shorter prefix is not shown again (``skip_rejected``): the person saw it and
typed on, so it is not the word, and its slot goes to the next candidate.

Words outside the vocabulary, which the model reads as ``<UNK>``, reach the
strip in two ways, as a phone keyboard's learned words and its dictionary do.
The conversation's own (kept with the cache: a name typed once) are ranked
with the vocabulary's words: each gets ``unknown_weight`` of the next token's
``<UNK>`` probability, in proportion to how often the conversation committed
it (:meth:`Engine.unknown_log_probs`), so a name the model expects no more than
the words it knows stays below them. Then the slots that no word starting with
the typed letters takes are filled (:meth:`Engine.fill`) with the train split's
words that ``vocab.min_freq`` left out (``vocab.rare``), shown with probability
0: the model gives them none of their own.

Fill-in-the-middle: with the cursor inside a message, ``suggest(right=...)``
takes the text after the cursor into account. The ``FIM_CANDIDATES`` best
words from the left context (the distribution above, prefix included) are
rescored with the right context: each is followed by the first
``FIM_RIGHT_TOKENS`` tokens of the right text (then ``<EOS>`` when the whole
of it fits: the message ends there), all candidates in one batched LSTM pass
from the carried state, and ranked by
``log P(word | left) + log P(right | left, word)``, the right tokens' log-probs
being the LSTM's mixed with the n-gram as in :meth:`Engine.step` (not the
cache, which describes the conversation). The forward model is asked for the
right context rather than a bidirectional encoder because it is the model the
engine already carries: the left state is already computed, the rescoring is
one batched pass of a few steps, every model folder and the whole pipeline
(training, n-gram, ONNX export) stay as they are, and a second model trained
and shipped for the cursor-in-the-middle case is left for when ``nextword
evaluate --fim`` shows the rescoring falls short.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nextword import decoding
from nextword.backends import OnnxStep, TorchStep, continuation_log_probs
from nextword.config import EngineParams
from nextword.errors import NextwordError
from nextword.modeldir import load_servable, onnx_file, read_banned_words
from nextword.ngram import KneserNey
from nextword.quantize import fused_int8, quantize_int8
from nextword.text import PUNCTUATION, is_word, tokenize
from nextword.tokenizer import WORD
from nextword.vocab import EOS, SPEAKER_TAG, UNK_ID
from nextword.windows import MESSAGE_END, message_head

# Fill-in-the-middle (suggest with ``right``): how many of the left context's best words are rescored with
# the text after the cursor, and how many of its tokens they are scored against. The words right after the
# gap say the most about it; each further token costs a step of the batched pass for every candidate.
FIM_CANDIDATES = 32
FIM_RIGHT_TOKENS = 4
# The engine settings that weigh what is mixed into the model's next-token distribution (see Engine.remixed).
MIX_WEIGHTS = ("ngram_weight", "cache_weight", "cache_bigram_weight", "unknown_weight")
# best(): how far below the highest score (in log-probability) the candidates for the top are looked for, in turn.
CANDIDATE_GAPS = (4.0, 12.0)


def best(scores: np.ndarray, ids: np.ndarray, want: int, last: float | None = None) -> np.ndarray:
    """Positions of the ``want`` highest ``scores``, highest first; equal scores go to the lower id.

    A lower id is a more frequent word. Every word with a score tied with the last one taken
    is a candidate, so the choice among ties never depends on how the top is found. ``last``
    is the ``want``-th highest score, when it is already known.
    """
    if want >= len(scores):
        top = np.arange(len(scores))
    elif last is not None:
        top = np.flatnonzero(scores >= last)
    else:
        # Every score at or above a bound is a candidate; once there are ``want`` of them, the bound is at
        # most the want-th highest score, so the top (ties included) is among them. A distribution puts
        # few words near its peak, so the first bound nearly always does: two passes over the scores
        # instead of a partition.
        peak = scores.max()
        for gap in CANDIDATE_GAPS:
            top = np.flatnonzero(scores >= peak - gap)
            if len(top) >= want:
                break
        else:
            top = np.flatnonzero(scores >= np.partition(scores, len(scores) - want)[len(scores) - want])
    return top[np.lexsort((ids[top], -scores[top]))][:want]


@dataclass
class Suggestion:
    word: str
    probability: float


class Engine:
    """A loaded model plus everything precomputed for fast lookups.

    ``backend`` runs the model step (:mod:`nextword.backends`); by default ``model`` in PyTorch.
    """

    def __init__(self, model, vocab, config: dict, banned: set[str], ngram: KneserNey | None,
                 options: EngineParams, backend=None):
        self.model = model.eval()
        self.backend = backend or TorchStep(self.model)
        self.vocab = vocab
        self.config = config
        if ngram is not None and ngram.vocab_size != len(vocab):
            raise NextwordError(f"the n-gram has {ngram.vocab_size} ids, the vocabulary {len(vocab)}")
        self._loaded_ngram = ngram
        self._set_options(options)
        self.speaker_tags = config["speaker_tags"]
        suggestable = np.array([is_word(t) and t not in banned for t in vocab.tokens], dtype=bool)
        self.blocked_suggest = ~suggestable
        self.blocked_ids = np.flatnonzero(self.blocked_suggest)
        # Completing a line may also end it or punctuate it; everything else that is blocked stays blocked.
        self.blocked_complete = self.blocked_suggest.copy()
        self.blocked_complete[vocab.id(EOS)] = False
        for mark in PUNCTUATION:
            if mark in vocab.index:
                self.blocked_complete[vocab.id(mark)] = False
        words = sorted((t, i) for i, t in enumerate(vocab.tokens) if suggestable[i])
        self.sorted_words = [w for w, _ in words]
        self.sorted_ids = np.array([i for _, i in words], dtype=np.int64)
        self.vocab_ids = np.arange(len(vocab), dtype=np.int64)
        self.banned = frozenset(banned)
        # The dictionary: the train split's words outside the vocabulary, most frequent first (see fill),
        # and the same words in alphabetical order with each one's place in that ranking.
        self.rare = [t for t in vocab.rare if self.fills(t)]
        by_word = sorted(range(len(self.rare)), key=self.rare.__getitem__)
        self.rare_sorted = [self.rare[i] for i in by_word]
        self.rare_places = np.array(by_word, dtype=np.int64)

    @classmethod
    def load(cls, model_dir: str | Path, options: EngineParams | None = None,
             overrides: dict | None = None, onnx: str | Path | None = None,
             exact_batches: bool = False) -> "Engine":
        """Load a servable model folder with the engine settings it was evaluated with.

        With ``int8``, the step of one stream runs PyTorch's fused int8 kernel; ``exact_batches``
        asks for the kernel whose batched steps equal each stream's own (:mod:`nextword.quantize`),
        which the keystroke simulation batches. With ``backend: onnx`` too: the int8 graph computes that
        kernel's arithmetic in ONNX operators (:mod:`nextword.export`), one stream at a time.

        ``options`` replaces those settings whole; ``overrides`` changes single ones (the CLI's flags).
        With ``backend: onnx`` the step runs the folder's exported graph (``model.int8.onnx`` with
        ``int8``, else ``model.onnx``), or the one at ``onnx``. A folder whose model was trained on
        SentencePiece pieces loads as a :class:`nextword.subword.SubwordEngine`, which suggests whole words.
        """
        torch.set_num_threads(1)  # one step of a small model: threads cost more than they give
        servable = load_servable(model_dir, options, overrides)
        options = servable.options
        model, backend = servable.model, None
        if options.backend == "onnx" and not (options.int8 and exact_batches):
            backend = OnnxStep(onnx or onnx_file(model_dir, options.int8), model)
        elif options.int8:
            model = quantize_int8(model) if exact_batches else fused_int8(model)
        banned = read_banned_words(options.banned_words)
        if servable.tokenizer.kind != WORD:
            from nextword.subword import SubwordEngine  # it builds on this module

            return SubwordEngine(model, servable.vocab, servable.config, banned, servable.ngram, options,
                                 servable.tokenizer, backend)
        return cls(model, servable.vocab, servable.config, banned, servable.ngram, options, backend)

    def _set_options(self, options: EngineParams) -> None:
        self.options = options
        ngram = self._loaded_ngram
        self.ngram = ngram if ngram is not None and options.ngram_weight > 0 else None
        # How many committed ids a session keeps: the n-gram's context.
        self.history = self.ngram.order - 1 if self.ngram is not None else 0

    def remixed(self, **weights: float) -> "Engine":
        """This engine with other mixing weights (:data:`MIX_WEIGHTS`).

        A shallow copy: it shares the model step, the vocabulary and the n-gram loaded with this one,
        so its suggestions are those of the model folder loaded with these weights.
        """
        unknown = sorted(set(weights) - set(MIX_WEIGHTS))
        if unknown:
            raise NextwordError(f"{', '.join(unknown)}: not a mixing weight ({', '.join(MIX_WEIGHTS)})")
        options = EngineParams.model_validate(self.options.model_dump() | weights)
        if options.ngram_weight > 0 and self._loaded_ngram is None:
            raise NextwordError("engine.ngram_weight: the model folder has no n-gram to mix in")
        engine = copy.copy(self)
        engine._set_options(options)
        return engine

    @property
    def batch_invariant(self) -> bool:
        """Whether the backend steps many streams in one batch, each exactly as it steps one alone."""
        return getattr(self.backend, "batch_invariant", False)

    @property
    def caching(self) -> bool:
        """Whether sessions keep a cache of their conversation: its words, and those outside the vocabulary
        (a cache weight or ``unknown_weight`` is set)."""
        options = self.options
        return bool(options.cache_weight or options.cache_bigram_weight or options.unknown_weight)

    def mix(self, log_probs: np.ndarray, history: tuple[int, ...], cache: "_Cache | None") -> np.ndarray:
        """The LSTM's next-token log-probs mixed with the n-gram after ``history`` and the conversation ``cache``."""
        return self.mix_rows(log_probs[None], [history], [cache])[0]

    def mix_rows(self, log_probs: np.ndarray, histories, caches) -> np.ndarray:
        """:meth:`mix` of each row of ``[rows, vocabulary]`` log-probs, in one pass over the batch.

        The parts nest: the n-gram is mixed into the LSTM with weight ``a``, then the cache's words into
        that with ``c``, then the last token's followers with ``b``, each part only where it has
        something to say. So a row is ``k_lstm P_lstm + k_ngram P_ngram + k_c P_c + k_b P_b``, with
        ``k_lstm = (1 - a)(1 - c)(1 - b)`` and so on; the products are worked out per row first, and
        the vocabulary-wide arrays are passed over once per term (this runs on the keystroke's clock).
        Every operation is elementwise or within a row, so a row comes out the same alone or in a batch.
        The exponential and the logarithm run in PyTorch, whose vectorised kernels take about half
        NumPy's time on these arrays (docs/results.md).
        """
        weights = (self.options.cache_weight, self.options.cache_bigram_weight)
        rows = len(log_probs)
        # Per cache part and row, what it has to say (None: nothing): the word counts and their total,
        # and the last token's followers ({id: count}).
        found: list[list] = [[None] * rows, [None] * rows]
        for row, cache in enumerate(caches):
            if cache is not None:
                found[0][row] = (cache.counts, cache.total) if cache.total else None
                found[1][row] = cache.followers.get(cache.last)
        # Each part's weight in a row, and what the parts nested inside it leave of it.
        own = [np.array([w if f is not None else 0.0 for f in part], dtype=np.float64)
               for w, part in zip(weights, found)]
        if self.ngram is None and not any(o.any() for o in own):
            return log_probs
        left = (1 - own[0]) * (1 - own[1])  # what the cache parts leave of the LSTM and the n-gram
        a = self.options.ngram_weight if self.ngram is not None else 0.0
        p = torch.from_numpy(log_probs).exp().numpy()
        p *= ((1 - a) * left).astype(np.float32)[:, None]
        if self.ngram is not None:
            p += self.ngram.next_probs(histories, dtype=np.float32, scale=a * left)
        words_scale = own[0] * (1 - own[1])
        for row, words in enumerate(found[0]):
            if words is not None and words_scale[row]:
                counts, total = words
                p[row] += counts * np.float32(words_scale[row] / total)
        followers = [(row, f) for row, f in enumerate(found[1]) if f is not None and own[1][row]]
        if followers:
            ids = [np.fromiter(f.keys(), dtype=np.int64, count=len(f)) for _, f in followers]
            n = [np.fromiter(f.values(), dtype=np.float64, count=len(f)) for _, f in followers]
            share = np.concatenate([own[1][row] * x / x.sum() for (row, _), x in zip(followers, n)])
            # A row's ids are distinct, so a plain indexed add is exact.
            p[np.repeat([row for row, _ in followers], [len(x) for x in n]), np.concatenate(ids)] += \
                share.astype(np.float32)
        return torch.from_numpy(p).log_().numpy()

    def run(self, token_ids: list[int], state):
        """Advance the model over ``token_ids``: (log-probs of the next token as numpy, new state).

        The state is the backend's own kind, None before the first step.
        """
        return self.backend.run(token_ids, state)

    def step(self, token_id: int, state):
        """Advance the model by one token: the ``step`` function the decoders use.

        The state is ``(LSTM state, last ids)``, so the n-gram mixes into completions too (not the cache,
        which describes the conversation, not the line being completed).
        """
        model_state, history = state
        log_probs, model_state = self.run([token_id], model_state)
        history = self.extend_history(history, [token_id])
        return self.mix(log_probs, history, None), (model_state, history)

    def extend_history(self, history: tuple[int, ...], ids) -> tuple[int, ...]:
        """``history`` followed by ``ids``, cut to the last ids the n-gram reads (none without one)."""
        return (history + tuple(ids))[-self.history:] if self.history else ()

    def right_ids(self, right: str, inside_word: bool) -> list[int]:
        """The ids the candidates are scored against: the right text's first ``FIM_RIGHT_TOKENS`` tokens,
        then ``<EOS>`` when they are all of it.

        With the cursor ``inside_word`` (letters typed before it), the letters
        right after it belong to that word, which is being retyped: they are
        left out, as the suggestion replaces them.
        """
        if inside_word:
            end = 0
            while end < len(right) and (right[end].isalnum() or right[end] == "'"):
                end += 1
            right = right[end:]
        tokens = tokenize(right)
        if not tokens:
            return []
        ids = self.vocab.encode(tokens[:FIM_RIGHT_TOKENS])
        if len(tokens) <= FIM_RIGHT_TOKENS:
            ids.append(self.vocab.id(EOS))
        return ids

    def right_log_probs(self, state, history: tuple[int, ...], candidates: np.ndarray,
                        right: list[int]) -> np.ndarray:
        """log P(``right`` | the context, candidate) for each candidate id: one batched pass from ``state``.

        The model's log-probs of each right token are mixed with the n-gram's after the ids before it.
        """
        inputs = np.array([[c, *right[:-1]] for c in candidates], dtype=np.int64)
        targets = np.broadcast_to(np.array(right, dtype=np.int64), inputs.shape)
        log_probs = continuation_log_probs(self.model, state, inputs, targets)
        if self.ngram is not None:
            a = self.options.ngram_weight
            histories = [self.extend_history(history, row[: t + 1]) for row in inputs.tolist()
                         for t in range(len(right))]
            ngram = self.ngram.next_probs(histories, dtype=np.float64)
            ngram = ngram[np.arange(len(histories)), targets.reshape(-1)].reshape(targets.shape)
            log_probs = np.log((1 - a) * np.exp(log_probs.astype(np.float64)) + a * ngram)
        return log_probs.sum(axis=1)

    def session(self) -> "Session":
        return Session(self)

    def prefix_range(self, prefix: str) -> tuple[int, int]:
        """The slice of ``sorted_words`` that start with ``prefix``."""
        return _prefix_range(self.sorted_words, prefix)

    def strip_range(self, prefix: str) -> tuple[int, int]:
        """The slice of ``sorted_words`` the strip of someone typing ranks after ``prefix``: the words that
        start with it, less the word it spells (:func:`typed_word`), which sorts first among them."""
        lo, hi = self.prefix_range(prefix)
        if prefix and lo < hi and self.sorted_words[lo] == prefix:
            lo += 1
        return lo, hi

    def suggestable(self, log_probs: np.ndarray) -> np.ndarray:
        """``log_probs`` with the tokens never suggested at -inf, ranked by :func:`best` before the first letter.

        A word can have probability 0 (-inf): it is raised to the lowest finite number, so the blocked
        tokens stay below every word, as the top k takes them.
        """
        suggestable = np.maximum(log_probs, np.finfo(log_probs.dtype).min)
        suggestable[self.blocked_ids] = -np.inf
        return suggestable

    def unknown_log_probs(self, log_probs: np.ndarray, unknown: dict[str, int]) -> dict[str, float]:
        """The log-probability of each of the conversation's words outside the vocabulary (``unknown``: word ->
        times committed) in the next-token distribution ``log_probs``: ``unknown_weight`` of its ``<UNK>``
        probability, shared in proportion to the counts. Empty when the weight is 0 or ``<UNK>`` has none."""
        weight, unk = self.options.unknown_weight, float(log_probs[UNK_ID])
        if not unknown or not weight or unk == -math.inf:
            return {}
        base = unk + math.log(weight / sum(unknown.values()))
        return {word: base + math.log(count) for word, count in unknown.items()}

    def ranked(self, log_probs: np.ndarray, prefix: str, k: int, rejected, unknown: dict[str, float],
               suggestable: np.ndarray | None = None) -> list[tuple[str, float]]:
        """The best ``k`` words that start with ``prefix``, not in ``rejected``, best first, each with its
        log-probability in ``log_probs``: the vocabulary's, and the conversation's own outside it
        (``unknown``, from :meth:`unknown_log_probs`).

        Ties go to the vocabulary's word, then to the more frequent one (the lower id; for the words
        outside it, the one committed more often, then the first alphabetically). ``suggestable`` is
        ``log_probs`` with the tokens never suggested at -inf, when the caller has it (before the first letter).
        """
        if prefix:  # the words that start with it: a slice of the sorted words
            lo, hi = self.prefix_range(prefix)
            ids = self.sorted_ids[lo:hi]
            scores, words, count = log_probs[ids], self.sorted_words, hi - lo
        else:  # every suggestable word: the distribution itself, the others at -inf, in the order of the ids
            if suggestable is None:
                suggestable = self.suggestable(log_probs)
            lo, scores, ids, words = 0, suggestable, self.vocab_ids, self.vocab.tokens
            count = len(self.sorted_ids)
        want = min(k + len(rejected), count)
        found = [(words[lo + i], float(scores[i])) for i in best(scores, ids, want)] if want > 0 else []
        found = [(word, score) for word, score in found if word not in rejected][:k]
        others = sorted(((score, word) for word, score in unknown.items()
                         if word.startswith(prefix) and word not in rejected), key=lambda x: (-x[0], x[1]))[:k]
        if not others:
            return found
        # Merged: the vocabulary's words first among equal scores (a stable sort keeps their order).
        return sorted(found + [(word, score) for score, word in others], key=lambda x: -x[1])[:k]

    def strip(self, log_probs: np.ndarray, prefix: str, k: int, rejected, unknown: dict[str, int],
              unknown_scores: dict[str, float]) -> list[str]:
        """The words of the strip after ``prefix`` (:meth:`ranked`, then :meth:`fill`), as a session shows them;
        ``unknown_scores`` is :meth:`unknown_log_probs` of ``unknown`` (word -> times committed)."""
        words = [w for w, _ in self.ranked(log_probs, prefix, k, rejected, unknown_scores)]
        return words + self.fill(prefix, k - len(words), unknown, rejected | set(words))

    def fills(self, token: str) -> bool:
        """Whether ``token``, outside the vocabulary, may fill the strip: a word, and not a banned one."""
        return is_word(token) and token not in self.banned and token not in self.vocab.index

    def fill(self, prefix: str, free: int, unknown: dict[str, int], rejected=frozenset()) -> list[str]:
        """Up to ``free`` words outside the vocabulary that start with ``prefix``, for the strip's free slots.

        These take the slots that no word :meth:`ranked` ranks takes: first the conversation's own
        (``unknown``, word -> times committed; with ``unknown_weight`` 0, which ranks none of them),
        the most committed first, then the dictionary's (the train split's words below
        ``vocab.min_freq``), the most frequent first; ties alphabetical. Words in ``rejected`` are left out.
        """
        if free <= 0:
            return []
        found = sorted((w for w in unknown if w.startswith(prefix) and w not in rejected),
                       key=lambda w: (-unknown[w], w))[:free]
        if len(found) < free:
            lo, hi = _prefix_range(self.rare_sorted, prefix)
            for place in np.sort(self.rare_places[lo:hi]).tolist():
                word = self.rare[place]
                if word not in rejected and word not in unknown:
                    found.append(word)
                    if len(found) == free:
                        break
        return found


def typed_word(prefix: str) -> frozenset[str]:
    """What the strip of someone typing leaves out after the letters ``prefix``: the word they already
    spell (none before the first letter).

    Tapping it would do just what the space bar does, so the slot goes to a word that saves keystrokes:
    after "the", the strip offers "they", "then" and "there", not "the". A one-off query (the CLI's
    ``suggest``, the MLflow model) still lists it, and so does a strip inside a word (fill-in-the-middle),
    where accepting a word also replaces the letters after the cursor.
    """
    return frozenset((prefix,)) if prefix else frozenset()


def _prefix_range(sorted_words: list[str], prefix: str) -> tuple[int, int]:
    """The slice of ``sorted_words`` that start with ``prefix``."""
    lo = bisect.bisect_left(sorted_words, prefix)
    return lo, bisect.bisect_left(sorted_words, prefix + "\U0010ffff", lo)


@dataclass(frozen=True)
class _Cache:
    """What a conversation has committed so far, for the engine's cache: never changed, only extended.

    ``counts`` counts the words (no specials, punctuation or banned words), one entry per id of the
    vocabulary (None before the first), and ``total`` is their sum: an array, not a dict, so that
    :meth:`Engine.mix_rows`, on the keystroke's clock, adds it to a distribution without a Python loop.
    ``followers[t]`` counts the words that came right after token ``t`` (a few, so a dict); ``last``
    is the last token committed, whose followers the next word may repeat.
    """

    counts: np.ndarray | None = None
    total: int = 0
    followers: dict = dataclasses.field(default_factory=dict)
    last: int | None = None

    def extended(self, ids, blocked: np.ndarray) -> "_Cache":
        """The cache after ``ids`` are committed, in a new array and dicts: snapshots and forks keep the old one."""
        counts, total, followers, last = self.counts, self.total, dict(self.followers), self.last
        for i in ids:
            if not blocked[i]:
                if counts is self.counts:
                    counts = np.zeros(len(blocked), dtype=np.float32) if counts is None else counts.copy()
                counts[i] += 1
                total += 1
                if last is not None:
                    after = followers[last] = dict(followers.get(last, {}))
                    after[i] = after.get(i, 0) + 1
            last = i
        return _Cache(counts, total, followers, last)


@dataclass
class _Draft:
    """The message being typed: its speaker, the words committed so far, and the session before it started."""

    speaker: str
    tokens: list[str]
    before: tuple
    partial: str = ""


@dataclass
class _Distribution:
    """The next-token log-probabilities and what suggest() derives from them, computed once."""

    log_probs: np.ndarray
    # The log-probs with the tokens that are never suggested at -inf: the strip before the first letter.
    suggestable: np.ndarray | None = None
    log_total: float = 0.0  # log of the probability mass of the suggestable words
    shown: dict = dataclasses.field(default_factory=dict)  # (prefix, k) -> the suggestions with skip_rejected


class Session:
    """One conversation: the state after everything committed so far, and the next-token distribution.

    ``copy.copy(session)`` forks it: the copy shares the model state computed so
    far and goes on independently.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._state = None
        self._dist: _Distribution | None = None
        self._pending: list[int] = []  # committed ids not yet run through the model
        self._history: tuple[int, ...] = ()  # the last ids run through it, as many as the n-gram reads
        self._cache = _Cache()  # what this conversation committed, for the engine's cache
        self._unknown: dict[str, int] = {}  # with the cache: its words outside the vocabulary (Engine.fill)
        self.in_message = False
        self._draft: _Draft | None = None
        self._lock = threading.Lock()  # a shared session may be read from several threads

    def __copy__(self) -> "Session":
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._pending = list(self._pending)
        new._draft = dataclasses.replace(self._draft) if self._draft is not None else None
        new._lock = threading.Lock()
        return new

    # -- the model state, brought up to date on demand --------------------------------------------

    def _flush(self) -> None:
        with self._lock:
            if self._pending:
                engine = self.engine
                log_probs, self._state = engine.run(self._pending, self._state)
                self._history = engine.extend_history(self._history, self._pending)
                if engine.caching:
                    self._cache = self._cache.extended(self._pending, engine.blocked_suggest)
                self._dist = _Distribution(engine.mix(log_probs, self._history, self._cache))
                self._pending = []

    @property
    def state(self):
        self._flush()
        return self._state

    @property
    def log_probs(self) -> np.ndarray | None:
        """Log-probabilities of the next token after everything committed (None before anything is)."""
        self._flush()
        return None if self._dist is None else self._dist.log_probs

    def _snapshot(self) -> tuple:
        return self._state, self._dist, list(self._pending), self.in_message, self._history, self._cache, \
            self._unknown

    def _restore(self, snapshot: tuple) -> None:
        self._state, self._dist, pending, self.in_message, self._history, self._cache, self._unknown = snapshot
        self._pending = list(pending)

    # -- committing tokens and messages ---------------------------------------------------------------

    def feed(self, token: str) -> None:
        """Commit one token to the context (run through the model when a distribution is next needed)."""
        engine = self.engine
        self._pending.append(engine.vocab.id(token))
        if engine.caching and engine.fills(token):  # a new dict: snapshots and forks keep the old one
            self._unknown = {**self._unknown, token: self._unknown.get(token, 0) + 1}

    def start_message(self, speaker: str) -> None:
        if speaker not in SPEAKER_TAG:
            raise NextwordError(f"speaker {speaker!r} is not 'user' or 'agent'")
        if self.in_message:
            self.end_message()
        for token in message_head(speaker, self.engine.speaker_tags):
            self.feed(token)
        self.in_message = True

    def end_message(self) -> None:
        self.feed(MESSAGE_END)
        self.in_message = False

    def add_message(self, speaker: str, text: str) -> None:
        """Commit a whole earlier message of the conversation; a draft being typed is dropped first."""
        self.discard_draft()
        self.start_message(speaker)
        for token in tokenize(text):
            self.feed(token)
        self.end_message()

    def type_text(self, speaker: str, text: str) -> str:
        """Make ``text`` the message ``speaker`` is typing: commit its complete words, return its partial last word.

        Called again as the text grows, only the new complete words are
        committed; if the text no longer extends what was committed (a word
        was erased, the speaker changed), the draft restarts from the
        conversation before it, so the result is always as if ``text`` had
        been typed from scratch.
        """
        if speaker not in SPEAKER_TAG:
            raise NextwordError(f"speaker {speaker!r} is not 'user' or 'agent'")
        tokens = tokenize(text)
        partial = ""
        if tokens and not text[-1].isspace() and is_word(tokens[-1]):
            partial = tokens.pop()
        draft = self._draft
        if draft is None or draft.speaker != speaker or tokens[: len(draft.tokens)] != draft.tokens:
            self.discard_draft()
            draft = self._draft = _Draft(speaker, [], self._snapshot())
            self.start_message(speaker)
        for token in tokens[len(draft.tokens):]:
            self.feed(token)
        draft.tokens = tokens
        draft.partial = partial
        return partial

    def send(self) -> None:
        """Commit the message being typed, its partial last word included, to the conversation."""
        if self._draft is None:
            raise NextwordError("no message is being typed")
        if self._draft.partial:
            self.feed(self._draft.partial)
        self.end_message()
        self._draft = None

    def discard_draft(self) -> None:
        """Forget the message being typed, if any: the session is as it was before it started."""
        if self._draft is not None:
            self._restore(self._draft.before)
            self._draft = None

    # -- suggestions and completions ------------------------------------------------------------------

    def _distribution(self) -> _Distribution:
        self._flush()
        if self._dist is None:
            raise NextwordError("nothing committed yet: start a message first")
        dist = self._dist
        if dist.suggestable is None:
            engine = self.engine
            suggestable = engine.suggestable(dist.log_probs)
            # The suggestable mass is 1 minus the few blocked tokens' mass: O(blocked), not O(vocabulary),
            # unless nearly all the mass is blocked (after a finished sentence) and 1 - x loses precision.
            blocked_mass = float(np.exp(dist.log_probs[engine.blocked_ids].astype(np.float64)).sum())
            if blocked_mass < 0.99:
                dist.log_total = float(np.log1p(-blocked_mass))
            elif len(engine.sorted_ids):
                scores = suggestable.astype(np.float64)
                top = scores.max()
                dist.log_total = float(top + np.log(np.exp(scores - top).sum()))
            dist.suggestable = suggestable  # last: another thread may read it as soon as it is set
        return dist

    def suggest(self, prefix: str = "", k: int = 3, typing: bool = False,
                skip_rejected: bool | None = None, right: str = "") -> list[Suggestion]:
        """Top-k words that start with ``prefix``, from the current distribution (no model work without ``right``).

        A probability is that of the word given what was typed: renormalised
        over the suggestable words (no specials, punctuation or banned words)
        that start with ``prefix``, the conversation's own words outside the
        vocabulary among them (:meth:`Engine.unknown_log_probs`). Ties go to
        the more frequent word.

        ``typing`` asks for the suggestion strip of someone typing the word
        letter by letter, who saw the strip at every shorter prefix. It leaves
        out the word the letters already spell (:func:`typed_word`). With the
        engine's ``skip_rejected``, the words shown at shorter prefixes were
        passed over and are left out too. They are worked out from the prefix,
        not remembered from earlier calls, so the result depends only on the
        conversation and the text typed (the web API stays stateless); each
        prefix is computed once per position. Without ``typing`` (a one-off
        query: the CLI's ``suggest``, the MLflow model) nothing is left out. ``skip_rejected``
        overrides the engine's setting (the keystroke simulation scores both).

        ``right`` is the text after the cursor, when it is inside the message
        (fill-in-the-middle, see the module's docstring): the best words from
        the left are rescored with it, one batched model pass, and a
        probability is then that of the word among those rescored, given both
        sides. Nothing is left out for ``typing`` then: each strip is worked
        out afresh, and accepting a word replaces the letters after the cursor
        too. Without right-hand tokens (an empty or blank ``right``) it is the
        plain strip.
        """
        dist = self._distribution()
        prefix = prefix.lower()
        right_ids = self.engine.right_ids(right, inside_word=bool(prefix)) if right else []
        if right_ids:
            return self._fill_in(dist, prefix, k, right_ids)
        skip = self.engine.options.skip_rejected if skip_rejected is None else skip_rejected
        if not typing:
            return self._top(dist, prefix, k, frozenset())
        if not skip:
            return self._top(dist, prefix, k, typed_word(prefix))
        rejected: set[str] = set()
        for end in range(len(prefix) + 1):
            key = (prefix[:end], k)
            shown = dist.shown.get(key)
            if shown is None:
                shown = dist.shown[key] = self._top(dist, key[0], k, rejected | typed_word(key[0]))
            rejected.update(s.word for s in shown)
        return shown

    def _fill_in(self, dist: _Distribution, prefix: str, k: int, right_ids: list[int]) -> list[Suggestion]:
        """The top k of the left context's best ``FIM_CANDIDATES`` words rescored with ``right_ids``."""
        engine = self.engine
        candidates = self._ranked(dist, prefix, max(k, FIM_CANDIDATES), frozenset())
        if not candidates:
            return []
        ids = np.array([engine.vocab.id(s.word) for s in candidates], dtype=np.int64)
        left = np.log(np.maximum([s.probability for s in candidates], np.finfo(np.float64).tiny))
        scores = left + engine.right_log_probs(self.state, self._history, ids, right_ids)
        order = np.lexsort((ids, -scores))[:k]  # ties to the more frequent word, as in _top
        posterior = np.exp(scores - scores.max())
        posterior /= posterior.sum()
        return [Suggestion(candidates[i].word, float(posterior[i])) for i in order]

    def _top(self, dist: _Distribution, prefix: str, k: int, rejected) -> list[Suggestion]:
        """The strip: the best ``k`` words that start with ``prefix``, not in ``rejected`` (:meth:`_ranked`);
        free slots go to the dictionary's words outside the vocabulary (:meth:`Engine.fill`), whose probability is 0."""
        top = self._ranked(dist, prefix, k, rejected)
        if len(top) < k:
            shown = set(rejected) | {s.word for s in top}
            top += [Suggestion(w, 0.0) for w in self.engine.fill(prefix, k - len(top), self._unknown, shown)]
        return top

    def _ranked(self, dist: _Distribution, prefix: str, k: int, rejected) -> list[Suggestion]:
        """The best ``k`` words that start with ``prefix``, not in ``rejected`` (:meth:`Engine.ranked`), with their
        probabilities given ``prefix``: over the vocabulary's words and the conversation's own that start with it."""
        engine = self.engine
        unknown = engine.unknown_log_probs(dist.log_probs, self._unknown)
        found = engine.ranked(dist.log_probs, prefix, k, rejected, unknown, dist.suggestable)
        if not found:
            return []
        log_total = dist.log_total
        if prefix:  # the probability given the letters typed: over the words that start with them
            lo, hi = engine.prefix_range(prefix)
            wide = dist.log_probs[engine.sorted_ids[lo:hi]].astype(np.float64)
            log_total = -math.inf
            if len(wide):
                peak = wide.max()
                log_total = float(peak + np.log(np.exp(wide - peak).sum()))
        others = [score for word, score in unknown.items() if word.startswith(prefix)]
        if others:
            log_total = float(np.logaddexp.reduce([log_total, *others]))
        return [Suggestion(word, math.exp(score - log_total)) for word, score in found]

    def complete(self, strategy: str = "greedy", max_words: int = 20, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, beam_size: int = 4, seed: int = 0,
                 prefix: str = "") -> list[str]:
        """Continue the current message until <EOS> or ``max_words`` tokens; the session is not advanced.

        ``strategy`` is one of :data:`nextword.decoding.STRATEGIES`.
        With a ``prefix`` (a partly typed word) the first token is a word that
        starts with it, chosen by the same strategy (greedily for beam search).
        """
        engine = self.engine
        rng = np.random.default_rng(seed)
        state, log_probs, first = (self.state, self._history), self._distribution().log_probs, []
        if prefix:
            lo, hi = engine.prefix_range(prefix.lower())
            if hi <= lo:
                return []
            blocked = np.ones(len(engine.vocab), dtype=bool)
            blocked[engine.sorted_ids[lo:hi]] = False
            token = decoding.choose(decoding.masked(log_probs, blocked), "greedy" if strategy == "beam" else strategy,
                                    rng, temperature, top_k, top_p)
            first = [token]
            log_probs, state = engine.step(token, state)
        args = (engine.step, state, log_probs, engine.blocked_complete, engine.vocab.id(EOS), max_words - len(first))
        if strategy == "beam":
            ids = decoding.beam_search(*args, beam_size=beam_size)
        else:
            ids = decoding.sample_line(*args, strategy=strategy, rng=rng,
                                       temperature=temperature, top_k=top_k, top_p=top_p)
        return engine.vocab.decode(first + ids)
