"""Keystroke savings under the Presage simulator protocol, on a case worked out by hand."""

import pandas as pd
import pytest

from nextword.backends import TorchStep
from nextword.engine import Engine
from nextword.keystrokes import conversations_from_table, simulate, simulate_batched, simulate_mixes, word_cost
from nextword.vocab import UNK_ID

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
    # Suggestions by prefix: ""/"t"/"th" -> the, they, then; "the" -> they, then, there (the word the
    # letters spell is left out); "a" -> apple (the same); "c" -> cat. Punctuation (",", "!") is
    # committed but not typed.
    #   word   shown at         cost  without (len + 1)
    #   the    i = 0             1     4
    #   cat    i = 1 ("c")       2     4
    #   there  i = 3 ("the")     4     6
    #   apple  i = 1 ("a")       2     6
    #   them   never (they, then, there outrank it at "the")   5     5
    #   zebra  out of vocabulary 6     6
    #   they   i = 0             1     5
    #   total                   21    36  ->  KSR = 1 - 21/36 = 5/12
    # Top-1 at i = 0 is always "the": 1 hit of 7 words; top-3 adds "they": 2 of 7.
    report = simulate(engine, [CONVERSATION])
    assert (report.keystrokes, report.keystrokes_without, report.words) == (21, 36, 7)
    assert report.ksr == report.ksr_show_rejected == pytest.approx(5 / 12)
    assert report.ksr_skip_rejected == pytest.approx(5 / 9)  # the next test's case, from the same run
    assert report.top1 == pytest.approx(1 / 7)
    assert report.top3 == pytest.approx(2 / 7)
    assert (report.conversations, report.messages) == (1, 2)
    assert report.latency_keystrokes == 1 + 2 + 4 + 2 + 4 + 5 + 1  # one timed display before each key typed
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
    assert report.ksr_show_rejected == pytest.approx(5 / 12)
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
    assert (capped.conversations, capped.keystrokes, capped.keystrokes_without) == (1, 21, 36)
    full = simulate(engine, table)
    assert (full.conversations, full.keystrokes, full.keystrokes_without) == (2, 23, 40)


def test_real_model_saves_nearly_every_keystroke_on_what_it_memorised(tiny_model_dir):
    from conftest import TINY_CONVERSATION

    report = simulate(Engine.load(tiny_model_dir), [TINY_CONVERSATION])
    # The best possible is one key per word (shown before its first letter).
    assert report.words == 29
    assert report.keystrokes <= report.words + 3
    assert report.top3 > 0.9


# ---------------------------------------------------------------- many conversations in one batch

# Many words share their first letters, so a strip that skips the words passed over shows others.
T_WORDS = [
    ("user", "then they took the train to town , though the trip took time"),
    ("agent", "the tall teacher told them that the test was tough"),
    ("user", "thanks , that is true , they tried two times today !"),
]
BATCH_CONVERSATIONS = [
    T_WORDS,
    [("agent", "they told the teacher that town was true"), ("user", "what zebra ?")],  # an unknown word
    [("user", "thanks")],
    [],
    [("user", "the test took two times , then the train took time"), ("agent", "today they tried")] * 3,
    # Words outside the vocabulary, which only free slots show (Engine.fill): the dictionary's, and the
    # conversation's own once committed.
    [("user", "zorro took the tea ?"), ("agent", "zorro , zebra , zeal and tomorrow , zorro")],
]
# The fixture's dictionary: words outside its vocabulary, most frequent first.
RARE = ["zeal", "tea", "zebra", "zone", "tomorrow"]


def save_batch_engine(folder, unknown_logit: float | None = None):
    """A two-layer int8 LSTM (untrained: exactness needs no skill) with an n-gram, and the default engine settings,
    saved at ``folder``; ``unknown_logit`` adds to the output bias of ``<UNK>``."""
    import torch

    from conftest import ENGINE, model_config, save_servable
    from nextword.model import LanguageModel
    from nextword.ngram import KneserNey
    from nextword.text import tokenize
    from nextword.vocab import Vocab
    from nextword.windows import split_stream

    tokenized = [(speaker, tokenize(text)) for speaker, text in T_WORDS]
    vocab = Vocab.build([tokens for _, tokens in tokenized])
    vocab.rare = RARE
    torch.manual_seed(0)
    model = LanguageModel(model_config(len(vocab), embedding=32, hidden=64, layers=2)).eval()
    if unknown_logit is not None:
        with torch.no_grad():
            model.decoder.bias[UNK_ID] += unknown_logit
    stream = split_stream(tokenized, vocab, speaker_tags=True)
    save_servable(folder, model, vocab, {"speaker_tags": True, "window_length": 8}, ENGINE,
                  KneserNey.fit(stream, len(vocab), ENGINE.ngram_order))
    return folder


@pytest.fixture(scope="module")
def batch_engine_dir(tmp_path_factory):
    return save_batch_engine(tmp_path_factory.mktemp("batch") / "model")


@pytest.fixture(scope="module")
def unknown_engine_dir(tmp_path_factory):
    """The batch engine with ``<UNK>`` likely: the conversation's words outside the vocabulary outrank its words."""
    return save_batch_engine(tmp_path_factory.mktemp("unknown") / "model", unknown_logit=4.0)


@pytest.mark.parametrize("skip_rejected", [False, True])
def test_batched_simulation_counts_exactly_what_one_stream_counts(batch_engine_dir, skip_rejected):
    engine = Engine.load(batch_engine_dir, overrides={"skip_rejected": skip_rejected}, exact_batches=True)
    assert not Engine.load(batch_engine_dir).batch_invariant  # the served kernel: batches it would change
    # The default engine: the int8 step (served on ONNX Runtime, simulated with PyTorch's batch-exact kernel, whose
    # arithmetic the graph computes), n-gram and both caches mixed in; batched for real, not typed one by one.
    assert engine.options.int8 and engine.options.backend == "onnx" and engine.ngram is not None and engine.caching
    assert isinstance(engine.backend, TorchStep) and engine.batch_invariant
    one = simulate(engine, BATCH_CONVERSATIONS).savings()
    assert one.words == 31 + 10 + 1 + 0 + 39 + 10 and one.conversations == 6 and 0 < one.ksr < 1
    assert one.ksr_show_rejected < one.ksr_skip_rejected  # both strips are exercised
    for batch_size in (2, 16):  # streams joining as others finish, and all at once
        assert simulate_batched(engine, BATCH_CONVERSATIONS, batch_size=batch_size) == one
    assert simulate_batched(engine, BATCH_CONVERSATIONS, processes=2) == one
    first_two = simulate_batched(engine, BATCH_CONVERSATIONS, max_conversations=2)
    assert first_two == simulate(engine, BATCH_CONVERSATIONS[:2]).savings()
    # Words outside a vocabulary are counted apart, the same way in both (here some are completed).
    vocabulary = {"the", "a", "you", "i", "is"}
    outside = simulate(engine, BATCH_CONVERSATIONS, vocabulary=vocabulary).savings()
    assert outside.oov_words < one.words and 0 < outside.oov_completed < outside.oov_words
    assert simulate_batched(engine, BATCH_CONVERSATIONS, batch_size=2, processes=2, vocabulary=vocabulary) == outside
    # The engine's own vocabulary: of the 10 words outside it, the second and third "zorro" (the conversation's
    # own), and "tea", "zebra" twice, "zeal" and "tomorrow" (the dictionary's) are shown before typed in full;
    # "what", "and" and the first "zorro" are not.
    own = simulate(engine, BATCH_CONVERSATIONS, vocabulary=engine.vocab.index).savings()
    assert (own.oov_words, own.oov_completed) == (10, 7)
    assert simulate_batched(engine, BATCH_CONVERSATIONS, batch_size=2, vocabulary=engine.vocab.index) == own


@pytest.mark.parametrize("skip_rejected", [False, True])
def test_the_conversations_words_outside_the_vocabulary_rank_the_same_way_batched(unknown_engine_dir, skip_rejected):
    # Ranked among the vocabulary's words (Engine.ranked), they push some of them down a strip: the batched
    # scorer works those strips out one by one, as the session shows them.
    def engine(weight):
        return Engine.load(unknown_engine_dir, overrides={"skip_rejected": skip_rejected, "unknown_weight": weight},
                           exact_batches=True)

    ranked, filled = engine(1.0), engine(0.0)
    assert ranked.batch_invariant
    one = simulate(ranked, BATCH_CONVERSATIONS, vocabulary=ranked.vocab.index).savings()
    only_filled = simulate(filled, BATCH_CONVERSATIONS, vocabulary=filled.vocab.index).savings()
    assert one.keystrokes != only_filled.keystrokes  # the ranking changes what the strips show
    for batch_size in (2, 16):
        assert simulate_batched(ranked, BATCH_CONVERSATIONS, batch_size=batch_size,
                                vocabulary=ranked.vocab.index) == one
    assert simulate_batched(filled, BATCH_CONVERSATIONS, vocabulary=filled.vocab.index) == only_filled


MIXES = [{"ngram_weight": 0.0, "cache_weight": 0.0, "cache_bigram_weight": 0.0}, {"cache_weight": 0.0}, {},
         {"ngram_weight": 0.9, "cache_bigram_weight": 0.3}]


@pytest.mark.parametrize("processes", [1, 2])
def test_mixes_typed_in_one_pass_count_what_each_engine_typing_alone_counts(batch_engine_dir, processes):
    # The evaluate stage's engine parts: the model runs once for all of them, each mix is scored on its own.
    engine = Engine.load(batch_engine_dir, exact_batches=True)
    together = simulate_mixes(engine, MIXES, BATCH_CONVERSATIONS, batch_size=3, processes=processes)
    alone = [simulate_batched(Engine.load(batch_engine_dir, overrides=mix, exact_batches=True),
                              BATCH_CONVERSATIONS) for mix in MIXES]
    assert together == alone
    assert len({r.ksr for r in alone}) == len(MIXES)  # the mixes do differ
    assert simulate_mixes(engine, [{}], BATCH_CONVERSATIONS) == [simulate(engine, BATCH_CONVERSATIONS).savings()]


def test_only_mixing_weights_are_remixed_and_only_with_an_ngram_to_mix(batch_engine_dir, fixed_engine):
    from nextword.errors import NextwordError

    engine = Engine.load(batch_engine_dir, exact_batches=True)
    with pytest.raises(NextwordError, match="^int8: not a mixing weight"):
        engine.remixed(int8=False)
    off = engine.remixed(ngram_weight=0.0)
    assert off.ngram is None and off.history == 0 and off.backend is engine.backend
    weight = engine.options.ngram_weight  # the default's, which mixes the n-gram in
    assert weight > 0 and off.remixed(ngram_weight=weight).ngram is engine.ngram
    loaded_without = Engine.load(batch_engine_dir, overrides={"ngram_weight": 0.0}, exact_batches=True)
    for no_ngram in (loaded_without, fixed_engine(LOGITS)):
        with pytest.raises(NextwordError, match="^engine.ngram_weight: the model folder has no n-gram"):
            no_ngram.remixed(ngram_weight=0.5)


def test_an_engine_that_is_not_batch_invariant_is_shared_among_processes_all_the_same(fixed_engine):
    engine = fixed_engine(LOGITS)
    conversations = [CONVERSATION, [("user", "cat")], CONVERSATION]
    assert simulate_batched(engine, conversations, processes=2) == simulate(engine, conversations).savings()


def test_batched_simulation_types_one_at_a_time_where_a_batch_would_change_the_numbers(fixed_engine):
    engine = fixed_engine(LOGITS)  # float32 products: summed in an order that depends on the batch
    assert not engine.batch_invariant
    report = simulate(engine, [CONVERSATION, [("user", "cat")]])
    assert simulate_batched(engine, [CONVERSATION, [("user", "cat")]]) == report.savings()
    assert (report.keystrokes, report.keystrokes_without) == (23, 40)


def test_a_speaker_that_is_not_user_or_agent_is_refused_in_one_line(fixed_engine):
    from nextword.errors import NextwordError

    for run in (simulate, simulate_batched):
        with pytest.raises(NextwordError, match="^speaker 'bot' is not 'user' or 'agent'$"):
            run(fixed_engine(LOGITS), [[("bot", "the cat")]])
