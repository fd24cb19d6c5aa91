import json

import numpy as np

from nextword.text import detokenize, is_word, tokenize
from nextword.vocab import PAD_ID, SPECIALS, UNK_ID, Vocab
from nextword.windows import cut_windows, lanes, message_tokens, split_stream


def test_tokenize_lowercases_keeps_apostrophes_and_marks():
    assert tokenize("Hi, I'm GOOD!! Don't you think so?; ok.") == [
        "hi", ",", "i'm", "good", "!", "!", "don't", "you", "think", "so", "?", ";", "ok", ".",
    ]
    assert tokenize("   ") == []
    assert tokenize("café 12345") == ["café", "12345"]


def test_is_word_and_detokenize():
    assert is_word("hello") and not is_word(",") and not is_word("<EOS>")
    assert detokenize(["hi", ",", "how", "are", "you", "?"]) == "hi, how are you?"


def test_vocab_specials_first_then_by_count_with_stable_ties():
    vocab = Vocab.build([["b", "a", "c", "a"], ["b", "d"]], min_freq=1, max_size=100)
    assert vocab.tokens[: len(SPECIALS)] == list(SPECIALS)
    assert vocab.tokens[len(SPECIALS):] == ["a", "b", "c", "d"]
    capped = Vocab.build([["b", "a", "c", "a"], ["b", "d"]], min_freq=2, max_size=7)
    assert capped.tokens[len(SPECIALS):] == ["a"]
    assert capped.encode(["a", "zzz"]) == [6, UNK_ID]
    # What is left out, below min_freq or beyond max_size, is kept as the engine's dictionary, by count.
    assert vocab.rare == [] and capped.rare == ["b", "c", "d"]
    assert Vocab.build([["b", "a", "c", "a"], ["b", "d"]], min_freq=1, max_size=7).rare == ["b", "c", "d"]


def test_vocab_round_trip(tmp_path):
    vocab = Vocab.build([["x", "y", "y", "z"]], min_freq=2)
    vocab.save(tmp_path / "v.json")
    loaded = Vocab.load(tmp_path / "v.json")
    assert loaded.tokens == vocab.tokens and loaded.counts == vocab.counts and loaded.rare == vocab.rare == ["x", "z"]
    # A file written before the dictionary was kept loads with none.
    (tmp_path / "old.json").write_text(json.dumps({"tokens": vocab.tokens, "counts": vocab.counts}))
    assert Vocab.load(tmp_path / "old.json").rare == []


def test_message_shorter_than_window_is_kept():
    vocab = Vocab.build([["hi"], ["ok", "thanks"]])
    stream = split_stream([("user", ["hi"]), ("agent", ["ok", "thanks"])], vocab, speaker_tags=True)
    assert vocab.decode(stream) == ["<USER>", "<BOS>", "hi", "<EOS>", "<AGENT>", "<BOS>", "ok", "thanks", "<EOS>"]
    windows = cut_windows(stream, length=15)
    assert windows.shape == (1, 16) and windows.dtype == np.int32
    # every id of the stream is in the window, the rest is PAD
    assert list(windows[0, : len(stream)]) == list(stream)
    assert (windows[0, len(stream):] == PAD_ID).all()


def test_windows_overlap_by_one_and_every_target_appears_once():
    stream = np.arange(1, 24, dtype=np.int32)  # 23 ids -> 22 targets
    windows = cut_windows(stream, length=5)
    assert windows.shape == (5, 6)
    for a, b in zip(windows, windows[1:]):
        assert a[-1] == b[0]
    targets = [t for w in windows for t in w[1:] if t != PAD_ID]
    assert targets == list(stream[1:])


def test_no_speaker_tags():
    vocab = Vocab.build([["a"]])
    assert message_tokens("user", ["a"], speaker_tags=False) == ["<BOS>", "a", "<EOS>"]
    assert vocab.decode(split_stream([("agent", ["a"])], vocab, False)) == ["<BOS>", "a", "<EOS>"]


def test_lanes_are_contiguous_runs_of_windows():
    windows = np.arange(10)[:, None].repeat(3, axis=1).astype(np.int32)
    train = lanes(windows, 3, pad_tail=False)  # 3 lanes x 3 steps, the 10th window left out
    assert train.shape == (3, 3, 3)
    assert [int(train[step, 1, 0]) for step in range(3)] == [3, 4, 5]
    evaluation = lanes(windows, 3, pad_tail=True)  # 4 steps, tail padded
    assert evaluation.shape == (4, 3, 3)
    kept = sorted(int(x) for x in evaluation[:, :, 0].ravel() if x != PAD_ID)
    assert kept == list(range(1, 10))


def test_vocab_stage_reads_the_train_split_only(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    root = Path(__file__).resolve().parents[1]
    tokens = tmp_path / "tokens.parquet"
    pd.DataFrame({
        "conversation_id": ["a", "b", "c"], "turn": [0, 0, 0], "speaker": ["user"] * 3,
        "split": ["train", "val", "test"],
        "tokens": [["hello", "there"], ["onlyinval"], ["onlyintest", "hello"]],
    }).to_parquet(tokens)
    params = tmp_path / "params.yaml"  # the toy preset: vocab.min_freq 1
    subprocess.run([sys.executable, "-m", "nextword.cli", "params", "toy", "--conf", str(root / "conf"),
                    "--out", str(params)], check=True, capture_output=True)
    out = tmp_path / "vocab.json"
    subprocess.run([sys.executable, str(root / "src/stages/vocab.py"), "--params", str(params),
                    "--tokens", str(tokens), "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(out)],
                   check=True, capture_output=True)
    assert Vocab.load(out).tokens[len(SPECIALS):] == ["hello", "there"]
