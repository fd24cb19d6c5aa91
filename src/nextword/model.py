"""The language model: embedding -> body -> linear to vocabulary logits.

The body is ``model.cell``: stacked LSTM, GRU or LayerNorm LSTM layers
(:class:`StackedRNN`, :mod:`nextword.lnlstm`), or a causal Transformer
decoder (:mod:`nextword.transformer`). Whatever it is, the model's state
(the recurrent state, or the Transformer's KV cache) is carried from one call
of :meth:`LanguageModel.features` to the next, in training, evaluation and the
engine alike, and only the methods here look inside it: :meth:`init_state`,
:func:`detach_state`, :meth:`stack_states` and :meth:`split_state`.

Regularisation, all off at rate 0:

* ``dropout`` on the embeddings, between recurrent layers and on the last
  layer's output. With ``locked_dropout`` each of these draws one mask per
  sequence and reuses it at every time step (variational dropout, Gal &
  Ghahramani 2016; the "locked" dropout of AWD-LSTM, Merity et al. 2017).
* ``embedding_dropout`` drops whole words: every occurrence of a dropped
  word in a batch gets a zero embedding (Merity et al. 2017).

The recurrent layers run one at a time (:class:`StackedRNN`) so that the
dropout between them can be locked; each layer is still one fused PyTorch
LSTM/GRU call (oneDNN on CPU, cuDNN on GPU), as fast as the stacked module.

With ``tie_weights`` the output layer shares the embedding matrix, through a
projection when the hidden size differs from the embedding size. With
``adaptive_softmax`` the output layer is PyTorch's
``AdaptiveLogSoftmaxWithLoss`` (Grave et al. 2017): the ``cutoffs[0]`` most
frequent words and one entry per tail cluster in the head, the rarer words in
smaller tail clusters that are computed only for their own targets.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from nextword.config import ModelConfig
from nextword.lnlstm import LayerNormLSTM
from nextword.transformer import CausalTransformer, KVCache, split_cache, stack_caches
from nextword.vocab import PAD_ID

# One layer of each recurrent cell, built as layer(input_size, hidden) and called like nn.LSTM(batch_first=True).
RECURRENT_LAYERS = {"lstm": partial(nn.LSTM, batch_first=True), "gru": partial(nn.GRU, batch_first=True),
                    "lnlstm": LayerNormLSTM}

State = "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"


def dropout(x: torch.Tensor, p: float, locked: bool, training: bool) -> torch.Tensor:
    """Dropout on ``[batch, time, features]``; ``locked`` uses one mask per sequence for all time steps."""
    if not training or p == 0:
        return x
    if not locked:
        return F.dropout(x, p, training=True)
    mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - p).div_(1 - p)
    return x * mask


class StackedRNN(nn.Module):
    """``layers`` single-layer LSTMs (or GRUs, or LayerNorm LSTMs) with dropout between them.

    Called like ``nn.LSTM`` with ``batch_first=True``; the state has the same
    ``[layers, batch, hidden]`` layout (a pair ``(h, c)`` for both LSTMs).
    """

    def __init__(self, cell: str, input_size: int, hidden: int, layers: int, dropout: float, locked: bool):
        super().__init__()
        rnn = RECURRENT_LAYERS[cell]
        self.layers = nn.ModuleList(rnn(input_size if i == 0 else hidden, hidden) for i in range(layers))
        self.lstm = cell != "gru"
        self.dropout = dropout
        self.locked = locked

    def forward(self, x: torch.Tensor, state=None):
        new_state = []
        for i, layer in enumerate(self.layers):
            if i:
                x = dropout(x, self.dropout, self.locked, self.training)
            layer_state = None
            if state is not None:
                layer_state = (state[0][i:i + 1], state[1][i:i + 1]) if self.lstm else state[i:i + 1]
            x, layer_state = layer(x, layer_state)
            new_state.append(layer_state)
        if self.lstm:
            return x, (torch.cat([h for h, _ in new_state]), torch.cat([c for _, c in new_state]))
        return x, torch.cat(new_state)


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embedding, padding_idx=PAD_ID)
        if c.cell == "transformer":
            self.body = CausalTransformer(c.embedding, c.hidden, c.layers, c.heads, c.context, c.dropout)
        else:
            self.body = StackedRNN(c.cell, c.embedding, c.hidden, c.layers, c.dropout, c.locked_dropout)
        out_dim = c.hidden
        self.proj = None
        if c.tie_weights and c.hidden != c.embedding:
            self.proj = nn.Linear(c.hidden, c.embedding, bias=False)
            out_dim = c.embedding
        if c.adaptive_softmax:
            cutoffs = [x for x in c.cutoffs if x < c.vocab_size - 1]
            self.head = nn.AdaptiveLogSoftmaxWithLoss(out_dim, c.vocab_size, cutoffs=cutoffs, div_value=c.div_value)
            self.decoder = None
        else:
            self.head = None
            self.decoder = nn.Linear(out_dim, c.vocab_size)
            if c.tie_weights:
                self.decoder.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self):
        """Embedding and output weights uniform in [-0.1, 0.1], as in PyTorch's word_language_model.

        The adaptive softmax's weights (head and tail clusters) get the same
        range. Its own default, PyTorch's ``Linear`` init (within 1/sqrt(fan-in)),
        learned much more slowly under Adam (docs/results.md has the measurement).
        """
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[PAD_ID].zero_()
        if self.decoder is not None:
            nn.init.zeros_(self.decoder.bias)
            if not self.config.tie_weights:
                nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        if self.head is not None:
            for linear in self.head.modules():
                if isinstance(linear, nn.Linear):
                    nn.init.uniform_(linear.weight, -0.1, 0.1)

    def features(self, ids: torch.Tensor, state=None):
        """Run the body: ``[batch, time]`` ids and the state after the ids before them (None at the start)
        -> ``[batch, time, out_dim]`` features, the state after these ids."""
        _, dropped, state = self.activations(ids, state)
        return self.project(dropped), state

    def activations(self, ids: torch.Tensor, state=None):
        """What :meth:`features` computes before its projection: (the body's ``[batch, time, hidden]``
        output, the same after dropout, the state after these ids). Training's activation regularisers
        (``train.ar``, ``train.tar``: :func:`nextword.training.activation_penalty`) read both."""
        c = self.config
        x = self.embed(ids)
        if self.training and c.embedding_dropout:
            # One keep/drop draw per vocabulary word, so a dropped word is dropped at all its positions.
            keep = x.new_empty(c.vocab_size).bernoulli_(1 - c.embedding_dropout).div_(1 - c.embedding_dropout)
            x = x * keep[ids].unsqueeze(-1)
        x = dropout(x, c.dropout, c.locked_dropout, self.training)
        out, state = self.body(x, state)
        return out, dropout(out, c.dropout, c.locked_dropout, self.training), state

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """The body's (dropped-out) output -> the features the output layer reads (the same, unless tied
        weights project it to the embedding's width)."""
        return out if self.proj is None else self.proj(out)

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the vocabulary for features of any leading shape."""
        flat = features.reshape(-1, features.shape[-1])
        if self.head is not None:
            with torch.autocast(flat.device.type, enabled=False):
                lp = self.head.log_prob(flat.float())
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
            # Outside autocast, in float32 like the full softmax's loss: under CUDA autocast PyTorch's
            # adaptive softmax fails (index_copy_ of float32 log-probs into a half-precision buffer),
            # and under CPU autocast it would compute the loss in bf16.
            with torch.autocast(flat.device.type, enabled=False):
                return self.head(flat[keep].float(), targets[keep]).loss, count
        logits = self.decoder(flat).float()
        return F.cross_entropy(logits, targets.long(), ignore_index=PAD_ID), count

    def init_state(self, batch: int, device=None):
        """The state before the first token, for ``batch`` rows (what ``None`` stands for)."""
        c = self.config
        if c.cell == "transformer":
            return self.body.empty(batch, device)
        zeros = torch.zeros(c.layers, batch, c.hidden, device=device)
        return (zeros, zeros.clone()) if c.cell != "gru" else zeros

    def stack_states(self, states: list) -> object:
        """One state for a batch whose rows are ``states`` in order (each of one or more rows; None: the start).

        Stepping the batch gives each row what stepping it alone gives. Transformer rows may have
        memories of different lengths; the shorter ones are padded, and the padding masked out.
        """
        states = [self.init_state(1) if s is None else s for s in states]
        if self.config.cell == "transformer":
            return stack_caches(states)
        if isinstance(states[0], tuple):
            return tuple(torch.cat(parts, dim=1) for parts in zip(*states))
        return torch.cat(states, dim=1)

    def split_state(self, state) -> list:
        """The rows of a batched state, each a one-row state: the inverse of :meth:`stack_states`."""
        if self.config.cell == "transformer":
            return split_cache(state)
        if isinstance(state, tuple):
            return [tuple(part[:, b:b + 1] for part in state) for b in range(state[0].shape[1])]
        return [state[:, b:b + 1] for b in range(state.shape[1])]


def detach_state(state):
    """The state cut from the graph that computed it (truncated back-propagation between windows)."""
    if state is None:
        return None
    if isinstance(state, KVCache):
        return state.detach()
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
    macs = 0
    if c.cell == "transformer":
        # The projection in, then per block: queries, keys, values and output (4 w^2) and the MLP (8 w^2).
        # The attention products themselves (2 x attended tokens x w) are not counted: a lower bound.
        macs += c.embedding * c.hidden if c.embedding != c.hidden else 0
        macs += c.layers * 12 * c.hidden * c.hidden
    else:
        gates = 3 if c.cell == "gru" else 4
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
