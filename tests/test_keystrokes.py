"""Keystroke savings under the Presage simulator protocol, on a case worked out by hand."""

import pandas as pd
import pytest

from nextword.engine import Engine
from nextword.keystrokes import conversations_from_table, simulate, word_cost

# A model whose next-word distribution is always softmax of these logits, so the three
# suggestions after any prefix can be read off this table: the most probable words that
# start with the prefix. <UNK> and the other specials, and ",", score higher than every
# word but are never suggested.
LOGITS = {
    "the": 5.0, "they": 4.0, "then": 3.0, "there": 2.0, "a": 1.5, "them": 1.0, "apple": 0.5, "cat": 0.0,
    ",": 8.0,
}

CONVERSATION = [
    ("user", "The cat, there apple!"),
    ("agent", "them zebra they"),
]


def test_word_cost_is_first_prefix_that_shows_the_word_plus_one():
    shown = {"": ["a", "b", "c"], "h": ["hat", "hello", "hi"], "he": ["hello", "help", "her"]}
    assert word_cost("a", lambda p: shown.get(p, [])) == 1  # shown before any letter: one key to accept
    assert word_cost("hello", lambda p: shown.get(p, [])) == 2  # after "h"
    assert word_cost("help", lambda p: shown.get(p, [])) == 3  # after "he"
    assert word_cost("hex", lambda p: shown.get(p, [])) == 4  # never: len + 1


def test_ksr_on_a_hand_computed_case(fixed_engine):
    engine = fixed_engine(LOGITS)
    # Suggestions by prefix: ""/"t"/"th"/"the" -> the, they, then; "ther" -> there;
    # "a" -> a, apple; "c" -> cat. Punctuation (",", "!") is committed but not typed.
    #   word   shown at         cost  without (len + 1)
    #   the    i = 0             1     4
    #   cat    i = 1 ("c")       2     4
    #   there  i = 4 ("ther")    5     6
    #   apple  i = 1 ("a")       2     6
    #   them   never (the*: the, they, then outrank it)   5     5
    #   zebra  out of vocabulary 6     6
    #   they   i = 0             1     5
    #   total                   22    36  ->  KSR = 1 - 22/36 = 7/18
    # Top-1 at i = 0 is always "the": 1 hit of 7 words; top-3 adds "they": 2 of 7.
    report = simulate(engine, [CONVERSATION])
    assert (report.keystrokes, report.keystrokes_without, report.words) == (22, 36, 7)
    assert report.ksr == report.ksr_show_rejected == pytest.approx(7 / 18)
    assert report.ksr_skip_rejected == pytest.approx(5 / 9)  # the next test's case, from the same run
    assert report.top1 == pytest.approx(1 / 7)
    assert report.top3 == pytest.approx(2 / 7)
    assert (report.conversations, report.messages) == (1, 2)
    assert report.latency_keystrokes == 1 + 2 + 5 + 2 + 4 + 5 + 1  # one timed display before each key typed
    assert 0 < report.latency_p50_ms <= report.latency_p99_ms
    assert 0 <= report.cpu_p50_ms <= report.cpu_p99_ms


def test_ksr_when_words_passed_over_make_room_for_others(fixed_engine):
    from conftest import PLAIN

    engine = fixed_engine(LOGITS, options=PLAIN.model_copy(update={"skip_rejected": True}))
    # At i = 0 the strip is always the, they, then; a word typed on past it drops them, so after "t"
    # it shows there, them (the only other t-words).
    #   word   shown at          cost  without
    #   the    i = 0              1     4
    #   cat    i = 1 ("c")        2     4
    #   there  i = 1 ("t")        2     6
    #   apple  i = 1 ("a")        2     6
    #   them   i = 1 ("t")        2     5
    #   zebra  out of vocabulary  6     6
    #   they   i = 0              1     5
    #   total                    16    36  ->  KSR = 1 - 16/36 = 5/9
    report = simulate(engine, [CONVERSATION])
    assert (report.keystrokes, report.keystrokes_without) == (16, 36)
    assert report.ksr == report.ksr_skip_rejected == pytest.approx(5 / 9)
    assert report.ksr_show_rejected == pytest.approx(7 / 18)
    assert (report.top1, report.top3) == (pytest.approx(1 / 7), pytest.approx(2 / 7))  # the strip at i = 0 is unchanged
    assert report.latency_keystrokes == 1 + 2 + 2 + 2 + 2 + 5 + 1


def test_banned_word_costs_full_length(fixed_engine):
    # With "the" banned, "then" moves into the top three and "the" is never shown: 4 keys, not 1.
    engine = fixed_engine(LOGITS, banned={"the"})
    report = simulate(engine, [[("user", "the then")]])
    assert report.keystrokes == 4 + 1


def test_table_input_and_conversation_cap(fixed_engine):
    engine = fixed_engine(LOGITS)
    table = pd.DataFrame({
        "conversation_id": ["b", "b", "a"],
        "turn": [1, 0, 0],
        "speaker": ["agent", "user", "user"],
        "text": ["them zebra they", "The cat, there apple!", "cat"],
    })
    assert conversations_from_table(table) == [CONVERSATION, [("user", "cat")]]
    capped = simulate(engine, table, max_conversations=1)
    assert (capped.conversations, capped.keystrokes, capped.keystrokes_without) == (1, 22, 36)
    full = simulate(engine, table)
    assert (full.conversations, full.keystrokes, full.keystrokes_without) == (2, 24, 40)


def test_real_model_saves_nearly_every_keystroke_on_what_it_memorised(tiny_model_dir):
    from conftest import TINY_CONVERSATION

    report = simulate(Engine.load(tiny_model_dir), [TINY_CONVERSATION])
    # The best possible is one key per word (shown before its first letter).
    assert report.words == 29
    assert report.keystrokes <= report.words + 3
    assert report.top3 > 0.9
