"""Fill-in-the-middle accuracy (nextword.fim) on the toy model where the right context disambiguates."""

import pytest

from conftest import FIM_CONVERSATION, PLAIN
from nextword.engine import Engine
from nextword.errors import NextwordError
from nextword.fim import evaluate_fim, gaps
from nextword.text import tokenize


def test_a_gap_is_a_word_with_a_word_on_each_side():
    assert gaps(tokenize("i like red wine .")) == [1, 2]
    assert gaps(tokenize("me , too !")) == []  # punctuation is no word on either side
    assert gaps(tokenize("well , i think so")) == [2, 3]


def test_restoring_middle_words_with_and_without_the_right_context(fim_model_dir):
    engine = Engine.load(fim_model_dir, options=PLAIN)
    # "i like red wine": only the right side tells "red" from the likelier "green" in the middle; the
    # seeded picks take "red" out of some of the messages, and "like" out of the others.
    conversation = [("user", "i like red wine .")]
    report = evaluate_fim(engine, [conversation] * 8, max_messages=6, seed=0)
    assert report.messages == 6 and report.oov == 0  # one gap per message, up to the cap
    assert report.top1 > report.top1_left
    assert report.top3 >= report.top1 and report.top3_left >= report.top1_left
    assert report.latency_p99_ms >= report.latency_p50_ms > 0
    with pytest.raises(NextwordError, match="no message"):
        evaluate_fim(engine, [[("agent", "me too .")]])
    whole = evaluate_fim(engine, [FIM_CONVERSATION])
    assert whole.messages == 3  # the three "i like ..." messages; "me too ." has no middle word
