"""The Kneser-Ney baseline (nextword.ngram) and the scoring code it shares with the LSTM (nextword.metrics)."""

import math

import numpy as np
import pytest
import torch

from nextword.metrics import Scores, evaluate, evaluate_ngram, word_masks
from conftest import model_config
from nextword.model import LanguageModel
from nextword.ngram import FALLBACK_DISCOUNTS, KneserNey, estimate_discounts, stream_from_windows
from nextword.vocab import PAD_ID, SPECIALS, UNK, Vocab
from nextword.windows import cut_windows, lanes

# The hand-checked corpus: ids a=1, b=2, c=3 (4 never occurs, 0 is PAD), V = 5.
A, B, C, D = 1, 2, 3, 4
HAND = [A, B, C, A, B, A, C, B, A, A]
HAND_DISCOUNTS = [(0.5, 1.0, 1.5), (0.4, 0.8, 1.2), (0.3, 0.6, 0.9)]

# Unigram level, on continuation counts (distinct left neighbours): a {c, b, a} 3, b {a, c} 2, c {b, a} 2.
GAMMA1 = (1.0 * 2 + 1.5 * 1) / 7  # D2 for b and c, D3+ for a, over a total of 7
P1 = {A: (3 - 1.5) / 7 + GAMMA1 / 5, B: (2 - 1.0) / 7 + GAMMA1 / 5, C: (2 - 1.0) / 7 + GAMMA1 / 5,
      D: GAMMA1 / 5, PAD_ID: GAMMA1 / 5}


def random_stream(n=400, vocab_size=12, seed=0):
    rng = np.random.default_rng(seed)
    stream = rng.integers(1, vocab_size, size=n)
    repeats = np.tile([3, 4, 5, 6], n // 20)  # some contexts with many repeats
    stream[n // 4: n // 4 + len(repeats)] = repeats
    return stream


def test_hand_checked_bigram():
    model = KneserNey.fit(HAND, 5, order=2, discounts=HAND_DISCOUNTS)
    # Top order, raw counts. After a: b 2, c 1, a 1 (total 4); after c: a 1, b 1 (total 2).
    gamma_a = (0.4 * 2 + 0.8 * 1) / 4
    gamma_c = (0.4 * 2) / 2
    expected = {
        (A, B): (2 - 0.8) / 4 + gamma_a * P1[B],
        (A, A): (1 - 0.4) / 4 + gamma_a * P1[A],
        (A, D): gamma_a * P1[D],
        (C, A): (1 - 0.4) / 2 + gamma_c * P1[A],
        (C, C): gamma_c * P1[C],
        (D, A): P1[A],  # an unseen context falls back to the unigram level
    }
    for (context, word), p in expected.items():
        assert model.next_probs([[context]])[0, word] == pytest.approx(p, rel=1e-12), (context, word)
    assert model.next_probs([[]])[0] == pytest.approx([P1[i] for i in range(5)], rel=1e-12)
    assert sum(P1.values()) == pytest.approx(1.0)


def test_hand_checked_trigram_uses_continuation_counts_below_the_top():
    model = KneserNey.fit(HAND, 5, order=3, discounts=HAND_DISCOUNTS)
    # Bigram level: distinct left neighbours. After b: c 1 (abc), a 2 (aba, cba); total 3.
    # After a: b 1 (cab only: the first ab has no left neighbour), c 1, a 1; total 3, not the raw 4.
    p2_a_after_b = (2 - 0.8) / 3 + (0.4 + 0.8) / 3 * P1[A]
    p2_b_after_b = (0.4 + 0.8) / 3 * P1[B]
    p2_b_after_a = (1 - 0.4) / 3 + (0.4 * 3) / 3 * P1[B]
    # Trigram level, raw counts: after "a b" come c (abc) and a (aba), once each.
    gamma_ab = 0.3 * 2 / 2
    probs = model.next_probs([[A, B], [D, A]])
    assert probs[0, A] == pytest.approx((1 - 0.3) / 2 + gamma_ab * p2_a_after_b, rel=1e-12)
    assert probs[0, B] == pytest.approx(gamma_ab * p2_b_after_b, rel=1e-12)
    assert probs[1, B] == pytest.approx(p2_b_after_a, rel=1e-12)  # "d a" unseen: the bigram level


def test_discounts_from_count_of_counts():
    counts = np.array([1] * 10 + [2] * 4 + [3] * 3 + [4] * 2 + [7, 0])  # n1=10 n2=4 n3=3 n4=2
    y = 10 / (10 + 2 * 4)
    assert estimate_discounts(counts) == pytest.approx((1 - 2 * y * 4 / 10, 2 - 3 * y * 3 / 4, 3 - 4 * y * 2 / 3))
    assert estimate_discounts(np.array([1, 1, 2, 3])) == FALLBACK_DISCOUNTS  # no count of 4
    model = KneserNey.fit(random_stream(3000, 8), 8, order=3)
    for discounts in model.discounts:
        assert all(0 < d <= r for r, d in zip((1, 2, 3), discounts))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_distributions_are_normalised_and_never_zero(order):
    stream = random_stream()
    model = KneserNey.fit(stream, 12, order)
    histories = [[], [3], [3, 4, 5], list(stream[-6:]), [11, 11, 11], [0, 0], list(stream[110:113])]
    probs = model.next_probs(histories)
    assert probs.shape == (len(histories), 12)
    assert probs.sum(axis=1) == pytest.approx(np.ones(len(histories)), abs=1e-12)
    assert (probs > 0).all()


def test_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="0 .. 4"):
        KneserNey.fit([1, 2, 5], 5)
    with pytest.raises(ValueError, match="0 .. 4"):
        KneserNey.fit(HAND, 5, order=2).next_probs([[7]])


def test_stream_scoring_matches_the_history_api():
    stream = random_stream()
    model = KneserNey.fit(stream, 12, order=4)
    held_out = random_stream(60, seed=1)
    batches = list(model.stream_probs(held_out, batch_size=7, dtype=np.float64))
    probs = np.concatenate([p for p, _ in batches])
    targets = np.concatenate([t for _, t in batches])
    assert (targets == held_out[1:]).all()
    expected = model.next_probs([held_out[:t] for t in range(1, len(held_out))])
    assert probs == pytest.approx(expected, abs=1e-12)
    assert probs.sum(axis=1) == pytest.approx(np.ones(len(targets)), abs=1e-12)


def test_the_baseline_ranks_on_probabilities_as_it_would_on_their_logarithms():
    vocab = toy_vocab(30)
    stream = np.random.default_rng(5).integers(1, len(vocab), size=700)
    model = KneserNey.fit(stream[:500], len(vocab), 3)
    windows = cut_windows(stream[500:], 6)
    reference = Scores(vocab)
    for probs, targets in model.stream_probs(stream_from_windows(windows)):
        reference.add(torch.from_numpy(np.log(probs)), torch.from_numpy(targets))
    got, expected = evaluate_ngram(model, windows, vocab), reference.result()
    assert got == pytest.approx(expected, rel=1e-12)
    for key in ("top1", "top3", "word_tokens", "tokens"):
        assert got[key] == expected[key], key
    assert 0 < got["top1"] < got["top3"] < 1


def test_stream_from_windows_round_trips():
    stream = random_stream(103)
    for length in (4, 5, 15):
        assert (stream_from_windows(cut_windows(stream, length)) == stream).all()
    assert len(stream_from_windows(np.zeros((0, 6), dtype=np.int32))) == 0


def toy_vocab(n_words: int) -> Vocab:
    tokens = list(SPECIALS) + [".", ",", "?"] + [f"w{i}" for i in range(n_words)]
    return Vocab(tokens, [0] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))


def test_higher_order_beats_unigram_on_a_repetitive_corpus():
    vocab = toy_vocab(20)
    rng = np.random.default_rng(0)
    pattern = rng.integers(6, len(vocab), size=9)

    def corpus(n, seed):
        stream = np.tile(pattern, n)
        noise = np.random.default_rng(seed).random(len(stream)) < 0.05
        stream[noise] = np.random.default_rng(seed + 1).integers(6, len(vocab), size=noise.sum())
        return cut_windows(stream, 5)

    train, test = corpus(200, 1), corpus(30, 2)
    figures = {order: evaluate_ngram(KneserNey.fit(stream_from_windows(train), len(vocab), order), test, vocab)
               for order in (1, 3)}
    assert figures[3]["tokens"] == figures[1]["tokens"] == len(stream_from_windows(test)) - 1
    assert figures[3]["perplexity"] < figures[1]["perplexity"] / 3
    assert figures[3]["top1"] > 0.8 > figures[1]["top1"]


def reference_evaluate(model, windows, vocab, batch_size):
    """The LSTM scoring as it was before it shared Scores: the metrics computed inline."""
    target_words, suggestable = (torch.from_numpy(m) for m in word_masks(vocab))
    data = torch.from_numpy(lanes(windows, batch_size, pad_tail=True))
    nll, tokens, words, top1, top3, state = 0.0, 0, 0, 0, 0, None
    with torch.no_grad():
        for step in range(data.shape[0]):
            batch = data[step].long()
            inp, tgt = batch[:, :-1], batch[:, 1:]
            feats, state = model.features(inp, state)
            lp = model.log_probs(feats).float()
            keep = tgt != PAD_ID
            nll -= lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[keep].sum().item()
            tokens += int(keep.sum())
            is_word = target_words[tgt] & keep
            best = lp.masked_fill(~suggestable, -math.inf).topk(3, dim=-1).indices
            hits = best == tgt.unsqueeze(-1)
            top1 += int((hits[..., 0] & is_word).sum())
            top3 += int((hits.any(-1) & is_word).sum())
            words += int(is_word.sum())
    return {"nll": nll / tokens, "perplexity": math.exp(nll / tokens), "tokens": tokens,
            "top1": top1 / words, "top3": top3 / words, "word_tokens": words}


def test_lstm_and_ngram_are_scored_alike():
    torch.manual_seed(0)
    vocab = toy_vocab(30)
    stream = np.random.default_rng(3).integers(1, len(vocab), size=500)
    windows = cut_windows(stream, 7)
    model = LanguageModel(model_config(len(vocab), embedding=8, hidden=16, layers=1))
    got = evaluate(model, windows, vocab, batch_size=4)
    expected = reference_evaluate(model.eval(), windows, vocab, batch_size=4)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert got["tokens"] == len(stream) - 1
    # Without accuracy: the same perplexity, no ranking
    assert evaluate(model, windows, vocab, batch_size=4, accuracy=False) == \
        {key: got[key] for key in ("nll", "perplexity", "tokens")}
    baseline = evaluate_ngram(KneserNey.fit(stream, len(vocab), 3), windows, vocab)
    assert baseline.keys() == got.keys()
    assert (baseline["tokens"], baseline["word_tokens"]) == (got["tokens"], got["word_tokens"])


def test_an_adaptive_softmax_is_scored_by_cluster_as_over_the_whole_vocabulary():
    """evaluate ranks an adaptive softmax's clusters apart: the figures of its full [rows, V] matrix."""
    torch.manual_seed(1)
    # Punctuation last, so that a tail cluster holds tokens that may not be suggested.
    tokens = list(SPECIALS) + [f"w{i}" for i in range(50)] + [".", ",", "?"]
    vocab = Vocab(tokens, [0] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    stream = np.random.default_rng(4).integers(1, len(vocab), size=600)
    windows = cut_windows(stream, 7)
    model = LanguageModel(model_config(len(vocab), embedding=8, hidden=16, layers=1, adaptive_softmax=True,
                                       cutoffs=[12, 30], div_value=2.0))
    got = evaluate(model, windows, vocab, batch_size=4)
    expected = reference_evaluate(model.eval(), windows, vocab, batch_size=4)
    words = sum(vocab.tokens[t].startswith("w") or vocab.tokens[t] == UNK for t in stream[1:])
    assert (got["tokens"], got["word_tokens"]) == (expected["tokens"], expected["word_tokens"]) == (599, words)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert got["top3"] > 0  # the ranking found some targets, so a mismatch in it would show
    assert evaluate(model, windows, vocab, batch_size=4, accuracy=False) == \
        {key: got[key] for key in ("nll", "perplexity", "tokens")}


def test_scores_counts_word_targets_and_word_candidates_only():
    vocab = toy_vocab(3)  # ids: 6 "." 7 "," 8 "?" 9 w0 10 w1 11 w2
    log_probs = torch.log(torch.tensor([
        [0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.3, 0.0, 0.0, 0.1, 0.06, 0.04],  # target w0: "." and <EOS> cannot be suggested
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.1, 0.2, 0.6],  # target ".": not a word target
        [0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3],  # target <UNK>: a word target, always missed
        [1.0 / 12] * 12,  # target PAD: skipped
    ]).clamp_min(1e-9))
    targets = torch.tensor([9, 6, 1, PAD_ID])
    scores = Scores(vocab)
    scores.add(log_probs, targets)
    result = scores.result()
    assert (result["tokens"], result["word_tokens"]) == (3, 2)
    assert (result["top1"], result["top3"]) == (0.5, 0.5)
    assert result["nll"] == pytest.approx(-(math.log(0.1) + math.log(0.1) + math.log(0.1)) / 3)


def test_saved_model_loads_with_the_same_distributions(tmp_path):
    stream = random_stream(3000, 12)
    model = KneserNey.fit(stream, 12, order=4)
    path = tmp_path / "ngram.npz"
    model.save(path)
    loaded = KneserNey.load(path)
    assert (loaded.order, loaded.vocab_size) == (4, 12)
    assert loaded.discounts == model.discounts
    histories = [stream[i: i + 3].tolist() for i in range(0, 300, 7)] + [[], [5], [11, 11, 11]]
    np.testing.assert_allclose(loaded.next_probs(histories), model.next_probs(histories), rtol=1e-6)
    with np.load(path, allow_pickle=False) as arrays:  # plain arrays only: loads without pickle
        assert all(arrays[name].dtype != object for name in arrays.files)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_one_history_gives_the_numbers_of_its_row_in_a_batch(order):
    # The engine asks for one distribution at a time, which takes a path of its own.
    stream = random_stream()
    model = KneserNey.fit(stream, 12, order)
    histories = [[], [3], [3, 4, 5], list(stream[-6:]), [11, 11, 11], [0, 0], list(stream[110:113]), [7, 7, 7, 7]]
    for dtype in (np.float64, np.float32):
        batch = model.next_probs(histories, dtype=dtype, scale=0.3)
        for history, row in zip(histories, batch):
            one = model.next_probs([history], dtype=dtype, scale=0.3)
            assert one.shape == (1, 12) and one.dtype == dtype
            np.testing.assert_array_equal(one[0], row)


def test_a_recent_context_is_answered_again_unchanged_and_read_only():
    stream = random_stream()
    model = KneserNey.fit(stream, 12, 3)
    first = model.next_probs([[9, 3, 4]], dtype=np.float32, scale=0.3)
    again = model.next_probs([[1, 3, 4]], dtype=np.float32, scale=0.3)  # the same last two ids: the same context
    assert np.shares_memory(first, again)
    with pytest.raises(ValueError, match="read-only"):
        again[0, 0] = 1.0
    np.testing.assert_array_equal(again[0], model.next_probs([[3, 4], [0, 0]], dtype=np.float32, scale=0.3)[0])
    # Another scale or dtype is another entry, not the kept one rescaled.
    other = model.next_probs([[3, 4]], dtype=np.float32, scale=0.5)
    assert not np.shares_memory(first, other)
    np.testing.assert_array_equal(other[0], model.next_probs([[3, 4], [0, 0]], dtype=np.float32, scale=0.5)[0])
    assert model.next_probs([[3, 4]], dtype=np.float64, scale=0.3).dtype == np.float64


def test_a_block_is_ranked_only_for_the_rows_whose_top_3_its_bound_could_enter():
    vocab = toy_vocab(6)  # ids 9 .. 14 are words
    log_probs = torch.log(torch.tensor([
        [0.0] * 9 + [0.4, 0.3, 0.2, 0.05, 0.03, 0.02],  # the first three words hold 0.9: the rest cannot enter
        [0.0] * 9 + [0.1, 0.1, 0.05, 0.3, 0.25, 0.2],  # the second block holds the top 3
    ]).clamp_min(1e-12))
    targets = torch.tensor([11, 13])
    asked = []  # (a block's first id, the rows it was worked out for)

    def blocks(rows):
        def block(start, stop):
            def scores(ranked):
                asked.append((start, ranked.tolist()))
                return log_probs[rows][ranked][:, start:stop]
            return start, log_probs[rows][:, start:stop].max(dim=1).values, scores

        yield 0, None, lambda ranked: log_probs[rows][ranked][:, :9]  # no bound: always worked out
        yield block(9, 12)
        yield block(12, 15)

    scores, reference = Scores(vocab), Scores(vocab)
    scores.add_blocks(log_probs.gather(1, targets[:, None])[:, 0], targets, blocks)
    reference.add(log_probs, targets)
    assert scores.result() == reference.result()
    assert scores.result()["top3"] == 1.0 and scores.result()["top1"] == 0.0
    assert asked == [(9, [True, True]), (12, [False, True])]  # the first row never ranks the last block
