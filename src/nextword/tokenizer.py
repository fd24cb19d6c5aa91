"""The language model's tokens: the words of :mod:`nextword.text`, or SentencePiece pieces of them.

A message is always tokenized into words first (``nextword.text.tokenize``:
lowercase words and the marks ``. , ! ? ;``). With ``tokenizer.kind:
sentencepiece`` each word token is then cut into pieces by a SentencePiece
model trained on the train split's word tokens, one message a line, the tokens
separated by spaces. A piece that starts a word token carries the word-start
mark ``▁`` (so ``, `` becomes ``▁,``); pieces never span two tokens, so the
pieces of a message join back into exactly its word tokens.

The message layout (``<USER>``/``<AGENT>``, ``<BOS>``, ``<EOS>``) and ``<PAD>``,
``<UNK>`` are pieces of the SentencePiece model (control and user-defined
symbols, which the text never produces: the word tokenizer drops ``<`` and
``>``). The language model's vocabulary is the model's pieces, ordered as a
word vocabulary is: the specials first (:data:`nextword.vocab.SPECIALS`), then
by count in the train split, so the adaptive softmax's head holds the frequent
pieces. Pieces map to ids by their text, so the windows, training, metrics and
n-gram work on ids as for words.

Training reads nothing but the train split and downloads nothing; it runs on
one thread with the pipeline's seed, so the same data and params give the
same model, byte for byte. A character never seen in training becomes ``<UNK>``.

A folder holds a tokenizer: ``tokenizer.json`` (its kind and params) and, for
SentencePiece, ``sentencepiece.model``. A folder without ``tokenizer.json`` is
the word tokenizer, as model folders written before tokenizers had a choice.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from nextword.config import TokenizerParams
from nextword.errors import NextwordError, damaged
from nextword.files import atomic_path, read_json, write_json
from nextword.vocab import AGENT, BOS, EOS, PAD, SPECIALS, UNK, USER, Vocab

WORD, SENTENCEPIECE = "word", "sentencepiece"
WORD_START = "\u2581"  # SentencePiece's mark of a piece that starts a word token
SETTINGS, SPM_MODEL = "tokenizer.json", "sentencepiece.model"
FILES = (SETTINGS, SPM_MODEL)


@dataclass
class Tokenizer:
    """Word tokens to the language model's tokens and back: the identity for ``word``."""

    params: TokenizerParams
    model: bytes | None = None  # the serialized SentencePiece model

    def __post_init__(self):
        self.processor = None
        if self.kind == SENTENCEPIECE:
            import sentencepiece

            if self.model is None:
                raise NextwordError("a sentencepiece tokenizer needs its model")
            self.processor = sentencepiece.SentencePieceProcessor(model_proto=self.model)

    @property
    def kind(self) -> str:
        return self.params.kind

    def pieces(self, tokens: Sequence[str]) -> list[str]:
        """The language model's tokens for a message's word tokens."""
        if self.processor is None:
            return list(tokens)
        return self.processor.encode(" ".join(tokens), out_type=str) if tokens else []

    def pieces_of_messages(self, token_lists: Iterable[Sequence[str]]) -> list[list[str]]:
        """:meth:`pieces` of many messages at once."""
        token_lists = [list(t) for t in token_lists]
        if self.processor is None:
            return token_lists
        return self.processor.encode([" ".join(t) for t in token_lists], out_type=str)

    def words(self, pieces: Iterable[str]) -> list[str]:
        """The word tokens that ``pieces`` (no specials) spell; the inverse of :meth:`pieces`."""
        if self.processor is None:
            return list(pieces)
        return "".join(pieces).replace(WORD_START, " ").split()

    def vocab(self, token_lists: Iterable[Sequence[str]]) -> Vocab:
        """Every piece of the SentencePiece model: the specials, then by count in ``token_lists`` (ties: by id)."""
        if self.processor is None:
            raise NextwordError("the word tokenizer's vocabulary is built by Vocab.build")
        counts: Counter[str] = Counter()
        for pieces in self.pieces_of_messages(token_lists):
            counts.update(pieces)
        pieces = [self.processor.id_to_piece(i) for i in range(self.processor.get_piece_size())]
        ranked = sorted((p for p in pieces if p not in SPECIALS), key=lambda p: -counts[p])  # stable: ties by id
        tokens = list(SPECIALS) + ranked
        return Vocab(tokens, [0] * len(SPECIALS) + [counts[p] for p in ranked])

    def save(self, folder) -> None:
        """Write ``tokenizer.json`` (and ``sentencepiece.model``) into an existing ``folder``."""
        folder = Path(folder)
        write_json(folder / SETTINGS, self.params.model_dump())
        if self.model is not None:
            with atomic_path(folder / SPM_MODEL) as tmp:
                tmp.write_bytes(self.model)

    @classmethod
    def load(cls, folder) -> "Tokenizer":
        folder = Path(folder)
        if not (folder / SETTINGS).is_file():
            return cls(word_params())
        try:
            params = TokenizerParams.model_validate(read_json(folder / SETTINGS))
        except (ValueError, OSError) as err:  # pydantic's ValidationError and json's errors are ValueErrors
            raise damaged(folder / SETTINGS, err) from None
        if params.kind == WORD:
            return cls(params)
        path = folder / SPM_MODEL
        if not path.is_file():
            raise NextwordError(f"{folder}: no {SPM_MODEL}, but {SETTINGS} says sentencepiece")
        try:
            return cls(params, path.read_bytes())
        except (RuntimeError, OSError) as err:
            raise damaged(path, err) from None


def word_params() -> TokenizerParams:
    """The settings of a folder written before tokenizers had a choice: words (the sizes do not apply)."""
    return TokenizerParams(kind=WORD, vocab_size=8, model_type="unigram")


def train(token_lists: Iterable[Sequence[str]], params: TokenizerParams, seed: int) -> Tokenizer:
    """A tokenizer for ``params``, trained on the word tokens of the train split's messages."""
    if params.kind == WORD:
        return Tokenizer(params)
    import sentencepiece

    lines = [" ".join(t) for t in token_lists if len(t)]
    if not lines:
        raise NextwordError("the train split has no tokens to train the sentencepiece tokenizer on")
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model,
            vocab_size=params.vocab_size, model_type=params.model_type,
            # A soft limit: a small corpus (the toy preset) has fewer distinct pieces than asked for.
            hard_vocab_limit=False,
            # The text is already the word tokenizer's (lowercase, one space between tokens): kept as it is,
            # so that pieces join back into the same tokens, and every character of the train split is kept.
            normalization_rule_name="identity", character_coverage=1.0,
            pad_id=0, pad_piece=PAD, unk_id=1, unk_piece=UNK, bos_id=2, bos_piece=BOS, eos_id=3, eos_piece=EOS,
            user_defined_symbols=[USER, AGENT],
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    except RuntimeError as err:
        raise NextwordError(f"tokenizer: sentencepiece training failed ({str(err).splitlines()[0]})") from None
    return Tokenizer(params, model.getvalue())
