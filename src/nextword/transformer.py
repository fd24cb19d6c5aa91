"""A small causal Transformer decoder with a sliding attention window and a KV cache.

Pre-LayerNorm blocks (attention, then a 4x-wide GELU MLP, each added to the
residual stream), rotary positions on queries and keys (Su et al. 2021), and a
final LayerNorm. The model's params map as: ``hidden`` is the width of the
residual stream (the token embedding, ``embedding`` wide, is projected to it
when the two differ), ``layers`` the number of blocks, ``heads`` the attention
heads, and ``context`` the attention span.

Every token attends to itself and the ``context - 1`` tokens before it, in
every layer (a sliding window, as in Longformer and Mistral), so what a token
sees never depends on where a training window happens to start:

* **Training** carries, from one window to the next of a lane, a memory of the
  keys and values of the last ``context - 1`` tokens in every layer, detached
  like the LSTM's state (Transformer-XL, Dai et al. 2019, keeps hidden states
  instead; at fixed weights the two are the same). A window's first token
  thus sees as far back as its last.
* **The engine** carries the same memory as a KV cache: a committed word costs
  one incremental step (its queries against the cached keys), never a
  recompute, and the cache never grows past ``context - 1`` tokens per layer.

Stepping through a stream in pieces of any length, with the memory carried
(in eval mode), gives what one pass over the whole stream gives, up to float
rounding (the tests check it).

Cached keys are stored already rotated, at their absolute positions; since
rotary attention depends only on the difference of positions, absolute
positions can grow without bound (the angles are computed in float64).

The state is a :class:`KVCache`: keys and values ``[layers, batch, heads,
memory, head_width]`` and ``positions [batch]``, the number of tokens each row
has seen. Rows of different memory lengths stack into one batch
(:func:`stack_caches`): a shorter memory is padded at the front, and the
padding's positions come out negative, which the mask excludes.

``locked_dropout`` applies to the embedding and output dropout that the
language model adds around this body; inside it dropout is plain, on the
attention weights and on each block's residual branches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ROTARY_BASE = 10000.0


class KVCache(NamedTuple):
    keys: torch.Tensor  # [layers, batch, heads, memory, head_width], rotated
    values: torch.Tensor  # [layers, batch, heads, memory, head_width]
    positions: torch.Tensor  # [batch] int64: tokens seen so far, the position of the next one

    def detach(self) -> "KVCache":
        return KVCache(self.keys.detach(), self.values.detach(), self.positions)


def rotary_frequencies(width: int) -> torch.Tensor:
    """The rotary angle per position of each of the ``width / 2`` pairs, in float64."""
    return ROTARY_BASE ** -(torch.arange(0, width, 2, dtype=torch.float64) / width)


def rotary(positions: torch.Tensor, frequencies: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary angles at ``positions [batch, time]`` as :func:`rotate` takes them, ``[batch, 1, time, width]``
    each: ``(cos, cos)`` and ``(-sin, sin)`` over the two halves of a head."""
    angles = positions.to(torch.float64).unsqueeze(-1) * frequencies
    cos, sin = angles.cos().to(dtype).unsqueeze(1), angles.sin().to(dtype).unsqueeze(1)
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (first half ``a``, second half ``b``) of ``x [..., time, width]`` by the angles of
    :func:`rotary`: ``(a cos - b sin, b cos + a sin)``, as ``x cos + (b, a) sin`` (the same numbers: a sum
    of two rounded products either way), in a few operations on the whole of ``x``. The halves are cut at
    a width fixed by the angles, so an exported graph has no shape arithmetic for it."""
    half = cos.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        # The attention's default scale, as a number: the ONNX export then has it as a constant instead of
        # working it out from the queries' shape at every step (the same value, so the same numbers).
        self.scale = 1 / math.sqrt(width // heads)
        self.norm_attention = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x, cos, sin, mask, past_keys, past_values, out_keys=None, out_values=None):
        """``x [batch, time, width]`` -> (new x, keys and values of the memory plus these tokens), the keys and
        values written into ``out_keys`` and ``out_values`` when given."""
        batch, steps, width = x.shape
        qkv = self.qkv(self.norm_attention(x)).view(batch, steps, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rotate(qkv[:2], cos, sin)  # queries and keys in one go
        v = qkv[2]
        # Into the layer's slice of the new cache where one is given (outside training: no gradient goes
        # through ``out=``), else into new tensors.
        keys = torch.cat([past_keys.to(k.dtype), k], dim=2, out=out_keys)
        values = torch.cat([past_values.to(v.dtype), v], dim=2, out=out_values)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                                  dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.out(attended.transpose(1, 2).reshape(batch, steps, width)), self.dropout,
                          self.training)
        x = x + F.dropout(self.down(F.gelu(self.up(self.norm_mlp(x)))), self.dropout, self.training)
        return x, keys, values


class CausalTransformer(nn.Module):
    """The decoder body, called like the recurrent bodies: ``(x [batch, time, input], KVCache or None)``."""

    def __init__(self, input_size: int, width: int, layers: int, heads: int, context: int, dropout: float):
        super().__init__()
        self.width, self.heads, self.context = width, heads, context
        self.input = nn.Linear(input_size, width, bias=False) if input_size != width else None
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.register_buffer("frequencies", rotary_frequencies(width // heads), persistent=False)

    def empty(self, batch: int, device=None, memory: int = 0) -> KVCache:
        """The state before the first token, at position 0: no memory, or ``memory`` slots of padding."""
        shape = (len(self.blocks), batch, self.heads, memory, self.width // self.heads)
        return KVCache(torch.zeros(shape, device=device), torch.zeros(shape, device=device),
                       torch.zeros(batch, dtype=torch.long, device=device))

    def forward(self, x: torch.Tensor, state: KVCache | None = None):
        batch, steps, _ = x.shape
        if state is None:
            state = self.empty(batch, x.device)
        memory = state.keys.shape[3]
        start = state.positions.unsqueeze(1)  # [batch, 1]
        new_positions = start + torch.arange(steps, device=x.device)
        key_positions = torch.cat([start - memory + torch.arange(memory, device=x.device), new_positions], dim=1)
        distance = new_positions.unsqueeze(2) - key_positions.unsqueeze(1)  # [batch, time, memory + time]
        # Itself and the context - 1 tokens before it; memory padding sits at negative positions.
        seen = ((distance >= 0) & (distance < self.context) & (key_positions >= 0).unsqueeze(1)).unsqueeze(1)
        # As an additive mask, made once for every layer: what the attention makes of a boolean one anyway.
        mask = torch.where(seen, 0.0, float("-inf"))
        h = self.input(x) if self.input is not None else x
        cos, sin = rotary(new_positions, self.frequencies, h.dtype)
        # Training, and the ONNX export (which has no ``out=``): the layers' keys and values stacked after them.
        if torch.is_grad_enabled() or torch.onnx.is_in_onnx_export():
            all_keys, all_values = [], []
            for i, block in enumerate(self.blocks):
                h, keys, values = block(h, cos, sin, mask, state.keys[i], state.values[i])
                all_keys.append(keys)
                all_values.append(values)
            keys, values = torch.stack(all_keys), torch.stack(all_values)
        else:  # a step of the engine: each layer writes its keys and values into the new cache, one copy fewer
            shape = (len(self.blocks), batch, self.heads, memory + steps, self.width // self.heads)
            keys, values = h.new_empty(shape), h.new_empty(shape)
            for i, block in enumerate(self.blocks):
                h, _, _ = block(h, cos, sin, mask, state.keys[i], state.values[i], keys[i], values[i])
        keep = min(self.context - 1, memory + steps)
        keys = keys[:, :, :, memory + steps - keep:]
        values = values[:, :, :, memory + steps - keep:]
        return self.norm(h), KVCache(keys, values, state.positions + steps)


def stack_caches(caches: list[KVCache]) -> KVCache:
    """One cache for a batch of rows (each cache one or more rows), padding shorter memories at the front."""
    memory = max(c.keys.shape[3] for c in caches)

    def padded(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0, memory - t.shape[3], 0))

    return KVCache(torch.cat([padded(c.keys) for c in caches], dim=1),
                   torch.cat([padded(c.values) for c in caches], dim=1),
                   torch.cat([c.positions for c in caches]))


def split_cache(cache: KVCache) -> list[KVCache]:
    """The rows of a batched cache as one-row caches, each without the padding it no longer needs."""
    rows = []
    memory = cache.keys.shape[3]
    for b in range(cache.keys.shape[1]):
        keep = min(memory, int(cache.positions[b]))
        rows.append(KVCache(cache.keys[:, b:b + 1, :, memory - keep:], cache.values[:, b:b + 1, :, memory - keep:],
                            cache.positions[b:b + 1]))
    return rows
