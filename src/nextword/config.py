"""Typed params: ``params.yaml`` is parsed and validated here, once.

Every stage calls :func:`load_params` first, so a bad value anywhere in the
file is refused before any work is done, with a message naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nextword.errors import NextwordError

SPEAKERS = ("user", "agent")  # the two sides of a chat, in the order the CLI and the page offer them

Speaker = Literal[SPEAKERS]

BACKENDS = ("torch", "onnx")  # what runs the engine's model step (nextword.backends)

# The model families (nextword.model): fused LSTM or GRU layers, the LayerNorm LSTM (nextword.lnlstm),
# or a causal Transformer decoder (nextword.transformer).
CELLS = ("lstm", "gru", "lnlstm", "transformer")
FUSED_CELLS = ("lstm", "gru")  # the cells whose layers are PyTorch's fused recurrent modules (one kernel per layer)
ONNX_CELLS = ("lstm", "gru", "transformer")  # the cells whose step nextword.export writes as ONNX


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitParams(_Section):
    """Fractions of conversations held out; the rest is train."""

    val: float = Field(ge=0, lt=1)
    test: float = Field(ge=0, lt=1)

    @model_validator(mode="after")
    def _leaves_train(self):
        if self.val + self.test >= 1:
            raise ValueError("val + test must be below 1, so that some conversations are left to train on")
        return self


class DataParams(_Section):
    csv: str = Field(min_length=1)
    format: Literal["csv", "text"]
    split: SplitParams
    # Rows without a conversation_id are grouped into blocks of this many
    # consecutive messages, each block one pseudo-conversation.
    block_messages: int = Field(ge=1)


class VocabParams(_Section):
    min_freq: int = Field(ge=1)
    max_size: int = Field(ge=7)  # includes the six specials


class TokenizerParams(_Section):
    """What the language model's tokens are: the words of ``nextword.text``, or SentencePiece pieces of them.

    ``sentencepiece`` trains a model of about ``vocab_size`` pieces (specials included; fewer when the train
    split has too few distinct pieces) on the train split; ``vocab.*`` then sizes only the word vocabulary
    that out-of-vocabulary rates are measured against.
    """

    kind: Literal["word", "sentencepiece"]
    vocab_size: int = Field(ge=8)  # the six specials, a word start and at least one letter
    model_type: Literal["unigram", "bpe"]


class WindowParams(_Section):
    length: int = Field(ge=1)
    speaker_tags: bool


class ModelParams(_Section):
    cell: Literal[CELLS]
    embedding: int = Field(ge=1)
    hidden: int = Field(ge=1)  # the recurrent state's size; the Transformer's width
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)  # transformer only: attention heads, each hidden / heads wide (an even number)
    # transformer only: each token attends to itself and the context - 1 tokens before it, in training
    # (across windows, through the carried memory) and in the engine's KV cache alike.
    context: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    tie_weights: bool
    adaptive_softmax: bool
    cutoffs: list[int]
    div_value: float = Field(ge=1)  # each adaptive-softmax tail cluster's size is this times smaller
    embedding_dropout: float = Field(ge=0, lt=1)  # drops whole words from the embedding
    locked_dropout: bool  # one dropout mask per sequence, reused at every time step

    @field_validator("cutoffs")
    @classmethod
    def _increasing(cls, v):
        if not v or any(b <= a for a, b in zip(v, v[1:])) or v[0] < 1:
            raise ValueError("must be a non-empty list of increasing positive ints")
        return v

    @model_validator(mode="after")
    def _tying_needs_the_full_softmax(self):
        if self.tie_weights and self.adaptive_softmax:
            raise ValueError("tie_weights needs adaptive_softmax off: the adaptive softmax has its own output weights")
        return self

    @model_validator(mode="after")
    def _heads_split_the_width(self):
        if self.cell == "transformer" and (self.heads is None or self.context is None):
            raise ValueError("the transformer needs heads and context")
        if self.cell == "transformer" and (self.hidden % self.heads or (self.hidden // self.heads) % 2):
            raise ValueError(f"the transformer needs hidden ({self.hidden}) split by heads ({self.heads}) "
                             "into an even width per head (rotary positions rotate pairs)")
        return self


class ModelConfig(ModelParams):
    """What builds a :class:`nextword.model.LanguageModel`: the ``model`` params and the vocabulary size.

    Saved as ``config.json`` in a model folder, so a folder rebuilds the same model. A folder saved
    before ``heads`` and ``context`` existed has neither: it holds an LSTM or GRU, which reads neither.
    """

    heads: int | None = Field(default=None, ge=1)
    context: int | None = Field(default=None, ge=1)
    vocab_size: int = Field(ge=1)


class TrainParams(_Section):
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    clip: float = Field(gt=0)
    # AWD-LSTM's activation regularisers (Merity et al. 2017), added to the loss (0: off): ar times the mean
    # square of the body's dropped-out output, tar times the mean square of its raw output's change from
    # one position to the next (nextword.training.activation_penalty).
    ar: float = Field(ge=0)
    tar: float = Field(ge=0)
    device: Literal["auto", "cpu", "cuda"]
    threads: int = Field(ge=0)  # 0: torch's default for this machine
    # Stop after this many optimizer steps per epoch (0: the whole epoch);
    # used by the chat preset to fit a time budget, and by tests.
    max_steps_per_epoch: int = Field(ge=0)
    # auto: bf16 autocast where the hardware has bf16 products (CUDA that supports it, CPUs with AMX), else fp32.
    precision: Literal["auto", "fp32", "bf16"]
    processes: int = Field(ge=1)  # >1: the stage relaunches itself under torchrun with this many
    # plateau: lr times lr_decay when val loss stops improving; cosine: linear warmup over warmup_steps,
    # then a cosine decay to 0 at the last step of the last epoch (the budget is epochs x steps per epoch).
    schedule: Literal["plateau", "cosine"]
    warmup_steps: int = Field(ge=0)  # cosine only
    lr_decay: float = Field(gt=0, le=1)  # plateau only: multiply lr by this when val loss stops improving (1: off)
    lr_patience: int = Field(ge=0)  # plateau only: epochs without improvement before lr_decay applies
    patience: int = Field(ge=0)  # early stopping: epochs without improvement before stopping (0: off)


class EvaluateParams(_Section):
    batch_size: int = Field(ge=1)
    # Keystroke savings on the first N test conversations (0: all of them), typed many at once.
    ksr_conversations: int = Field(ge=0)
    # Keystroke latency on the first N of them, typed one at a time on one thread, as a keyboard types.
    latency_conversations: int = Field(ge=1)
    ablation_conversations: int = Field(ge=0)  # the KSR of each engine part, on the first N (0: all)


class EngineParams(_Section):
    """How the suggestion engine (:mod:`nextword.engine`) turns the model into suggestions.

    The bundle stage writes them into the model folder (``engine.json``), and
    every surface that loads the folder (the evaluate and sample stages, the
    CLI, the web page, the MLflow model) reads them from there, so what is
    served is what the pipeline evaluated; flags on the command line override them.
    """

    # The bundle stage fits a Kneser-Ney n-gram of this order on the train split into the model
    # folder (0: none); the engine mixes it into the LSTM's next-word distribution with ngram_weight
    # (1: the n-gram alone, the baseline to compare with; it gives every word some probability).
    ngram_order: int = Field(ge=0)
    ngram_weight: float = Field(ge=0, le=1)
    # A cache of the conversation so far: its words as a unigram mixed in with cache_weight, then the
    # words that followed the last token earlier in it, as a bigram, with cache_bigram_weight.
    cache_weight: float = Field(ge=0, lt=1)
    cache_bigram_weight: float = Field(ge=0, lt=1)
    # The conversation's own words outside the vocabulary (a name typed earlier) are ranked in the strip
    # with the vocabulary's words, each given this share of the model's <UNK> probability in proportion
    # to how often the conversation committed it (0: they only fill the strip's free slots).
    unknown_weight: float = Field(ge=0, le=1)
    suggestions: int = Field(ge=1, le=10)  # how many words the strip shows (the CLI's -k, the API's k)
    # While a word is typed, leave out the words the strip showed for it at a shorter prefix. Off by
    # default: it assumes a person who reads the strip after every letter, and so can hide the likeliest
    # completion from one who types on without looking.
    skip_rejected: bool
    int8: bool  # int8 weights for the model step (dynamic quantization): faster on CPU
    # What runs the model step: PyTorch, or the step exported to ONNX in ONNX Runtime (the bundle stage
    # writes it into the model folder, model.int8.onnx with int8, else model.onnx); the rest of the engine is the same.
    backend: Literal[BACKENDS]
    # Words never suggested nor completed, one per line; the bundle stage copies the list into the model folder.
    banned_words: str | None


class BaselineParams(_Section):
    order: int = Field(ge=1)  # of the Kneser-Ney n-gram baseline


class Prompt(_Section):
    speaker: Speaker
    text: str


class SampleParams(_Section):
    prompts: list[Prompt] = Field(min_length=1)
    k: int = Field(ge=1)
    max_words: int = Field(ge=1)
    temperature: float = Field(gt=0)
    top_k: int = Field(ge=1)
    top_p: float = Field(gt=0, le=1)
    beam_size: int = Field(ge=1)


class Params(_Section):
    preset: Literal["toy", "chat", "custom"]
    seed: int
    data: DataParams
    vocab: VocabParams
    tokenizer: TokenizerParams
    window: WindowParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    baseline: BaselineParams
    engine: EngineParams
    sample: SampleParams

    @model_validator(mode="after")
    def _onnx_exports_the_cell(self):
        if self.engine.backend == "onnx" and self.model.cell not in ONNX_CELLS:
            raise ValueError(f"engine.backend onnx exports model.cell {', '.join(ONNX_CELLS)} only, "
                             f"not {self.model.cell}: set engine.backend torch")
        return self


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "missing"
    elif "input" in first and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    return f"{key}: {msg}"


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise NextwordError(f"{source}: {_describe(err)}") from None


def load_params(path: str | Path = "params.yaml", name: str | None = None) -> Params:
    """Read and validate a params file; errors name it as ``name`` (default: its path)."""
    path = Path(path)
    name = name or str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NextwordError(f"{name}: file not found") from None
    except yaml.YAMLError as err:
        raise NextwordError(f"{name}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise NextwordError(f"{name}: expected a mapping of sections")
    return parse_params(raw, name)


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """Flatten nested params to dotted keys, as MLflow and ``dvc exp show`` display them."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump()
    out: dict[str, object] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out
