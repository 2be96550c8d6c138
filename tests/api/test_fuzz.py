"""Property-based fuzzing of our own OpenAPI schema with schemathesis: no 500s, server healthy after.

`make test` runs a short pass (a few examples per operation); the long run:
    SOFTSERVE_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/api/test_fuzz.py -m slow -p no:cacheprovider
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.support.live_server import LiveServer, tiny_model_dir  # noqa: E402

pytestmark = pytest.mark.process  # a live server subprocess

EXAMPLES = int(os.environ.get("SOFTSERVE_FUZZ_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tokenizer):
    model_dir = tiny_model_dir(tmp_path_factory, tokenizer)
    # Small limits keep each fuzzed generation short: max_tokens is capped, contexts are short.
    with LiveServer(tmp_path_factory.mktemp("fuzz-store"), model=model_dir, max_model_len=128,
                    extra_args=["--max-tokens-limit", "8", "--request-timeout", "30"]) as server:
        yield server


def _operations(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return schema


def test_fuzz_api_no_server_errors(fuzz_server):
    from schemathesis.checks import not_a_server_error

    schema = _operations(fuzz_server)
    failures = []
    ran = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run_operation(case):
            response = case.call(base_url=fuzz_server.url, timeout=60)
            case.validate_response(response, checks=[not_a_server_error])

        test = operation.as_strategy()
        from hypothesis import given

        try:
            given(test)(run_operation)()
            ran += 1
        except Exception as exc:  # collect all failing operations, then report
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:500]}")
    assert ran > 5
    assert not failures, "\n".join(failures)
    with fuzz_server.client() as c:
        assert c.get("/ready").status_code == 200
