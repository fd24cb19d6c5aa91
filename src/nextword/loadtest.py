"""``make loadtest``: the web API under 32 people typing at once, printed as one JSON object.

The real server (``nextword serve --workers N``, uvicorn; one worker by
default) runs in a subprocess on a free port of 127.0.0.1 with a model
folder. One worker, because the clients run on the same machine: on two
cores, a second worker competes with them and with the first for the CPUs
(``--workers 2`` measures it; docs/results.md has both). ``--concurrency`` clients, each one
keep-alive HTTP/1.1 connection in one asyncio process, then type chitchat
conversations (from the pinned ``chitchat_dataset`` package; see
:func:`conversations` for the few left out) as the web page does: every
message letter by letter, each keystroke a ``POST /api/suggest`` with the
conversation so far, the text typed, ``k`` 3 and ``typing: true``, and the
next message starts when one is sent. So the server's session cache sees
what it sees from real pages: most keystrokes land inside a word (a cache
hit, no model step), a space or a new message costs model steps. A client
sends its next keystroke as soon as the answer to the last one arrives (no
think time), so the server is saturated.

Each client joins its first conversation at a random message, as a server
in service finds people in the middle of their conversations. Its first
keystroke reads that conversation into the server's cache (a cold session,
once per conversation); those ``warmup_requests`` are sent before the clock
starts and are not in the figures, so the run measures people typing, not
the server's start.

The run stops after ``--requests`` answers or ``--max-seconds``, whichever
comes first. The figures:

* ``requests_per_second``: answers received over the wall time of the run;
* ``p50_ms``, ``p99_ms``: time from sending a request to its full answer;
* ``errors``: answers other than 200, and broken connections;
* ``model_step_share``: answers whose ``steps`` was not 0 (the cache missed
  the committed words and the model ran).

The client is written lean (raw asyncio streams, no HTTP library) because it
shares the machine's CPUs with the server; ``client`` in the JSON says so.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson

from nextword.cli import DEFAULT_MODEL
from nextword.errors import NextwordError, exit_on_error
from nextword.server import MAX_HISTORY

HOST = "127.0.0.1"
K = 3  # suggestions per keystroke, as the page asks
START_TIMEOUT = 120  # seconds for the server to load the model and answer


def conversations() -> list[list[tuple[str, str]]]:
    """The chitchat conversations of at most ``MAX_HISTORY`` messages, as lists of (speaker, text), in order.

    Past ``MAX_HISTORY`` messages the page sends the last ``MAX_HISTORY``, so
    each message sent moves the window's start and the server reads the whole
    window again (a cold session): a cost of that window, not of typing,
    which a few clients in such conversations would make the whole figure.
    """
    from nextword.chitchat import chitchat_messages

    messages = chitchat_messages()
    grouped = (list(zip(group.speaker, group.text)) for _, group in messages.groupby("conversation_id", sort=False))
    return [conversation for conversation in grouped if len(conversation) <= MAX_HISTORY]


def keystrokes(all_conversations: list, rng: random.Random) -> Iterator[bytes]:
    """Suggest request bodies of one person typing random conversations, keystroke by keystroke, forever.

    The first conversation is joined at a random message, the ones after it from the start.
    """
    first = True
    while True:
        conversation = all_conversations[rng.randrange(len(all_conversations))]
        joined = rng.randrange(len(conversation)) if first else 0
        first = False
        history = [{"speaker": speaker, "text": text} for speaker, text in conversation[:joined]]
        for speaker, text in conversation[joined:]:
            for end in range(len(text) + 1):
                yield orjson.dumps({"history": history, "speaker": speaker, "text": text[:end], "k": K,
                                    "typing": True})
            history.append({"speaker": speaker, "text": text})


def uvicorn_parts() -> str:
    """The HTTP parser and event loop uvicorn picks in this environment (it prefers the C ones when installed)."""
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"the {parser} parser and the {loop} loop"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, host: str, port: int, log_path: Path, workers: int, stderr) -> subprocess.Popen:
    command = [sys.executable, "-m", "nextword.cli", "serve", "--model", str(model_dir), "--host", host,
               "--port", str(port), "--log", str(log_path), "--workers", str(workers)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)


def wait_until_up(proc: subprocess.Popen, url: str, stderr_path: Path) -> None:
    """Poll ``/api/stats`` until it answers; a server that exits or never answers is a one-line error."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = stderr_path.read_text(errors="replace").strip().splitlines()
            raise NextwordError(f"the server exited: {lines[-1] if lines else f'status {proc.returncode}'}")
        try:
            with urllib.request.urlopen(f"{url}/api/stats", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise NextwordError(f"the server did not answer within {START_TIMEOUT} s")


class Client:
    """One keep-alive HTTP/1.1 connection that sends one request at a time."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None
        self.head = (f"POST /api/suggest HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise ConnectionError("an answer without Content-Length")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run_clients(host: str, port: int, all_conversations: list, concurrency: int, requests: int,
                      max_seconds: float, seed: int) -> dict:
    """Each client's first keystroke untimed (it reads the conversation joined), then the timed run."""
    deadline = time.perf_counter() + max_seconds
    clients = [Client(host, port) for _ in range(concurrency)]
    people = [keystrokes(all_conversations, random.Random(seed * 1_000_003 + n)) for n in range(concurrency)]
    latencies: list[float] = []
    counts = {"errors": 0, "model_steps": 0, "sent": 0}

    async def exchange(client: Client, body: bytes) -> tuple[int, bytes] | None:
        try:
            return await client.post(body)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            client.close()
            return None

    async def person(client: Client, bodies: Iterator[bytes]) -> None:
        while counts["sent"] < requests and time.perf_counter() < deadline:
            counts["sent"] += 1
            started = time.perf_counter()
            answer = await exchange(client, next(bodies))
            if answer is None:
                counts["errors"] += 1
                continue
            latencies.append(time.perf_counter() - started)
            if answer[0] != 200:
                counts["errors"] += 1
            elif orjson.loads(answer[1])["steps"]:
                counts["model_steps"] += 1

    try:
        joined = await asyncio.gather(*(exchange(c, next(p)) for c, p in zip(clients, people)))
        warmup_errors = sum(answer is None or answer[0] != 200 for answer in joined)
        started = time.perf_counter()
        await asyncio.gather(*(person(c, p) for c, p in zip(clients, people)))
        seconds = time.perf_counter() - started
    finally:
        for client in clients:
            client.close()
    answered = len(latencies)
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000 if latencies else (float("nan"), float("nan"))
    return {
        "requests": counts["sent"],
        "answered": answered,
        "errors": counts["errors"] + warmup_errors,
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "requests_per_second": round(answered / seconds, 1) if seconds else None,
        "p50_ms": round(float(p50), 2),
        "p99_ms": round(float(p99), 2),
        "model_step_share": round(counts["model_steps"] / answered, 3) if answered else None,
        "warmup_requests": concurrency,
        "stopped_by": "time limit" if counts["sent"] < requests else "request count",
    }


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nextword.loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder (default {DEFAULT_MODEL})")
    parser.add_argument("--requests", type=int, default=2000, help="suggest requests in all (default 2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients typing at once (default 32)")
    parser.add_argument("--max-seconds", type=float, default=60, help="stop sending after this (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="which conversations each client types")
    parser.add_argument("--workers", type=int, default=1, help="server processes (nextword serve --workers; default 1)")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise NextwordError(f"{model_dir}: no such model folder; run `make repro` first (or pass --model)")
    if args.requests < 1 or args.concurrency < 1 or args.max_seconds <= 0 or args.workers < 1:
        raise NextwordError("--requests, --concurrency, --max-seconds and --workers must be positive")
    all_conversations = conversations()
    port = free_port(HOST)
    with tempfile.TemporaryDirectory(prefix="nextword-loadtest-") as tmp:
        stderr_path = Path(tmp) / "server.err"
        with open(stderr_path, "wb") as stderr:
            proc = start_server(model_dir, HOST, port, Path(tmp) / "keystrokes.jsonl", args.workers, stderr)
            try:
                wait_until_up(proc, f"http://{HOST}:{port}", stderr_path)
                report = asyncio.run(run_clients(HOST, port, all_conversations, args.concurrency,
                                                 args.requests, args.max_seconds, args.seed))
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    report = {
        **report,
        "model": str(model_dir),
        "server": f"nextword serve --workers {args.workers} in a subprocess on {HOST}: uvicorn with {uvicorn_parts()}",
        "client": f"one asyncio process on the same machine, {args.concurrency} keep-alive HTTP/1.1 "
                  f"connections, sharing its {os.cpu_count()} CPUs with the server",
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
