"""The model: every cell, stacked layers, the carried state, dropout variants, output layers, FLOP count."""

import pytest
import torch
from torch import nn

from conftest import model_config
from nextword.config import CELLS
from nextword.lnlstm import LayerNormLSTM
from nextword.model import LanguageModel, StackedRNN, count_flops_per_token, detach_state, dropout
from nextword.training import cpu_runs_bf16
from nextword.vocab import PAD_ID


def config(**overrides):
    return model_config(**{"vocab_size": 40, "embedding": 8, "hidden": 12, "layers": 2, **overrides})


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_stacked_layers_compute_what_the_stacked_torch_module_computes(cell):
    torch.manual_seed(0)
    ours = StackedRNN(cell, 8, 12, 3, dropout=0.0, locked=False)
    theirs = (nn.LSTM if cell == "lstm" else nn.GRU)(8, 12, 3, batch_first=True)
    with torch.no_grad():
        for i, layer in enumerate(ours.layers):
            for name, value in layer.named_parameters():
                getattr(theirs, name.replace("_l0", f"_l{i}")).copy_(value)
    x = torch.randn(4, 5, 8)
    out, state = ours(x)
    expected_out, expected_state = theirs(x)
    torch.testing.assert_close(out, expected_out)
    if cell == "lstm":
        assert state[0].shape == state[1].shape == (3, 4, 12)
        torch.testing.assert_close(state, expected_state)
    else:
        torch.testing.assert_close(state, expected_state)
    # carrying the state on gives what one longer call gives
    first, carried = ours(x[:, :2])
    second, _ = ours(x[:, 2:], carried)
    torch.testing.assert_close(torch.cat([first, second], 1), out)


def test_the_layernorm_lstm_computes_the_papers_equations():
    torch.manual_seed(0)
    cell = LayerNormLSTM(3, 4)
    with torch.no_grad():  # gains and biases away from 1 and 0, so that each one matters
        for norm in (cell.norm_input, cell.norm_recurrent, cell.norm_cell):
            norm.weight.uniform_(0.5, 1.5)
        cell.norm_input.bias.uniform_(-0.5, 0.5)
        cell.norm_cell.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 3)
    h0, c0 = torch.randn(1, 2, 4), torch.randn(1, 2, 4)

    def layer_norm(v, gain, bias=0.0, eps=1e-5):
        mean = v.mean(-1, keepdim=True)
        variance = ((v - mean) ** 2).mean(-1, keepdim=True)
        return gain * (v - mean) / torch.sqrt(variance + eps) + bias

    h, c = h0[0], c0[0]
    expected = []
    for t in range(3):
        gates = (layer_norm(x[:, t] @ cell.input.weight.T, cell.norm_input.weight, cell.norm_input.bias)
                 + layer_norm(h @ cell.recurrent.weight.T, cell.norm_recurrent.weight))
        i, f, g, o = (gates[:, k * 4:(k + 1) * 4] for k in range(4))
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(layer_norm(c, cell.norm_cell.weight, cell.norm_cell.bias))
        expected.append(h)
    out, (h_last, c_last) = cell(x, (h0, c0))
    torch.testing.assert_close(out, torch.stack(expected, 1))
    torch.testing.assert_close(h_last[0], h)
    torch.testing.assert_close(c_last[0], c)


def cell_model(cell: str, **shape) -> LanguageModel:
    """A small model of ``cell`` with a Transformer context shorter than the test sequences."""
    torch.manual_seed(0)
    return LanguageModel(config(cell=cell, heads=2, context=4, **shape)).eval()


@pytest.mark.parametrize("cell", CELLS)
def test_carrying_the_state_gives_what_one_pass_gives(cell):
    model = cell_model(cell)
    ids = torch.randint(1, 40, (3, 11))
    with torch.no_grad():
        whole, _ = model.features(ids)
        pieces, state = [], None
        for lo, hi in ((0, 3), (3, 4), (4, 9), (9, 11)):  # pieces longer and shorter than the context
            out, state = model.features(ids[:, lo:hi], state)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), whole)


def test_the_kv_cache_steps_give_the_distribution_of_a_recompute_from_scratch():
    model = cell_model("transformer", layers=3)
    ids = torch.randint(1, 40, (1, 13))
    with torch.no_grad():
        state = None
        for t in range(ids.shape[1]):
            feats, state = model.features(ids[:, t:t + 1], state)
            # the cache is bounded: the context - 1 tokens before the next one, in every layer
            assert state.keys.shape == (3, 1, 2, min(t + 1, 3), 6) and int(state.positions) == t + 1
            recomputed, _ = model.features(ids[:, :t + 1])
            torch.testing.assert_close(model.log_probs(feats[:, -1]), model.log_probs(recomputed[:, -1]),
                                       rtol=0, atol=1e-5)


def test_a_transformer_token_sees_the_context_and_nothing_else():
    model = cell_model("transformer", layers=1)  # one layer: no path around the window
    ids = torch.randint(6, 40, (1, 9))
    with torch.no_grad():
        feats, _ = model.features(ids)
        changed = ids.clone()
        changed[0, 4] = 5
        other, _ = model.features(changed)
    # position 4 reaches positions 4..7 (context 4), and nothing before it is changed
    differs = (feats - other).abs().amax(-1)[0] > 1e-6
    assert differs.tolist() == [False] * 4 + [True] * 4 + [False]


@pytest.mark.parametrize("cell", CELLS)
def test_stacked_states_step_each_row_as_it_would_step_alone(cell):
    model = cell_model(cell)
    histories = [torch.randint(1, 40, (1, n)) for n in (0, 2, 7)]  # memories shorter and longer than the context
    with torch.no_grad():
        states = [model.features(h, None)[1] if h.shape[1] else None for h in histories]
        step = torch.randint(1, 40, (3, 2))
        alone = [model.features(step[b:b + 1], states[b]) for b in range(3)]
        feats, stacked = model.features(step, model.stack_states(states))
        for b, (row_feats, row_state) in enumerate(alone):
            torch.testing.assert_close(feats[b:b + 1], row_feats)
            split = model.split_state(stacked)[b]
            torch.testing.assert_close(split, row_state)
            # and the split state steps on as the row's own does
            more = torch.randint(1, 40, (1, 3))
            torch.testing.assert_close(model.features(more, split)[0], model.features(more, row_state)[0])


@pytest.mark.parametrize("cell", CELLS)
def test_every_cell_trains_with_the_carried_state_detached(cell):
    torch.manual_seed(0)
    model = LanguageModel(config(cell=cell, embedding=16, hidden=32, heads=2, context=4, dropout=0.1)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    # 3 consecutive windows of 4 lanes, over a stream where each token says which comes next
    ids = (6 + torch.arange(4 * 3 * 6).remainder(10)).reshape(4, 3, 6)
    state = None
    losses = []
    for epoch in range(25):
        state = None
        for window in ids.unbind(1):
            feats, state = model.features(window[:, :-1], state)
            loss, _ = model.loss(feats, window[:, 1:])
            optimizer.zero_grad()
            loss.backward()  # fails if the state still holds the previous window's graph
            optimizer.step()
            state = detach_state(state)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_locked_dropout_uses_one_mask_for_every_time_step():
    torch.manual_seed(0)
    x = torch.ones(3, 7, 50)
    locked = dropout(x, 0.5, locked=True, training=True)
    assert torch.equal(locked, locked[:, :1].expand_as(locked))
    assert set(locked.unique().tolist()) == {0.0, 2.0}
    plain = dropout(x, 0.5, locked=False, training=True)
    assert not torch.equal(plain, plain[:, :1].expand_as(plain))
    assert torch.equal(dropout(x, 0.5, locked=True, training=False), x)


def test_embedding_dropout_drops_a_word_at_all_its_positions():
    model = LanguageModel(config(vocab_size=200, embedding_dropout=0.5, layers=1)).train()
    ids = torch.arange(6, 200).repeat(2, 1)  # every word once in each row
    rnn_inputs = []
    model.body.register_forward_pre_hook(lambda module, args: rnn_inputs.append(args[0]))
    torch.manual_seed(1)
    model.features(ids)
    torch.manual_seed(1)
    keep = torch.empty(200).bernoulli_(0.5) * 2  # the model's draw, replayed
    torch.testing.assert_close(rnn_inputs[0], model.embed(ids) * keep[ids].unsqueeze(-1))
    zero = rnn_inputs[0].abs().sum(-1) == 0
    assert torch.equal(zero[0], zero[1]) and 0 < int(zero[0].sum()) < zero.shape[1]
    model.eval()
    model.features(ids)
    torch.testing.assert_close(rnn_inputs[1], model.embed(ids))


def test_tied_weights_share_the_embedding_through_a_projection():
    model = LanguageModel(config(tie_weights=True))
    assert model.decoder.weight is model.embed.weight
    assert model.proj.weight.shape == (8, 12)
    feats, _ = model.features(torch.tensor([[6, 7, 8]]))
    assert feats.shape == (1, 3, 8)


def test_adaptive_softmax_gives_a_distribution_and_its_loss():
    torch.manual_seed(0)
    model = LanguageModel(config(hidden=32, adaptive_softmax=True, cutoffs=(10, 20))).eval()
    ids = torch.randint(1, 40, (3, 6))
    targets = torch.randint(1, 40, (3, 6))
    targets[0, 0] = PAD_ID
    feats, _ = model.features(ids)
    lp = model.log_probs(feats)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 6))
    loss, count = model.loss(feats, targets)
    keep = targets != PAD_ID
    assert count == int(keep.sum())
    torch.testing.assert_close(loss, -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[keep].mean())


def test_every_output_layer_starts_within_a_tenth():
    # PyTorch's Linear default would reach 1/sqrt(8) = 0.35 here; the adaptive softmax learned slowly from it
    torch.manual_seed(0)
    for options in ({}, {"adaptive_softmax": True, "cutoffs": (10, 20), "div_value": 1.0}):
        model = LanguageModel(config(hidden=8, **options))
        outputs = [model.decoder] if model.decoder is not None else list(model.head.modules())
        weights = [m.weight for m in outputs if isinstance(m, nn.Linear)]
        assert len(weights) == (1 if not options else 5)  # the head, and two linears per tail cluster
        for w in weights:
            assert w.abs().max() <= 0.1
            assert w.abs().max() > 0.09  # uniform over the whole range, not a narrower init
        assert model.embed.weight.abs().max() <= 0.1


@pytest.mark.parametrize("cell", CELLS)
def test_the_adaptive_softmax_runs_in_float32_under_autocast(cell):
    torch.manual_seed(0)
    model = LanguageModel(config(cell=cell, hidden=16, heads=2, context=4, adaptive_softmax=True, cutoffs=(10, 20)))
    ids = torch.randint(1, 40, (3, 6))
    plain, _ = model.loss(model.features(ids)[0], ids)
    if cell != "lstm" or cpu_runs_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats, _ = model.features(ids)
    else:  # below AVX-512 oneDNN has no bf16 LSTM (nextword.training.cpu_runs_bf16): the head gets bf16 all the same
        feats = model.features(ids)[0].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if cell == "lstm":
            assert feats.dtype == torch.bfloat16  # the body runs in bf16 (CPU autocast leaves a GRU in fp32)
        loss, _ = model.loss(feats, ids)
        lp = model.log_probs(feats)
    assert loss.dtype == lp.dtype == torch.float32
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 6))
    torch.testing.assert_close(loss, plain, atol=0.05, rtol=0)  # only the body's bf16 rounding differs
    loss.backward()


def test_flops_per_token_count_the_matrix_multiplies():
    # LSTM: 4 gates x hidden x (input + hidden) per layer; output: hidden x vocab; x2 FLOPs, x3 for backward
    c = config()
    assert count_flops_per_token(c) == 6 * (4 * 12 * (8 + 12) + 4 * 12 * 24 + 12 * 40)
    # the adaptive softmax counts its head only: the shortlist and one logit per tail cluster
    ada = config(adaptive_softmax=True, cutoffs=(10, 20))
    assert count_flops_per_token(ada) == 6 * (4 * 12 * (8 + 12) + 4 * 12 * 24 + 12 * (10 + 2))
    gru = config(cell="gru", layers=1)
    assert count_flops_per_token(gru) == 6 * (3 * 12 * 20 + 12 * 40)
    assert count_flops_per_token(config(cell="lnlstm")) == count_flops_per_token(c)
    # transformer: the projection in (8 -> 12), then 12 w^2 per block (attention's four matrices, the 4x MLP)
    transformer = config(cell="transformer", heads=2, context=4)
    assert count_flops_per_token(transformer) == 6 * (8 * 12 + 2 * 12 * 12 * 12 + 12 * 40)


@pytest.mark.parametrize("adaptive", [False, True])
def test_pad_targets_are_masked_out_of_the_loss(adaptive):
    torch.manual_seed(0)
    model = LanguageModel(model_config(50, embedding=8, hidden=12, layers=1,
                                         adaptive_softmax=adaptive, cutoffs=(10, 30))).eval()
    ids = torch.randint(6, 50, (3, 7))
    targets = torch.randint(6, 50, (3, 7))
    targets[1, 4:] = PAD_ID  # a padded tail, as the last window of a split has
    feats, _ = model.features(ids)
    loss, count = model.loss(feats, targets)
    assert count == 3 * 7 - 3
    # the mean NLL over the real targets only, from the full distribution
    log_probs = model.log_probs(feats)
    keep = targets != PAD_ID
    expected = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[keep].mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    # whatever sits at a padded position does not change the loss
    other = targets.clone()
    other[1, 4:] = 7
    assert not torch.allclose(model.loss(feats, other)[0], loss)
