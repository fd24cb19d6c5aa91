"""The real `nextword` command line, run as a subprocess against the tiny model."""

from __future__ import annotations

import csv
import json
import os
import re
import select
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ENGINE, TINY_CONVERSATION
from nextword.engine import Engine


def nextword(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "nextword.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def chat_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("csv") / "chat.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["conversation_id", "speaker", "text"])
        for _ in range(2):  # the same conversation twice: two conversations
            for speaker, text in TINY_CONVERSATION:
                writer.writerow([f"c{_}", speaker, text])
    return path


def test_suggest(tiny_model_dir):
    result = nextword("suggest", "--model", tiny_model_dir, "good morning , how are ")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[0].split("\t")[0] == "you"
    assert 0.5 < float(lines[0].split("\t")[1]) <= 1
    result = nextword("suggest", "--model", tiny_model_dir, "--speaker", "agent", "-k", "1", "i am f")
    assert result.stdout.splitlines() == [result.stdout.splitlines()[0]] and result.stdout.startswith("fine\t")


def test_suggest_prints_every_probability_to_four_significant_digits(tiny_model_dir):
    """A completion far less likely than the first still gets its number, not a rounded 0."""
    result = nextword("suggest", "--model", tiny_model_dir, "--speaker", "agent", "i am f")
    assert result.returncode == 0, result.stderr
    engine = Engine.load(tiny_model_dir)  # the CLI's count of suggestions is the folder's setting
    session = engine.session()
    expected = session.suggest(session.type_text("agent", "i am f"), engine.options.suggestions)
    assert min(s.probability for s in expected) < 5e-5  # what four decimals would print as 0.0000
    printed = [line.split("\t") for line in result.stdout.splitlines()]
    assert [word for word, _ in printed] == [s.word for s in expected]
    for (_, probability), s in zip(printed, expected):
        assert float(probability) == pytest.approx(s.probability, rel=1e-3)


def test_usage_and_model_errors_are_one_line(tiny_model_dir, tmp_path):
    assert_one_line_error(nextword("suggest", "--model", tiny_model_dir, "--speaker", "bob", "hi"), "--speaker")
    assert_one_line_error(nextword("suggest", "-k", "0", "hi"), "-k")
    assert_one_line_error(nextword("complete", "--top-p", "1.5", "hi"), "--top-p")
    assert_one_line_error(nextword("suggest", "--cache-bigram-weight", "1", "hi"), "--cache-bigram-weight")
    # The default model folder is the pipeline's output, models/model, missing here.
    assert_one_line_error(nextword("suggest", "hi", cwd=tmp_path), "models/model: no such model folder")


def test_complete_strategies(tiny_model_dir):
    greedy = nextword("complete", "--model", tiny_model_dir, "good morning , how are ")
    assert greedy.returncode == 0, greedy.stderr
    assert greedy.stdout == "good morning , how are you today?\n"
    beam = nextword("complete", "--model", tiny_model_dir, "--strategy", "beam", "--max-words", "1",
                    "good morning , how are y")
    assert beam.stdout == "good morning , how are you\n"
    sample = nextword("complete", "--model", tiny_model_dir, "--strategy", "sample", "--temperature", "0.5",
                      "--top-k", "3", "--top-p", "0.9", "--seed", "1", "what do you like")
    assert sample.returncode == 0 and sample.stdout.startswith("what do you like ")


def test_evaluate(tiny_model_dir, chat_csv, tmp_path):
    result = nextword("evaluate", "--model", tiny_model_dir, "--csv", chat_csv, "--json", "--max-conversations", "1")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert (figures["conversations"], figures["messages"], figures["words"]) == (1, 4, 29)
    assert figures["keystrokes_without"] == sum(len(w) + 1 for _, text in TINY_CONVERSATION
                                                for w in text.split() if w not in {",", "?", "!", "."})
    assert 0.5 < figures["ksr"] < 1 and figures["top3"] > 0.9
    assert figures["perplexity"] >= 1 and figures["perplexity"] < 3
    assert 0 < figures["latency_p50_ms"] <= figures["latency_p99_ms"] and figures["latency_conversations"] == 1
    # the settings stored in the model folder, as the pipeline evaluated them ...
    assert figures["engine"] == ENGINE.model_dump(exclude={"ngram_order", "banned_words"})
    # ... and each flag overrides one of them
    plain = json.loads(nextword("evaluate", "--model", tiny_model_dir, "--csv", chat_csv, "--json",
                                "--max-conversations", "1", "--ngram-weight", "0", "--cache-weight", "0",
                                "--cache-bigram-weight", "0", "--unknown-weight", "0", "--skip-rejected", "--fp32",
                                "--backend", "torch", "-k", "2").stdout)
    assert plain["engine"] == {"ngram_weight": 0.0, "cache_weight": 0.0, "cache_bigram_weight": 0.0,
                               "unknown_weight": 0.0, "suggestions": 2, "skip_rejected": True, "int8": False, "backend": "torch"}
    assert plain["words"] == figures["words"] and plain["perplexity"] == figures["perplexity"]
    text = nextword("evaluate", "--model", tiny_model_dir, "--csv", chat_csv)
    assert "2 conversations" in text.stdout and "KSR" in text.stdout

    bad = tmp_path / "bad.csv"
    bad.write_text("who,what\nuser,hi\n", encoding="utf-8")
    assert_one_line_error(nextword("evaluate", "--model", tiny_model_dir, "--csv", bad), "no 'text' column")
    assert_one_line_error(nextword("evaluate", "--model", tiny_model_dir, "--csv", chat_csv, "--split", "test"),
                          "no 'split' column")


def test_serve_starts_the_web_demo(tiny_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nextword.cli", "serve", "--model", str(tiny_model_dir),
                             "--port", str(port), "--log", str(tmp_path / "keys.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
                time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_chat_shows_suggestions_and_tab_accepts(tiny_model_dir):
    """Drive `nextword chat` in a pseudo-terminal, answering cursor-position queries as a terminal does."""
    import fcntl
    import pty
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: the real command in the terminal
        os.execve(sys.executable, [sys.executable, "-m", "nextword.cli", "chat", "--model", str(tiny_model_dir)],
                  {**os.environ, "TERM": "xterm"})
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    seen = b""

    def screen_until(pattern, timeout=120):
        nonlocal seen
        deadline = time.time() + timeout
        while time.time() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # the child has exited
                    data = b""
                seen += data
                for _ in range(data.count(b"\x1b[6n")):
                    os.write(fd, b"\x1b[2;1R")
            text = ANSI.sub("", seen.decode("utf-8", "replace"))
            if re.search(pattern, text):
                return text
        raise AssertionError(f"no {pattern!r} on the screen: {ANSI.sub('', seen.decode(errors='replace'))[-500:]!r}")

    try:
        screen_until(r"user>")
        seen = b""
        os.write(fd, b"good morning , how are ")
        screen_until(r"\[Tab\] you \| ")  # the suggestion strip, most probable first
        os.write(fd, b"\t\r")  # accept it and send the message
        screen_until(r"agent>")
        os.write(fd, b"\x04")  # Ctrl-D
        text = screen_until(r"suggestions accepted: 1\b")
        assert "user> good morning , how are you\r" in text
        assert "messages: 1, words: 5" in text
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)


def test_suggest_and_evaluate_with_the_text_after_the_cursor(fim_model_dir, tmp_path):
    from conftest import FIM_CONVERSATION

    first = lambda result: result.stdout.splitlines()[0].split("\t")[0]  # noqa: E731
    assert first(nextword("suggest", "--model", fim_model_dir, "i like ")) == "green"
    assert first(nextword("suggest", "--model", fim_model_dir, "i like ", "--right", " wine .")) == "red"
    path = tmp_path / "fim.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("speaker", "text"), *FIM_CONVERSATION])
    result = nextword("evaluate", "--model", fim_model_dir, "--csv", path, "--fim", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["messages"] == 3 and report["k"] == 3
    assert {"top1_left", "top3_left", "top1", "top3", "latency_p50_ms", "latency_p99_ms"} <= report.keys()
    assert_one_line_error(nextword("evaluate", "--model", fim_model_dir, "--csv", path, "--fim",
                                   "--fim-messages", "0"), "--fim-messages")
