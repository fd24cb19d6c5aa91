"""The model folder: what the pipeline trained and evaluated, in one folder every surface loads.

The train stage writes the *trained* folder: ``weights.pt`` (a state dict),
``vocab.json`` and ``config.json`` (the model's shape, the window length,
whether messages carry speaker tags, the best epoch and its validation
scores), and the tokenizer (``tokenizer.json``,
and ``sentencepiece.model`` for pieces; see ``nextword.tokenizer``). The bundle
stage copies it into the *servable* folder and adds what the suggestion engine needs:

* ``engine.json``: the ``engine`` params the pipeline evaluated with;
* ``ngram.npz``: the Kneser-Ney n-gram the engine mixes in (when ``engine.ngram_order`` > 0);
* ``banned_words.txt``: the banned-word list (when ``engine.banned_words`` names one).

With ``engine.backend: onnx`` the bundle stage also writes the model step as
an ONNX graph, which the engine runs in ONNX Runtime: ``model.int8.onnx``
with ``engine.int8``, else ``model.onnx``. ``nextword export --format onnx``
writes either into any model folder.

The evaluate and sample stages, the CLI, the web page and the MLflow model all
load the servable folder, so they serve the settings the pipeline evaluated.
Nothing is pickled: tensors load with ``weights_only=True``, arrays with
``allow_pickle=False``, the rest is JSON and text. A missing or damaged file is
reported in one line that names it.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pydantic import ValidationError

from nextword.config import EngineParams, ModelConfig
from nextword.errors import NextwordError, damaged
from nextword.files import atomic_path, read_json, write_json
from nextword.model import LanguageModel
from nextword.ngram import KneserNey
from nextword.text import tokenize
from nextword.tokenizer import FILES as TOKENIZER_FILES, SPM_MODEL, Tokenizer
from nextword.vocab import Vocab

WEIGHTS, VOCAB, CONFIG = "weights.pt", "vocab.json", "config.json"
ENGINE, NGRAM, BANNED = "engine.json", "ngram.npz", "banned_words.txt"
TRAINED_FILES = (WEIGHTS, VOCAB, CONFIG)
ONNX, ONNX_INT8 = "model.onnx", "model.int8.onnx"

# What a damaged file raises when it is read: weights_only refuses anything but tensors, and a
# truncated or foreign file fails in the unpickler, zip reader, JSON parser or numpy.
LOAD_ERRORS = (pickle.UnpicklingError, json.JSONDecodeError, KeyError, TypeError, RuntimeError, EOFError,
               ValueError, OSError, ValidationError, IndexError)


def save_trained(path, model: LanguageModel, vocab: Vocab, extra: dict, tokenizer: Tokenizer | None = None) -> None:
    """Write a trained folder: weights, vocabulary, ``config.json`` (the model config plus ``extra``), tokenizer."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        if tokenizer is not None:
            tokenizer.save(tmp)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
        vocab.save(tmp / VOCAB)
        write_json(tmp / CONFIG, {"model": model.config.model_dump(), **extra})


def load_trained(path, device="cpu") -> tuple[LanguageModel, Vocab, dict]:
    """Load the trained part of a folder: (model in eval mode, vocab, config dict)."""
    path = Path(path)
    if not path.is_dir():
        raise NextwordError(f"{path}: no such model folder; run the pipeline or pass --model")
    for name in TRAINED_FILES:
        if not (path / name).is_file():
            raise NextwordError(f"{path}: not a model folder (no {name}); run the pipeline or pass --model")
    try:
        config = read_json(path / CONFIG)
        model = LanguageModel(ModelConfig.model_validate(config["model"]))
    except LOAD_ERRORS as err:
        raise damaged(path / CONFIG, err) from None
    try:
        vocab = Vocab.load(path / VOCAB)
    except LOAD_ERRORS as err:
        raise damaged(path / VOCAB, err) from None
    if len(vocab) != model.config.vocab_size:
        raise NextwordError(f"{path / VOCAB}: {len(vocab)} tokens, but {CONFIG} says {model.config.vocab_size}")
    try:
        weights = torch.load(path / WEIGHTS, map_location=device, weights_only=True)
        # Folders written before model.cell had a transformer call the recurrent body `rnn`.
        weights = {f"body.{k[4:]}" if k.startswith("rnn.") else k: v for k, v in weights.items()}
        model.load_state_dict(weights)
    except LOAD_ERRORS as err:
        raise damaged(path / WEIGHTS, err) from None
    return model.to(device).eval(), vocab, config


def onnx_file(path, int8: bool) -> Path:
    """Where a model folder keeps its exported ONNX step: float32 or int8 weights."""
    return Path(path) / (ONNX_INT8 if int8 else ONNX)


def read_banned_words(path: str | Path | None) -> set[str]:
    """One word per line; blank lines and lines starting with # are ignored."""
    if not path:
        return set()
    path = Path(path)
    if not path.is_file():
        raise NextwordError(f"{path}: banned-word list not found")
    words = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise NextwordError(f"{path}: not UTF-8 text (byte {err.start})") from None
    for line in lines:
        line = line.strip().lower()
        if line and not line.startswith("#"):
            words.update(tokenize(line))
    return words


def write_servable(path, trained: str | Path, options: EngineParams, ngram: KneserNey | None,
                   also: Callable[[Path], None] | None = None) -> None:
    """The servable folder: the trained folder's files, the engine settings, its n-gram and banned-word list.

    ``also(folder)`` writes more files into the folder before it appears, so the folder is whole or absent.
    """
    trained = Path(trained)
    read_banned_words(options.banned_words)  # refuse a missing or unreadable list before writing anything
    with atomic_path(path) as tmp:
        tmp.mkdir()
        for name in TRAINED_FILES + TOKENIZER_FILES:
            if name in TRAINED_FILES or (trained / name).is_file():
                shutil.copy2(trained / name, tmp / name)
        banned = None
        if options.banned_words:
            shutil.copyfile(options.banned_words, tmp / BANNED)
            banned = BANNED
        if ngram is not None:
            ngram.save(tmp / NGRAM)
        write_json(tmp / ENGINE, options.model_copy(update={"banned_words": banned}).model_dump())
        if also is not None:
            also(tmp)


def read_engine_options(path) -> EngineParams:
    """The engine settings a servable folder was evaluated with; its banned-word list as a path inside it."""
    path = Path(path)
    if not (path / ENGINE).is_file():
        raise NextwordError(f"{path}: no {ENGINE}, so not a servable model folder (the pipeline's bundle stage "
                            "writes one); run the pipeline or pass --model")
    try:
        # A folder bundled before engine.unknown_weight existed was evaluated ranking no word outside the
        # vocabulary: it is served that way.
        options = EngineParams.model_validate({"unknown_weight": 0.0} | read_json(path / ENGINE))
    except LOAD_ERRORS as err:
        raise damaged(path / ENGINE, err) from None
    if options.banned_words:
        options = options.model_copy(update={"banned_words": str(path / options.banned_words)})
    return options


def load_ngram(path, vocab_size: int) -> KneserNey | None:
    """The folder's n-gram, or None when it has none."""
    path = Path(path) / NGRAM
    if not path.is_file():
        return None
    try:
        ngram = KneserNey.load(path)
    except LOAD_ERRORS as err:
        raise damaged(path, err) from None
    if ngram.vocab_size != vocab_size:
        raise NextwordError(f"{path}: {ngram.vocab_size} ids, but the vocabulary has {vocab_size}")
    return ngram


@dataclass
class Servable:
    model: LanguageModel
    vocab: Vocab
    config: dict
    options: EngineParams
    ngram: KneserNey | None
    tokenizer: Tokenizer


def load_servable(path, options: EngineParams | None = None, overrides: dict | None = None) -> Servable:
    """Load a servable folder with its own engine settings, or ``options``, updated by ``overrides``.

    ``options`` replaces the folder's settings whole (a folder without ``engine.json`` needs it);
    ``overrides`` changes single settings, as the command line's flags do.
    """
    model, vocab, config = load_trained(path)
    options = options or read_engine_options(path)
    if overrides:
        options = EngineParams.model_validate(options.model_dump() | overrides)
    ngram = load_ngram(path, len(vocab)) if options.ngram_weight > 0 else None
    return Servable(model, vocab, config, options, ngram, load_tokenizer(path, vocab))


def load_tokenizer(path, vocab: Vocab) -> Tokenizer:
    """The folder's tokenizer (words when it has none), checked against its vocabulary."""
    tokenizer = Tokenizer.load(path)
    if tokenizer.processor is not None and tokenizer.processor.get_piece_size() != len(vocab):
        raise NextwordError(f"{Path(path) / SPM_MODEL}: {tokenizer.processor.get_piece_size()} pieces, "
                            f"but {VOCAB} has {len(vocab)} tokens")
    return tokenizer
