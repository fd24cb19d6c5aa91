"""The web API over real HTTP: a uvicorn server on a free port of 127.0.0.1, spoken to with urllib."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import PLAIN
from nextword.engine import Engine
from nextword.server import MAX_BODY, MAX_EVENTS, EventLog, Message, RateLimit, SessionCache, create_app, split_typed
from servers import background_server

GREETING = "good morning , how are you today ?"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """The API over the LSTM alone (PLAIN), so that suggestions can be checked against the engine's."""
    log_path = tmp_path_factory.mktemp("server") / "keystrokes.jsonl"
    with background_server(create_app(tiny_model_dir, log_path=log_path, options=PLAIN)) as url:
        yield url, log_path


def request(url: str, body=None, *, raw: bytes | None = None, content_type: str = "application/json"):
    """(status, parsed JSON body, headers) of a GET, or of a POST when a body is given."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.load(response), response.headers
    except urllib.error.HTTPError as err:
        return err.code, json.load(err), err.headers


def suggest(server, text, speaker="user", **fields):
    url, _ = server
    status, body, _ = request(f"{url}/api/suggest", {"speaker": speaker, "text": text, **fields})
    assert status == 200, body
    return body


def words(body) -> list[str]:
    return [s["word"] for s in body["suggestions"]]


def test_split_typed_keeps_the_word_being_typed_apart():
    assert split_typed("how are y") == (["how", "are"], "y", 8)
    assert split_typed("how are ") == (["how", "are"], "", 8)
    assert split_typed("") == ([], "", 0)
    assert split_typed("Hello,Wor") == (["hello", ","], "wor", 6)
    assert split_typed("it'") == ([], "it'", 0)  # an apostrophe inside a word keeps the word open
    assert split_typed("hey-") == (["hey"], "", 4)
    assert split_typed("'tis") == ([], "tis", 1)


def test_suggests_next_words_and_completes_the_partial_word(server):
    body = suggest(server, "good morning , how are ")
    assert words(body)[0] == "you"
    assert body["partial"] == "" and len(body["suggestions"]) == 3
    probabilities = [s["probability"] for s in body["suggestions"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    body = suggest(server, "good morning , how are y")
    assert body["partial"] == "y" and body["start"] == len("good morning , how are ")
    assert words(body) == ["you"]  # only words that start with the prefix
    assert body["latency_ms"] >= 0


def test_while_typing_words_passed_over_are_skipped_whatever_was_asked_before(tiny_model_dir, tmp_path):
    app = create_app(tiny_model_dir, log_path=tmp_path / "log.jsonl", overrides={"skip_rejected": True})
    with background_server(app) as url:
        server = (url, None)
        # Asked first, before the strip for "" was: it is worked out from the text, not remembered.
        assert "you" not in words(suggest(server, "good morning , how are y", typing=True))
        before = words(suggest(server, "good morning , how are ", typing=True))
        assert before[0] == "you"  # shown before "y" was typed, so left out after it
        assert "you" not in words(suggest(server, "good morning , how are y", typing=True))
        assert words(suggest(server, "good morning , how are ", typing=True)) == before  # erased back: the same
        assert words(suggest(server, "good morning , how are y")) == ["you"]  # a one-off query leaves nothing out


def test_k_sets_how_many_come_back(server):
    assert len(suggest(server, "", k=1)["suggestions"]) == 1
    assert len(suggest(server, "", k=5)["suggestions"]) == 5


def test_the_conversation_and_speaker_condition_the_suggestions(server):
    history = [{"speaker": "user", "text": GREETING}]
    assert words(suggest(server, "i am f", speaker="agent", history=history))[0] == "fine"
    assert words(suggest(server, "", speaker="agent", history=history))[0] == "i"


def test_a_keystroke_inside_a_word_runs_no_model_step(server):
    history = [{"speaker": "agent", "text": "i like to read books and play music ."}]
    first = suggest(server, "what do y", history=history)
    assert first["steps"] == 2 + 9 + 1 + 2 + 2  # history: tag, <BOS>, 9 tokens, <EOS>; then tag, <BOS>, 2 words
    assert suggest(server, "what do yo", history=history)["steps"] == 0
    assert suggest(server, "what do you", history=history)["steps"] == 0
    assert suggest(server, "what do you ", history=history)["steps"] == 1  # the word is committed: one step
    sent = history + [{"speaker": "user", "text": "what do you like"}]
    # Sending the message costs its last word, <EOS>, and the next message's tag and <BOS>.
    assert suggest(server, "", speaker="agent", history=sent)["steps"] == 4


def test_cached_sessions_give_what_a_fresh_session_gives(server, tiny_model_dir):
    engine = Engine.load(tiny_model_dir, options=PLAIN)
    history = [{"speaker": "user", "text": GREETING}, {"speaker": "agent", "text": "i am fine , thank you"}]
    for speaker, text in [("user", "what do y"), ("user", "what do you like to "), ("agent", ""), ("user", "Good mor")]:
        session = engine.session()
        for message in history:
            session.add_message(message["speaker"], message["text"])
        partial = session.type_text(speaker, text)
        expected = session.suggest(partial, 3)
        body = suggest(server, text, speaker=speaker, history=history)
        assert words(body) == [s.word for s in expected], text
        assert [s["probability"] for s in body["suggestions"]] == pytest.approx([s.probability for s in expected], rel=1e-4)


def test_the_session_cache_resumes_from_the_longest_cached_prefix_and_forgets_the_oldest(tiny_model_dir):
    cache = SessionCache(Engine.load(tiny_model_dir), size=2)
    greeting = [Message(speaker="user", text=GREETING)]
    first = cache.key(greeting, "agent", ["i", "am"])
    assert cache.session(first)[1] == len(first)
    assert cache.session(first)[1] == 0
    assert cache.session(first + ("fine",))[1] == 1
    sent = cache.key(greeting + [Message(speaker="agent", text="i am fine")], "user", [])
    assert cache.session(sent)[1] == 3  # <EOS>, <USER>, <BOS> after "... i am fine"
    assert cache.session(first)[1] == len(first)  # the least recently used, so evicted by the third
    assert cache.session(sent)[1] == 0


def test_the_text_after_the_cursor_makes_the_suggestions_fit_both_sides(fim_model_dir, tmp_path):
    engine = Engine.load(fim_model_dir, options=PLAIN)
    with background_server(create_app(fim_model_dir, log_path=tmp_path / "log.jsonl", options=PLAIN)) as url:
        server = (url, None)
        assert words(suggest(server, "i like "))[0] == "green"
        body = suggest(server, "i like ", right=" wine .")
        assert words(body)[0] == "red" and body["steps"] == 0  # the left context's session, rescored
        session = engine.session()
        session.type_text("user", "i like ")
        expected = session.suggest("", 3, right=" wine .")
        assert words(body) == [s.word for s in expected]
        assert [s["probability"] for s in body["suggestions"]] == pytest.approx([s.probability for s in expected],
                                                                                rel=1e-4)
        assert words(suggest(server, "i like r", right="ed tea")) == ["red"]  # "ed" is the word's own rest
        assert words(suggest(server, "i like ", right="")) == words(suggest(server, "i like "))


def test_complete_extends_the_line(server):
    url, _ = server
    status, body, _ = request(f"{url}/api/complete", {"speaker": "user", "text": "good morning , how are y"})
    assert status == 200, body
    assert body["words"] == ["you", "today", "?"] and body["completion"] == "you today?"
    assert body["line"] == "good morning , how are you today?"
    status, body, _ = request(f"{url}/api/complete", {"speaker": "user", "text": "good morning ", "strategy": "beam"})
    assert status == 200 and body["words"][:3] == [",", "how", "are"]
    status, body, _ = request(f"{url}/api/complete", {"speaker": "user", "text": "good qx"})
    assert status == 200 and body["words"] == [] and body["line"] == "good qx"  # no word starts with qx
    status, body, _ = request(f"{url}/api/complete", {"speaker": "user", "text": "", "strategy": "sample",
                                                      "top_p": 0.9, "seed": 3, "max_words": 2})
    assert status == 200 and 1 <= len(body["words"]) <= 2


def test_events_are_appended_to_the_log_and_summarised(server, tmp_path):
    url, log_path = server
    events = [
        {"type": "keystroke", "latency_ms": 4.0, "server_ms": 0.5},
        {"type": "keystroke", "latency_ms": 8.0, "server_ms": 0.7},
        {"type": "accepted", "word": "you", "rank": 1, "via": "tab", "typed": 1},
        {"type": "accepted", "word": "today", "rank": 2, "via": "click"},
        {"type": "ignored", "word": "morning", "suggested": True},
    ]
    status, stats, _ = request(f"{url}/api/events", {"events": events})
    assert status == 200, stats
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [line["type"] for line in lines] == ["keystroke", "keystroke", "accepted", "accepted", "ignored"]
    assert all("time" in line for line in lines) and lines[3]["via"] == "click"
    status, again, _ = request(f"{url}/api/stats")
    assert status == 200 and again == stats
    assert stats["accepted"] == 2 and stats["ignored"] == 1 and stats["keystrokes"] == 2
    assert stats["acceptance_rate"] == pytest.approx(2 / 3)
    assert stats["latency_ms"]["p50"] == pytest.approx(6.0) and stats["latency_ms"]["p99"] == pytest.approx(7.96)
    assert stats["server_ms"]["p50"] == pytest.approx(0.6)
    # A restarted server reads the same totals back, skipping a line cut short by a crash.
    copy = tmp_path / "copy.jsonl"
    copy.write_text(log_path.read_text() + '{"type": "accep')
    assert EventLog(copy).stats() == stats
    assert EventLog(tmp_path / "none.jsonl").stats()["acceptance_rate"] is None


@pytest.mark.parametrize("path, body, field", [
    ("suggest", {"text": "hi"}, "speaker"),
    ("suggest", {"speaker": "user"}, "text"),
    ("suggest", {"speaker": "bob", "text": "hi"}, "speaker"),
    ("suggest", {"speaker": "user", "text": "x" * 2001}, "text"),
    ("suggest", {"speaker": "user", "text": "hi", "k": 0}, "k"),
    ("suggest", {"speaker": "user", "text": "hi", "k": 11}, "k"),
    ("suggest", {"speaker": "user", "text": 5}, "text"),
    ("suggest", {"speaker": "user", "text": "hi", "history": "hello"}, "history"),
    ("suggest", {"speaker": "user", "text": "hi", "history": [{"speaker": "user"}]}, "history.0.text"),
    ("suggest", {"speaker": "user", "text": "hi", "prefix": "h"}, "prefix"),
    ("suggest", ["user", "hi"], "body"),
    ("suggest", {"speaker": "user", "text": "hi", "k": True}, "k"),  # no coercion: the schema says integer
    ("suggest", {"speaker": "user", "text": "hi", "k": "3"}, "k"),
    ("suggest", {"speaker": "user", "text": "hi", "typing": 1}, "typing"),
    ("suggest", {"speaker": "user", "text": "hi", "right": 5}, "right"),
    ("suggest", {"speaker": "user", "text": "hi", "right": None}, "right"),
    ("suggest", {"speaker": "user", "text": "hi", "right": ["there"]}, "right"),
    ("suggest", {"speaker": "user", "text": "hi", "right": "x" * 2001}, "right"),
    ("complete", {"speaker": "user", "text": "hi", "strategy": "random"}, "strategy"),
    ("complete", {"speaker": "user", "text": "hi", "max_words": 0}, "max_words"),
    ("complete", {"speaker": "user", "text": "hi", "temperature": 0}, "temperature"),
    ("complete", {"speaker": "user", "text": "hi", "temperature": 1e-300}, "temperature"),  # would overflow
    ("events", {"events": []}, "events"),
    ("events", {"events": [{"type": "clicked"}]}, "events.0"),
    ("events", {"events": [{"type": "keystroke", "latency_ms": -1}]}, "latency_ms"),
])
def test_bad_requests_get_a_4xx_naming_the_field(server, path, body, field):
    url, _ = server
    status, answer, _ = request(f"{url}/api/{path}", body)
    assert status == 422
    assert field in answer["error"], answer


def test_a_body_that_is_not_json_gets_a_400(server):
    url, _ = server
    status, answer, _ = request(f"{url}/api/suggest", raw=b"{speaker: user")
    assert status == 400 and "not valid JSON" in answer["error"]
    status, answer, _ = request(f"{url}/api/suggest", raw=b"speaker=user&text=hi",
                                content_type="application/x-www-form-urlencoded")
    assert 400 <= status < 500 and "body" in answer["error"]


def test_an_oversized_body_is_refused_before_it_is_read(server):
    url, _ = server
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=10)
    connection.putrequest("POST", "/api/suggest")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(MAX_BODY + 1))
    connection.endheaders()  # the body is never sent: the answer comes from the header alone
    response = connection.getresponse()
    assert response.status == 413 and "body" in json.load(response)["error"]
    connection.close()


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(server):
    url, _ = server
    total = 40_000_000
    chunk = b"x" * 65536
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    address = urllib.parse.urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(b"POST /api/suggest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # no Content-Length to refuse it by
        sent = 0
        while sent < total and not select.select([sock], [], [], 0)[0]:  # send until the server answers
            try:
                sock.sendall(frame)
            except OSError:  # it closed the connection: the answer is already here
                break
            sent += len(chunk)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass  # reset for the bytes sent after the answer, which nobody read
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert json.loads(body) == {"error": f"body: larger than {MAX_BODY} bytes"}
    assert sent < total / 2, f"the server read {sent} bytes before refusing"
    assert suggest(server, "good morning , how are ")["suggestions"]  # and goes on serving


def test_unknown_paths_and_methods_get_a_one_line_error(server):
    url, _ = server
    status, answer, _ = request(f"{url}/api/nothing")
    assert status == 404 and answer == {"error": "GET /api/nothing: not found"}
    status, answer, _ = request(f"{url}/api/stats", {"events": []})
    assert status == 405 and answer == {"error": "POST /api/stats: method not allowed"}


def test_integral_numbers_are_integers_as_in_json(server):
    assert len(suggest(server, "", k=2.0)["suggestions"]) == 2


def test_the_event_log_rotates_at_its_size_cap_and_keeps_whole_totals(tiny_model_dir, tmp_path):
    log_path = tmp_path / "keystrokes.jsonl"
    batch = [{"type": "keystroke", "latency_ms": 5.0, "server_ms": 0.5}, {"type": "ignored", "word": "hello"},
             {"type": "accepted", "word": "you", "rank": 1, "via": "tab"}]
    with background_server(create_app(tiny_model_dir, log_path=log_path, log_max_bytes=1000)) as url:
        for _ in range(20):
            status, stats, _ = request(f"{url}/api/events", {"events": batch})
            assert status == 200, stats
    rotated = log_path.with_name("keystrokes.jsonl.1")
    assert log_path.stat().st_size <= 1000 and rotated.stat().st_size <= 1000
    kept = [json.loads(line) for path in (rotated, log_path) for line in path.read_text().splitlines()]
    assert sum(record["type"] != "totals" for record in kept) < 60  # older lines are gone from the disk...
    assert (stats["keystrokes"], stats["ignored"], stats["accepted"]) == (20, 20, 20)  # ...not from the totals
    assert EventLog(log_path).stats() == stats  # a restart reads them back
    os.replace(log_path, rotated)  # a crash between the rename of a rotation and the new file
    assert EventLog(log_path).stats() == stats and EventLog(log_path).stats() == stats


def test_latency_percentiles_come_from_a_bounded_sample(tmp_path):
    log = EventLog(tmp_path / "keystrokes.jsonl", samples=100)
    for start in range(0, 1000, 250):
        log.append([{"type": "keystroke", "latency_ms": float(i), "server_ms": 1.0} for i in range(start, start + 250)])
    assert len(log.latency_ms.values) == len(log.server_ms.values) == 100
    stats = log.stats()
    assert stats["keystrokes"] == 1000
    assert 350 < stats["latency_ms"]["p50"] < 650 and stats["latency_ms"]["p99"] > 900
    assert stats["server_ms"] == {"p50": 1.0, "p99": 1.0}


def test_events_past_a_clients_allowance_get_a_429_naming_the_limit(tiny_model_dir, tmp_path):
    log_path = tmp_path / "keystrokes.jsonl"
    app = create_app(tiny_model_dir, log_path=log_path, events_per_second=0.01, event_burst=MAX_EVENTS)
    events = [{"type": "keystroke", "latency_ms": 3.0}] * MAX_EVENTS
    with background_server(app) as url:
        status, stats, _ = request(f"{url}/api/events", {"events": events})
        assert status == 200 and stats["keystrokes"] == MAX_EVENTS
        status, answer, headers = request(f"{url}/api/events", {"events": events[:1]})
        assert status == 429 and "0.01 a second" in answer["error"] and f"{MAX_EVENTS} at once" in answer["error"]
        assert int(headers["Retry-After"]) >= 99
        assert request(f"{url}/api/stats")[1]["keystrokes"] == MAX_EVENTS  # nothing more was logged
    assert len(log_path.read_text().splitlines()) == MAX_EVENTS


def test_the_allowance_is_per_client_refills_and_forgets_the_least_recent_clients():
    limit = RateLimit(rate=100, burst=10, clients=2)
    assert limit.take("a", 10) == 0
    assert limit.take("a", 1) == pytest.approx(0.01, abs=0.005)  # empty: one more in a hundredth of a second
    assert limit.take("b", 10) == 0  # another address has its own bucket
    time.sleep(0.05)
    assert limit.take("a", 4) == 0  # refilled at 100 a second
    assert limit.take("c", 1) == 0  # a third address: "b", the least recent, is forgotten...
    assert list(limit.buckets) == ["a", "c"]
    assert limit.take("b", 10) == 0  # ...and starts again with a full bucket


def test_the_page_and_its_files_are_served_locally(server):
    url, _ = server
    with urllib.request.urlopen(f"{url}/", timeout=10) as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert 'data-testid="suggestions"' in page and "/static/app.js" in page
    assert "http://" not in page and "https://" not in page  # nothing from the network
    for name in ("app.js", "style.css"):
        with urllib.request.urlopen(f"{url}/static/{name}", timeout=10) as response:
            text = response.read().decode()
            assert response.status == 200 and "http://" not in text and "https://" not in text


def test_two_logs_on_one_file_count_the_same_events_in_the_same_order(tmp_path):
    """Two worker processes' logs on one file, as `nextword serve --workers 2` has them, across rotations."""
    path = tmp_path / "keystrokes.jsonl"
    first, second = EventLog(path, max_bytes=2000, samples=50), EventLog(path, max_bytes=2000, samples=50)
    for n in range(60):
        log = first if n % 3 else second
        log.append([{"type": "keystroke", "latency_ms": float(n), "server_ms": 0.5},
                    {"type": "accepted" if n % 2 else "ignored", "word": "you", "rank": 1, "via": "tab"}])
    assert path.with_name("keystrokes.jsonl.1").exists()  # the cap made them rotate, more than once
    stats = first.stats()
    assert (stats["keystrokes"], stats["accepted"], stats["ignored"]) == (60, 30, 30)
    assert second.stats() == stats
    assert first.latency_ms.values == second.latency_ms.values  # the same sample, drawn in file order


def test_serve_with_two_workers_answers_with_the_totals_of_both(tiny_model_dir, tmp_path):
    """The real `nextword serve --workers 2`: events sent on fresh connections land wherever the kernel
    hands them; every answer counts all of them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url, log_path = f"http://127.0.0.1:{port}", tmp_path / "keystrokes.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "nextword.cli", "serve", "--model", str(tiny_model_dir),
                             "--port", str(port), "--log", str(log_path), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if request(f"{url}/api/stats")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer"
            time.sleep(0.2)
        # -ww: without a terminal ps cuts each line at 80 columns, before "spawn_main" on a long venv path
        children = subprocess.run(["ps", "-ww", "-o", "args=", "--ppid", str(proc.pid)], capture_output=True,
                                  text=True).stdout.splitlines()
        assert sum("spawn_main" in child for child in children) == 2, children  # the worker processes
        event = {"type": "accepted", "word": "you", "rank": 1, "via": "click"}
        counts = [request(f"{url}/api/events", {"events": [event]})[1]["accepted"] for _ in range(12)]
        assert counts == list(range(1, 13))  # each answer counts the events the other worker took too
        assert {request(f"{url}/api/stats")[1]["accepted"] for _ in range(6)} == {12}
        assert suggest((url, log_path), "good morning , how ")["suggestions"]
    finally:
        proc.terminate()  # uvicorn stops its workers and then itself
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
