"""Decoding strategies on hand-made distributions: greedy, temperature, top-k, top-p, beam search."""

import math
from collections import Counter

import numpy as np
import pytest

from nextword.decoding import beam_search, choose, masked, sample_line, sampling_distribution, top_p_keep

PROBS = np.array([0.05, 0.5, 0.1, 0.2, 0.15])  # token 1 most probable, then 3, 4, 2, 0
LOG_PROBS = np.log(PROBS)


def frequencies(strategy, draws=4000, **knobs):
    rng = np.random.default_rng(0)
    counts = Counter(choose(LOG_PROBS, strategy, rng, **knobs) for _ in range(draws))
    return np.array([counts[i] / draws for i in range(len(PROBS))])


def test_greedy_is_the_argmax():
    rng = np.random.default_rng(0)
    assert choose(LOG_PROBS, "greedy", rng) == 1
    assert choose(masked(LOG_PROBS, np.array([0, 1, 0, 0, 0], dtype=bool)), "greedy", rng) == 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Sorted: 0.5 (1), 0.2 (3), 0.15 (4), 0.1 (2), 0.05 (0); cumulative 0.5, 0.7, 0.85, 0.95, 1.0.
    assert list(top_p_keep(PROBS, 0.5)) == [1]
    assert list(top_p_keep(PROBS, 0.6)) == [1, 3]
    assert list(top_p_keep(PROBS, 0.7)) == [1, 3]  # exactly 0.7 is enough
    assert list(top_p_keep(PROBS, 0.8)) == [1, 3, 4]
    assert list(top_p_keep(PROBS, 1.0)) == [1, 3, 4, 2, 0]
    ids, probs = sampling_distribution(LOG_PROBS, top_p=0.8)
    assert list(ids) == [1, 3, 4]
    np.testing.assert_allclose(probs, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85])
    seen = frequencies("sample", top_p=0.8)
    assert seen[[0, 2]].sum() == 0
    np.testing.assert_allclose(seen[[1, 3, 4]], probs, atol=0.03)


def test_top_k_never_picks_outside_the_top_k():
    seen = frequencies("sample", top_k=2)
    assert seen[[0, 2, 4]].sum() == 0
    np.testing.assert_allclose(seen[[1, 3]], [0.5 / 0.7, 0.2 / 0.7], atol=0.03)


def test_temperature_reshapes_the_distribution():
    np.testing.assert_allclose(frequencies("sample", temperature=1.0), PROBS, atol=0.03)
    flat = PROBS ** 0.5 / (PROBS ** 0.5).sum()  # T = 2: softmax(log p / 2)
    np.testing.assert_allclose(frequencies("sample", temperature=2.0), flat, atol=0.03)
    assert frequencies("sample", draws=300, temperature=0.05)[1] == 1.0  # near 0: greedy
    with pytest.raises(ValueError):
        choose(LOG_PROBS, "sample", np.random.default_rng(0), temperature=0)


def test_sample_combines_the_knobs_and_skips_blocked_tokens():
    blocked = np.array([0, 1, 0, 0, 0], dtype=bool)
    rng = np.random.default_rng(0)
    picks = {choose(masked(LOG_PROBS, blocked), "sample", rng, temperature=0.7, top_k=3, top_p=0.9)
             for _ in range(500)}
    assert picks <= {3, 4, 2} and 1 not in picks
    with pytest.raises(ValueError):
        choose(LOG_PROBS, "nucleus", rng)


# A hand-made step function where greedy is myopic. Tokens: 0 = <EOS>, 1 = A, 2 = B, 3 = C, 4 = D.
# First token: A 0.6, B 0.4. After A: C 0.35, D 0.35, <EOS> 0.3 (C and D then end for sure).
# After B: <EOS> 1.0. Greedy takes A, then C, then ends: 0.6 * 0.35 = 0.21. Beam search finds
# B then <EOS>: 0.4, better both in total and per token.
EOS = 0


def step_table(prefix: tuple) -> np.ndarray:
    table = {
        (): {1: 0.6, 2: 0.4},
        (1,): {3: 0.35, 4: 0.35, EOS: 0.3},
        (2,): {EOS: 1.0},
    }
    probs = np.full(5, 1e-12)
    for token, p in table.get(prefix, {EOS: 1.0}).items():
        probs[token] = p
    return np.log(probs / probs.sum())


def step(token, state):
    state = state + (token,)
    return step_table(state), state


def sequence_log_prob(tokens):
    total, state = 0.0, ()
    for token in tokens + [EOS]:
        total += step_table(state)[token]
        state = state + (token,)
    return total


def test_beam_search_beats_myopic_greedy():
    nothing_blocked = np.zeros(5, dtype=bool)
    args = (step, (), step_table(()), nothing_blocked, EOS, 10)
    greedy = sample_line(*args, strategy="greedy")
    beam = beam_search(*args, beam_size=3)
    assert greedy == [1, 3]
    assert beam == [2]
    assert sequence_log_prob(beam) == pytest.approx(math.log(0.4))
    assert sequence_log_prob(greedy) == pytest.approx(math.log(0.21))
    assert sequence_log_prob(beam) / 2 > sequence_log_prob(greedy) / 3  # per token, <EOS> counted


def test_lines_stop_at_the_word_limit_and_never_produce_blocked_tokens():
    blocked = np.array([0, 1, 0, 0, 0], dtype=bool)  # no A
    args = (step, (), step_table(()), blocked, EOS, 1)
    assert sample_line(*args, strategy="greedy") == [2]
    assert beam_search(*args, beam_size=3) == [2]
    endless = lambda token, state: (np.log(np.array([1e-9, 0.2, 0.2, 0.3, 0.3])), state)  # noqa: E731
    assert len(sample_line(endless, None, endless(0, None)[0], np.zeros(5, bool), EOS, 4)) == 4
