"""The model step the engine runs: in PyTorch, or the exported ONNX graph in ONNX Runtime.

Both have one method, ``run(token_ids, state)``: the ids of one step (the
engine runs every committed token in one call), and the recurrent state
after the previous step (None before the first), give the log-probabilities
of the token after the last of them (a numpy vector over the vocabulary) and
the new state. The engine keeps the state and hands it back; it never looks
inside, so each backend carries its own kind.

A backend whose ``batch_invariant`` is true also has ``stream_features`` and
``output``: many streams stepped in batches, each row exactly the numbers
``run`` gives that stream alone (the keystroke simulation relies on it). The
PyTorch step with the engine's int8 weights is (:mod:`nextword.quantize`);
float32 products, in PyTorch or ONNX Runtime, are summed in an order that
depends on the batch, and ONNX Runtime's int8 quantizes the activations of a
whole batch with one scale, so the ONNX step runs one stream at a time.

The ONNX graph (:func:`nextword.export.export_onnx` writes it) is one such
step with the state as explicit inputs and outputs, since ONNX Runtime keeps
nothing between calls: inputs ``ids`` ([1, steps] int64) and the state
(:func:`state_names`: ``h`` and, for an LSTM, ``c``, [layers, 1, hidden]
each; for a Transformer its KV cache of ``context - 1`` tokens); outputs
``log_probs`` ([1, vocabulary], the last position only) and the new state
(``h_out``, ``c_out``, ...).

Scoring several continuations from one state (:func:`continuation_log_probs`,
the engine's fill-in-the-middle) always runs in PyTorch: the exported graph
is a batch of one that gives the last position's log-probabilities only. An
ONNX state converts to PyTorch's with :func:`torch_state`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nextword.config import FUSED_CELLS, ONNX_CELLS, ModelConfig
from nextword.errors import NextwordError, damaged
from nextword.quantize import Int8Matrix, batch_invariant, one_thread


def require_onnx_cell(config: ModelConfig) -> None:
    """Refuse, in one line, a model whose step has no ONNX graph.

    The LayerNorm LSTM's time loop would need a scripted loop of its own,
    which :mod:`nextword.export` does not write: it runs on the PyTorch backend.
    """
    if config.cell not in ONNX_CELLS:
        raise NextwordError(f"model.cell {config.cell} has no ONNX export (only {', '.join(ONNX_CELLS)}); "
                            "use engine.backend torch")


def state_names(config: ModelConfig) -> list[str]:
    """The graph's state inputs, in order: ``h`` and ``c`` for an LSTM, ``h`` for a GRU, and the KV cache's
    ``keys``, ``values`` and ``positions`` for a Transformer (the fields of :class:`nextword.transformer.KVCache`)."""
    if config.cell == "transformer":
        return ["keys", "values", "positions"]
    return ["h", "c"] if config.cell == "lstm" else ["h"]


STEPS = "steps"  # the dynamic axis of an exported step's ids: [1, steps]


def input_names(config: ModelConfig) -> list[str]:
    return ["ids", *state_names(config)]


def output_names(config: ModelConfig) -> list[str]:
    return ["log_probs", *(f"{name}_out" for name in state_names(config))]


class TorchStep:
    """The step in PyTorch; the state is the model's own (a tensor, a pair for an LSTM, a KV cache).

    The step of one stream runs as a TorchScript trace of :class:`_Step`: the same operators on the
    same tensors, so the same numbers to the bit (a test checks it for every cell), without the Python
    of the modules around them, which costs about as much as the operators in a step of one token. A
    trace freezes the shapes that Python code reads, so one is made for each :meth:`_trace_key`, at its
    first use: one for any number of ids with the fused LSTM and GRU layers; one per number of ids (up to
    ``TRACED_IDS``) for the LayerNorm LSTM's time loop and the Transformer, whose cache must also be full
    (``context - 1`` tokens). So the Transformer's first step starts from a full cache of padding, which
    its mask leaves out (as :func:`nextword.transformer.stack_caches` pads a batch), not from an empty
    one. The batch-exact int8 kernel (:mod:`nextword.quantize`) runs eagerly.

    ``torch.jit.trace`` is deprecated; ``torch.export``, its successor, cannot export the packed weights
    of PyTorch's quantized LSTM. The decision: as for ``torch.ao``'s dynamic quantization
    (:func:`nextword.quantize.fused_int8`), the PyTorch backend traces while the pinned torch ships it,
    and runs eagerly without it; ONNX Runtime (``engine.backend: onnx``) is the way forward.
    """

    def __init__(self, model):
        self.model = model
        self.batch_invariant = batch_invariant(model)
        # The batch-exact int8 kernel loops over the time steps in Python, which a trace would freeze.
        self._trace = hasattr(torch.jit, "trace") and not any(isinstance(m, Int8Matrix) for m in model.modules())
        self._traced: dict[tuple, torch.jit.ScriptModule] = {}
        self._start = start_state(model)

    def _trace_key(self, ids: int, state) -> tuple | None:
        """What a trace of this step freezes (None: run it eagerly, see the class docstring)."""
        config = self.model.config
        if config.cell in FUSED_CELLS:
            return ()
        if ids > TRACED_IDS or (config.cell == "transformer" and state is not None
                                and state.keys.shape[3] != config.context - 1):
            return None
        return (ids,)

    @torch.no_grad()
    def run(self, token_ids: list[int], state):
        ids = torch.tensor([token_ids])
        key = self._trace_key(len(token_ids), state) if self._trace else None
        if key is not None:
            parts = self._start if state is None else state_tensors(state)
            traced = self._traced.get(key)
            if traced is None:
                traced = self._traced[key] = _trace(self.model, ids, parts)
            log_probs, *parts = traced(ids, *parts)
            return log_probs.numpy(), model_state(parts)
        # The output layer, the largest part of a step, runs only for the last token.
        feats, state = self.model.features(ids, state)
        return self.model.log_probs(feats[:, -1])[0].numpy(), state

    @torch.no_grad()
    def stream_features(self, streams: list[list[int]], at: list[list[int]]) -> list[torch.Tensor]:
        """Many streams side by side: for each stream (all its ids, from the start), the model's features after
        each of its positions ``at[s]``, ``[len(at[s]), features]``, the input of :meth:`output`.

        A stream's numbers are those :meth:`run` gives it alone, stepped through the same ids in any
        number of calls (``batch_invariant``). The streams go through their ids side by side, longest
        first, so the streams still running are the first rows of the batch, and each call, of up to
        ``SEGMENT`` ids, is on a slice of the state. Only the recurrent body runs this way: the output
        layer, the larger part of a step, runs in full batches of positions from anywhere
        (:meth:`output`), so a stream much longer than the others costs little alone.
        """
        if not self.batch_invariant:
            raise NextwordError("this model's step depends on its batch; run the streams one at a time")
        order = sorted(range(len(streams)), key=lambda s: -len(streams[s]))
        lengths = np.array([len(streams[s]) for s in order], dtype=np.int64)
        ids = torch.zeros(len(order), int(lengths.max(initial=0)), dtype=torch.long)
        # Where the features after each id go in ``found`` (-1: nowhere), the streams' positions one after another.
        into = np.full(ids.shape, -1, dtype=np.int64)
        starts = np.cumsum([0] + [len(at[s]) for s in order])
        for i, s in enumerate(order):
            ids[i, :lengths[i]] = torch.tensor(streams[s], dtype=torch.long)
            into[i, at[s]] = np.arange(starts[i], starts[i + 1])
        found = torch.empty(0, 0)
        lstm = self.model.config.cell == "lstm"
        state = self.model.init_state(len(order))
        with one_thread():
            t = 0
            while t < ids.shape[1]:
                running = int(np.count_nonzero(lengths > t))
                # Up to the next stream's end, SEGMENT ids at most: the recurrent layer's input matrix
                # runs once over all of them, its recurrent one once per id.
                stop = min(int(lengths[running - 1]), t + SEGMENT)
                now = (state[0][:, :running], state[1][:, :running]) if lstm else state[:, :running]
                feats, now = self.model.features(ids[:running, t:stop], now)
                if not found.numel():
                    found = feats.new_empty(int(starts[-1]), feats.shape[-1])
                if lstm:
                    state[0][:, :running], state[1][:, :running] = now
                else:
                    state[:, :running] = now
                rows, steps = np.nonzero(into[:running, t:stop] >= 0)
                if len(rows):
                    found[torch.from_numpy(into[rows, t + steps])] = feats[torch.from_numpy(rows),
                                                                           torch.from_numpy(steps)]
                t = stop
        by_stream = [found[starts[i]:starts[i + 1]] for i in range(len(order))]
        return [by_stream[i] for i in np.argsort(order)]

    @torch.no_grad()
    def output(self, features: torch.Tensor) -> np.ndarray:
        """``[rows, vocabulary]`` next-token log-probs of ``[rows, features]`` from :meth:`stream_features`:
        each row what :meth:`run` gives at that position."""
        with one_thread():
            return self.model.log_probs(features).numpy()


# The most ids of each stream in one call of stream_features: more make fewer, larger products, in more memory.
SEGMENT = 32

# The most ids of one step that get a trace of their own, where a trace freezes their number (TorchStep).
TRACED_IDS = 16


def state_tensors(state) -> tuple:
    """The tensors of a model's state, in order: :func:`model_state` undoes it."""
    return (state,) if isinstance(state, torch.Tensor) else tuple(state)


def start_state(model) -> tuple:
    """The tensors of the state that None stands for, one stream: zeros, and for a Transformer a full cache
    of padding (so that every step has the same shapes: a trace for each number of ids, one ONNX graph)."""
    if model.config.cell == "transformer":
        return state_tensors(model.body.empty(1, memory=model.config.context - 1))
    return state_tensors(model.init_state(1))


def model_state(parts):
    """The model's state from its tensors: a GRU's one, an LSTM's pair, or a Transformer's KV cache (three)."""
    if len(parts) == 3:
        from nextword.transformer import KVCache

        return KVCache(*parts)
    return parts[0] if len(parts) == 1 else tuple(parts)


class _Step(torch.nn.Module):
    """:meth:`TorchStep.run` as a module with the state as tensors: ``(ids, *state) -> (log_probs, *state)``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, *state: torch.Tensor):
        feats, state = self.model.features(ids, model_state(state))
        return self.model.log_probs(feats[:, -1])[0], *state_tensors(state)


def _trace(model, ids: torch.Tensor, state: tuple):
    """A TorchScript trace of ``model``'s step, for steps of any number of ids (see :class:`TorchStep`)."""
    import warnings

    with warnings.catch_warnings():
        # That tracing is deprecated (see TorchStep), and the shape checks and sizes that a trace
        # records as constants: TorchStep keys its traces by them.
        warnings.simplefilter("ignore")
        return torch.jit.trace(_Step(model).eval(), (ids, *state), check_trace=False)


class OnnxStep:
    """The exported step of ``model`` in an ONNX Runtime session on one thread; the state is a tuple of numpy
    arrays, shaped as the model's own (:func:`start_state`)."""

    def __init__(self, path: str | Path, model):
        import onnxruntime

        config = model.config
        require_onnx_cell(config)
        path = Path(path)
        if not path.is_file():
            raise NextwordError(f"{path}: no such file; write it with `nextword export --format onnx`, "
                                "or run the step in PyTorch (engine.backend torch, --backend torch)")
        options = onnxruntime.SessionOptions()
        # One step of a small model: threads cost more than they give, as for PyTorch (Engine.load).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ONNX Runtime's own exception types (InvalidProtobuf, Fail, ...)
            raise damaged(path, err) from None
        # The state before the first step, as in TorchStep: zeros, and for a Transformer a full cache of padding.
        self.names = state_names(config)
        self.zeros = tuple(t.numpy() for t in start_state(model))
        inputs = [(i.name, i.shape) for i in self.session.get_inputs()]
        vocab = self.session.get_outputs()[0].shape[-1]
        expected = list(zip(input_names(config), [[1, STEPS], *(list(z.shape) for z in self.zeros)]))
        if inputs != expected or vocab != config.vocab_size:
            raise NextwordError(f"{path}: not a step of this model (inputs {inputs}, {vocab} log-probs; "
                                f"expected {expected}, {config.vocab_size}); export it again")
        self.batch_invariant = False

    def run(self, token_ids: list[int], state):
        feeds = dict(zip(self.names, self.zeros if state is None else state))
        feeds["ids"] = np.array([token_ids], dtype=np.int64)
        log_probs, *state = self.session.run(None, feeds)
        return log_probs[0], tuple(state)


def torch_state(state):
    """A backend's state as the PyTorch model takes it: ONNX's numpy arrays become tensors."""
    if state is None or isinstance(state, torch.Tensor) or isinstance(state[0], torch.Tensor):
        return state  # PyTorch's own: a tensor, an LSTM's pair, a transformer's KV cache
    return model_state([torch.as_tensor(part) for part in state])


@torch.no_grad()
def continuation_log_probs(model, state, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``[B, T]``: log P(``targets[b, t]`` | the context of ``state``, ``inputs[b, : t + 1]``).

    The ``B`` continuations all start from the one ``state`` (after the context) and run as one batch.
    """
    state = model.stack_states([torch_state(state)] * len(inputs))
    feats, _ = model.features(torch.tensor(inputs, dtype=torch.int64), state)
    return target_log_probs(model, feats, torch.tensor(targets, dtype=torch.int64)).numpy()


def target_log_probs(model, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's log-probability of each target, for features of any leading shape and targets of that shape.

    The adaptive softmax computes only the clusters the targets fall in, not the whole vocabulary.
    It is inference only, so it lives here: a change to :mod:`nextword.model` reruns the train stage.
    """
    if model.head is None:
        return model.log_probs(features).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    flat = features.reshape(-1, features.shape[-1])
    with torch.autocast(flat.device.type, enabled=False):
        return model.head(flat.float(), targets.reshape(-1)).output.reshape(targets.shape)
