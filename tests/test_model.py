"""The model: stacked layers, dropout variants, output layers, FLOP count."""

import pytest
import torch
from torch import nn

from conftest import model_config
from nextword.model import LanguageModel, StackedRNN, count_flops_per_token, dropout
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
    model.rnn.register_forward_pre_hook(lambda module, args: rnn_inputs.append(args[0]))
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


def test_the_adaptive_softmax_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    model = LanguageModel(config(hidden=16, adaptive_softmax=True, cutoffs=(10, 20)))
    ids = torch.randint(1, 40, (3, 6))
    plain, _ = model.loss(model.features(ids)[0], ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, _ = model.features(ids)
        assert feats.dtype == torch.bfloat16  # the body runs in bf16
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
