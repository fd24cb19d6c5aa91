"""The classical baseline: an interpolated modified Kneser-Ney n-gram model over token ids.

It is trained on the same id stream as the LSTM (the train split's windows
laid end to end) and gives a full distribution over the vocabulary, so it is
scored by the same code (:class:`nextword.metrics.Scores`).

The model (Chen & Goodman 1998, "interpolated modified Kneser-Ney")::

    P_k(w | h) = max(c_k(h w) - D_k(c_k(h w)), 0) / c_k(h .)  +  gamma_k(h) * P_{k-1}(w | h')
    gamma_k(h) = (D_k1 * N1(h .) + D_k2 * N2(h .) + D_k3 * N3+(h .)) / c_k(h .)
    P_0(w)     = 1 / V

* ``h'`` is ``h`` without its first token; ``N_r(h .)`` counts the words that
  follow ``h`` exactly ``r`` times (``N3+``: three times or more).
* ``c_k`` is the raw count at the highest order and, below it, the
  continuation count: how many distinct tokens precede the k-gram.
* A context ``h`` never seen at order k leaves ``P_k = P_{k-1}``.
* Three discounts per order come from that order's count-of-counts ``n_r``:
  ``Y = n1 / (n1 + 2 n2)`` and ``D_r = r - (r + 1) Y n_{r+1} / n_r``.
  Plain interpolated KN is the special case ``D_1 = D_2 = D_3``.
* Discounts are kept in ``(0, r]``: positive so that every context leaves
  mass to the lower order, at most ``r`` so that no count goes negative.
* The lowest order interpolates with the uniform distribution, so no id ever
  gets zero probability and an out-of-vocabulary target (``<UNK>``) is scored.
* The stream is one sequence, so n-grams span message and conversation
  boundaries, as the LSTM's carried state does; its first ids, with fewer than
  N - 1 ids before them, are predicted from the orders their history allows.

Lookups are vectorised with numpy. Each order keeps its n-grams as a
sorted array of keys ``index of the (k-1)-gram prefix * V + last id`` (the
unigram's index is its id). The keys of one context are then contiguous, which
gives CSR rows of followers. A batch of distributions is one dense
``weight * P_1`` term plus, for each higher order, a scatter of the context's
followers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from nextword.vocab import PAD_ID

RECENT_CONTEXTS = 64  # one-history distributions kept (KneserNey._recent): 64 x V floats

# Discounts used when an order has too few distinct counts to estimate them
# (tiny corpora), in the range that large corpora give.
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)


def stream_from_windows(windows: np.ndarray) -> np.ndarray:
    """The id stream a split's windows were cut from: ``windows[0]``, then ``windows[i, 1:]``, without PAD."""
    if len(windows) == 0:
        return np.zeros(0, dtype=np.int64)
    stream = np.concatenate([windows[0], windows[1:, 1:].reshape(-1)]).astype(np.int64)
    return stream[stream != PAD_ID]


def estimate_discounts(counts: np.ndarray) -> tuple[float, float, float]:
    """Modified KN discounts ``(D1, D2, D3+)`` from the count-of-counts of ``counts``."""
    n = np.bincount(counts[counts > 0], minlength=5)[1:5].astype(np.float64)  # n1 .. n4
    if (n == 0).any():
        return FALLBACK_DISCOUNTS
    y = n[0] / (n[0] + 2 * n[1])
    d = [r - (r + 1) * y * n[r] / n[r - 1] for r in (1, 2, 3)]
    return tuple(float(np.clip(d_r, 0.01, r)) for r, d_r in zip((1, 2, 3), d))


@dataclass
class _Order:
    """One order k >= 2, as CSR rows of followers indexed by the (k-1)-gram context."""

    keys: np.ndarray  # [n_k] sorted int64: context index * V + word
    offsets: np.ndarray  # [n_{k-1} + 1] rows of keys per context
    words: np.ndarray  # [n_k] last id of each k-gram
    alpha: np.ndarray  # [n_k] discounted probability of the word after its context
    gamma: np.ndarray  # [n_{k-1}] weight of the lower order after each context (1 if never a context)
    discounts: tuple[float, float, float]


def _discounted(counts: np.ndarray, discounts: Sequence[float]) -> np.ndarray:
    """``counts - D(count)`` for int counts, with ``D(0) = 0``."""
    table = np.array([0.0, *discounts], dtype=np.float64)
    return counts - table[np.minimum(counts, 3)]


def _by_context(context: np.ndarray, counts: np.ndarray, discounts, n_contexts: int):
    """Per k-gram ``alpha`` and per context ``gamma`` for k-grams grouped by sorted ``context``."""
    kept = _discounted(counts, discounts)
    total = np.bincount(context, weights=counts, minlength=n_contexts)
    held = np.bincount(context, weights=counts - kept, minlength=n_contexts)
    seen = total > 0
    safe = np.where(seen, total, 1.0)
    alpha = kept / safe[context]
    gamma = np.where(seen, held / safe, 1.0)
    return alpha, gamma


class KneserNey:
    """Interpolated modified Kneser-Ney over ids ``0 .. vocab_size - 1``."""

    def __init__(self, vocab_size: int, unigram: np.ndarray, orders: list[_Order], unigram_discounts):
        self.vocab_size = vocab_size
        self.unigram = unigram  # [V] P_1, interpolated with uniform
        self.orders = orders  # orders 2 .. N
        self.unigram_discounts = unigram_discounts
        self._unigram_as = {}  # dtype -> the unigram in it, for _next_probs_one
        # The distributions of the last contexts asked for one at a time (see _next_probs_one).
        self._recent = functools.lru_cache(maxsize=RECENT_CONTEXTS)(self._next_probs_one)

    @property
    def order(self) -> int:
        return len(self.orders) + 1

    @property
    def discounts(self) -> list[tuple[float, float, float]]:
        """Discounts per order, from unigram up."""
        return [self.unigram_discounts] + [o.discounts for o in self.orders]

    @classmethod
    def fit(cls, stream: np.ndarray, vocab_size: int, order: int = 4,
            discounts: Sequence[Sequence[float]] | None = None) -> "KneserNey":
        """Count the n-grams of an id stream; ``discounts`` (per order, from unigram up) overrides the estimate."""
        if order < 1:
            raise ValueError("order must be at least 1")
        s = np.asarray(stream, dtype=np.int64)
        if len(s) and (s.min() < 0 or s.max() >= vocab_size):
            raise ValueError(f"ids must lie in 0 .. {vocab_size - 1}")
        v = vocab_size
        # keys[k]: the sorted distinct k-grams; index[k][j]: which of them starts at position j.
        keys = {1: np.arange(v, dtype=np.int64)}
        index = {1: s}
        first_start = {}
        for k in range(2, order + 1):
            grams = index[k - 1][:-1] * v + s[k - 1:]
            uniq, first, inverse, raw = np.unique(grams, return_index=True, return_inverse=True, return_counts=True)
            keys[k], first_start[k], index[k] = uniq, first, inverse.reshape(-1).astype(np.int64)
            if k == order:
                top_counts = raw

        def counts_of(k: int) -> np.ndarray:
            """Raw counts at the top order; below it, distinct left extensions (continuation counts)."""
            if k == order:
                return top_counts if order > 1 else np.bincount(s, minlength=v)
            # Each distinct (k+1)-gram adds one to its suffix, the k-gram starting one id later.
            suffix = index[k][first_start[k + 1] + 1]
            return np.bincount(suffix, minlength=len(keys[k]))

        def pick(k: int, counts: np.ndarray):
            if discounts is not None:
                return tuple(float(d) for d in discounts[k - 1])
            return estimate_discounts(counts)

        orders = []
        for k in range(2, order + 1):
            counts = counts_of(k)
            d = pick(k, counts)
            context = keys[k] // v
            n_contexts = len(keys[k - 1])
            alpha, gamma = _by_context(context, counts, d, n_contexts)
            offsets = np.searchsorted(context, np.arange(n_contexts + 1))
            orders.append(_Order(keys[k], offsets, (keys[k] % v).astype(np.int64), alpha, gamma, d))
        counts1 = counts_of(1)
        d1 = pick(1, counts1)
        alpha1, gamma1 = _by_context(np.zeros(v, dtype=np.int64), counts1, d1, 1)
        unigram = alpha1 + gamma1[0] / v
        return cls(v, unigram, orders, d1)

    def save(self, path) -> None:
        """Write the model as one ``.npz`` of plain arrays (nothing pickled); :meth:`load` reads it back.

        Each order keeps its CSR rows, follower ids and discounted probabilities, the
        probabilities in float32 (a relative change of about 1e-7); the sorted keys are
        rebuilt on load from the rows, so they are not stored.
        """
        arrays = {"vocab_size": np.array(self.vocab_size), "unigram": self.unigram,
                  "unigram_discounts": np.array(self.unigram_discounts)}
        for k, o in enumerate(self.orders, start=2):
            offsets = o.offsets.astype(np.int32) if o.offsets[-1] < 2**31 else o.offsets
            arrays.update({f"offsets{k}": offsets, f"words{k}": o.words.astype(np.int32),
                           f"alpha{k}": o.alpha.astype(np.float32), f"gamma{k}": o.gamma.astype(np.float32),
                           f"discounts{k}": np.array(o.discounts)})
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path) -> "KneserNey":
        with np.load(path, allow_pickle=False) as z:
            v = int(z["vocab_size"])
            orders = []
            k = 2
            while f"offsets{k}" in z:
                offsets, words = z[f"offsets{k}"].astype(np.int64), z[f"words{k}"].astype(np.int64)
                context = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
                orders.append(_Order(context * v + words, offsets, words, z[f"alpha{k}"].astype(np.float64),
                                     z[f"gamma{k}"].astype(np.float64),
                                     tuple(float(d) for d in z[f"discounts{k}"])))
                k += 1
            return cls(v, z["unigram"], orders, tuple(float(d) for d in z["unigram_discounts"]))

    def _gram_indices(self, seqs: np.ndarray) -> list[np.ndarray]:
        """For ``[B, T]`` ids (-1: none), the index of the k-gram ending at each column, -1 if unseen.

        Element ``j`` of the result is for (j+1)-grams, up to order N - 1 (the contexts).
        """
        v = self.vocab_size
        if (seqs >= v).any():
            raise ValueError(f"ids must lie in 0 .. {v - 1}")
        out = [np.where(seqs >= 0, seqs, -1)]
        for o in self.orders[:-1]:
            prev = out[-1]
            cur = np.full_like(seqs, -1)
            valid = (prev[:, :-1] >= 0) & (seqs[:, 1:] >= 0)
            query = prev[:, :-1][valid] * v + seqs[:, 1:][valid]
            pos = np.searchsorted(o.keys, query)
            pos_c = np.minimum(pos, len(o.keys) - 1)
            found = (pos < len(o.keys)) & (o.keys[pos_c] == query) if len(o.keys) else np.zeros(len(query), bool)
            inner = cur[:, 1:]
            inner[valid] = np.where(found, pos_c, -1)
            out.append(cur)
        return out

    def _dense(self, b: int, contexts: list[np.ndarray], dtype=np.float64, scale=1.0) -> np.ndarray:
        """``[b, V]`` distributions (times ``scale``, one or one per row) for context indices per order
        2 .. N (-1: context unseen)."""
        # Weight of each order's term: the product of the gammas of all orders above it.
        weights = [np.broadcast_to(np.asarray(scale, dtype=np.float64), (b,)).copy()]
        for o, ctx in zip(reversed(self.orders), reversed(contexts)):
            gamma = np.where(ctx >= 0, o.gamma[np.maximum(ctx, 0)], 1.0)
            weights.append(weights[-1] * gamma)
        weights = weights[::-1]  # weights[k - 1] multiplies order k
        probs = np.multiply.outer(weights[0].astype(dtype), self.unigram.astype(dtype))
        flat = probs.reshape(-1)
        for o, ctx, w in zip(self.orders, contexts, weights[1:]):
            rows = np.flatnonzero(ctx >= 0)
            start = o.offsets[ctx[rows]]
            length = o.offsets[ctx[rows] + 1] - start
            total = int(length.sum())
            if total == 0:
                continue
            row_of = np.repeat(rows, length)
            gram = np.repeat(start - np.cumsum(length) + length, length) + np.arange(total)
            # One context per row, so a row's followers are distinct: a plain indexed add is exact.
            flat[row_of * self.vocab_size + o.words[gram]] += (w[row_of] * o.alpha[gram]).astype(dtype)
        return probs

    def next_probs(self, histories: Sequence[Sequence[int]], dtype=np.float64, scale=1.0) -> np.ndarray:
        """``[B, V]`` next-id distributions after each history (only the last N - 1 ids matter), times
        ``scale`` (one number, or one per history)."""
        width = self.order - 1
        if len(histories) == 1:
            tail = tuple(int(i) for i in list(histories[0])[-width:]) if width else ()
            return self._recent(tail, np.dtype(dtype), float(np.ravel(scale)[0]))[None]
        seqs = np.full((len(histories), max(width, 1)), -1, dtype=np.int64)
        for i, h in enumerate(histories):
            tail = list(h)[-width:] if width else []
            if tail:
                seqs[i, width - len(tail):] = tail
        grams = self._gram_indices(seqs)
        contexts = [g[:, -1] for g in grams[: len(self.orders)]]
        return self._dense(len(histories), contexts, dtype, scale)

    def _next_probs_one(self, tail: tuple[int, ...], dtype, scale: float) -> np.ndarray:
        """:meth:`next_probs` of one history, given as ``tail``, the ids of it that the n-gram reads (the last
        N - 1 at most): the same numbers without the batch's index arrays; read-only.

        The engine asks for one distribution per committed word, on the keystroke's clock. The last
        ``RECENT_CONTEXTS`` are kept (``_recent``, keyed by the ids the n-gram reads, the dtype and the
        scale): the slowest context to look up, the start of a message, whose followers are most of the
        vocabulary, recurs at every message of a conversation.
        """
        v = self.vocab_size
        if any(i >= v for i in tail):
            raise ValueError(f"ids must lie in 0 .. {v - 1}")
        # grams[t]: the index of the k-gram that ends at tail[t] (-1: unseen), for k = 1, 2, ...;
        # the one that ends the history is the context of order k + 1.
        grams = [i if i >= 0 else -1 for i in tail]
        contexts = [grams[-1] if grams else -1]
        for o in self.orders[:-1]:
            longer = []
            for t in range(1, len(grams)):
                word = tail[len(tail) - len(grams) + t]
                index = -1
                if grams[t - 1] >= 0 and word >= 0:
                    query = grams[t - 1] * v + word
                    pos = int(np.searchsorted(o.keys, query))
                    if pos < len(o.keys) and o.keys[pos] == query:
                        index = pos
                longer.append(index)
            grams = longer
            contexts.append(grams[-1] if grams else -1)
        # As _dense: each order's term weighs the product of the gammas of the orders above it.
        weight = scale
        weights = []
        for o, ctx in zip(reversed(self.orders), reversed(contexts)):
            weights.append(weight)
            if ctx >= 0:
                weight = weight * o.gamma[ctx]
        weights.reverse()
        unigram = self._unigram_as.get(np.dtype(dtype))
        if unigram is None:
            unigram = self._unigram_as[np.dtype(dtype)] = self.unigram.astype(dtype)
        probs = np.asarray(weight, dtype=dtype) * unigram
        for o, ctx, w in zip(self.orders, contexts, weights):
            if ctx >= 0:
                start, end = o.offsets[ctx], o.offsets[ctx + 1]
                probs[o.words[start:end]] += (w * o.alpha[start:end]).astype(dtype)
        probs.flags.writeable = False  # kept by _recent: a caller that changed it would change the next answer
        return probs

    def stream_probs(self, stream: np.ndarray, batch_size: int = 128,
                     dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``([B, V] probabilities, [B] targets)`` for every id of a stream but the first, in batches.

        Each target's context is the ids before it in the stream, up to N - 1 of them. The batches are
        small enough for a batch and its passes to stay in the CPU's cache.
        """
        s = np.asarray(stream, dtype=np.int64)
        grams = self._gram_indices(s[None, :])
        # Context of the target at t (t >= 1) is the gram ending at t - 1.
        contexts = [g[0, :-1] for g in grams[: len(self.orders)]]
        targets = s[1:]
        for lo in range(0, len(targets), batch_size):
            hi = min(lo + batch_size, len(targets))
            yield self._dense(hi - lo, [c[lo:hi] for c in contexts], dtype), targets[lo:hi]
