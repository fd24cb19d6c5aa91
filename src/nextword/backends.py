"""The model step the engine runs: in PyTorch, or the exported ONNX graph in ONNX Runtime.

Both have one method, ``run(token_ids, state)``: the ids of one step (the
engine runs every committed token in one call), and the recurrent state
after the previous step (None before the first), give the log-probabilities
of the token after the last of them (a numpy vector over the vocabulary) and
the new state. The engine keeps the state and hands it back; it never looks
inside, so each backend carries its own kind.

The ONNX graph (:func:`nextword.export.export_onnx` writes it) is one such
step with the state as explicit inputs and outputs, since ONNX Runtime keeps
nothing between calls: inputs ``ids`` ([1, steps] int64), ``h`` and, for an
LSTM, ``c`` ([layers, 1, hidden] each); outputs ``log_probs`` ([1, vocabulary],
the last position only) and the new ``h_out`` and ``c_out``.

Scoring several continuations from one state (:func:`continuation_log_probs`,
the engine's fill-in-the-middle) always runs in PyTorch: the exported graph
is a batch of one that gives the last position's log-probabilities only. An
ONNX state converts to PyTorch's with :func:`torch_state`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nextword.config import ONNX_CELLS, ModelConfig
from nextword.errors import NextwordError, damaged


def require_onnx_cell(config: ModelConfig) -> None:
    """Refuse, in one line, a model whose step has no ONNX graph.

    The LayerNorm LSTM's time loop and the Transformer's cache would need a
    graph of their own (a scripted loop; a cache of varying length), which
    :mod:`nextword.export` does not write: they run on the PyTorch backend.
    """
    if config.cell not in ONNX_CELLS:
        raise NextwordError(f"model.cell {config.cell} has no ONNX export (only {' and '.join(ONNX_CELLS)}); "
                            "use engine.backend torch")


def state_names(config: ModelConfig) -> list[str]:
    """The graph's state inputs, in order: ``h`` and ``c`` for an LSTM, ``h`` for a GRU."""
    return ["h", "c"] if config.cell == "lstm" else ["h"]


def input_names(config: ModelConfig) -> list[str]:
    return ["ids", *state_names(config)]


def output_names(config: ModelConfig) -> list[str]:
    return ["log_probs", *(f"{name}_out" for name in state_names(config))]


class TorchStep:
    """The step in PyTorch; the state is the model's own (a tensor, or a pair for an LSTM)."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def run(self, token_ids: list[int], state):
        # The output layer, the largest part of a step, runs only for the last token.
        feats, state = self.model.features(torch.tensor([token_ids]), state)
        return self.model.log_probs(feats[:, -1])[0].numpy(), state


class OnnxStep:
    """The exported step in an ONNX Runtime session on one thread; the state is a tuple of numpy arrays."""

    def __init__(self, path: str | Path, config: ModelConfig):
        import onnxruntime

        require_onnx_cell(config)
        path = Path(path)
        if not path.is_file():
            raise NextwordError(f"{path}: no such file; write it with `nextword export --format onnx`")
        options = onnxruntime.SessionOptions()
        # One step of a small model: threads cost more than they give, as for PyTorch (Engine.load).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ONNX Runtime's own exception types (InvalidProtobuf, Fail, ...)
            raise damaged(path, err) from None
        inputs = [i.name for i in self.session.get_inputs()]
        vocab = self.session.get_outputs()[0].shape[-1]
        if inputs != input_names(config) or vocab != config.vocab_size:
            raise NextwordError(f"{path}: not a step of this model (inputs {inputs}, {vocab} log-probs; "
                                f"expected {input_names(config)}, {config.vocab_size}); export it again")
        self.names = state_names(config)
        self.zeros = tuple(np.zeros((config.layers, 1, config.hidden), dtype=np.float32) for _ in self.names)

    def run(self, token_ids: list[int], state):
        feeds = dict(zip(self.names, self.zeros if state is None else state))
        feeds["ids"] = np.array([token_ids], dtype=np.int64)
        log_probs, *state = self.session.run(None, feeds)
        return log_probs[0], tuple(state)


def torch_state(state):
    """A backend's state as the PyTorch model takes it: ONNX's numpy arrays become tensors."""
    if state is None or isinstance(state, torch.Tensor) or isinstance(state[0], torch.Tensor):
        return state  # PyTorch's own: a tensor, an LSTM's pair, a transformer's KV cache
    parts = tuple(torch.as_tensor(part) for part in state)
    return parts if len(parts) == 2 else parts[0]


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
