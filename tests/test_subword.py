"""The engine over a SentencePiece model: whole-word suggestions and completions, as the word engine gives."""

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import ENGINE, PLAIN, TINY_CONVERSATION, save_servable, train_tiny_model
from nextword.config import TokenizerParams
from nextword.engine import Engine
from nextword.keystrokes import simulate, simulate_batched
from nextword.oov import oov_report
from nextword.subword import SubwordEngine
from nextword.text import tokenize
from nextword.tokenizer import train

CONVERSATION = [("user", "hi , i am marvin ."), ("agent", "good morning , how are you today ?")]


@pytest.fixture(scope="module")
def subword_dir(tmp_path_factory):
    tokenizer = train([tokenize(text) for _, text in TINY_CONVERSATION],
                      TokenizerParams(kind="sentencepiece", vocab_size=60, model_type="bpe"), seed=0)
    model, vocab = train_tiny_model(tokenizer=tokenizer)
    path = tmp_path_factory.mktemp("subword") / "model"
    save_servable(path, model, vocab, {"speaker_tags": True, "window_length": 8}, tokenizer=tokenizer)
    return path


def words(suggestions):
    return [s.word for s in suggestions]


def test_a_model_folder_of_pieces_loads_as_the_subword_engine(subword_dir, tiny_model_dir):
    assert isinstance(Engine.load(subword_dir), SubwordEngine)
    assert type(Engine.load(tiny_model_dir)) is Engine


def test_suggests_the_memorised_next_word_and_completes_prefixes_as_whole_words(subword_dir):
    engine = Engine.load(subword_dir, options=PLAIN)
    session = engine.session()
    session.type_text("user", "good morning , how are ")
    top = session.suggest("", 3)
    assert top[0].word == "you" and top[0].probability > 0.5
    assert all(0 < s.probability <= 1 for s in top) and sum(s.probability for s in top) <= 1 + 1e-9
    assert words(session.suggest("y", 3))[0] == "you"
    session.type_text("user", "good morning , how are you ")
    assert words(session.suggest("to", 3))[0] == "today"
    assert all(w.startswith("to") for w in words(session.suggest("to", 3)))
    # the text after the cursor is not read by the search over pieces (yet): the strip of the left alone
    assert session.suggest("to", 3, right=" ?") == session.suggest("to", 3)


def test_a_name_first_seen_in_the_conversation_is_completed(subword_dir, tiny_model_dir):
    def strip(engine, typed):
        session = engine.session()
        session.add_message(*CONVERSATION[0])
        partial = session.type_text("agent", typed)
        return words(session.suggest(partial, 3, typing=True))

    subword, word = Engine.load(subword_dir, options=ENGINE), Engine.load(tiny_model_dir, options=ENGINE)
    assert "marvin" in strip(subword, "good morning , mar")
    # Outside the word vocabulary: the word engine shows it only because no vocabulary word starts with "mar"
    # (Engine.fill), the subword engine because its pieces spell it.
    assert strip(word, "good morning , mar") == ["marvin"]
    # The keystroke simulation types it through the same engine, unchanged.
    report = simulate(subword, [CONVERSATION + [("agent", "good morning marvin")]])
    assert report.words == 13 and 0 < report.ksr < 1


def test_banned_words_are_never_suggested_nor_completed(subword_dir, tmp_path):
    banned = tmp_path / "banned.txt"
    banned.write_text("you\n", encoding="utf-8")
    engine = Engine.load(subword_dir, options=PLAIN.model_copy(update={"banned_words": str(banned)}))
    session = engine.session()
    session.type_text("user", "good morning , how are ")
    assert "you" not in words(session.suggest("", 3)) and len(session.suggest("", 3)) == 3
    assert session.complete("greedy") == []  # the line would go on with "you"


def test_complete_gives_words_up_to_the_end_of_the_message_and_leaves_the_session_alone(subword_dir):
    engine = Engine.load(subword_dir, options=PLAIN)
    session = engine.session()
    session.type_text("user", "what do you like to ")
    before = session.log_probs.copy()
    assert session.complete("greedy") == ["do", "for", "fun", "?"]
    assert session.complete("beam", beam_size=3) == ["do", "for", "fun", "?"]
    assert session.complete("greedy", prefix="d") == ["do", "for", "fun", "?"]
    assert session.complete("greedy", max_words=2) == ["do", "for"]
    assert (session.log_probs == before).all()
    fork = copy.copy(session)
    assert type(fork) is type(session) and fork.complete("greedy") == ["do", "for", "fun", "?"]


def test_the_oov_report_counts_words_outside_the_word_vocabulary_and_those_completed(subword_dir, tiny_model_dir):
    conversation = CONVERSATION + [("agent", "good morning marvin")]
    vocabulary = {t for _, text in TINY_CONVERSATION for t in tokenize(text)}
    by_word = oov_report(Engine.load(tiny_model_dir, options=ENGINE), [conversation], vocabulary)
    by_pieces = oov_report(Engine.load(subword_dir, options=ENGINE), [conversation], vocabulary)
    for report in (by_word, by_pieces):  # "hi", "marvin" and "marvin" again
        assert (report.words, report.oov_words, report.oov_rate) == (13, 3, 3 / 13)
    assert by_word.completed == 1  # the second "marvin": the conversation's own, in a free slot (Engine.fill)
    assert by_pieces.completed >= 1 and by_pieces.completed_share == by_pieces.completed / 3


def test_the_command_line_serves_and_scores_a_subword_model(subword_dir, tiny_model_dir, tmp_path):
    chat = tmp_path / "chat.csv"
    chat.write_text("speaker,text\n" + "".join(f'{s},"{t}"\n' for s, t in TINY_CONVERSATION), encoding="utf-8")

    def nextword(*args):
        result = subprocess.run([sys.executable, "-m", "nextword.cli", *map(str, args)], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert nextword("complete", "--model", subword_dir, "--fp32", "--backend", "torch", "good morning , how are ") == \
        "good morning , how are you today?\n"
    pieces = json.loads(nextword("evaluate", "--model", subword_dir, "--csv", chat, "--json"))
    words = json.loads(nextword("evaluate", "--model", tiny_model_dir, "--csv", chat, "--json"))
    assert pieces["words"] == words["words"] == 29 and pieces["tokens"] > words["tokens"]
    assert words["word_perplexity"] == pytest.approx(words["perplexity"])
    assert pieces["word_perplexity"] == pytest.approx(math.exp(pieces["nll"] * pieces["tokens"] / words["tokens"]))


def test_the_search_steps_many_hypotheses_at_once_as_one_at_a_time(subword_dir):
    engine = Engine.load(subword_dir, options=PLAIN)
    session = engine.session()
    session.type_text("user", "good morning , ")
    state = (session.state, session._history)
    pieces = [engine.vocab.id(p) for p in ("▁how", "▁you", "▁t")]
    pieces = [p for p in pieces if p != engine.vocab.id("<UNK>")] + [engine.starts.ids[0]]
    batched = engine.step_many(pieces, [state] * len(pieces))
    for piece, (log_probs, _) in zip(pieces, batched):
        assert np.allclose(log_probs, engine.step(piece, state)[0], atol=1e-5)


def test_the_onnx_backend_suggests_the_same_words(subword_dir, tmp_path):
    import shutil

    from nextword.export import export_onnx
    from nextword.modeldir import load_trained, onnx_file

    folder = shutil.copytree(subword_dir, tmp_path / "model")
    export_onnx(load_trained(folder)[0], onnx_file(folder, int8=False))
    engines = [Engine.load(folder, options=PLAIN.model_copy(update={"backend": backend}))
               for backend in ("torch", "onnx")]
    strips = []
    for engine in engines:
        session = engine.session()
        session.add_message(*CONVERSATION[0])
        session.type_text("agent", "good morning , how are ")
        strips.append([words(session.suggest(prefix, 3)) for prefix in ("", "y", "t", "mar")])
    assert strips[0] == strips[1]


def test_the_batched_simulation_of_a_subword_engine_counts_what_typing_one_stream_gives(subword_dir):
    """Its words are searched over pieces, which the batched scorer of whole-word ids cannot do."""
    conversations = [TINY_CONVERSATION, CONVERSATION + [("agent", "good morning marvin")]]
    engine = Engine.load(subword_dir, exact_batches=True)
    assert simulate_batched(engine, conversations, processes=2) == simulate(engine, conversations).savings()


def test_the_mlflow_model_of_a_folder_of_pieces_pins_sentencepiece(subword_dir, tiny_model_dir):
    import sentencepiece

    from nextword.pyfunc import requirements

    assert f"sentencepiece=={sentencepiece.__version__}" in requirements(subword_dir)
    assert not [r for r in requirements(tiny_model_dir) if r.startswith("sentencepiece")]
