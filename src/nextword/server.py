"""`nextword serve`: a web page to try the autocomplete, its JSON API, and a keystroke log.

Endpoints (all JSON, all requests validated; bad input gets a 4xx whose
``error`` names the field):

- ``GET /`` the page (``static/``: plain HTML, JS and CSS; nothing loads from the network).
- ``POST /api/suggest`` ``{history, speaker, text, k}`` -> the top-k next words, or
  completions of the word being typed: ``{suggestions, partial, start, steps, latency_ms}``.
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
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Literal, Union

import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from nextword.config import EngineParams
from nextword.engine import Engine, Session
from nextword.text import detokenize, tokenize
from nextword.vocab import BOS, EOS, SPEAKER_TAG

STATIC = Path(__file__).parent / "static"
MAX_TEXT = 2000  # characters per message
MAX_HISTORY = 200  # earlier messages per request
MAX_BODY = 2_000_000  # bytes
CACHE_SIZE = 128  # sessions; one per recent (conversation, committed words)
# Nothing but this server: the page must work offline and leak nothing.
CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"

Speaker = Literal["user", "agent"]


# ----------------------------------------------------------------------------- requests


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(Strict):
    speaker: Speaker
    text: str = Field(max_length=MAX_TEXT)


class Typing(Strict):
    history: list[Message] = Field(default_factory=list, max_length=MAX_HISTORY,
                                   description="earlier messages of the conversation, oldest first")
    speaker: Speaker
    text: str = Field(max_length=MAX_TEXT, description="the message being typed")


class SuggestRequest(Typing):
    k: int = Field(3, ge=1, le=10)
    # True from the page: the strip of someone typing letter by letter (see Session.suggest).
    typing: bool = False


class CompleteRequest(Typing):
    strategy: Literal["greedy", "sample", "temperature", "top_k", "top_p", "beam"] = "greedy"
    max_words: int = Field(20, ge=1, le=50)
    temperature: float = Field(1.0, gt=0, le=5)
    top_k: int = Field(0, ge=0, le=1000)
    top_p: float = Field(1.0, gt=0, le=1)
    beam_size: int = Field(4, ge=1, le=10)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    def engine_strategy(self) -> str:
        """``sample`` is temperature sampling, narrowed by top-p or top-k when one is given."""
        if self.strategy != "sample":
            return self.strategy
        return "top_p" if self.top_p < 1 else "top_k" if self.top_k else "temperature"


class Keystroke(Strict):
    type: Literal["keystroke"]
    latency_ms: float = Field(ge=0, le=60_000, description="keystroke to suggestions on screen, in the browser")
    server_ms: float | None = Field(None, ge=0, le=60_000, description="the server's share")


class Accepted(Strict):
    type: Literal["accepted"]
    word: str = Field(max_length=100)
    rank: int = Field(ge=1, le=10)
    via: Literal["tab", "click"]
    typed: int = Field(0, ge=0, le=100, description="letters of the word typed before accepting it")


class Ignored(Strict):
    type: Literal["ignored"]
    word: str = Field(max_length=100, description="a word finished by typing while suggestions were shown")
    suggested: bool = Field(False, description="whether it was among the suggestions shown for it")


Event = Annotated[Union[Keystroke, Accepted, Ignored], Field(discriminator="type")]


class EventsRequest(Strict):
    events: list[Event] = Field(min_length=1, max_length=500)


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


class SessionCache:
    """Engine sessions keyed by the token sequence they have read; the least recently used go first.

    A lookup finds the longest cached prefix of the sequence. Entries are
    filed under a hash chained over the tokens, so trying every prefix costs
    one pass over the sequence, not one per prefix; the stored sequence is
    compared only where a hash matches.
    """

    def __init__(self, engine: Engine, size: int = CACHE_SIZE):
        self.engine = engine
        self.size = size
        self.sessions: OrderedDict[int, tuple[tuple[str, ...], Session]] = OrderedDict()
        self.lock = threading.Lock()

    def message_head(self, speaker: str) -> list[str]:
        return ([SPEAKER_TAG[speaker]] if self.engine.speaker_tags else []) + [BOS]

    def key(self, history: list[Message], speaker: str, committed: list[str]) -> tuple[str, ...]:
        tokens: list[str] = []
        for message in history:
            tokens += self.message_head(message.speaker) + tokenize(message.text) + [EOS]
        return tuple(tokens + self.message_head(speaker) + committed)

    def session(self, key: tuple[str, ...]) -> tuple[Session, int]:
        """A session that has read ``key``, and how many tokens the model had to read for it."""
        hashes, chained = [], 0
        for token in key:
            chained = hash((chained, token))
            hashes.append(chained)
        length, found = 0, None
        with self.lock:
            for n in range(len(key), 0, -1):
                entry = self.sessions.get(hashes[n - 1])
                if entry is not None and entry[0] == key[:n]:
                    self.sessions.move_to_end(hashes[n - 1])
                    length, found = n, entry[1]
                    break
        if length == len(key):
            return found, 0
        session = copy.copy(found) if found is not None else self.engine.session()
        for token in key[length:]:
            session.feed(token)
        session.in_message = True  # keys end inside the message being typed
        with self.lock:
            self.sessions[hashes[-1]] = (key, session)
            self.sessions.move_to_end(hashes[-1])
            while len(self.sessions) > self.size:
                self.sessions.popitem(last=False)
        return session, len(key) - length


# ----------------------------------------------------------------------------- the event log


class EventLog:
    """Append-only JSONL of page events, with running totals for the stats panel."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.counts = {"accepted": 0, "ignored": 0, "keystroke": 0}
        self.latency_ms: list[float] = []
        self.server_ms: list[float] = []
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash: skip it, keep the rest
                    if isinstance(record, dict):
                        self._count(record)

    def _count(self, record: dict) -> None:
        kind = record.get("type")
        if kind not in self.counts:
            return
        if kind == "keystroke":
            try:
                latency = float(record["latency_ms"])
                server = record.get("server_ms")
                server = None if server is None else float(server)
            except (KeyError, TypeError, ValueError):
                return  # not a line this server wrote: leave it out of the totals
            self.latency_ms.append(latency)
            if server is not None:
                self.server_ms.append(server)
        self.counts[kind] += 1

    def append(self, events: list[dict]) -> None:
        now = time.time()
        records = [{"time": round(now, 3), **event} for event in events]
        lines = "".join(json.dumps(record) + "\n" for record in records)
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(lines)
            for record in records:
                self._count(record)

    def stats(self) -> dict:
        with self.lock:
            accepted, ignored = self.counts["accepted"], self.counts["ignored"]
            offered = accepted + ignored
            return {
                "accepted": accepted,
                "ignored": ignored,
                "acceptance_rate": accepted / offered if offered else None,
                "keystrokes": self.counts["keystroke"],
                "latency_ms": percentiles(self.latency_ms),
                "server_ms": percentiles(self.server_ms),
            }


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


# ----------------------------------------------------------------------------- the app


def field_name(loc: tuple) -> str:
    parts = [str(part) for part in loc[1:]] if loc and loc[0] == "body" else [str(part) for part in loc]
    return ".".join(parts) or "body"


async def validation_error(request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    for error in errors:
        if error["type"] == "json_invalid":
            reason = error.get("ctx", {}).get("error", "invalid JSON")
            return JSONResponse({"error": f"body: not valid JSON ({reason})"}, status_code=400)
    details = [{"field": field_name(error["loc"]), "message": error["msg"]} for error in errors]
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return JSONResponse({"error": message, "errors": details}, status_code=422)


def create_app(model_dir: str | Path, banned_words: str | Path | None = None,
               log_path: str | Path = "reports/keystrokes.jsonl", options: EngineParams | None = None) -> FastAPI:
    engine = Engine.load(model_dir, banned_words, options)
    cache = SessionCache(engine)
    log = EventLog(log_path)
    app = FastAPI(title="nextword", description=__doc__.split("\n")[0], docs_url=None, redoc_url=None)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def limits_and_headers(request, call_next):
        size = request.headers.get("content-length", "0")
        if not size.isdigit():
            return JSONResponse({"error": "body: bad Content-Length header"}, status_code=400)
        if int(size) > MAX_BODY:
            return JSONResponse({"error": f"body: larger than {MAX_BODY} bytes"}, status_code=413)
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Cache-Control"] = "no-store"
        return response

    def typed_session(request: Typing) -> tuple[Session, str, int, int]:
        committed, partial, start = split_typed(request.text)
        session, steps = cache.session(cache.key(request.history, request.speaker, committed))
        return session, partial, start, steps

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.post("/api/suggest")
    def suggest(request: SuggestRequest) -> dict:
        started = time.perf_counter()
        session, partial, start, steps = typed_session(request)
        suggestions = session.suggest(partial, request.k, typing=request.typing)
        return {
            "suggestions": [{"word": s.word, "probability": s.probability} for s in suggestions],
            "partial": partial,
            "start": start,
            "steps": steps,
            "latency_ms": (time.perf_counter() - started) * 1000,
        }

    @app.post("/api/complete")
    def complete(request: CompleteRequest) -> dict:
        started = time.perf_counter()
        session, partial, start, steps = typed_session(request)
        words = session.complete(request.engine_strategy(), request.max_words, request.temperature,
                                 request.top_k, request.top_p, request.beam_size, request.seed, prefix=partial)
        completion = detokenize(words)
        line = request.text[:start] if words else request.text  # the completion replaces the partial word
        if words and line and not line[-1].isspace() and completion[0].isalnum():
            line += " "
        return {
            "completion": completion,
            "words": words,
            "partial": partial,
            "line": line + completion,
            "latency_ms": (time.perf_counter() - started) * 1000,
        }

    @app.post("/api/events")
    def events(request: EventsRequest) -> dict:
        log.append([event.model_dump(exclude_none=True) for event in request.events])
        return log.stats()

    @app.get("/api/stats")
    def stats() -> dict:
        return log.stats()

    return app


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a thread of this process; yields the base URL (``port=0`` picks a free port)."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve(model_dir: str | Path, banned_words: str | Path | None = None, host: str = "127.0.0.1",
          port: int = 8000, log_path: str | Path = "reports/keystrokes.jsonl",
          options: EngineParams | None = None) -> None:
    """Run the page and API with uvicorn until interrupted."""
    import uvicorn

    app = create_app(model_dir, banned_words, log_path, options)
    print(f"nextword: http://{host}:{port}/  (model {model_dir}, log {log_path}; Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
