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

``int8`` quantizes the exported graph with ONNX Runtime's dynamic quantization:
the weights of the embedding, the recurrent layers and the output layers are
stored in 8 bits, a quarter of float32, and the activations are quantized on
the fly at every call. The choices, measured on a model of the chat preset's
shape typing chat conversations (``nextword export --int8 --check-csv``):

* Unsigned weights (``QUInt8``), not signed (``QInt8``): as close to float32
  and no slower here, and ONNX Runtime's guidance gives the unsigned-unsigned
  products as free of the overflow that signed weights risk on CPUs without VNNI.
* One scale per output column for the recurrent layers and for the output
  layer's first matrix (the adaptive softmax's head, or the full softmax's
  decoder), which every word's probability goes through: one scale for all
  of its columns turned the top suggestion several times more often. One
  scale per tensor for the tail clusters, where per column bought little
  agreement and cost time.
* One scale per block of 32 weights of a row for the embedding table
  (:func:`embedding_in_blocks`), written by this module since ONNX Runtime's
  quantizer gives a lookup one scale for the whole table: the step looks up
  the word's 8-bit row and its scales and multiplies them, so it is as fast,
  and the top suggestion turns less often.

Weights in 8 bits, however they are scaled, turn the top suggestion at some
keystrokes where float32 has two words nearly tied; docs/results.md measures
how often, and what float16 weights would cost instead.

ONNX Runtime quantizes LSTM layers but not GRU layers, which stay in float32.
A Transformer's products (the attention's input and output, the MLP) take one
scale per tensor, its output layer one per column, as above.

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

import logging
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
    """Write ``model``'s step to ``path`` as ONNX, with float32 weights, int8 weights (``int8``: :func:`quantize`)
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
        if int8:
            quantize(graph, tmp)
        elif fp16:
            halve(graph, tmp)
        size = tmp.stat().st_size
    return size


def per_column_nodes(model) -> list[str]:
    """The nodes of the ONNX ``model`` quantized with a scale per column: the recurrent layers and the output
    layer's first matrix."""
    nodes = model.graph.node
    # The exporter names nodes by the module that made them: head.head (adaptive_log_prob) or decoder.
    head = [n.name for n in nodes if n.op_type == "MatMul" and n.name.startswith(("/head/", "/decoder/"))]
    if len(head) != 1:
        raise RuntimeError(f"the exported step: expected one output-layer matrix, found {head}")
    return [n.name for n in nodes if n.op_type == "LSTM"] + head


EMBEDDING = "model.embed.weight"  # the embedding table's initializer, as the exporter names it
EMBED_BLOCK = 32  # weights of an embedding row that share a scale (embedding_in_blocks)
BLOCK_SCALES = "embed_blocks_scale"  # the scale of each block of the 8-bit table


def embedding_in_blocks(model, block: int = EMBED_BLOCK) -> list[str]:
    """Store the embedding table of the ONNX ``model`` (changed in place) in 8 bits, each run of ``block``
    weights of a row with a scale of its own; the nodes it adds.

    The lookup becomes: gather the word's int8 row and its float32 scales, cast, multiply block by block
    (symmetric: a block's largest weight is 127 times its scale). A row whose width ``block`` does not
    divide is one block. A scale per row, as the 8-bit table of ONNX Runtime's quantizer cannot have, turns
    the top suggestion less often than one for the whole table, and a scale per block of 32 less often
    still, for an eighth more bytes than the int8 rows alone and as fast a lookup (docs/results.md). The
    exporter gives the lookup a table of its own, tied weights included (the output layer gets a
    transposed copy); a graph where it does not is left as it is, and no nodes are added.
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes = model.graph.node
    readers = [n for n in nodes if EMBEDDING in n.input]
    table = next((i for i in model.graph.initializer if i.name == EMBEDDING), None)
    if table is None or len(readers) != 1 or readers[0].op_type != "Gather":
        return []
    lookup = readers[0]
    weights = numpy_helper.to_array(table)
    words, width = weights.shape
    block = block if width % block == 0 else width
    blocks = weights.reshape(words, width // block, block)
    scale = np.abs(blocks).max(axis=2, keepdims=True) / 127
    scale[scale == 0] = 1  # an all-zero block (the padding's row): any scale gives zeros
    rows = np.round(blocks / scale).astype(np.int8).reshape(words, width)
    model.graph.initializer.remove(table)
    model.graph.initializer.extend([
        numpy_helper.from_array(rows, "embed_rows_int8"),
        numpy_helper.from_array(scale.astype(np.float32), BLOCK_SCALES),  # [words, blocks, 1]
        # ids are [1, steps]: the rows [1, steps, width] as [1, steps, blocks, block], and back
        numpy_helper.from_array(np.array([0, -1, width // block, block], dtype=np.int64), "embed_blocks_shape"),
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


def quantize(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic quantization of the graph at ``source``, written to ``target`` (see above)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(source)
    per_column = per_column_nodes(model)
    lookup = embedding_in_blocks(model)
    per_tensor = target.with_name("per_tensor.onnx")
    logging.disable(logging.WARNING)  # its advice to pre-process the graph, which changes nothing here
    try:
        quantize_dynamic(model, per_tensor, weight_type=QuantType.QUInt8, nodes_to_exclude=per_column + lookup)
        quantize_dynamic(per_tensor, target, weight_type=QuantType.QUInt8, nodes_to_quantize=per_column,
                         per_channel=True)
    finally:
        logging.disable(logging.NOTSET)


def halve(source: Path, target: Path) -> None:
    """The graph at ``source`` with float16 weights, written to ``target``.

    The embedding table takes 8 bits and a scale per block (:func:`embedding_in_blocks`: in float16 it
    would be most of the file); every other float32 initializer is stored in float16 and cast back to float32
    by a node at the start of the graph. ONNX Runtime folds those casts when it loads the graph, so the
    step computes in float32, as fast as the float32 graph, on weights rounded to 11 significant bits:
    its top suggestion turns far less often than with 8-bit weights (docs/results.md). An initializer
    that float16 cannot hold (beyond its range) stays in float32.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(source)
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
    onnx.save(model, target)
