"""The language model: embedding -> stacked LSTM (or GRU) -> linear to vocabulary logits.

Dropout is applied to the embeddings, between recurrent layers (by the RNN
module itself) and to the last layer's output. With ``tie_weights`` the
output layer shares the embedding matrix, through a projection when the
hidden size differs from the embedding size. With ``adaptive_softmax`` the
output layer is PyTorch's ``AdaptiveLogSoftmaxWithLoss`` (Grave et al. 2017).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nextword.vocab import PAD_ID

State = "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    embedding: int
    hidden: int
    layers: int
    dropout: float
    cell: str = "lstm"
    tie_weights: bool = False
    adaptive_softmax: bool = False
    cutoffs: tuple[int, ...] = (2000, 8000)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["cutoffs"] = tuple(d.get("cutoffs", ()))
        return cls(**d)


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embedding, padding_idx=PAD_ID)
        self.drop = nn.Dropout(c.dropout)
        rnn = nn.LSTM if c.cell == "lstm" else nn.GRU
        self.rnn = rnn(c.embedding, c.hidden, c.layers, batch_first=True, dropout=c.dropout if c.layers > 1 else 0.0)
        out_dim = c.hidden
        self.proj = None
        if c.tie_weights and c.hidden != c.embedding:
            self.proj = nn.Linear(c.hidden, c.embedding, bias=False)
            out_dim = c.embedding
        if c.adaptive_softmax:
            cutoffs = [x for x in c.cutoffs if x < c.vocab_size - 1]
            self.head = nn.AdaptiveLogSoftmaxWithLoss(out_dim, c.vocab_size, cutoffs=cutoffs, div_value=4.0)
            self.decoder = None
        else:
            self.head = None
            self.decoder = nn.Linear(out_dim, c.vocab_size)
            if c.tie_weights:
                self.decoder.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self):
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[PAD_ID].zero_()
        if self.decoder is not None:
            nn.init.zeros_(self.decoder.bias)
            if not self.config.tie_weights:
                nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def features(self, ids: torch.Tensor, state=None):
        """Run the recurrent body: ``[batch, time]`` ids -> ``[batch, time, out_dim]`` features, new state."""
        x = self.drop(self.embed(ids))
        out, state = self.rnn(x, state)
        out = self.drop(out)
        if self.proj is not None:
            out = self.proj(out)
        return out, state

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the vocabulary for features of any leading shape."""
        flat = features.reshape(-1, features.shape[-1])
        if self.head is not None:
            lp = self.head.log_prob(flat)
        else:
            lp = F.log_softmax(self.decoder(flat).float(), dim=-1)
        return lp.reshape(*features.shape[:-1], -1)

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the non-PAD targets, and how many there were."""
        flat = features.reshape(-1, features.shape[-1])
        targets = targets.reshape(-1)
        keep = targets != PAD_ID
        count = int(keep.sum())
        if self.head is not None:
            return self.head(flat[keep], targets[keep]).loss, count
        logits = self.decoder(flat).float()
        return F.cross_entropy(logits, targets.long(), ignore_index=PAD_ID), count

    def init_state(self, batch: int, device=None):
        c = self.config
        zeros = torch.zeros(c.layers, batch, c.hidden, device=device)
        return (zeros, zeros.clone()) if c.cell == "lstm" else zeros


def detach_state(state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def count_flops_per_token(config: ModelConfig) -> int:
    """Training FLOPs per token (forward + backward, 3x the forward multiply-adds, 2 FLOPs each).

    Counts the matrix multiplies only. For the adaptive softmax only the head
    is counted, since the tail clusters see only their own tokens: a lower
    bound, so a utilisation computed from it is never flattered.
    """
    c = config
    gates = 4 if c.cell == "lstm" else 3
    macs = 0
    for layer in range(c.layers):
        inp = c.embedding if layer == 0 else c.hidden
        macs += gates * c.hidden * (inp + c.hidden)
    out_dim = c.hidden
    if c.tie_weights and c.hidden != c.embedding:
        macs += c.hidden * c.embedding
        out_dim = c.embedding
    if c.adaptive_softmax:
        cutoffs = [x for x in c.cutoffs if x < c.vocab_size - 1] + [c.vocab_size]
        macs += out_dim * (cutoffs[0] + len(cutoffs) - 1)
    else:
        macs += out_dim * c.vocab_size
    return 6 * macs


def save_model_dir(path, model: LanguageModel, vocab, extra: dict) -> None:
    """A model folder: ``weights.pt`` (a state dict), ``vocab.json`` and ``config.json``; nothing pickled."""
    from nextword.files import atomic_path, write_json

    with atomic_path(path) as tmp:
        tmp.mkdir()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "weights.pt")
        vocab.save(tmp / "vocab.json")
        write_json(tmp / "config.json", {"model": model.config.to_dict(), **extra})


def load_model_dir(path, device="cpu"):
    """Load a model folder written by :func:`save_model_dir`: (model in eval mode, vocab, config dict)."""
    from pathlib import Path

    from nextword.errors import NextwordError
    from nextword.files import read_json
    from nextword.vocab import Vocab

    path = Path(path)
    for name in ("weights.pt", "vocab.json", "config.json"):
        if not (path / name).exists():
            raise NextwordError(f"{path}: not a model folder (no {name}); run the pipeline or pass --model")
    config = read_json(path / "config.json")
    model = LanguageModel(ModelConfig.from_dict(config["model"]))
    model.load_state_dict(torch.load(path / "weights.pt", map_location=device, weights_only=True))
    model.to(device).eval()
    return model, Vocab.load(path / "vocab.json"), config
