"""One model step as an ONNX graph, optionally with int8 or float16 weights, for ONNX Runtime.

The graph is :class:`StepGraph`: the token ids of a step and the recurrent
state in, the next-token log-probabilities after the last id and the new state
out (:mod:`nextword.backends` names the inputs and outputs and runs it). The
number of ids is a dynamic axis, so the engine runs a step of any length.

PyTorch's TorchScript-based exporter (``dynamo=False``) writes it: each
recurrent layer becomes one ONNX ``LSTM`` (or ``GRU``) op, and it needs no
package beyond torch and onnx. ``AdaptiveLogSoftmaxWithLoss.log_prob`` exports
too, but as a vocabulary-sized buffer filled by ``ScatterND`` with index grids
built at run time; :func:`adaptive_log_prob` is the same computation as one
concatenation, which is what is exported.

``int8`` writes the graph of the engine's own int8 arithmetic, :func:`nextword.quantize.quantize_int8`'s,
which the evaluate stage scores (:func:`int8_graph`): every matrix of the recurrent and output layers
(and a Transformer's linear layers) in 8 bits with a scale per output, its input rows quantized on the
fly with a scale per row, the products summed in int32 by ``MatMulInteger``; the embedding table in 8
bits with a scale per block of a row. So the engine on it serves the numbers the pipeline evaluated:
the same integers, and the float operations in the same order, where only ONNX Runtime's sigmoid,
tanh and log-softmax differ from PyTorch's in the last bit (and, where one of those turns a rounding
of the next row's 8-bit values, a little more; docs/results.md measures how often the top suggestion
turns). ONNX Runtime's own dynamic quantization (``onnxruntime.quantization``) scales activations per
tensor and asymmetrically, so it cannot compute those numbers, and against float32 it turned the top
suggestion more often than the evaluated kernel does; the file is the same size.

The ``lstm``, ``gru`` and ``transformer`` cells export; the LayerNorm LSTM is
refused in one line (:func:`nextword.backends.require_onnx_cell`). A
Transformer's state is its KV cache, always ``context - 1`` tokens long (the
first step's is padding, which the mask leaves out, as in
:class:`nextword.backends.TorchStep`), so the graph's state has fixed shapes
and only the number of ids varies; it is exported through the same code as
training's forward pass (stacking the layers' caches, since the exporter has
no ``out=``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nextword.backends import (STEPS, input_names, model_state, output_names, require_onnx_cell,
                               start_state, state_tensors)
from nextword.files import atomic_path
from nextword.model import LanguageModel
from nextword.modeldir import load_trained, onnx_file, read_engine_options
from nextword.quantize import Int8Matrix, embedding_blocks

OPSET = 17


def adaptive_log_prob(head: nn.AdaptiveLogSoftmaxWithLoss, features: torch.Tensor) -> torch.Tensor:
    """``head.log_prob(features)`` as a concatenation: the shortlist's log-probs, then each cluster's.

    A word in tail cluster ``i`` has the log-prob of the cluster in the head
    (the head's entry ``shortlist + i``) plus its own log-prob within the cluster.
    """
    head_log_probs = F.log_softmax(head.head(features), dim=-1)
    parts = [head_log_probs[:, : head.shortlist_size]]
    for i, cluster in enumerate(head.tail):
        cluster_log_prob = head_log_probs[:, head.shortlist_size + i: head.shortlist_size + i + 1]
        parts.append(F.log_softmax(cluster(features), dim=-1) + cluster_log_prob)
    return torch.cat(parts, dim=-1)


class StepGraph(nn.Module):
    """What is exported: ``(ids, *state) -> (log_probs, *new state)`` for one step of ``model``, the state
    as the tensors :func:`nextword.backends.state_names` names."""

    def __init__(self, model: LanguageModel):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, *state: torch.Tensor):
        model = self.model
        feats, state = model.features(ids, model_state(state))
        if model.head is not None:
            log_probs = adaptive_log_prob(model.head, feats[:, -1])
        else:  # [1, 1, features] in: the exporter writes MatMul and Add, not the Gemm it writes for a matrix
            log_probs = F.log_softmax(model.decoder(feats[:, -1:]), dim=-1)[:, 0]
        return log_probs, *state_tensors(state)


def export_onnx(model: LanguageModel, path: str | Path, int8: bool = False, fp16: bool = False) -> int:
    """Write ``model``'s step to ``path`` as ONNX, with float32 weights, int8 weights (``int8``: :func:`int8_graph`)
    or float16 ones (``fp16``: :func:`halve`); its size in bytes."""
    if int8 and fp16:
        raise ValueError("int8 and fp16 weights are exclusive")
    config = model.config
    require_onnx_cell(config)
    model = model.cpu().eval()
    example = (torch.tensor([[1, 2]]), *start_state(model))
    with atomic_path(path) as tmp:
        graph = tmp.with_name("float32.onnx") if int8 or fp16 else tmp
        with warnings.catch_warnings():
            # The exporter warns that it is the legacy one, and that an LSTM exported without its
            # state as an input fixes the batch size; the state is an input, and the batch is 1.
            warnings.simplefilter("ignore")
            torch.onnx.export(StepGraph(model), example, str(graph), dynamo=False, opset_version=OPSET,
                              input_names=input_names(config), output_names=output_names(config),
                              dynamic_axes={"ids": {1: STEPS}})
        if int8 or fp16:
            import onnx

            step = onnx.load(graph)
            if int8:
                int8_graph(step)
            else:
                halve(step)
            onnx.save(step, tmp)
        size = tmp.stat().st_size
    return size


EMBEDDING = "model.embed.weight"  # the embedding table's initializer, as the exporter names it
BLOCK_SCALES = "embed_blocks_scale"  # the scale of each block of the 8-bit table


def export_servable_step(folder) -> Path | None:
    """With ``engine.backend: onnx`` in the servable ``folder``'s settings, write the step it runs into it
    (``engine.int8`` picks the int8 graph or float32), where the engine reads it; returns its path (None
    on the PyTorch backend, which needs no file). ``write_servable(..., also=export_servable_step)``."""
    options = read_engine_options(folder)
    if options.backend != "onnx":
        return None
    int8 = options.int8
    path = onnx_file(folder, int8)
    size = export_onnx(load_trained(folder)[0], path, int8=int8)
    print(f"{path.name}: the model step for ONNX Runtime, {size / 1e6:.1f} MB")
    return path


def embedding_in_blocks(model) -> list[str]:
    """Store the embedding table of the ONNX ``model`` (changed in place) in 8 bits with a scale per block of
    a row (:func:`nextword.quantize.embedding_blocks`); the nodes it adds.

    The lookup becomes: gather the word's int8 row and its float32 scales, cast, multiply block by block,
    the table :func:`nextword.quantize.blocks_to_float` gives PyTorch, to the bit. It is as fast a lookup
    as the float32 one (docs/results.md). The exporter gives the lookup a table of its own, tied weights
    included (the output layer gets a transposed copy); a graph where it does not is left as it is, and
    no nodes are added.
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes = model.graph.node
    readers = [n for n in nodes if EMBEDDING in n.input]
    table = next((i for i in model.graph.initializer if i.name == EMBEDDING), None)
    if table is None or len(readers) != 1 or readers[0].op_type != "Gather":
        return []
    lookup = readers[0]
    rows, scale = (t.numpy() for t in embedding_blocks(torch.from_numpy(numpy_helper.to_array(table).copy())))
    width, blocks = rows.shape[1], scale.shape[1]
    model.graph.initializer.remove(table)
    model.graph.initializer.extend([
        numpy_helper.from_array(rows, "embed_rows_int8"),
        numpy_helper.from_array(scale, BLOCK_SCALES),  # [words, blocks, 1]
        # ids are [1, steps]: the rows [1, steps, width] as [1, steps, blocks, block], and back
        numpy_helper.from_array(np.array([0, -1, blocks, width // blocks], dtype=np.int64), "embed_blocks_shape"),
        numpy_helper.from_array(np.array([0, -1, width], dtype=np.int64), "embed_rows_shape")])
    ids, out = lookup.input[1], lookup.output[0]
    added = [helper.make_node("Gather", ["embed_rows_int8", ids], ["embed_row_int8"], name="/embed/row_int8"),
             helper.make_node("Cast", ["embed_row_int8"], ["embed_row"], to=TensorProto.FLOAT, name="/embed/row"),
             helper.make_node("Reshape", ["embed_row", "embed_blocks_shape"], ["embed_blocks"], name="/embed/blocks"),
             helper.make_node("Gather", [BLOCK_SCALES, ids], ["embed_block_scale"], name="/embed/block_scale"),
             helper.make_node("Mul", ["embed_blocks", "embed_block_scale"], ["embed_blocks_scaled"],
                              name="/embed/blocks_scaled"),
             helper.make_node("Reshape", ["embed_blocks_scaled", "embed_rows_shape"], [out], name="/embed/rows")]
    at = list(nodes).index(lookup)
    nodes.remove(lookup)
    for offset, node in enumerate(added):
        nodes.insert(at + offset, node)
    return [n.name for n in added]


class _Nodes:
    """Nodes and initializers for :func:`int8_graph`, each named after the node of the float32 graph it replaces."""

    def __init__(self, name: str, initializers: list):
        self.name, self.nodes, self.initializers, self.count = name, [], initializers, 0

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | None = None, **attributes) -> str:
        from onnx import helper

        self.count += 1
        name = f"{self.name}/{op_type}_{self.count}"
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attributes))
        return outputs[0]

    def constant(self, suffix: str, value) -> str:
        from onnx import numpy_helper

        name = f"{self.name}.{suffix}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def rows_int8(self, x: str) -> tuple[str, str]:
        """The rows of ``x`` as :func:`nextword.quantize.quantize_rows` makes them: (uint8 values offset by 128,
        ``[rows, 1]`` scales). Offset, because ONNX Runtime multiplies uint8 by uint8 fastest, exactly."""
        from onnx import TensorProto

        amax = self.op("ReduceMax", [self.op("Abs", [x])], axes=[-1], keepdims=1)
        scale = self.op("Max", [self.op("Div", [amax, _INT8_MAX]), _TINY])
        offset = self.op("Add", [self.op("Round", [self.op("Div", [x, scale])]), _OFFSET_FLOAT])
        return self.op("Cast", [offset], to=TensorProto.UINT8), scale

    def matrix(self, rows: tuple[str, str], weight_t: np.ndarray, bias: np.ndarray | None, suffix: str) -> str:
        """:class:`nextword.quantize.Int8Matrix`'s ``x @ weight.T + bias`` of ``rows`` (:meth:`rows_int8`), given
        the float32 ``weight_t`` ([in, out], as the exporter stores a linear layer): the same integers, then the
        scales and the bias applied in its order."""
        from onnx import TensorProto

        matrix = Int8Matrix(torch.from_numpy(weight_t.T.copy()), None if bias is None else torch.from_numpy(bias.copy()))
        weight = (matrix.weight.to(torch.int32).numpy().T + 128).astype(np.uint8)  # [in, out], offset as the rows
        product = self.op("MatMulInteger", [rows[0], self.constant(f"{suffix}.uint8", weight), _OFFSET, _OFFSET])
        out = self.op("Cast", [product], to=TensorProto.FLOAT)
        out = self.op("Mul", [self.op("Mul", [out, rows[1]]), self.constant(f"{suffix}.scale", matrix.scale.numpy())])
        return out if bias is None else self.op("Add", [out, self.constant(f"{suffix}.bias", matrix.bias.numpy())])


_INT8_MAX, _TINY, _OFFSET_FLOAT, _OFFSET = "int8/max", "int8/tiny", "int8/offset_float", "int8/offset"


def _recurrent_layer(node, initializers: dict, added: list) -> list:
    """The nodes that replace an ONNX ``LSTM`` or ``GRU`` node (one layer, one way, as the exporter writes them)
    with :class:`nextword.quantize.Int8Recurrent`'s arithmetic: the input's matrix once over every id, then a
    ``Scan`` of the steps, each quantizing the state's row for the recurrent matrix and applying the gates in
    PyTorch's order of operations (ONNX orders the gates i, o, f, c and z, r, h; a gate's rows keep their scales)."""
    from onnx import TensorProto, helper, numpy_helper

    lstm = node.op_type == "LSTM"
    x, w, r, b = node.input[:4]
    w, r, b = (numpy_helper.to_array(initializers[name])[0] for name in (w, r, b))
    hidden, gates = r.shape[1], r.shape[0]
    outer = _Nodes(node.name, added)
    flat = outer.op("Reshape", [x, outer.constant("rows", np.array([-1, w.shape[1]], dtype=np.int64))])
    inputs = outer.matrix(outer.rows_int8(flat), w.T, b[:gates], "input")  # [steps, gates]

    step = _Nodes(node.name + "/step", added)
    # the body's inputs: the state, then the step's row of ``inputs``
    h_in, c_in, row = (f"{step.name}/{name}" for name in ("h_in", "c_in", "x_t"))
    recurrent = step.matrix(step.rows_int8(h_in), r.T, b[gates:], "recurrent")
    x_t = step.op("Unsqueeze", [row, step.constant("axis", np.array([0], dtype=np.int64))])
    sizes = step.constant("split", np.array([hidden] * (gates // hidden), dtype=np.int64))
    if lstm:
        names = [f"{step.name}/{gate}" for gate in "iofc"]
        step.op("Split", [step.op("Add", [x_t, recurrent]), sizes], names, axis=1)
        i, o, f, g = names
        c = step.op("Add", [step.op("Mul", [step.op("Sigmoid", [f]), c_in]),
                            step.op("Mul", [step.op("Sigmoid", [i]), step.op("Tanh", [g])])])
        h = step.op("Mul", [step.op("Sigmoid", [o]), step.op("Tanh", [c])])
        carried = [h, c]
    else:
        xs, hs = [f"{step.name}/x_{gate}" for gate in "zrn"], [f"{step.name}/h_{gate}" for gate in "zrn"]
        step.op("Split", [x_t, sizes], xs, axis=1)
        step.op("Split", [recurrent, sizes], hs, axis=1)
        z = step.op("Sigmoid", [step.op("Add", [xs[0], hs[0]])])
        reset = step.op("Sigmoid", [step.op("Add", [xs[1], hs[1]])])
        n = step.op("Tanh", [step.op("Add", [xs[2], step.op("Mul", [reset, hs[2]])])])
        one = step.constant("one", np.array(1, dtype=np.float32))
        h = step.op("Add", [step.op("Mul", [step.op("Sub", [one, z]), n]), step.op("Mul", [z, h_in])])
        carried = [h]
    state_in = [h_in, c_in][: len(carried)]
    outputs = [step.op("Identity", [t], [f"{name}_next"]) for t, name in zip(carried, state_in)]
    outputs.append(step.op("Identity", [h], [f"{step.name}/y"]))
    value = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    body = helper.make_graph(step.nodes, "step", [*(value(n, [1, hidden]) for n in state_in), value(row, [gates])],
                             [value(n, [1, hidden]) for n in outputs])

    state_shape = outer.constant("state", np.array([1, hidden], dtype=np.int64))
    initial = [outer.op("Reshape", [name, state_shape]) for name in node.input[5:5 + len(carried)]]
    scanned = [f"{node.name}/{name}" for name in ("h", "c")[: len(carried)] + ("ys",)]
    outer.op("Scan", [*initial, inputs], scanned, body=body, num_scan_inputs=1)
    # as the op's outputs: Y [steps, 1, 1, hidden], then the last state(s) [1, 1, hidden]
    outer.op("Reshape", [scanned[-1], outer.constant("y", np.array([-1, 1, 1, hidden], dtype=np.int64))],
             [node.output[0]])
    last = outer.constant("last", np.array([1, 1, hidden], dtype=np.int64))
    for name, out in zip(scanned[:-1], node.output[1:]):
        if out:
            outer.op("Reshape", [name, last], [out])
    return outer.nodes


def int8_graph(model) -> None:
    """The ONNX ``model`` (changed in place) computing :func:`nextword.quantize.quantize_int8`'s arithmetic.

    Every ``MatMul`` by a weight (the exporter's linear layers) becomes :meth:`_Nodes.matrix` of its input's
    rows, each input quantized once however many matrices read it; every ``LSTM`` or ``GRU``
    :func:`_recurrent_layer`; the embedding :func:`embedding_in_blocks`. A ``Gemm`` by a weight is refused:
    the exporter writes one only for inputs of two dimensions, which the step has none of.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    added = [numpy_helper.from_array(np.array(value, dtype=dtype), name) for name, value, dtype in (
        (_INT8_MAX, 127, np.float32), (_TINY, torch.finfo(torch.float32).tiny, np.float32),
        (_OFFSET_FLOAT, 128, np.float32), (_OFFSET, 128, np.uint8))]
    nodes, replaced, quantized_rows = [], set(), {}
    for node in graph.node:
        weights = [name for name in node.input[1:] if name in initializers]
        if node.op_type == "MatMul" and weights:
            x, weight = node.input
            ops = _Nodes(node.name, added)
            if x not in quantized_rows:
                quantized_rows[x] = ops.rows_int8(x)
            out = ops.matrix(quantized_rows[x], numpy_helper.to_array(initializers[weight]), None, "weight")
            ops.op("Identity", [out], [node.output[0]])
            nodes += ops.nodes
            replaced.add(weight)
        elif node.op_type in ("LSTM", "GRU"):
            nodes += _recurrent_layer(node, initializers, added)
            replaced.update(node.input[1:4])
        elif node.op_type == "Gemm" and weights:
            raise RuntimeError(f"the exported step: {node.name} is a Gemm by a weight, which int8 does not cover")
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    for name in replaced:
        if not any(name in n.input for n in nodes):
            graph.initializer.remove(initializers[name])
    graph.initializer.extend(added)
    embedding_in_blocks(model)


def halve(model) -> None:
    """The ONNX ``model`` (changed in place) with float16 weights.

    The embedding table takes 8 bits and a scale per block (:func:`embedding_in_blocks`: in float16 it
    would be most of the file); every other float32 initializer is stored in float16 and cast back to float32
    by a node at the start of the graph. ONNX Runtime folds those casts when it loads the graph, so the
    step computes in float32, as fast as the float32 graph, on weights rounded to 11 significant bits:
    its top suggestion turns far less often than with 8-bit weights (docs/results.md). An initializer
    that float16 cannot hold (beyond its range) stays in float32.
    """
    from onnx import TensorProto, helper, numpy_helper

    embedding_in_blocks(model)
    graph = model.graph
    casts = []
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or init.name == BLOCK_SCALES:
            continue
        weights = numpy_helper.to_array(init)
        halved = weights.astype(np.float16)
        if not np.array_equal(np.isfinite(halved), np.isfinite(weights)):
            continue
        half = numpy_helper.from_array(halved, f"{init.name}.float16")
        graph.initializer.remove(init)
        graph.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=f"/float16/{init.name}"))
    for node in reversed(casts):
        graph.node.insert(0, node)
