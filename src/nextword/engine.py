"""The suggestion engine: next-word top-k, word completion and line completion as a person types.

The recurrent state is carried: a committed word costs one model step, and
while a word is being typed its completions come from the distribution
already computed for that position, looked up by prefix in a sorted array of
the suggestable words, so a keystroke costs no model work. Specials and
banned words are removed from the distribution before the top k are taken,
so k suggestions still come back.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nextword import decoding
from nextword.errors import NextwordError
from nextword.model import load_model_dir
from nextword.text import is_word, tokenize
from nextword.vocab import BOS, EOS, SPEAKER_TAG


def read_banned_words(path: str | Path | None) -> set[str]:
    """One word per line; blank lines and lines starting with # are ignored."""
    if not path:
        return set()
    path = Path(path)
    if not path.exists():
        raise NextwordError(f"{path}: banned-word list not found")
    words = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip().lower()
        if line and not line.startswith("#"):
            words.update(tokenize(line))
    return words


@dataclass
class Suggestion:
    word: str
    probability: float


class Engine:
    """A loaded model plus everything precomputed for fast lookups."""

    def __init__(self, model, vocab, config: dict, banned: set[str] = frozenset()):
        self.model = model.eval()
        self.vocab = vocab
        self.speaker_tags = config.get("speaker_tags", True)
        suggestable = np.array([is_word(t) and t not in banned for t in vocab.tokens], dtype=bool)
        self.blocked_suggest = ~suggestable
        # Completing a line may also end it; everything else that is blocked stays blocked.
        self.blocked_complete = self.blocked_suggest.copy()
        self.blocked_complete[vocab.id(EOS)] = False
        for mark in ".,!?;":
            if mark in vocab.index:
                self.blocked_complete[vocab.id(mark)] = False
        words = sorted((t, i) for i, t in enumerate(vocab.tokens) if suggestable[i])
        self.sorted_words = [w for w, _ in words]
        self.sorted_ids = np.array([i for _, i in words], dtype=np.int64)

    @classmethod
    def load(cls, model_dir: str | Path, banned_words: str | Path | None = None) -> "Engine":
        torch.set_num_threads(1)  # one step of a small model: threads cost more than they give
        model, vocab, config = load_model_dir(model_dir)
        return cls(model, vocab, config, read_banned_words(banned_words))

    @torch.no_grad()
    def step(self, token_id: int, state):
        """Advance the model by one token: (log-probs of the next token as numpy, new state)."""
        ids = torch.tensor([[token_id]])
        feats, state = self.model.features(ids, state)
        return self.model.log_probs(feats)[0, -1].numpy(), state

    def session(self) -> "Session":
        return Session(self)

    def prefix_range(self, prefix: str) -> tuple[int, int]:
        lo = bisect.bisect_left(self.sorted_words, prefix)
        hi = bisect.bisect_left(self.sorted_words, prefix + "\U0010ffff")
        return lo, hi


class Session:
    """One conversation: the state after everything committed so far, and the next-token distribution."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.state = None
        self.log_probs: np.ndarray | None = None
        self.in_message = False

    def feed(self, token: str) -> None:
        self.log_probs, self.state = self.engine.step(self.engine.vocab.id(token), self.state)

    def start_message(self, speaker: str) -> None:
        if speaker not in SPEAKER_TAG:
            raise NextwordError(f"speaker {speaker!r} is not 'user' or 'agent'")
        if self.in_message:
            self.end_message()
        if self.engine.speaker_tags:
            self.feed(SPEAKER_TAG[speaker])
        self.feed(BOS)
        self.in_message = True

    def end_message(self) -> None:
        self.feed(EOS)
        self.in_message = False

    def add_message(self, speaker: str, text: str) -> None:
        """Commit a whole earlier message of the conversation."""
        self.start_message(speaker)
        for token in tokenize(text):
            self.feed(token)
        self.end_message()

    def type_text(self, speaker: str, text: str) -> str:
        """Start a message and commit its complete words; return the partial last word, if any."""
        self.start_message(speaker)
        tokens = tokenize(text)
        partial = ""
        if tokens and text and not text[-1].isspace() and is_word(tokens[-1]):
            partial = tokens.pop()
        for token in tokens:
            self.feed(token)
        return partial

    def suggest(self, prefix: str = "", k: int = 3) -> list[Suggestion]:
        """Top-k words that start with ``prefix``, from the current distribution (no model work)."""
        engine = self.engine
        lo, hi = engine.prefix_range(prefix.lower())
        if hi <= lo:
            return []
        ids = engine.sorted_ids[lo:hi]
        scores = self.log_probs[ids]
        k = min(k, len(ids))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
        top = top[np.lexsort((ids[top], -scores[top]))]
        total = np.exp(np.logaddexp.reduce(self.log_probs[~engine.blocked_suggest]))
        return [Suggestion(engine.vocab.tokens[ids[i]], float(np.exp(scores[i]) / total)) for i in top]

    def complete(self, strategy: str = "greedy", max_words: int = 20, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, beam_size: int = 4, seed: int = 0,
                 prefix: str = "") -> list[str]:
        """Continue the current message until <EOS> or ``max_words`` tokens; the session is not advanced.

        With a ``prefix`` (a partly typed word) the first token is a word that
        starts with it, chosen by the same strategy (greedily for beam search).
        """
        engine = self.engine
        rng = np.random.default_rng(seed)
        state, log_probs, first = self.state, self.log_probs, []
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
