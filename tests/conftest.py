"""Shared fixtures: a tiny trained model folder that gives predictable suggestions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathlib import Path

from nextword.config import ModelConfig, TrainParams, load_params
from nextword.export import export_servable_step
from nextword.model import LanguageModel, detach_state
from nextword.modeldir import save_trained, write_servable
from nextword.text import tokenize
from nextword.vocab import Vocab
from nextword.windows import cut_windows, lanes, split_stream

ROOT = Path(__file__).resolve().parents[1]
# The committed params (the chat preset): the project's defaults, which live in conf/ alone.
DEFAULTS = load_params(ROOT / "params.yaml")
# The engine with the project's default settings, without a banned-word list.
ENGINE = DEFAULTS.engine.model_copy(update={"banned_words": None})
# The engine as the LSTM alone: no n-gram, no cache, no conversation's words outside the vocabulary ranked,
# rejected words shown again, float32 in PyTorch.
PLAIN = ENGINE.model_copy(update={"ngram_weight": 0, "cache_weight": 0, "cache_bigram_weight": 0,
                                  "unknown_weight": 0, "skip_rejected": False, "int8": False, "backend": "torch"})


def model_config(vocab_size: int, **shape) -> ModelConfig:
    """A small plain LSTM for tests: full softmax, no tying, plain dropout; ``shape`` sets the sizes.

    ``heads`` and ``context`` are the Transformer's, read only with ``cell="transformer"``.
    """
    plain = {"cell": "lstm", "heads": 2, "context": 6, "tie_weights": False, "adaptive_softmax": False,
             "cutoffs": [2000, 8000], "div_value": 4.0, "embedding_dropout": 0.0, "locked_dropout": False,
             "dropout": 0.0}
    return ModelConfig.model_validate(plain | shape | {"vocab_size": vocab_size})


def train_params(**settings) -> TrainParams:
    """The committed train params with ``settings`` changed (validated).

    On the plateau schedule without warmup unless ``settings`` say otherwise: the chat preset's warmup
    is longer than a test's whole run, and the tests of the schedules ask for the one they test.
    """
    return TrainParams.model_validate(DEFAULTS.train.model_dump() | {"schedule": "plateau", "warmup_steps": 0}
                                      | settings)


def save_servable(path, model, vocab, extra: dict, options=ENGINE, ngram=None, tokenizer=None) -> None:
    """A servable model folder, as the train and bundle stages write one (with the ONNX backend, its step too)."""
    trained = Path(path).with_name(Path(path).name + ".trained")
    save_trained(trained, model, vocab, extra, tokenizer)
    write_servable(path, trained, options, ngram, also=export_servable_step)

TINY_CONVERSATION = [
    ("user", "good morning , how are you today ?"),
    ("agent", "i am fine , thank you very much !"),
    ("user", "what do you like to do for fun ?"),
    ("agent", "i like to read books and play music ."),
]


def train_tiny_model(messages=TINY_CONVERSATION, steps: int = 150, seed: int = 0, cell: str = "lstm", tokenizer=None):
    """A small model (an LSTM unless ``cell`` says) trained to memorise ``messages`` (repeated): (model, vocab).

    With a sentencepiece ``tokenizer`` (trained on ``messages``), on its pieces.
    """
    torch.manual_seed(seed)
    tokenized = [(speaker, tokenize(text)) for speaker, text in messages]
    if tokenizer is None:
        vocab = Vocab.build([toks for _, toks in tokenized])
    else:
        vocab = tokenizer.vocab([toks for _, toks in tokenized])
        tokenized = [(speaker, tokenizer.pieces(toks)) for speaker, toks in tokenized]
    stream = split_stream(tokenized * 20, vocab, speaker_tags=True)
    windows = cut_windows(stream, 8)
    data = torch.from_numpy(lanes(windows, 8, pad_tail=False)).long()
    model = LanguageModel(model_config(len(vocab), embedding=32, hidden=64, layers=1, cell=cell))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for step in range(steps):
        state = None
        for batch in data:
            feats, state = model.features(batch[:, :-1], state)
            loss, _ = model.loss(feats, batch[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state = detach_state(state)
        if loss.item() < 0.05:
            break
    return model.eval(), vocab


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    model, vocab = train_tiny_model()
    path = tmp_path_factory.mktemp("model") / "model"
    save_servable(path, model, vocab, {"speaker_tags": True, "window_length": 8})
    return path


# Fill-in-the-middle: after "i like" the left context favours "green" (two messages to one), and only the
# word after the gap tells "green" (tea) from "red" (wine).
FIM_CONVERSATION = [
    ("user", "i like green tea ."),
    ("agent", "me too ."),
    ("user", "i like green tea ."),
    ("agent", "me too ."),
    ("user", "i like red wine ."),
    ("agent", "me too ."),
]


@pytest.fixture(scope="session")
def fim_model_dir(tmp_path_factory):
    model, vocab = train_tiny_model(FIM_CONVERSATION)
    path = tmp_path_factory.mktemp("fim") / "model"
    save_servable(path, model, vocab, {"speaker_tags": True, "window_length": 8})
    return path


def make_fixed_engine(logits: dict[str, float], banned=(), special_logit: float = 10.0, options=PLAIN, ngram=None,
                      rare=()):
    """An Engine whose next-token distribution never changes: softmax of ``logits`` (and the specials).

    A real LanguageModel with a zero output matrix, so its output bias alone
    sets the distribution and suggestions can be worked out by hand. The
    specials get ``special_logit`` (by default more than any word) to show
    they are filtered, not merely unlikely; tokens not in ``logits`` get -20.
    """
    from nextword.engine import Engine
    from nextword.vocab import SPECIALS, Vocab

    tokens = list(SPECIALS) + [t for t in logits if t not in SPECIALS]
    vocab = Vocab(tokens, [0] * len(tokens), list(rare))  # rare: the dictionary outside the vocabulary
    model = LanguageModel(model_config(len(vocab), embedding=4, hidden=4, layers=1))
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.fill_(-20.0)
        model.decoder.bias[: len(SPECIALS)] = special_logit
        for token, logit in logits.items():
            model.decoder.bias[vocab.id(token)] = logit
    return Engine(model.eval(), vocab, {"speaker_tags": True, "window_length": 4}, set(banned), ngram, options)


@pytest.fixture
def fixed_engine():
    return make_fixed_engine
