"""The suggestion engine: carried state, prefix completion, banned words, specials, safe loading."""

import copy
import json
import re
import shutil

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import PLAIN, save_servable, train_tiny_model
from nextword.decoding import STRATEGIES
from nextword.engine import Engine
from nextword.errors import NextwordError
from nextword.text import is_word, tokenize
from nextword.windows import message_tokens

HISTORY = [("user", "good morning , how are you today ?"), ("agent", "i am fine , thank you very much !")]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(tiny_model_dir, options=PLAIN)


def from_scratch(engine, tokens):
    """Log-probs after every prefix of ``tokens``, from one pass over the whole sequence."""
    with torch.no_grad():
        feats, _ = engine.model.features(torch.tensor([engine.vocab.encode(tokens)]))
        return engine.model.log_probs(feats)[0].numpy()


def conversation_tokens(engine, history, speaker, typed_tokens):
    tokens = []
    for who, text in history:
        tokens += message_tokens(who, tokenize(text), engine.speaker_tags)
    return tokens + message_tokens(speaker, typed_tokens, engine.speaker_tags)[:-1]  # still open: no <EOS>


def test_carried_state_gives_the_distribution_of_a_pass_over_the_whole_context(engine):
    session = engine.session()
    for speaker, text in HISTORY:
        session.add_message(speaker, text)
    partial = session.type_text("user", "what do you like to do for f")
    assert partial == "f"
    typed = tokenize("what do you like to do for")
    expected = from_scratch(engine, conversation_tokens(engine, HISTORY, "user", typed))
    np.testing.assert_allclose(session.log_probs, expected[-1], atol=1e-5)


def test_one_step_per_token_matches_the_whole_pass_at_every_position(engine):
    tokens = conversation_tokens(engine, HISTORY, "agent", [])
    expected = from_scratch(engine, tokens)
    session = engine.session()
    for position, token in enumerate(tokens):
        session.feed(token)
        np.testing.assert_allclose(session.log_probs, expected[position], atol=1e-5)


def test_typing_letter_by_letter_equals_typing_at_once(engine, monkeypatch):
    text = "what do you like to do for fun ?"
    session = engine.session()
    session.add_message(*HISTORY[0])
    calls = []
    run = engine.run
    monkeypatch.setattr(engine, "run", lambda ids, state: (calls.append(len(ids)), run(ids, state))[1])
    for end in range(1, len(text) + 1):
        session.suggest(session.type_text("user", text[:end]))
    # The history and the message start run once, in one call; then one call per committed
    # token, and none for a letter inside a word.
    history_and_start = len(message_tokens("user", tokenize(HISTORY[0][1]), True)) + 2  # + <USER> <BOS>
    assert calls == [history_and_start] + [1] * len(tokenize(text))
    fresh = engine.session()
    fresh.add_message(*HISTORY[0])
    fresh.type_text("user", text)
    np.testing.assert_allclose(session.log_probs, fresh.log_probs, atol=1e-5)


def test_erasing_a_word_restarts_the_draft(engine):
    session = engine.session()
    session.add_message(*HISTORY[0])
    session.type_text("agent", "i am fine , thank ")
    session.type_text("agent", "i am ")  # erased back over three words
    fresh = engine.session()
    fresh.add_message(*HISTORY[0])
    fresh.type_text("agent", "i am ")
    np.testing.assert_allclose(session.log_probs, fresh.log_probs, atol=1e-5)
    session.type_text("user", "good ")  # another speaker: another message
    fresh = engine.session()
    fresh.add_message(*HISTORY[0])
    fresh.type_text("user", "good ")
    np.testing.assert_allclose(session.log_probs, fresh.log_probs, atol=1e-5)


def test_send_commits_the_draft_and_copies_fork(engine):
    session = engine.session()
    session.type_text("user", "good morning , how are you today ?")
    session.send()
    fork = copy.copy(session)
    fork.type_text("agent", "i am fine , thank ")
    session.type_text("agent", "i am ")
    assert session.suggest("")[0].word == "fine"
    assert fork.suggest("")[0].word == "you"
    with pytest.raises(NextwordError):
        engine.session().send()


def test_suggests_the_memorised_next_word_and_completes_prefixes(engine):
    session = engine.session()
    partial = session.type_text("user", "good morning , how are ")
    assert partial == ""
    assert session.suggest("", 3)[0].word == "you"
    assert [s.word for s in session.suggest("y", 3)] == ["you"]
    assert session.suggest("zz", 3) == []
    session = engine.session()
    assert session.type_text("user", "good morning , how are Y") == "y"
    assert session.suggest("y")[0].word == "you"


def test_prefix_completion_is_the_top_k_of_the_words_with_that_prefix(engine):
    session = engine.session()
    session.type_text("agent", "i like to ")
    log_probs = session.log_probs
    words = [t for t in engine.vocab.tokens if is_word(t)]
    prefixes = {w[:i] for w in words for i in range(len(w) + 1)}
    mass = sum(np.exp(float(log_probs[engine.vocab.id(w)])) for w in words)
    for prefix in sorted(prefixes):
        candidates = [w for w in words if w.startswith(prefix)]
        expected = sorted(candidates, key=lambda w: (-log_probs[engine.vocab.id(w)], engine.vocab.id(w)))[:3]
        shown = session.suggest(prefix, 3)
        assert [s.word for s in shown] == expected, prefix
        # the probability given the letters typed: renormalised over the suggestable words with that prefix
        given = sum(np.exp(float(log_probs[engine.vocab.id(w)])) for w in candidates)
        for s in shown:
            assert s.probability == pytest.approx(np.exp(float(log_probs[engine.vocab.id(s.word)])) / given,
                                                  rel=1e-4)
        if prefix == "":
            assert given == pytest.approx(mass)


def test_top_k_over_a_large_vocabulary(fixed_engine):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(5000)]
    logits = dict(zip(words, rng.normal(size=len(words)).tolist()))
    session = fixed_engine(logits).session()
    session.start_message("agent")
    best = sorted(words, key=lambda w: -logits[w])
    assert [s.word for s in session.suggest("", 5)] == best[:5]
    assert [s.word for s in session.suggest("w1", 3)] == [w for w in best if w.startswith("w1")][:3]


def test_specials_and_punctuation_are_never_suggested(engine, fixed_engine):
    session = engine.session()
    session.type_text("user", "good morning , how are you today ")  # "?" comes next with high probability
    everything = session.suggest("", len(engine.vocab))
    words = {t for t in engine.vocab.tokens if is_word(t)}
    assert {s.word for s in everything} == words
    assert sum(s.probability for s in everything) == pytest.approx(1.0, abs=1e-5)
    # Specials that outscore every word are skipped, not just unlikely.
    fixed = fixed_engine({"hello": 1.0, "help": 0.5, "?": 9.0}, special_logit=12.0).session()
    fixed.start_message("user")
    assert [s.word for s in fixed.suggest("", 3)] == ["hello", "help"]


def test_banned_words_never_appear_and_k_suggestions_still_come_back(tiny_model_dir, tmp_path):
    banned = tmp_path / "banned.txt"
    banned.write_text("# a comment\nYou\n\nfine\n", encoding="utf-8")
    engine = Engine.load(tiny_model_dir, overrides={"banned_words": str(banned)})
    session = engine.session()
    session.type_text("user", "good morning , how are ")
    shown = [s.word for s in session.suggest("", 3)]
    assert len(shown) == 3 and "you" not in shown
    assert session.suggest("yo") == []
    for strategy in STRATEGIES:
        for seed in range(3):
            line = session.complete(strategy, max_words=10, temperature=1.5, top_k=5, top_p=0.9, seed=seed)
            assert not {"you", "fine"} & set(line), (strategy, line)
    session = engine.session()
    session.type_text("agent", "i am ")
    assert "fine" not in [s.word for s in session.suggest("", 3)]


def test_missing_banned_list_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(NextwordError, match="banned-word list not found"):
        Engine.load(tiny_model_dir, overrides={"banned_words": str(tmp_path / "missing.txt")})


def test_complete_stops_at_the_end_of_the_message_and_leaves_the_session_alone(engine):
    session = engine.session()
    session.type_text("user", "good morning , how are ")
    before = session.log_probs.copy()
    assert session.complete("greedy", max_words=20) == ["you", "today", "?"]
    assert session.complete("greedy", max_words=2) == ["you", "today"]
    assert session.complete("beam", max_words=20) == ["you", "today", "?"]
    assert session.complete("greedy", prefix="yo") == ["you", "today", "?"]
    assert session.complete("greedy", prefix="zz") == []
    np.testing.assert_array_equal(session.log_probs, before)


def test_model_folder_holds_tensors_json_and_the_onnx_step_only(tiny_model_dir):
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == ["config.json", "engine.json", "model.int8.onnx",
                                                                "vocab.json", "weights.pt"]
    weights = torch.load(tiny_model_dir / "weights.pt", weights_only=True)
    assert weights and all(isinstance(v, torch.Tensor) for v in weights.values())
    for name in ("config.json", "engine.json", "vocab.json"):
        json.loads((tiny_model_dir / name).read_text(encoding="utf-8"))
    # the default engine's step: an ONNX graph (protobuf), which onnx reads and checks
    onnx.checker.check_model(onnx.load(tiny_model_dir / "model.int8.onnx"))


def test_a_folder_written_before_the_transformer_existed_still_loads(tiny_model_dir, tmp_path):
    """Its config has no model.heads or model.context, and its weights call the body `rnn`."""
    old = tmp_path / "model"
    old.mkdir()
    for name in ("vocab.json", "engine.json", "model.int8.onnx"):
        (old / name).write_bytes((tiny_model_dir / name).read_bytes())
    config = json.loads((tiny_model_dir / "config.json").read_text())
    del config["model"]["heads"], config["model"]["context"]
    (old / "config.json").write_text(json.dumps(config))
    weights = torch.load(tiny_model_dir / "weights.pt", weights_only=True)
    assert any(k.startswith("body.") for k in weights)
    torch.save({k.replace("body.", "rnn.", 1): v for k, v in weights.items()}, old / "weights.pt")
    session, again = Engine.load(old).session(), Engine.load(tiny_model_dir).session()
    for s in (session, again):
        s.start_message("user")
    np.testing.assert_array_equal(session.log_probs, again.log_probs)


def test_a_folder_bundled_before_unknown_weight_existed_is_served_as_it_was_evaluated(tiny_model_dir, tmp_path):
    old = tmp_path / "model"
    shutil.copytree(tiny_model_dir, old)
    options = json.loads((old / "engine.json").read_text())
    assert options.pop("unknown_weight") > 0
    (old / "engine.json").write_text(json.dumps(options))
    assert Engine.load(old).options == Engine.load(tiny_model_dir).options.model_copy(update={"unknown_weight": 0.0})


class Smuggled:
    """Anything but a tensor: weights_only loading must refuse to unpickle it."""


def test_a_pickled_object_in_the_weights_is_refused(tiny_model_dir, tmp_path):
    bad = tmp_path / "model"
    bad.mkdir()
    for name in ("config.json", "vocab.json", "engine.json"):
        (bad / name).write_bytes((tiny_model_dir / name).read_bytes())
    weights = torch.load(tiny_model_dir / "weights.pt", weights_only=True)
    torch.save({**weights, "extra": Smuggled()}, bad / "weights.pt")
    with pytest.raises(NextwordError, match=f"^{re.escape(str(bad / 'weights.pt'))}: damaged"):
        Engine.load(bad)


@pytest.mark.parametrize("name, damage", [
    ("weights.pt", lambda b: b[: len(b) // 2]),
    ("config.json", lambda b: b[:-20]),
    ("vocab.json", lambda b: b"{}"),
    ("engine.json", lambda b: b.replace(b'"int8"', b'"int9"')),
])
def test_a_damaged_model_folder_names_the_damaged_file(tiny_model_dir, tmp_path, name, damage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / name).write_bytes(damage((folder / name).read_bytes()))
    with pytest.raises(NextwordError) as err:
        Engine.load(folder)
    assert str(err.value).startswith(f"{folder / name}: damaged") and "\n" not in str(err.value)


def test_int8_engine_gives_nearly_the_same_distribution(engine, tiny_model_dir):
    quantized = Engine.load(tiny_model_dir, options=PLAIN.model_copy(update={"int8": True}))
    for speaker, text in [("user", "good morning , how are "), ("agent", "i like to read b"), ("user", "what do you ")]:
        full, small = engine.session(), quantized.session()
        partial = full.type_text(speaker, text)
        small.type_text(speaker, text)
        assert [s.word for s in full.suggest(partial)][:1] == [s.word for s in small.suggest(partial)][:1]
        np.testing.assert_allclose(np.exp(small.log_probs), np.exp(full.log_probs), atol=0.01)


# ---------------------------------------------------------------- the mixture and the skipped suggestions

WORDS = {"the": 5.0, "they": 4.0, "then": 3.0, "there": 2.0, "them": 1.0, "cat": 0.5, "dog": 0.0}


def test_words_passed_over_are_not_shown_again_for_the_same_word(fixed_engine):
    skipping = fixed_engine(WORDS, options=PLAIN.model_copy(update={"skip_rejected": True})).session()
    skipping.start_message("user")
    assert [s.word for s in skipping.suggest("", typing=True)] == ["the", "they", "then"]
    assert [s.word for s in skipping.suggest("t", typing=True)] == ["there", "them"]  # the three above were passed over
    assert [s.word for s in skipping.suggest("th", typing=True)] == []
    assert [s.word for s in skipping.suggest("", typing=True)] == ["the", "they", "then"]  # erased back: shown again
    assert [s.word for s in skipping.suggest("c", typing=True)] == ["cat"]
    skipping.feed("cat")  # the next word: what the strip showed for it is worked out from its prefix alone
    assert [s.word for s in skipping.suggest("t", typing=True)] == ["there", "them"]
    assert [s.word for s in skipping.suggest("t", 2, typing=True)] == ["then", "there"]  # at "", k = 2 showed the, they
    assert [s.word for s in skipping.suggest("", typing=True)] == ["the", "they", "then"]
    plain = fixed_engine(WORDS).session()
    plain.start_message("user")
    plain.suggest("", typing=True)
    assert [s.word for s in plain.suggest("t", typing=True)] == ["the", "they", "then"]


def test_the_typing_strip_leaves_out_the_word_the_letters_spell(fixed_engine):
    # Tapping "the" after typing "the" would do what the space bar does: its slot goes to a completion.
    session = fixed_engine(WORDS, rare=["thee", "zeal"]).session()
    session.start_message("user")

    def words(prefix, **kwargs):
        return [s.word for s in session.suggest(prefix, **kwargs)]

    assert words("the") == ["the", "they", "then"]  # a one-off query lists it
    assert words("the", typing=True) == ["they", "then", "there"]
    typed = session.suggest("the", typing=True)
    # Each probability is still the word's given the letters typed, "the" itself among them.
    np.testing.assert_allclose([s.probability for s in typed],
                               np.exp([4.0, 3.0, 2.0]) / np.exp([5.0, 4.0, 3.0, 2.0, 1.0]).sum(), rtol=1e-5)
    assert words("", typing=True) == ["the", "they", "then"]  # before the first letter nothing is spelt yet
    assert words("zeal", typing=True) == [] and words("zeal") == ["zeal"]  # a free slot's word too
    assert words("the", typing=True, right=" end") == ["the", "they", "then"]  # inside a message: it replaces more
    # Skipping words passed over: the, they, then were shown at "", the other t-words at "t".
    skipping = [words(p, typing=True, skip_rejected=True) for p in ("t", "th", "the")]
    assert skipping == [["there", "them", "thee"], [], []]


def test_free_slots_show_words_outside_the_vocabulary_the_conversations_own_first(fixed_engine):
    cached = PLAIN.model_copy(update={"cache_weight": 0.05})
    # The dictionary, most frequent first: the train split's words below vocab.min_freq.
    rare = ["catnip", "zeal", "zulu", "zebra", "cattle"]
    engine = fixed_engine(WORDS, banned={"zulu"}, options=cached, rare=rare)
    session = engine.session()
    session.add_message("user", "zorro saw zest , zorro !")
    session.start_message("agent")

    def strip(prefix, **kwargs):
        return [(s.word, round(s.probability, 6)) for s in session.suggest(prefix, **kwargs)]

    # The vocabulary's words come first, with their probabilities; the model gives the others none.
    assert strip("c") == [("cat", 1.0), ("catnip", 0.0), ("cattle", 0.0)]
    assert [w for w, _ in strip("")] == [w for w, _ in strip("t")] == ["the", "they", "then"]  # no free slot
    assert strip("z") == [("zorro", 0.0), ("zest", 0.0), ("zeal", 0.0)]  # the most committed first, then the dictionary
    assert strip("ze") == [("zest", 0.0), ("zeal", 0.0), ("zebra", 0.0)]
    assert strip("zu") == []  # banned
    assert strip("ze", typing=True, skip_rejected=True) == [("zebra", 0.0)]  # zest and zeal were shown at "z"
    session.type_text("agent", "zig zag ")
    assert strip("z") == [("zorro", 0.0), ("zag", 0.0), ("zest", 0.0)]
    session.discard_draft()  # the draft's words go with it
    assert strip("z") == [("zorro", 0.0), ("zest", 0.0), ("zeal", 0.0)]
    # Without the cache, the conversation's own words are not kept: the dictionary alone.
    plain = fixed_engine(WORDS, banned={"zulu"}, rare=rare).session()
    plain.add_message("user", "zorro saw zest , zorro !")
    plain.start_message("agent")
    assert [s.word for s in plain.suggest("z")] == ["zeal", "zebra"]


def test_the_conversations_words_outside_the_vocabulary_rank_among_its_words_by_their_share_of_unk(fixed_engine):
    # <UNK> is likely here; unknown_weight of its probability goes to the conversation's own words outside the
    # vocabulary, in proportion to how often it committed each: zorro 2, saw 1, zest 1.
    logits = WORDS | {"<UNK>": 4.5}
    ranking = PLAIN.model_copy(update={"unknown_weight": 0.5})
    engine = fixed_engine(logits, special_logit=-20.0, options=ranking, rare=["zeal"])
    session = engine.session()
    session.add_message("user", "zorro saw zest , zorro !")
    session.start_message("agent")
    unk = session.log_probs[engine.vocab.id("<UNK>")]
    shares = {"zorro": 0.5 * 2 / 4, "saw": 0.5 / 4, "zest": 0.5 / 4}
    assert engine.unknown_log_probs(session.log_probs, session._unknown) == pytest.approx(
        {w: unk + np.log(share) for w, share in shares.items()})
    # Before the first letter zorro (4.5 + log 1/4, about 3.11) ranks between "they" (4) and "then" (3).
    strip = session.suggest("")
    assert [s.word for s in strip] == ["the", "they", "zorro"]
    # Each probability is the word's given what was typed, over the vocabulary's words and these.
    total = sum(np.exp(v) for v in WORDS.values()) + np.exp(4.5) * 0.5
    np.testing.assert_allclose([s.probability for s in strip],
                               np.array([np.exp(5.0), np.exp(4.0), np.exp(4.5) * 0.25]) / total, rtol=1e-5)
    # After "z" the conversation's z-words rank by their counts, then the dictionary fills the free slot.
    assert [(s.word, round(s.probability, 6)) for s in session.suggest("z")] == [
        ("zorro", round(2 / 3, 6)), ("zest", round(1 / 3, 6)), ("zeal", 0.0)]
    # The typing strip leaves out the word the letters spell, and with skip_rejected the words passed over.
    assert [s.word for s in session.suggest("zorro", typing=True)] == []
    assert [s.word for s in session.suggest("z", typing=True, skip_rejected=True)] == ["zest", "zeal"]
    assert [s.word for s in session.suggest("t", typing=True)] == ["the", "they", "then"]  # none start with t
    # With the weight at 0 they only fill free slots, most committed first, with probability 0.
    filled = fixed_engine(logits, special_logit=-20.0, options=PLAIN.model_copy(update={"cache_weight": 0.05}),
                          rare=["zeal"]).session()
    filled.add_message("user", "zorro saw zest , zorro !")
    filled.start_message("agent")
    assert [s.word for s in filled.suggest("")] == ["the", "they", "then"]
    assert [(s.word, s.probability) for s in filled.suggest("z")] == [("zorro", 0.0), ("zest", 0.0), ("zeal", 0.0)]


def test_the_cache_mixes_in_the_words_of_this_conversation(fixed_engine):
    c = 0.2
    plain, cached = fixed_engine(WORDS), fixed_engine(WORDS, options=PLAIN.model_copy(update={"cache_weight": c}))
    session = cached.session()
    session.add_message("user", "the dog , the cat")
    session.start_message("agent")
    p = np.exp(cached.model.log_probs(torch.zeros(1, 4))[0].detach().numpy())  # the fixed LSTM distribution
    expected = (1 - c) * p
    for word, count in (("the", 2), ("dog", 1), ("cat", 1)):  # punctuation and specials are not cached
        expected[cached.vocab.id(word)] += c * count / 4
    np.testing.assert_allclose(np.exp(session.log_probs), expected, rtol=1e-5, atol=1e-7)
    # "cat" and "dog", the LSTM's last words, overtake "they" once the conversation used them.
    assert [s.word for s in session.suggest("", 4)] == ["the", "cat", "dog", "they"]
    plain_session = plain.session()
    plain_session.start_message("agent")
    assert [s.word for s in plain_session.suggest("", 4)] == ["the", "they", "then", "there"]
    fresh = cached.session()  # another conversation: no cache
    fresh.start_message("agent")
    np.testing.assert_allclose(np.exp(fresh.log_probs), p, rtol=1e-5, atol=1e-7)


def test_the_bigram_cache_mixes_in_what_followed_the_last_token_in_this_conversation(fixed_engine):
    c, b = 0.2, 0.3
    engine = fixed_engine(WORDS, options=PLAIN.model_copy(update={"cache_weight": c, "cache_bigram_weight": b}))
    p = np.exp(engine.model.log_probs(torch.zeros(1, 4))[0].detach().numpy())  # the fixed LSTM distribution
    ids = engine.vocab.id

    def expected(words: dict, followers: dict):
        e = (1 - c) * p
        for word, count in words.items():
            e[ids(word)] += c * count / sum(words.values())
        if followers:
            e *= 1 - b
            for word, count in followers.items():
                e[ids(word)] += b * count / sum(followers.values())
        return e

    session = engine.session()
    session.add_message("user", "the dog , the cat , the dog")
    session.type_text("agent", "the ")  # "the" was followed by dog twice and cat once
    seen = {"the": 4, "dog": 2, "cat": 1}
    np.testing.assert_allclose(np.exp(session.log_probs), expected(seen, {"dog": 2, "cat": 1}), rtol=1e-5, atol=1e-7)
    assert [s.word for s in session.suggest("", 3)] == ["dog", "cat", "the"]  # what followed "the" comes first
    session.type_text("agent", "the dog ")  # nothing followed "dog" yet but punctuation, which is not cached
    np.testing.assert_allclose(np.exp(session.log_probs), expected({**seen, "dog": 3}, {}), rtol=1e-5, atol=1e-7)
    session.type_text("agent", "the ")  # erased back: the draft restarts from the conversation before it
    np.testing.assert_allclose(np.exp(session.log_probs), expected(seen, {"dog": 2, "cat": 1}), rtol=1e-5, atol=1e-7)
    unigram_only = fixed_engine(WORDS, options=PLAIN.model_copy(update={"cache_weight": c})).session()
    unigram_only.add_message("user", "the dog , the cat , the dog")
    unigram_only.type_text("agent", "the ")
    np.testing.assert_allclose(np.exp(unigram_only.log_probs), expected(seen, {}), rtol=1e-5, atol=1e-7)


def test_the_ngram_mixes_in_after_the_last_ids_in_suggestions_and_completions(fixed_engine, tmp_path):
    from nextword.ngram import KneserNey
    from nextword.windows import message_tokens

    a = 0.5
    base = fixed_engine(WORDS)
    texts = ["the cat", "then the dog", "the cat", "they them"] * 5
    stream = [base.vocab.id(t) for text in texts for t in message_tokens("user", tokenize(text), True)]
    ngram = KneserNey.fit(stream, len(base.vocab), order=3)
    mixed = fixed_engine(WORDS, ngram=ngram, options=PLAIN.model_copy(update={"ngram_weight": a}))
    session = mixed.session()
    session.type_text("user", "the ")
    history = [mixed.vocab.id(t) for t in ("<BOS>", "the")]
    p_lstm = np.exp(base.model.log_probs(torch.zeros(1, 4))[0].detach().numpy())
    expected = (1 - a) * p_lstm + a * ngram.next_probs([history])[0]
    np.testing.assert_allclose(np.exp(session.log_probs), expected, rtol=1e-5, atol=1e-7)
    assert session.suggest("")[0].word == "cat"  # "the cat" in the counts outweighs the LSTM's "the"
    # Completions step through the same mixture: greedy follows the counts ("the cat <EOS>").
    assert session.complete("greedy", 5) == ["cat"]
    alone = fixed_engine(WORDS, ngram=ngram, options=PLAIN.model_copy(update={"ngram_weight": 1.0})).session()
    alone.type_text("user", "the ")  # weight 1: the n-gram alone, the baseline the engine is compared with
    np.testing.assert_allclose(np.exp(alone.log_probs), ngram.next_probs([history])[0], rtol=1e-6, atol=1e-9)


def test_a_model_folder_with_an_ngram_is_loaded_with_it(tiny_model_dir, tmp_path):
    from conftest import TINY_CONVERSATION, save_servable
    from nextword.modeldir import load_trained
    from nextword.ngram import KneserNey
    from nextword.windows import split_stream

    model, vocab, config = load_trained(tiny_model_dir)
    stream = split_stream([(s, tokenize(t)) for s, t in TINY_CONVERSATION], vocab, True)
    folder = tmp_path / "model"
    save_servable(folder, model, vocab, config, ngram=KneserNey.fit(stream, len(vocab), order=3))
    assert (folder / "ngram.npz").is_file()
    options = PLAIN.model_copy(update={"ngram_weight": 0.3})
    with_ngram = Engine.load(folder, options=options)
    assert with_ngram.ngram is not None and with_ngram.ngram.order == 3
    assert Engine.load(tiny_model_dir, options=options).ngram is None  # a folder without one: the LSTM alone
    assert Engine.load(folder, options=PLAIN).ngram is None  # weight 0: not even loaded
    (folder / "ngram.npz").write_bytes(b"not an npz")
    with pytest.raises(NextwordError, match="ngram.npz: damaged"):
        Engine.load(folder, options=options)


# ---------------------------------------------------------------- every model.cell behind the same engine


def assert_rescored_as_stepping_would(engine, session, candidates, right) -> None:
    """The batched right-context scores equal stepping through each candidate and the right tokens one by one."""
    batched = engine.right_log_probs(session.state, session._history, candidates, right)
    for candidate, total in zip(candidates, batched):
        log_probs, state = engine.step(int(candidate), (session.state, session._history))
        expected = 0.0
        for token in right:
            expected += log_probs[token]
            log_probs, state = engine.step(token, state)
        assert total == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("cell", ["gru", "lnlstm", "transformer"])
def test_every_cell_serves_the_engine_with_its_state_carried(cell, tmp_path):
    model, vocab = train_tiny_model(steps=40, cell=cell)
    folder = tmp_path / "model"
    save_servable(folder, model, vocab, {"speaker_tags": True, "window_length": 8}, options=PLAIN)
    engine = Engine.load(folder, options=PLAIN)
    assert engine.model.config.cell == cell
    session = engine.session()
    for speaker, text in HISTORY:
        session.add_message(speaker, text)
    partial = session.type_text("user", "what do you like to do for f")
    # a word at a time through the carried state (the transformer's KV cache, 6 tokens of context here)
    # gives what one pass over the whole conversation gives
    typed = tokenize("what do you like to do for")
    expected = from_scratch(engine, conversation_tokens(engine, HISTORY, "user", typed))
    np.testing.assert_allclose(session.log_probs, expected[-1], rtol=0, atol=1e-4)
    assert [s.word for s in session.suggest(partial)][:1] == ["fun"]
    assert session.complete("beam", max_words=4) == session.complete("beam", max_words=4)
    # fill-in-the-middle batches its candidates from the carried state: each as stepping through it gives
    right = engine.right_ids(" ?", inside_word=False)
    candidates = np.array([engine.vocab.id(w) for w in ("fun", "work")])
    assert_rescored_as_stepping_would(engine, session, candidates, right)
    quantized = Engine.load(folder, options=PLAIN.model_copy(update={"int8": True}))
    small = quantized.session()
    for speaker, text in HISTORY:
        small.add_message(speaker, text)
    small.type_text("user", "what do you like to do for f")
    assert [s.word for s in small.suggest(partial)][:1] == ["fun"]
    np.testing.assert_allclose(np.exp(small.log_probs), np.exp(session.log_probs), atol=0.02)


# -- fill-in-the-middle ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fim_engine(fim_model_dir):
    return Engine.load(fim_model_dir, options=PLAIN)


def words_of(suggestions):
    return [s.word for s in suggestions]


def test_the_text_after_the_cursor_changes_the_top_suggestion(fim_engine):
    session = fim_engine.session()
    session.type_text("user", "i like ")
    assert session.suggest("", 3)[0].word == "green"  # two "green tea" to one "red wine" on the left
    assert session.suggest("", 3, right=" tea .")[0].word == "green"
    with_wine = session.suggest("", 3, right=" wine .")
    assert with_wine[0].word == "red"
    assert len(with_wine) == 3 and 0.99 <= sum(s.probability for s in with_wine) <= 1 + 1e-9
    # A blank right side is no right side: the plain strip.
    assert session.suggest("", 3, right="   ") == session.suggest("", 3)
    # Letters right after the cursor belong to the word being typed, which the suggestion replaces.
    assert words_of(session.suggest("r", 3, right="ed tea")) == ["red"]
    assert session.suggest("", 3, right="wine")[0].word == "red"  # at a word's start the word after is context


def test_fill_in_scores_each_candidate_as_stepping_through_it_would(fim_engine, fixed_engine):
    """The batched pass equals stepping through candidate and right tokens one by one, n-gram mixed in."""
    from conftest import FIM_CONVERSATION
    from nextword.ngram import KneserNey
    from nextword.windows import split_stream

    stream = split_stream([(s, tokenize(t)) for s, t in FIM_CONVERSATION] * 3, fim_engine.vocab, True)
    ngram = KneserNey.fit(stream, len(fim_engine.vocab), order=3)
    engine = Engine(fim_engine.model, fim_engine.vocab, fim_engine.config, set(), ngram,
                    PLAIN.model_copy(update={"ngram_weight": 0.3}))
    session = engine.session()
    session.type_text("user", "i like ")
    right = engine.right_ids(" wine .", inside_word=False)
    assert engine.vocab.decode(right) == ["wine", ".", "<EOS>"]  # all of it fits: the message ends there
    candidates = np.array([engine.vocab.id(w) for w in ("green", "red", "tea")])
    assert_rescored_as_stepping_would(engine, session, candidates, right)


def test_only_the_first_right_tokens_are_read(fim_engine):
    from nextword.engine import FIM_RIGHT_TOKENS

    long_right = " ".join(["tea"] * (FIM_RIGHT_TOKENS + 3))
    ids = fim_engine.right_ids(long_right, inside_word=False)
    assert ids == [fim_engine.vocab.id("tea")] * FIM_RIGHT_TOKENS  # cut short: no <EOS>
    assert fim_engine.right_ids("ine", inside_word=True) == []


def test_equal_scores_go_to_the_lower_id_however_the_top_is_found():
    from nextword.engine import best

    scores = np.array([1.0, 2.0, 2.0, 2.0, 0.0], dtype=np.float32)
    ids = np.array([4, 3, 9, 1, 0])
    assert best(scores, ids, 2).tolist() == [3, 1]  # the 2.0s of ids 1 and 3, not 9
    assert best(scores, ids, 9).tolist() == [3, 1, 2, 0, 4]
    wide = np.zeros(5000, dtype=np.float32)  # ties everywhere near the top
    wide[[4000, 17]] = 1.0
    assert best(wide, np.arange(5000)[::-1].copy(), 4).tolist() == [4000, 17, 4999, 4998]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([-60.0, -30.0, -13.0, -9.0, -5.0, -4.0, -1.0, 0.0, 0.5]), min_size=1, max_size=60),
       st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_the_top_is_the_top_of_a_full_sort_whatever_the_spread_of_scores(values, want, seed):
    """Scores far apart, close together or tied: each bound best() tries, and its last resort, are exercised."""
    from nextword.engine import best

    scores = np.array(values, dtype=np.float32)
    ids = np.random.default_rng(seed).permutation(len(scores))
    expected = np.lexsort((ids, -scores))[:want]
    assert best(scores, ids, want).tolist() == expected.tolist()
