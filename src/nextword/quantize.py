"""int8 weights for the engine's PyTorch step, computed so that a row's result never depends on its batch.

One step of the chat model reads its whole output matrix (vocabulary x
hidden); in float32 that is tens of megabytes, more than a CPU cache, so a
step is bound by memory bandwidth. In int8 it is a quarter of that.

PyTorch's own dynamic quantization (``torch.ao``, deprecated) quantizes each
activation tensor with one scale, from the largest value in the whole tensor:
a stream's result then depends on the streams batched with it, and on how
many tokens its step runs (an LSTM's input is quantized over all of them at
once). The keystroke simulation types many conversations in one batch and
must score exactly what one stream is served (:mod:`nextword.keystrokes`), so
here everything is per row:

* weights: int8, one scale per output unit (``max |w| / 127`` over its row);
* activations: int8, one scale per row (one token of one stream), computed on the fly;
* the products are summed exactly, so in any order and any blocking, whatever the number of rows:
  in int32 by ``torch._int_mm`` where it is fast, else as integers held in float32 (or float64
  for more than ``EXACT_FLOAT32_INPUTS`` inputs), whose sums are exact too (:class:`Int8Matrix`);
* the rest is elementwise (scales, bias, the gates) or row by row (the log-softmax).

Elementwise, PyTorch's CPU kernels compute a contiguous run in SIMD lanes and
the few elements left over at its end in scalar code, whose exp and tanh can
differ from the vector ones in the last bit. Rows whose length is a multiple of
64 leave nothing over, and on one thread no kernel splits a row between
threads; :func:`batch_invariant` tells whether a model qualifies (the
recurrent sizes), :func:`one_thread` holds the thread count. A model that does
not qualify is served the same way; the keystroke simulation then types one
stream at a time.

The price is paid on one stream: ``torch._int_mm`` keeps no prepacked
weights and the gates run as separate PyTorch operations, so a step is
several times slower than ``torch.ao``'s fused int8 LSTM, though still faster
than float32 (``docs/results.md`` has the figures). So each kernel does what
it is good at: the served engine steps one stream with the fused kernel
(:func:`fused_int8`), and the evaluation types many conversations at once with
this one (``Engine.load(exact_batches=True)``). Both hold the int8 weights of
the same float32 model, rounded alike but for the scales (per row here, per
tensor there); docs/results.md gives the KSR of both on the same conversations.

The embedding table is looked up, not multiplied, so it keeps float32 arithmetic, but both kernels
round its weights to 8 bits with a scale per block of ``EMBED_BLOCK`` weights of a row
(:func:`embedding_blocks`): the values the int8 ONNX graph stores (:mod:`nextword.export`), which
computes this module's arithmetic, so the engine on it serves what the evaluation scored.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from nextword.errors import NextwordError

# Every row of an elementwise kernel is a whole number of SIMD iterations (2 x 16 float32 with AVX-512) and more.
ROW_MULTIPLE = 64
EMBED_BLOCK = 32  # weights of an embedding row that share a scale (embedding_blocks)
# The most inputs whose products of two integers up to 127 sum exactly in float32: every partial sum stays below 2^24.
EXACT_FLOAT32_INPUTS = 2**24 // 127**2


def int8_products_fast() -> bool:
    """Whether ``torch._int_mm`` has a fast kernel on this CPU.

    Decided by the CPU capability PyTorch dispatches on: with AVX-512 it runs oneDNN's int8 kernels;
    on an AVX2-only AMD EPYC (Zen 3) it ran far slower than a float32 product of the same shape
    (docs/results.md has the figures), so there :class:`Int8Matrix` multiplies the same integers in
    floating point.
    """
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def _scales(amax: torch.Tensor) -> torch.Tensor:
    """The scale that maps ``amax`` to 127 (a zero row keeps a tiny scale and stays zero)."""
    return (amax / 127).clamp_(min=torch.finfo(torch.float32).tiny)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, n]`` float32 as integers in -127 .. 127 with one scale per row: (the integers in float32, ``[rows, 1]`` scales).

    No clamp: ``|x| <= max |x|``, so ``|x| / scale`` rounds to 127 at most.
    """
    scale = _scales(x.abs().amax(dim=1, keepdim=True))
    return torch.round(x / scale), scale


def embedding_blocks(table: torch.Tensor, block: int = EMBED_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding ``table`` [words, width] in 8 bits, each run of ``block`` weights of a row with a scale of its
    own: (the int8 rows [words, width], the float32 scales [words, width // block, 1]).

    Symmetric, scaled as :func:`_scales` scales a matrix's rows: a block's largest weight is 127 times its
    scale, and an all-zero block (the padding's row) stays zero. A row whose width ``block`` does not divide
    is one block. A scale per block turns the top suggestion less often than one per row or per table
    (docs/results.md), for an eighth more bytes than the int8 rows alone.
    """
    words, width = table.shape
    block = block if width % block == 0 else width
    blocks = table.detach().float().reshape(words, width // block, block)
    scale = _scales(blocks.abs().amax(dim=2, keepdim=True))
    return torch.round(blocks / scale).to(torch.int8).reshape(words, width), scale


def blocks_to_float(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 table of :func:`embedding_blocks`'s 8-bit ``rows`` and ``scale``: each weight times its block's scale."""
    words, width = rows.shape
    return (rows.float().reshape(words, scale.shape[1], -1) * scale).reshape(words, width)


def _round_embedding(model: nn.Module) -> nn.Module:
    """``model`` (a quantized copy) with its embedding table rounded to the 8-bit blocks of :func:`embedding_blocks`."""
    embed = getattr(model, "embed", None)
    if isinstance(embed, nn.Embedding):
        embed.weight = nn.Parameter(blocks_to_float(*embedding_blocks(embed.weight)), requires_grad=False)
    return model


class Int8Matrix(nn.Module):
    """``x @ weight.T + bias`` with int8 weights (a scale per output) and int8 rows of ``x`` (a scale per row).

    The integer products are summed exactly, in one of three ways that give the same numbers:

    * ``int``: in int32 by ``torch._int_mm``, where :func:`int8_products_fast`;
    * ``float32``: the int8 values held in float32 and multiplied in float32, for a narrow matrix
      (``FLOAT_PRODUCTS`` inputs or fewer, faster there on one row), and elsewhere for up to
      ``EXACT_FLOAT32_INPUTS`` inputs: the sums of that many products of two integers up to 127 stay
      below 2^24, so every partial sum is an exact float32;
    * ``float64``: the same in float64, for wider matrices where ``torch._int_mm`` is slow.

    An exact integer sum converts to float32 the same way from int32 or from either float, so a
    model folder serves the same suggestions on every CPU.
    """

    FLOAT_PRODUCTS = 128

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, products: str | None = None):
        super().__init__()
        weight = weight.detach().float()
        scale = _scales(weight.abs().amax(dim=1))
        q = torch.round(weight / scale[:, None])
        inputs = weight.shape[1]
        if products is None:
            fast = int8_products_fast()
            if inputs <= self.FLOAT_PRODUCTS or (not fast and inputs <= EXACT_FLOAT32_INPUTS):
                products = "float32"
            else:
                products = "int" if fast else "float64"
        if products not in ("int", "float32", "float64") or (products == "float32" and inputs > EXACT_FLOAT32_INPUTS):
            raise ValueError(f"int8 products: {products!r} for {inputs} inputs")
        self.products = products
        # [out, in]; _int_mm takes its transpose as it is
        dtype = {"int": torch.int8, "float32": torch.float32, "float64": torch.float64}[products]
        self.register_buffer("weight", q.to(dtype))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, row_scale = quantize_rows(x)
        if self.products == "int":
            out = torch._int_mm(q.to(torch.int8), self.weight.t()).float()
        else:
            out = torch.nn.functional.linear(q.to(self.weight.dtype), self.weight).float()
        out.mul_(row_scale).mul_(self.scale)
        return out if self.bias is None else out.add_(self.bias)


class Int8Linear(nn.Module):
    """An ``nn.Linear`` with int8 weights; inputs of any leading shape."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.matrix = Int8Matrix(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)


class Int8Recurrent(nn.Module):
    """A one-layer, batch-first ``nn.LSTM`` or ``nn.GRU`` with int8 weights, called as the module it replaces.

    The input's matrix runs once over every token of the call (rows are independent), the
    recurrent one once per time step; the gates follow PyTorch's equations.
    """

    def __init__(self, rnn: nn.LSTM | nn.GRU):
        super().__init__()
        if rnn.num_layers != 1 or not rnn.batch_first or rnn.bidirectional or getattr(rnn, "proj_size", 0):
            raise NextwordError(f"int8: only one-layer, batch-first, one-way recurrent layers, not {rnn}")
        self.lstm = isinstance(rnn, nn.LSTM)
        self.hidden_size = rnn.hidden_size
        self.ih = Int8Matrix(rnn.weight_ih_l0, rnn.bias_ih_l0)
        self.hh = Int8Matrix(rnn.weight_hh_l0, rnn.bias_hh_l0)

    def forward(self, x: torch.Tensor, state=None):
        batch, steps, _ = x.shape
        zeros = x.new_zeros(batch, self.hidden_size)
        if self.lstm:
            h, c = (zeros, zeros) if state is None else (state[0][0], state[1][0])
        else:
            h = zeros if state is None else state[0]
        inputs = self.ih(x.reshape(batch * steps, -1)).reshape(batch, steps, -1)
        outputs = []
        for t in range(steps):
            if self.lstm:
                i, f, g, o = (inputs[:, t] + self.hh(h)).chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                x_r, x_z, x_n = inputs[:, t].chunk(3, 1)
                h_r, h_z, h_n = self.hh(h).chunk(3, 1)
                r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
            outputs.append(h)
        out = torch.stack(outputs, 1)
        return out, ((h[None], c[None]) if self.lstm else h[None])


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with int8 weights in its linear and recurrent layers, and its embedding table rounded to
    8-bit blocks (:func:`embedding_blocks`)."""
    if not hasattr(torch, "_int_mm"):
        raise NextwordError(f"torch {torch.__version__} has no int8 matrix product (torch._int_mm): "
                            "set engine.int8 false (--fp32), or engine.backend onnx")
    model = copy.deepcopy(model).eval()
    replacements = {nn.Linear: Int8Linear, nn.LSTM: Int8Recurrent, nn.GRU: Int8Recurrent}
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) in replacements:
                parent._modules[name] = replacements[type(child)](child)
    return _round_embedding(model)


def fused_int8(model: nn.Module) -> nn.Module:
    """A copy of the model with int8 weights in its recurrent and linear layers, PyTorch's dynamic quantization,
    and its embedding table rounded as :func:`quantize_int8` rounds it.

    The served engine's kernel: fused, with prepacked weights, the fastest step of one stream. Every
    cell has its matrices there: the fused LSTM/GRU layers, and the ``nn.Linear`` layers of the
    LayerNorm LSTM's gates and of the Transformer's attention and MLP; layer norms, rotary positions
    and the attention products over the KV cache stay in float32. It quantizes each activation tensor
    with one scale, so a batched step is not each stream's own (see the module docstring).

    ``torch.ao.quantization`` is deprecated, and PyTorch points to torchao, whose
    dynamic quantization covers linear layers but not ``nn.LSTM``/``nn.GRU``.
    The decision: the PyTorch backend keeps this API while the pinned torch
    ships it, and gains no torchao dependency; int8 goes forward on the ONNX
    backend (``engine.backend: onnx``, ONNX Runtime's own dynamic quantization).
    Once a torch without it is pinned, int8 on the PyTorch backend is refused in one line.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError:
            raise NextwordError(f"torch {torch.__version__} has no dynamic quantization: "
                                "set engine.int8 false (--fp32), or engine.backend onnx") from None
        return _round_embedding(quantize_dynamic(model, {nn.LSTM, nn.GRU, nn.Linear}, dtype=torch.qint8))


def batch_invariant(model: nn.Module) -> bool:
    """Whether each row of a batched step of ``model`` (quantized here) equals that row's step alone, bit for bit."""
    recurrent = [m for m in model.modules() if isinstance(m, Int8Recurrent)]
    plain = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.LSTM, nn.GRU, nn.RNNBase))]
    return bool(recurrent) and not plain and all(m.hidden_size % ROW_MULTIPLE == 0 for m in recurrent)


@contextlib.contextmanager
def one_thread():
    """Run the block on one PyTorch thread (see the module docstring), then restore the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
