"""Schema-driven fuzzing of the HTTP API (schemathesis) against a real server on loopback.

Every operation of `/api/v1/openapi.json` gets generated requests (valid and invalid query
parameters, path parameters, multipart bodies) with a valid access token. Checks: no 5xx,
every status code is declared for its operation, bodies match the declared schemas, the
content type and declared headers match, and a request without credentials is refused.
Deterministic (derandomized) and bounded, so CI time stays small.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import auth, process_env, running_server

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    ignored_auth,
]
# 40 in CI; a longer run: API_FUZZ_EXAMPLES=500 pytest tests/test_api_fuzz.py
EXAMPLES_PER_OPERATION = int(os.environ.get("API_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def server(tiny_model: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("api-fuzz")
    env = {
        **process_env(tiny_model, shared_cache, folder / "data"),
        "ADMIN_API_KEY": "admin-key-for-the-fuzz-test",
        "MODEL_POLL_INTERVAL_S": "0",
        "ACCESS_LOG": "false",
    }
    with running_server(env, folder / "server.log") as base_url:
        yield base_url


def _app_schema() -> dict:
    """The OpenAPI document, built from the app as the server builds it (admin routes on)."""
    from rottenbot_inference.app import create_app
    from rottenbot_inference.settings import Settings

    settings = Settings(_env_file=None, admin_api_key="admin-key-for-the-fuzz-test")
    return create_app(settings).openapi()


schema = schemathesis.openapi.from_dict(_app_schema())


def test_served_schema_is_the_one_fuzzed(server: str) -> None:
    served = httpx.get(f"{server}/api/v1/openapi.json").json()
    assert served == schema.raw_schema


@schema.parametrize()
@FUZZ
def test_api_conforms_to_its_schema(server: str, case: schemathesis.Case) -> None:
    # A user token on every call (the admin route only ever sees a wrong credential).
    case.call_and_validate(base_url=server, headers=auth(), checks=CHECKS, timeout=60)


def _statuses(server: str, path: str, method: str, mode: GenerationMode) -> Counter[int]:
    """Status codes of generated requests for one operation (its own derandomized run)."""
    seen: Counter[int] = Counter()

    @given(case=schema[path][method].as_strategy(generation_mode=mode))
    @FUZZ
    def run(case: schemathesis.Case) -> None:
        seen[case.call(base_url=server, headers=auth(), timeout=60).status_code] += 1

    run()
    print(f"{method} {path} ({mode.value}): {dict(sorted(seen.items()))}")
    return seen


def test_fuzzing_reaches_the_handlers(server: str) -> None:
    """Generated uploads reach the image decoder (400), not only validation (422), and
    generated uids reach the lookup (404). Self-contained: it generates its own requests, so
    it means the same whether it runs alone, first or last."""
    predict = "/api/v1/inference/predict"
    assert _statuses(server, predict, "POST", GenerationMode.POSITIVE)[400] > 0
    assert _statuses(server, predict, "POST", GenerationMode.NEGATIVE)[422] > 0
    lookup = "/api/v1/inference/predictions/{uid}"
    assert _statuses(server, lookup, "GET", GenerationMode.POSITIVE)[404] > 0
