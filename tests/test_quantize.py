"""int8 weights quantized per row: a stream's step is the same numbers alone or in a batch."""

import numpy as np
import pytest
import torch

from conftest import model_config
from nextword import backends
from nextword.backends import TorchStep
from nextword.errors import NextwordError
from nextword.model import LanguageModel
from nextword.quantize import EXACT_FLOAT32_INPUTS, Int8Matrix, int8_products_fast, quantize_int8

# Steps of different lengths (ids committed at once), as streams typing different things have them.
STEPS = [[5, 6, 7], [8], [9, 10], [11], [3, 4, 12, 13]]


def int8_step(cell: str, adaptive: bool, hidden: int = 64) -> TorchStep:
    torch.manual_seed(0)
    config = model_config(40, cell=cell, embedding=32, hidden=hidden, layers=2, adaptive_softmax=adaptive,
                          cutoffs=[10, 20])
    return TorchStep(quantize_int8(LanguageModel(config).eval()))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_streams_stepped_side_by_side_give_each_stream_exactly_its_own_steps(cell, adaptive, monkeypatch):
    step = int8_step(cell, adaptive)
    assert step.batch_invariant
    # Streams of different lengths, each a few steps of different numbers of ids, as conversations have them.
    streams = [STEPS, STEPS[1:3], STEPS[::-1] * 3, STEPS[3:4]]
    alone = []  # each stream's log-probs after each of its steps, one stream at a time
    for steps in streams:
        state = None
        for ids in steps:
            log_probs, state = step.run(ids, state)
            alone.append(log_probs)
    ends = [np.cumsum([len(ids) for ids in steps]) - 1 for steps in streams]
    for segment in (4, 64):  # calls that end inside a step and between steps; one call per stream
        monkeypatch.setattr(backends, "SEGMENT", segment)
        features = step.stream_features([sum(steps, []) for steps in streams], ends)
        assert [len(f) for f in features] == [len(steps) for steps in streams]
        together = step.output(torch.cat(features))
        for row, log_probs in enumerate(alone):
            np.testing.assert_array_equal(together[row], log_probs)  # bit for bit, not approximately


def test_int8_stays_close_to_float32():
    torch.manual_seed(0)
    model = LanguageModel(model_config(40, embedding=32, hidden=64, layers=2)).eval()
    ids = torch.tensor([STEPS[-1]])
    with torch.no_grad():
        exact = model.log_probs(model.features(ids)[0])
        quantized = quantize_int8(model)
        approx = quantized.log_probs(quantized.features(ids)[0])
    assert (approx - exact).abs().max() < 0.05


def test_a_hidden_size_that_is_not_a_multiple_of_64_is_not_batched():
    step = int8_step("lstm", False, hidden=96)
    assert not step.batch_invariant  # the elementwise kernels' scalar tails could differ in the last bit
    with pytest.raises(NextwordError, match="depends on its batch"):
        step.stream_features(STEPS, [[0]] * len(STEPS))


def test_the_exact_kernel_of_a_model_that_does_not_batch_steps_any_number_of_ids():
    step = int8_step("lstm", False, hidden=96)
    state = eager_state = None
    for ids in STEPS:  # 3 ids, then 1: a trace of the first would freeze the time loop at 3
        log_probs, state = step.run(ids, state)
        with torch.no_grad():
            feats, eager_state = step.model.features(torch.tensor([ids]), eager_state)
            expected = step.model.log_probs(feats[:, -1])[0].numpy()
        np.testing.assert_array_equal(log_probs, expected)


def test_int8_products_are_summed_exactly():
    # What the batch-invariance rests on: int8 x int8 summed in int32, on this machine's kernels too.
    a = torch.full((3, 1024), -127, dtype=torch.int8)
    a[1] = 127
    a[2, ::2] = 127
    w = torch.full((1024, 24), 127, dtype=torch.int8)
    expected = a.double() @ w.double()
    assert torch.equal(torch._int_mm(a, w).double(), expected)
    assert torch.equal(torch._int_mm(a[:1], w).double(), expected[:1])


@pytest.mark.parametrize("inputs", [64, 512, EXACT_FLOAT32_INPUTS, EXACT_FLOAT32_INPUTS + 60])
def test_the_integer_products_give_the_same_numbers_whichever_way_they_are_summed(inputs):
    # int32 where torch._int_mm is fast, float32 or float64 where it is not: every CPU serves the same suggestions.
    torch.manual_seed(inputs)
    weight, bias = torch.randn(24, inputs), torch.randn(24)
    x = torch.randn(20, inputs) * 3
    x[3] = 0  # a zero row keeps a tiny scale and gives the bias
    ways = ["int", "float64"] + (["float32"] if inputs <= EXACT_FLOAT32_INPUTS else [])
    outs = {way: Int8Matrix(weight, bias, products=way)(x) for way in ways}
    for way in ways:
        assert torch.equal(outs[way], outs["int"]), way
        assert torch.equal(Int8Matrix(weight, bias, products=way)(x[5:6]), outs["int"][5:6]), way
    fast, narrow = int8_products_fast(), inputs <= Int8Matrix.FLOAT_PRODUCTS
    expected = "float32" if narrow or (not fast and inputs <= EXACT_FLOAT32_INPUTS) else "int" if fast else "float64"
    assert Int8Matrix(weight, bias).products == expected
    if inputs > EXACT_FLOAT32_INPUTS:
        with pytest.raises(ValueError, match="float32"):
            Int8Matrix(weight, bias, products="float32")


@pytest.mark.parametrize("cell", ["lstm", "gru", "lnlstm", "transformer"])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
def test_the_traced_step_of_one_stream_is_the_eager_step_to_the_bit(cell, int8, adaptive):
    from nextword.backends import TRACED_IDS
    from nextword.quantize import fused_int8

    torch.manual_seed(0)
    config = model_config(40, cell=cell, embedding=32, hidden=64, layers=2, adaptive_softmax=adaptive,
                          cutoffs=[10, 20], tie_weights=not adaptive, context=6)
    model = LanguageModel(config).eval()
    model = fused_int8(model) if int8 else model
    served = TorchStep(model)
    long_step = list(range(5, 6 + TRACED_IDS))  # more ids than get a trace of their own: run eagerly
    state = eager_state = None
    if cell == "transformer":  # the served step starts from a full cache of padding, which the mask leaves out
        eager_state = model.body.empty(1, memory=config.context - 1)
        with torch.no_grad():
            padded, empty = (model.log_probs(model.features(torch.tensor([STEPS[0]]), start)[0][:, -1])
                             for start in (eager_state, None))
        torch.testing.assert_close(padded, empty)  # the same up to float rounding
    for ids in STEPS + STEPS + [long_step] + STEPS:  # from no state
        log_probs, state = served.run(ids, state)
        with torch.no_grad():
            feats, eager_state = model.features(torch.tensor([ids]), eager_state)
            expected = model.log_probs(feats[:, -1])[0].numpy()
        assert np.array_equal(log_probs, expected), ids
        for a, b in zip(*(s if isinstance(s, tuple) else (s,) for s in (state, eager_state))):
            assert torch.equal(a, b), ids
    # One trace for any number of ids with the fused layers; else one per number of ids, up to TRACED_IDS.
    expected_keys = {()} if cell in ("lstm", "gru") else {(len(ids),) for ids in STEPS}
    assert set(served._traced) == expected_keys


@pytest.mark.parametrize("tied", [False, True])
def test_both_int8_kernels_round_the_embedding_to_8_bits_a_scale_per_block(tied):
    from nextword.quantize import EMBED_BLOCK, blocks_to_float, embedding_blocks, fused_int8

    torch.manual_seed(0)
    model = LanguageModel(model_config(40, embedding=64, hidden=64, layers=1, tie_weights=tied)).eval()
    table = model.embed.weight.detach().clone()
    rows, scale = embedding_blocks(table)
    assert rows.dtype == torch.int8 and scale.shape == (40, 64 // EMBED_BLOCK, 1)
    rounded = blocks_to_float(rows, scale)
    step = scale.repeat_interleave(EMBED_BLOCK, dim=1)[:, :, 0]
    assert 0 < (rounded - table).abs().max() and torch.all((rounded - table).abs() <= step / 2 + 1e-7)
    assert torch.equal(rounded[0], torch.zeros(64))  # the padding's row stays all zeros
    for quantized in (quantize_int8(model), fused_int8(model)):
        assert torch.equal(quantized.embed.weight, rounded)
    assert torch.equal(model.embed.weight, table)  # the float32 model keeps its table
    if tied:  # and its output layer, which the int8 copies hold in 8 bits of their own
        assert model.decoder.weight is model.embed.weight
