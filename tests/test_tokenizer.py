import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_CONVERSATION, model_config
from nextword.config import TokenizerParams
from nextword.errors import NextwordError
from nextword.metrics import evaluate, per_word
from nextword.model import LanguageModel
from nextword.text import detokenize, tokenize
from nextword.tokenizer import SETTINGS, SPM_MODEL, WORD_START, Tokenizer, train
from nextword.vocab import SPECIALS, UNK, Vocab
from nextword.windows import cut_windows, split_stream, word_targets

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [tokenize(text) for _, text in TINY_CONVERSATION] + [
    tokenize("the brown dog jumps over the cat"),
    tokenize("sequence models predict the next word, i think!"),
]


def sentencepiece(model_type="unigram", vocab_size=60, seed=0, corpus=CORPUS) -> Tokenizer:
    return train(corpus, TokenizerParams(kind="sentencepiece", vocab_size=vocab_size, model_type=model_type), seed)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_text_to_pieces_and_back_gives_the_same_text(model_type):
    tokenizer = sentencepiece(model_type)
    # "bread" and "jumping" were never seen as words, but their letters were.
    for text in ["Good morning, how are you today?", "I think the bread is jumping!", "", "cat ; dog"]:
        tokens = tokenize(text)
        pieces = tokenizer.pieces(tokens)
        assert UNK not in pieces
        assert sum(p.startswith(WORD_START) for p in pieces) == len(tokens)  # no piece spans two tokens
        assert tokenizer.words(pieces) == tokens
        assert detokenize(tokenizer.words(pieces)) == detokenize(tokens)
    assert tokenizer.pieces_of_messages([["good", "morning"], []]) == [tokenizer.pieces(["good", "morning"]), []]


def test_the_message_layout_keeps_the_ids_of_a_word_vocabulary_and_pieces_go_by_count():
    tokenizer = sentencepiece()
    vocab = tokenizer.vocab(CORPUS)
    assert vocab.tokens[: len(SPECIALS)] == list(SPECIALS)
    assert len(vocab) == tokenizer.processor.get_piece_size()
    counts = vocab.counts[len(SPECIALS):]
    assert counts == sorted(counts, reverse=True)
    stream = split_stream([("user", tokenizer.pieces(["hi"]))], vocab, speaker_tags=True)
    assert vocab.decode(stream)[:2] == ["<USER>", "<BOS>"] and vocab.decode(stream)[-1] == "<EOS>"
    # The layout is never produced from text: the word tokenizer drops "<" and ">".
    assert tokenizer.pieces(tokenize("<USER> hi")) == tokenizer.pieces(["user", "hi"])


def test_training_is_deterministic_and_reads_only_what_it_is_given():
    assert sentencepiece(seed=3).model == sentencepiece(seed=3).model
    assert sentencepiece("bpe", seed=3).model == sentencepiece("bpe", seed=3).model
    pieces = sentencepiece().vocab(CORPUS).tokens
    assert not any("z" in p for p in pieces)  # a letter the corpus never has


def test_a_folder_keeps_the_tokenizer_and_an_old_folder_is_words(tmp_path):
    tokenizer = sentencepiece()
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.kind == "sentencepiece" and loaded.model == tokenizer.model
    assert loaded.pieces(["morning"]) == tokenizer.pieces(["morning"])
    assert Tokenizer.load(tmp_path / "nothing").kind == "word"
    (tmp_path / SPM_MODEL).write_bytes(b"not a model")
    with pytest.raises(NextwordError, match=rf"{SPM_MODEL}: damaged"):
        Tokenizer.load(tmp_path)
    (tmp_path / SPM_MODEL).unlink()
    with pytest.raises(NextwordError, match=f"no {SPM_MODEL}, but {SETTINGS} says sentencepiece"):
        Tokenizer.load(tmp_path)


def test_no_train_tokens_is_an_error():
    with pytest.raises(NextwordError, match="no tokens to train"):
        sentencepiece(corpus=[[], []])


def scored(messages, vocab, pieces_of):
    """(token-level result, per-word result) of a random model on ``messages`` (speaker, word tokens)."""
    torch.manual_seed(0)
    model = LanguageModel(model_config(len(vocab), embedding=8, hidden=16, layers=1)).eval()
    stream = split_stream([(s, pieces_of(t)) for s, t in messages], vocab, speaker_tags=True)
    result = evaluate(model, cut_windows(stream, 4), vocab, batch_size=2)
    return result, per_word(result, word_targets(messages, speaker_tags=True))


def test_per_word_perplexity_is_the_token_perplexity_for_words_and_counts_the_same_words_for_pieces():
    messages = [(speaker, tokenize(text)) for speaker, text in TINY_CONVERSATION]
    vocab = Vocab.build(t for _, t in messages[:3])  # the last message has unknown words
    tokens, words = scored(messages, vocab, list)
    assert words["words"] == tokens["tokens"]
    assert words["word_perplexity"] == pytest.approx(tokens["perplexity"], rel=1e-9)

    tokenizer = sentencepiece()
    pieces, words = scored(messages, tokenizer.vocab(CORPUS), tokenizer.pieces)
    assert pieces["tokens"] > words["words"] == tokens["tokens"]
    assert words["word_perplexity"] == pytest.approx(math.exp(pieces["nll"] * pieces["tokens"] / words["words"]))


def test_the_vocab_stage_trains_sentencepiece_on_the_train_split_only(tmp_path):
    tokens = tmp_path / "tokens.parquet"
    pd.DataFrame({
        "conversation_id": ["a", "b", "c"], "turn": [0, 0, 0], "speaker": ["user"] * 3,
        "split": ["train", "val", "test"],
        "tokens": [["hello", "there", "hello"], ["quiz"], ["jumbo", "hello"]],
    }).to_parquet(tokens)
    params = tmp_path / "params.yaml"
    subprocess.run([sys.executable, "-m", "nextword.cli", "params", "toy", "tokenizer.kind=sentencepiece",
                    "tokenizer.model_type=bpe", "--conf", str(ROOT / "conf"), "--out", str(params)],
                   check=True, capture_output=True)
    out, folder = tmp_path / "vocab.json", tmp_path / "tokenizer"
    for run in range(2):
        subprocess.run([sys.executable, str(ROOT / "src/stages/vocab.py"), "--params", str(params),
                        "--tokens", str(tokens), "--tokenizer", str(folder), "--out", str(out)],
                       check=True, capture_output=True)
        model = (folder / SPM_MODEL).read_bytes()
        assert run == 0 or model == first_model  # noqa: F821 - the same params and data, the same model
        first_model = model
    vocab, tokenizer = Vocab.load(out), Tokenizer.load(folder)
    assert sorted(vocab.tokens) == sorted(tokenizer.processor.id_to_piece(i) for i in range(len(vocab)))
    assert vocab.tokens[: len(SPECIALS)] == list(SPECIALS)
    counts = vocab.counts[len(SPECIALS):]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]  # by count, as words are
    assert not any(c in piece for piece in vocab.tokens for c in "qzjb")  # letters of val and test only
    assert vocab.counts[vocab.tokens.index(tokenizer.pieces(["hello"])[0])] == 2
    assert np.all(np.array(vocab.counts[: len(SPECIALS)]) == 0)
