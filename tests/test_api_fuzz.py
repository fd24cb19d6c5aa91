"""The API fuzzed from its own OpenAPI schema with schemathesis, against a real uvicorn on 127.0.0.1.

Every operation in ``/openapi.json`` gets requests generated from its schema,
valid and invalid, and every answer is checked: no 5xx, a status and a body
that the schema documents (the 4xx bodies included: one ``error`` line).
The server counts the requests it answered, and the test prints that count.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from nextword.server import create_app
from servers import background_server

EXAMPLES = 50  # generated requests per operation and generation mode, before the checks' own


class CountRequests:
    """A plain ASGI wrapper that counts the HTTP requests the app answers."""

    def __init__(self, app):
        self.app = app
        self.count = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.count += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def api(tiny_model_dir, tmp_path_factory):
    # The fuzzer's valid event batches must not run into the per-client allowance; that has its own test.
    log_path = tmp_path_factory.mktemp("fuzz") / "keystrokes.jsonl"
    app = CountRequests(create_app(tiny_model_dir, log_path=log_path, event_burst=10**9))
    with background_server(app) as url:
        yield url, app


def test_no_input_gets_a_5xx_and_every_answer_conforms_to_the_schema(api, capsys):
    url, counter = api
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == {
        "POST /api/suggest", "POST /api/complete", "POST /api/events", "GET /api/stats"}
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.body else [])
        for mode in modes:
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def fuzz(case):
                case.call_and_validate(base_url=url)

            fuzz()
    with capsys.disabled():
        print(f"\nschemathesis: {counter.count} requests to {len(operations)} operations, none a 5xx or off the schema")
