"""Token streams and training windows.

Each conversation becomes one stream of ids, ``<USER> <BOS> ... <EOS> <AGENT>
<BOS> ... <EOS>`` (without the speaker tags when they are turned off), and
the streams of a split are laid end to end. The split's stream is cut into
windows of ``length + 1`` ids that overlap by one id, so every id but the
first is a target exactly once, and no message is dropped for being short.
Windows are kept in stream order: training reads them as parallel lanes and
carries the recurrent state from one window to the next (truncated BPTT), so
context flows across turns and conversations.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from nextword.text import tokenize
from nextword.vocab import BOS, EOS, PAD_ID, SPEAKER_TAG, Vocab


# The layout of one message, the one place it is written: training streams, the engine's sessions and
# the web server's session keys all build messages from these.
MESSAGE_END = EOS


def message_head(speaker: str, speaker_tags: bool) -> list[str]:
    """The tokens that open a message: its speaker's tag (when tags are on), then ``<BOS>``."""
    return [SPEAKER_TAG[speaker], BOS] if speaker_tags else [BOS]


def message_tokens(speaker: str, tokens: Sequence[str], speaker_tags: bool) -> list[str]:
    """A whole message: ``<TAG> <BOS> tokens <EOS>``."""
    return message_head(speaker, speaker_tags) + list(tokens) + [MESSAGE_END]


def split_stream(messages: Iterable[tuple[str, Sequence[str]]], vocab: Vocab, speaker_tags: bool) -> np.ndarray:
    """Ids of ``(speaker, tokens)`` messages laid end to end, in the order given."""
    ids: list[int] = []
    for speaker, tokens in messages:
        ids.extend(vocab.encode(message_tokens(speaker, tokens, speaker_tags)))
    return np.asarray(ids, dtype=np.int32)


def word_targets(messages: Iterable[tuple[str, Sequence[str]]], speaker_tags: bool) -> int:
    """How many targets the word tokenizer's stream of ``(speaker, word tokens)`` messages has.

    Every token of the stream but the first: words, punctuation and the message layout alike, as the
    word model's perplexity counts them. Per-word perplexity divides any tokenizer's total NLL by it.
    """
    return max(sum(len(message_tokens(speaker, tokens, speaker_tags)) for speaker, tokens in messages) - 1, 0)


def table_word_targets(table, speaker_tags: bool) -> int:
    """:func:`word_targets` of the rows of a messages table (its ``speaker`` and ``text`` columns)."""
    return word_targets(zip(table["speaker"], map(tokenize, table["text"])), speaker_tags)


def cut_windows(stream: np.ndarray, length: int) -> np.ndarray:
    """Cut a stream into ``[n, length + 1]`` windows that overlap by one id; pad the last with PAD."""
    if len(stream) < 2:
        return np.zeros((0, length + 1), dtype=np.int32)
    n = -(-(len(stream) - 1) // length)  # ceil: every target lands in a window
    padded = np.full(n * length + 1, PAD_ID, dtype=np.int32)
    padded[: len(stream)] = stream
    starts = np.arange(n) * length
    return padded[starts[:, None] + np.arange(length + 1)]


def lanes(windows: np.ndarray, batch_size: int, pad_tail: bool) -> np.ndarray:
    """Arrange windows as ``[steps, batch, length + 1]``: lane b holds a contiguous run of windows.

    ``pad_tail`` keeps every window (evaluation) by padding with PAD windows;
    otherwise the few windows that do not fill a whole step are left out (training).
    """
    n, width = windows.shape
    if pad_tail:
        steps = -(-n // batch_size)
        full = np.full((steps * batch_size, width), PAD_ID, dtype=windows.dtype)
        full[:n] = windows
    else:
        steps = n // batch_size
        full = windows[: steps * batch_size]
    return full.reshape(batch_size, steps, width).transpose(1, 0, 2)
