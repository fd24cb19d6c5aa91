"""`nextword serve`: a web page to try the autocomplete, its JSON API, and a keystroke log.

Endpoints (all JSON, all requests validated; bad input gets a 4xx whose
``error`` names the field):

- ``GET /`` the page (``static/``: plain HTML, JS and CSS; nothing loads from the network).
- ``POST /api/suggest`` ``{history, speaker, text, k, right}`` -> the top-k next words, or
  completions of the word being typed: ``{suggestions, partial, start, steps, latency_ms}``.
  ``text`` is the message up to the cursor; ``right``, the text after it when the cursor is
  inside the message, makes them fit both sides (the engine's fill-in-the-middle).
- ``POST /api/complete`` ``{history, speaker, text, strategy, max_words, ...}`` -> ``{completion, line, ...}``.
- ``POST /api/events`` ``{events: [...]}`` appends accepted / ignored suggestions and keystroke
  latencies to a JSONL file, one line per event, and answers with the stats.
- ``GET /api/stats`` acceptance rate and keystroke latency p50/p99 over the whole log.

Why a keystroke costs no LSTM work. Every request carries the whole
conversation, so the server is stateless, but it reads it as the token
sequence the model sees (speaker tag, ``<BOS>``, words, ``<EOS>`` per earlier
message, then the tag, ``<BOS>`` and the committed words of the message being
typed) and keeps a small LRU cache of engine sessions keyed by that
sequence. The word being typed is not part of the key: another letter of
the same word finds its session and costs only a prefix lookup in the
distribution already computed (``steps`` is 0). Finishing a word finds the
session one token shorter and runs one step; sending a message and starting
the next costs the few tokens in between. Only a cold conversation is read
from the start, once. Sessions in the cache are never advanced in place: a
longer sequence starts from a copy.

Why ``/api/suggest`` is an ``async`` endpoint. Most keystrokes cost a prefix
lookup, far less than handing the request to a worker thread and back, so
they are answered on the event loop. So is a keystroke that makes the model
read a word or two: a model step is many short PyTorch calls, each of which
lets go of the GIL and must win it back from the busy event loop, so on a
worker thread its time is set by those hand-offs, not by its arithmetic.
Only reading a whole conversation into a cold session (more than
``INLINE_STEPS`` tokens) goes to a worker thread, so that it does not stall
every other keystroke, and so does a suggestion with a ``right`` context: its
rescoring is one batched pass over every candidate, a few large PyTorch calls
rather than many short ones. A session enters the cache once the model has read
it, so a cached one never makes a keystroke wait. The body limit and the
security headers are a plain ASGI middleware, and answers are serialised
with orjson, for the same reason: at hundreds of keystrokes a second the
cost of handling a request weighs as much as the suggestion.

What one client can take. Bodies are capped at ``MAX_BODY`` bytes, counted as
they arrive, so a chunked body is refused too. ``/api/events`` takes at most
``EVENT_BURST`` events at once and ``EVENTS_PER_SECOND`` after that from one
client address (429 past it). The log rotates to ``<name>.1`` past
``LOG_MAX_BYTES``, and the latency percentiles come from a bounded sample, so
neither the disk nor the memory grows with the traffic.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from functools import lru_cache
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import orjson
from fastapi import FastAPI, Request
from filelock import FileLock
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from nextword.config import EngineParams, Speaker
from nextword.decoding import STRATEGIES
from nextword.engine import Engine, Session
from nextword.errors import NextwordError
from nextword.files import write_text
from nextword.text import detokenize, tokenize
from nextword.windows import MESSAGE_END, message_head

STATIC = Path(__file__).parent / "static"
MAX_TEXT = 2000  # characters per message
MAX_HISTORY = 200  # earlier messages per request
MAX_BODY = 2_000_000  # bytes
MAX_EVENTS = 500  # per request
CACHE_SIZE = 128  # sessions; one per recent (conversation, committed words)
MESSAGE_CACHE = 4096  # earlier messages whose tokens are kept
# Tokens a keystroke may make the model read on the event loop: a word, or the end of one message and
# the start of the next, cost about one step; reading a whole conversation into a cold session goes to
# a worker thread instead.
INLINE_STEPS = 16
# The event log's bounds, so that no client can grow the disk or the memory without end.
LOG_MAX_BYTES = 10_000_000  # past this the log is renamed to <name>.1 (replacing the one before)
LATENCY_SAMPLES = 10_000  # keystroke latencies kept for the percentiles: a uniform sample of all of them
EVENTS_PER_SECOND = 20.0  # per client address, sustained: a fast typist sends about one per keystroke
EVENT_BURST = 2 * MAX_EVENTS  # per client address at once: two full requests
RATE_CLIENTS = 10_000  # client addresses whose allowance is remembered; the least recent are forgotten
# Nothing but this server: the page must work offline and leak nothing.
CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
HEADERS = [(b"content-security-policy", CSP.encode()), (b"cache-control", b"no-store")]

# ----------------------------------------------------------------------------- requests


class Strict(BaseModel):
    # No coercion (true for an integer, "3" for a number): what is accepted is what the schema documents.
    model_config = ConfigDict(extra="forbid", strict=True)


def json_integer(value):
    """A JSON number with no fractional part, 3.0 as well as 3 (JSON Schema's integer); not true, not "3"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def integer(ge: int, le: int):
    """The type of an integer field in [ge, le], as JSON numbers are read (:func:`json_integer`)."""
    return Annotated[int, Field(strict=False, ge=ge, le=le), BeforeValidator(json_integer)]


class Message(Strict):
    speaker: Speaker
    text: str = Field(max_length=MAX_TEXT)


class Typing(Strict):
    history: list[Message] = Field(default_factory=list, max_length=MAX_HISTORY,
                                   description="earlier messages of the conversation, oldest first")
    speaker: Speaker
    text: str = Field(max_length=MAX_TEXT, description="the message being typed")


class SuggestRequest(Typing):
    k: integer(1, 10) | None = Field(None, description="how many (default: the model folder's engine.suggestions)")
    # True from the page: the strip of someone typing letter by letter (see Session.suggest).
    typing: bool = False
    right: str = Field("", max_length=MAX_TEXT,
                       description="the message after the cursor, when the cursor is inside it (text is before it)")


class CompleteRequest(Typing):
    strategy: Literal[STRATEGIES] = "greedy"
    max_words: integer(1, 50) = 20
    # Lower is greedy in all but name, and dividing log-probabilities by it could overflow.
    temperature: float = Field(1.0, ge=0.01, le=5)
    top_k: integer(0, 1000) = 0
    top_p: float = Field(1.0, gt=0, le=1)
    beam_size: integer(1, 10) = 4
    seed: integer(0, 2**32 - 1) = 0


class Keystroke(Strict):
    type: Literal["keystroke"]
    latency_ms: float = Field(ge=0, le=60_000, description="keystroke to suggestions on screen, in the browser")
    server_ms: float | None = Field(None, ge=0, le=60_000, description="the server's share")


class Accepted(Strict):
    type: Literal["accepted"]
    word: str = Field(max_length=100)
    rank: integer(1, 10)
    via: Literal["tab", "click"]
    typed: integer(0, 100) = Field(0, description="letters of the word typed before accepting it")


class Ignored(Strict):
    type: Literal["ignored"]
    word: str = Field(max_length=100, description="a word finished by typing while suggestions were shown")
    suggested: bool = Field(False, description="whether it was among the suggestions shown for it")


Event = Annotated[Union[Keystroke, Accepted, Ignored], Field(discriminator="type")]


class EventsRequest(Strict):
    events: list[Event] = Field(min_length=1, max_length=MAX_EVENTS)


# ----------------------------------------------------------------------------- responses
# The endpoints answer with ready-made JSON, so these models document the answers in the schema
# without validating each one; tests/test_api_fuzz.py checks that the answers conform.


class SuggestionOut(BaseModel):
    word: str
    probability: float


class SuggestResponse(BaseModel):
    suggestions: list[SuggestionOut]
    partial: str = Field(description="the word being typed, lowercased")
    start: int = Field(description="where it starts in text")
    steps: int = Field(description="tokens the model read for this request")
    latency_ms: float


class CompleteResponse(BaseModel):
    completion: str
    words: list[str]
    partial: str
    line: str = Field(description="text with the completion in place of the partial word")
    latency_ms: float


class Percentiles(BaseModel):
    p50: float | None
    p99: float | None


class StatsResponse(BaseModel):
    accepted: int
    ignored: int
    acceptance_rate: float | None
    keystrokes: int
    latency_ms: Percentiles
    server_ms: Percentiles


class ErrorResponse(BaseModel):
    error: str = Field(description="one line that names the field or the limit")


class FieldError(BaseModel):
    field: str
    message: str


class ValidationErrorResponse(ErrorResponse):
    errors: list[FieldError]


BODY_ERRORS = {
    400: {"model": ErrorResponse, "description": "the body is not JSON"},
    413: {"model": ErrorResponse, "description": f"the body is larger than {MAX_BODY} bytes"},
    422: {"model": ValidationErrorResponse, "description": "a field is missing or out of range"},
}


def json_response(content, status_code: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(content), status_code, headers, media_type="application/json")


def error_response(status_code: int, message: str, headers: dict | None = None) -> Response:
    return json_response({"error": message}, status_code, headers)


# ----------------------------------------------------------------------------- typing state


def split_typed(text: str) -> tuple[list[str], str, int]:
    """(committed tokens, partial word, where it starts) for a message being typed.

    The partial word is the run of letters, digits and apostrophes at the very
    end of the text (a trailing apostrophe stays, so ``it'`` still finds
    ``it's``); everything before it is committed. The page's ``partialStart``
    applies the same rule to know what an accepted suggestion replaces.
    """
    start = len(text)
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "'"):
        start -= 1
    while start < len(text) and text[start] == "'":
        start += 1
    return tokenize(text[:start]), text[start:].lower(), start


@lru_cache(maxsize=MESSAGE_CACHE)
def earlier_tokens(text: str) -> tuple[str, ...]:
    """The tokens of an earlier message; every request repeats the conversation, so each is tokenized once."""
    return tuple(tokenize(text))


class SessionCache:
    """Engine sessions keyed by the token sequence they have read; the least recently used go first.

    A lookup finds the longest cached prefix of the sequence. Most keystrokes
    find their whole sequence, one dictionary lookup. Otherwise every prefix
    is tried: entries are also filed under a hash chained over their tokens,
    so that costs one pass over the sequence, not one per prefix, and the
    stored sequence is compared only where a hash matches.
    """

    def __init__(self, engine: Engine, size: int = CACHE_SIZE):
        self.engine = engine
        self.size = size
        self.sessions: OrderedDict[tuple[str, ...], tuple[int, Session]] = OrderedDict()  # key -> (chained, session)
        self.by_chained: dict[int, tuple[str, ...]] = {}
        self.lock = threading.Lock()

    def key(self, history: list[Message], speaker: str, committed: list[str]) -> tuple[str, ...]:
        tags = self.engine.speaker_tags
        tokens: list[str] = []
        for message in history:
            tokens += message_head(message.speaker, tags)
            tokens += earlier_tokens(message.text)
            tokens.append(MESSAGE_END)
        return (*tokens, *message_head(speaker, tags), *committed)

    def lookup(self, key: tuple[str, ...]) -> tuple[Session | None, int, int]:
        """The cached session of the longest prefix of ``key`` (or None), its length, and ``key``'s chained hash."""
        with self.lock:
            entry = self.sessions.get(key)
            if entry is not None:
                self.sessions.move_to_end(key)
                return entry[1], len(key), entry[0]
        hashes, chained = [], 0
        for token in key:
            chained = hash((chained, token))
            hashes.append(chained)
        with self.lock:
            for n in range(len(key) - 1, 0, -1):
                prefix = self.by_chained.get(hashes[n - 1])
                if prefix is not None and len(prefix) == n and prefix == key[:n]:
                    self.sessions.move_to_end(prefix)
                    return self.sessions[prefix][1], n, hashes[-1]
        return None, 0, hashes[-1]

    def extend(self, key: tuple[str, ...], found: Session | None, length: int, chained: int) -> Session:
        """A session that has read ``key``, from ``found``, which has read its first ``length`` tokens."""
        if found is not None and length == len(key):
            return found
        session = copy.copy(found) if found is not None else self.engine.session()
        for token in key[length:]:
            session.feed(token)
        session.in_message = True  # keys end inside the message being typed
        session.log_probs  # the model reads the tokens now, so that a cached session never makes a keystroke wait
        with self.lock:
            self.sessions[key] = (chained, session)
            self.sessions.move_to_end(key)
            self.by_chained[chained] = key
            while len(self.sessions) > self.size:
                old, (old_chained, _) = self.sessions.popitem(last=False)
                if self.by_chained.get(old_chained) == old:  # not taken over by a key with the same hash
                    del self.by_chained[old_chained]
        return session

    def session(self, key: tuple[str, ...]) -> tuple[Session, int]:
        """A session that has read ``key``, and how many tokens the model had to read for it."""
        found, length, chained = self.lookup(key)
        return self.extend(key, found, length, chained), len(key) - length


# ----------------------------------------------------------------------------- the event log


class Reservoir:
    """A uniform random sample of at most ``size`` values of a stream of any length (Vitter's algorithm R)."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.values: list[float] = []
        self.seen = 0
        self.random = random.Random(seed)

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            slot = self.random.randrange(self.seen)
            if slot < self.size:
                self.values[slot] = value


class EventLog:
    """Append-only JSONL of page events, with running totals for the stats panel.

    Bounded on disk and in memory. When an append would take the file past
    ``max_bytes`` it is renamed to ``<name>.1`` (replacing the one before) and
    a new file starts with a ``totals`` line that carries the counts so far,
    so the totals stay whole across rotations and restarts. Counts are
    counters; the latency percentiles come from a uniform sample of at most
    ``samples`` keystrokes.

    The file is the record, and the totals are read from it. Each worker
    process of ``nextword serve --workers N`` has its own log object on the
    same file: it appends under a lock file (``<name>.lock``) and, before it
    answers, reads what the other workers appended since it last looked, in
    file order. So every worker counts the same lines in the same order and
    draws the same sample, and ``/api/stats`` gives the same answer whichever
    worker serves it. A restart reads both files again, oldest first.
    """

    def __init__(self, path: str | Path, max_bytes: int = LOG_MAX_BYTES, samples: int = LATENCY_SAMPLES):
        self.path = Path(path)
        self.rotated = self.path.with_name(self.path.name + ".1")
        self.max_bytes = max_bytes
        self.lock = threading.Lock()  # threads of this process
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file_lock = FileLock(str(self.path) + ".lock")  # processes writing the same log
        self.counts = {"accepted": 0, "ignored": 0, "keystroke": 0}
        self.latency_ms = Reservoir(samples, seed=0)
        self.server_ms = Reservoir(samples, seed=1)
        self.inode: int | None = None  # the file read so far, and how far
        self.offset = 0
        self._stats: dict | None = None  # computed once per change, not once per request
        with self.lock, self.file_lock:
            if self.rotated.exists():
                self._read(self.rotated, 0)  # oldest first: the current file's totals line takes over its counts
                if not self.path.exists():
                    self._start_file()  # a crash came between the rename and the new file: finish that rotation
            self._catch_up()

    def _read(self, path: Path, offset: int) -> int:
        """Count the lines of ``path`` from byte ``offset`` on; the offset of its end."""
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        for line in data.splitlines():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a line cut short by a crash: skip it, keep the rest
            if isinstance(record, dict):
                self._count(record)
        if data:
            self._stats = None
        return offset + len(data)

    def _catch_up(self) -> None:
        """Read what was appended to the log since the last call (by any process), under both locks."""
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            return
        if inode != self.inode:  # another worker rotated: finish the old file (now .1), then read the new one
            if self.inode is not None and self.rotated.exists() and os.stat(self.rotated).st_ino == self.inode:
                self._read(self.rotated, self.offset)
            self.inode, self.offset = inode, 0
        self.offset = self._read(self.path, self.offset)

    def _count(self, record: dict) -> None:
        kind = record.get("type")
        if kind == "totals":
            try:
                self.counts = {name: max(0, int(record.get(name, 0))) for name in self.counts}
            except (TypeError, ValueError, OverflowError):
                pass  # not a line this server wrote
            return
        if kind not in self.counts:
            return
        if kind == "keystroke":
            try:
                latency = float(record["latency_ms"])
                server = record.get("server_ms")
                server = None if server is None else float(server)
            except (KeyError, TypeError, ValueError):
                return  # not a line this server wrote: leave it out of the totals
            self.latency_ms.add(latency)
            if server is not None:
                self.server_ms.add(server)
        self.counts[kind] += 1

    def append(self, events: list[dict]) -> None:
        records = [{"time": round(time.time(), 3), **event} for event in events]
        data = "".join(json.dumps(record) + "\n" for record in records).encode()
        with self.lock, self.file_lock:
            self._catch_up()
            if self.offset and self.offset + len(data) > self.max_bytes:
                os.replace(self.path, self.rotated)
                self._start_file()
            with open(self.path, "ab") as f:
                f.write(data)
            self._catch_up()  # counts the lines just written, as the other workers will

    def _start_file(self) -> None:
        """A new log file whose first line carries the totals so far (written whole, then renamed into place)."""
        totals = json.dumps({"time": round(time.time(), 3), "type": "totals", **self.counts}) + "\n"
        write_text(self.path, totals)

    def stats(self) -> dict:
        with self.lock:
            with self.file_lock:
                self._catch_up()
            if self._stats is None:
                accepted, ignored = self.counts["accepted"], self.counts["ignored"]
                offered = accepted + ignored
                self._stats = {
                    "accepted": accepted,
                    "ignored": ignored,
                    "acceptance_rate": accepted / offered if offered else None,
                    "keystrokes": self.counts["keystroke"],
                    "latency_ms": percentiles(self.latency_ms.values),
                    "server_ms": percentiles(self.server_ms.values),
                }
            return self._stats


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


class RateLimit:
    """A token bucket per client address: ``burst`` at once, then ``rate`` per second.

    Only the ``clients`` most recent addresses are remembered, so the table
    is bounded too; a forgotten address starts again with a full bucket.
    """

    def __init__(self, rate: float, burst: float, clients: int = RATE_CLIENTS):
        self.rate, self.burst, self.clients = rate, burst, clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, when)
        self.lock = threading.Lock()

    def take(self, client: str, n: int) -> float:
        """Take ``n`` (at most ``burst``) from ``client``'s bucket: 0 if they were there, else the seconds to wait."""
        now = time.monotonic()
        with self.lock:
            tokens, then = self.buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            wait = 0.0 if n <= tokens else (n - tokens) / self.rate
            if not wait:
                tokens -= n
            self.buckets[client] = (tokens, now)
            while len(self.buckets) > self.clients:
                self.buckets.popitem(last=False)
        return wait


# ----------------------------------------------------------------------------- the app


class LimitsAndHeaders:
    """Refuses bodies over ``max_body`` bytes and adds the security headers: a plain ASGI middleware.

    A Content-Length over the limit is refused before the body is read. A
    body without one (``Transfer-Encoding: chunked``) is counted as it
    arrives and refused as soon as it passes the limit; that 413 closes the
    connection, so the rest is never read. Starlette's ``BaseHTTPMiddleware``
    (``@app.middleware("http")``) would run every request in a task of its
    own behind a stream; this costs a function call.
    """

    def __init__(self, app, max_body: int = MAX_BODY):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *HEADERS]
            await send(message)

        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await error_response(400, "body: bad Content-Length header")(scope, receive, send_with_headers)
                    return
                if int(value) > self.max_body:
                    too_large = self.too_large()
                    await error_response(413, too_large.detail, too_large.headers)(scope, receive, send_with_headers)
                    return
        received = 0

        async def receive_counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise self.too_large()  # answered by http_error, in the app's exception middleware
            return message

        await self.app(scope, receive_counted, send_with_headers)

    def too_large(self) -> HTTPException:
        return HTTPException(413, f"body: larger than {self.max_body} bytes", headers={"Connection": "close"})


def field_name(loc: tuple) -> str:
    parts = [str(part) for part in loc[1:]] if loc and loc[0] == "body" else [str(part) for part in loc]
    return ".".join(parts) or "body"


async def validation_error(request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    for error in errors:
        if error["type"] == "json_invalid":
            reason = error.get("ctx", {}).get("error", "invalid JSON")
            return error_response(400, f"body: not valid JSON ({reason})")
    details = [{"field": field_name(error["loc"]), "message": error["msg"]} for error in errors]
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return json_response({"error": message, "errors": details}, 422)


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Every other 4xx (an unknown path, a wrong method, a body too large) as one ``error`` line too."""
    message = str(exc.detail)
    if message == HTTPStatus(exc.status_code).phrase:
        message = f"{request.method} {request.url.path}: {message.lower()}"
    return error_response(exc.status_code, message, exc.headers)


def create_app(model_dir: str | Path, banned_words: str | Path | None = None,
               log_path: str | Path = "reports/keystrokes.jsonl", options: EngineParams | None = None, *,
               overrides: dict | None = None, log_max_bytes: int = LOG_MAX_BYTES,
               latency_samples: int = LATENCY_SAMPLES, events_per_second: float = EVENTS_PER_SECOND,
               event_burst: int = EVENT_BURST) -> FastAPI:
    """The page and the API over a servable model folder.

    The engine runs with the folder's settings (``engine.json``), or ``options``
    in their place, changed by ``overrides`` (the command line's flags) and
    ``banned_words``. The keyword arguments after them bound the event log and
    what one client may send to it.
    """
    if event_burst < MAX_EVENTS:
        raise ValueError(f"event_burst must be at least {MAX_EVENTS}, the events one request may carry")
    if banned_words:
        overrides = {**(overrides or {}), "banned_words": str(banned_words)}
    engine = Engine.load(model_dir, options, overrides)
    cache = SessionCache(engine)
    log = EventLog(log_path, log_max_bytes, latency_samples)
    event_limit = RateLimit(events_per_second, event_burst)
    app = FastAPI(title="nextword", description=__doc__.split("\n")[0], docs_url=None, redoc_url=None)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(LimitsAndHeaders, max_body=MAX_BODY)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def typed_session(request: Typing) -> tuple[Session, str, int, int]:
        committed, partial, start = split_typed(request.text)
        session, steps = cache.session(cache.key(request.history, request.speaker, committed))
        return session, partial, start, steps

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.post("/api/suggest", response_model=SuggestResponse, responses=BODY_ERRORS)
    async def suggest(request: SuggestRequest) -> Response:
        started = time.perf_counter()
        committed, partial, start = split_typed(request.text)
        key = cache.key(request.history, request.speaker, committed)
        found, length, chained = cache.lookup(key)
        steps = len(key) - length
        if steps > INLINE_STEPS:
            session = await run_in_threadpool(cache.extend, key, found, length, chained)
        else:
            session = cache.extend(key, found, length, chained)
        k = request.k or engine.options.suggestions
        if request.right.strip():
            suggestions = await run_in_threadpool(session.suggest, partial, k, request.typing, None, request.right)
        else:
            suggestions = session.suggest(partial, k, typing=request.typing)
        return json_response({
            "suggestions": [{"word": s.word, "probability": s.probability} for s in suggestions],
            "partial": partial,
            "start": start,
            "steps": steps,
            "latency_ms": (time.perf_counter() - started) * 1000,
        })

    @app.post("/api/complete", response_model=CompleteResponse, responses=BODY_ERRORS)
    def complete(request: CompleteRequest) -> Response:
        started = time.perf_counter()
        session, partial, start, steps = typed_session(request)
        words = session.complete(request.strategy, request.max_words, request.temperature,
                                 request.top_k, request.top_p, request.beam_size, request.seed, prefix=partial)
        completion = detokenize(words)
        line = request.text[:start] if words else request.text  # the completion replaces the partial word
        if words and line and not line[-1].isspace() and completion[0].isalnum():
            line += " "
        return json_response({
            "completion": completion,
            "words": words,
            "partial": partial,
            "line": line + completion,
            "latency_ms": (time.perf_counter() - started) * 1000,
        })

    rate_limited = {"model": ErrorResponse, "description": "more events than this client may send now"}

    @app.post("/api/events", response_model=StatsResponse, responses={**BODY_ERRORS, 429: rate_limited})
    def events(request: EventsRequest, http: Request) -> Response:
        wait = event_limit.take(http.client.host if http.client else "", len(request.events))
        if wait:
            retry = math.ceil(wait)
            return error_response(429, f"events: over this client's limit of {events_per_second:g} a second "
                                       f"({event_burst} at once); retry in {retry} s", {"Retry-After": str(retry)})
        log.append([event.model_dump(exclude_none=True) for event in request.events])
        return json_response(log.stats())

    @app.get("/api/stats", response_model=StatsResponse)
    async def stats() -> Response:
        return json_response(log.stats())

    return app


def serve(model_dir: str | Path, banned_words: str | Path | None = None, host: str = "127.0.0.1",
          port: int = 8000, log_path: str | Path = "reports/keystrokes.jsonl",
          options: EngineParams | None = None, *, overrides: dict | None = None, workers: int = 1) -> None:
    """Run the page and API with uvicorn until interrupted.

    ``workers`` processes answer on the same port, each with its own engine
    and session cache; they share the event log (:class:`EventLog`). One
    worker keeps one core busy at most: give it as many as the cores it may
    use. Each worker listens on a socket of its own with ``SO_REUSEPORT``, so
    the kernel spreads new connections evenly over them (uvicorn's own
    ``--workers`` share one socket, and a busy worker can take nearly every
    connection while the others idle). A connection stays with its worker.
    """
    import uvicorn

    settings = {"model_dir": str(model_dir), "banned_words": None if banned_words is None else str(banned_words),
                "log_path": str(log_path), "options": None if options is None else options.model_dump(),
                "overrides": overrides}
    # Load it here first: a folder that cannot be served is one line now, not a worker dying.
    app = app_from_settings(settings)
    print(f"nextword: http://{host}:{port}/  (model {model_dir}, log {log_path}, "
          f"{workers} worker{'s' if workers > 1 else ''}; Ctrl-C stops)", flush=True)
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
        return
    del app
    context = multiprocessing.get_context("spawn")  # a fork of a process that has run torch is not safe
    processes = [context.Process(target=worker, args=(settings, host, port), name=f"nextword-worker-{n}")
                 for n in range(workers)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the workers too, as Ctrl-C does
    try:
        for process in processes:
            process.start()
        multiprocessing.connection.wait([process.sentinel for process in processes])
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()  # uvicorn finishes the requests in flight, then exits
        for process in processes:
            process.join()
    failed = [process.exitcode for process in processes if process.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        raise NextwordError(f"a worker stopped with status {failed[0]}")


def app_from_settings(settings: dict) -> FastAPI:
    options = settings["options"]
    app = create_app(settings["model_dir"], settings["banned_words"], settings["log_path"],
                     None if options is None else EngineParams(**options), overrides=settings["overrides"])
    # What is loaded by now (the libraries, the model, its vocabulary and n-gram) lives as long as the
    # server: frozen, the garbage collector's full passes skip it instead of stalling every request in
    # flight while they walk it.
    gc.freeze()
    return app


def worker(settings: dict, host: str, port: int) -> None:
    """One worker process of ``serve(workers=N)``: its own socket on the shared port, its own app."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        print(f"error: {host}:{port}: {err.strerror}", file=sys.stderr)
        sys.exit(2)
    app = app_from_settings(settings)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
