"""The training-run API fuzzed from its own OpenAPI document (schemathesis): whatever the
body, path or headers, it answers with a client error or success, never a server error."""

from __future__ import annotations

import tempfile

import schemathesis
from hypothesis import settings

from exporter.app import create_app
from exporter.config import parse_settings

STATE = f"sqlite:///{tempfile.mkdtemp(prefix='mlmon-api-fuzz-')}/state.sqlite"
app = create_app(parse_settings({"stores": {}, "models": [], "state": {"url": STATE}}))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=60, deadline=None)
def test_no_server_error(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.text[:300])
