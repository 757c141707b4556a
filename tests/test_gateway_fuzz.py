"""Fuzzed: schemathesis against the gateway's own /openapi.json, in front of the real services and the
ComfyUI Deploy emulator.

With a valid key, every operation gets examples generated from its schema (valid and invalid ones),
and the links between operations are followed (a new hold into GetHold, CaptureHold and ReleaseHold,
a new run into GetRun and CancelRun): no answer may be a 5xx, and every answer must match the
document (status, content type, headers and body schema). Without a key, every operation answers
401 and nothing else. Example counts are bounded so the whole run stays well under a minute.

schemathesis calls over blocking HTTP, so it runs in a worker thread while the event loop of the
test serves the gateway and the services.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Running
from tests.test_gateway import KEYS, RunningGateway, gateway_env, serve_gateway

# schemathesis's negative-mode strategies use `random` inside (its own business, not a finding).
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = 10  # per operation and generation mode
NO_KEY_EXAMPLES = 3
# 20 sequences: at 8 a single lucky GET was the only 200, and a run that missed it failed (seen once in CI).
STATEFUL_EXAMPLES = 20
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture
async def gw(stack: dict[str, Running]) -> AsyncIterator[RunningGateway]:
    # Rate limits out of the way; timeouts short, so a stuck call would show as a 504, not a hang.
    async with serve_gateway(gateway_env(stack, GATEWAY_RPC_TIMEOUT_SECONDS="10")) as running:
        yield running


def _schema(gw: RunningGateway) -> Any:
    return schemathesis.openapi.from_dict(gw.gateway.openapi)


def _run(gw: RunningGateway, test: Callable[[Any, str], None]) -> list[str]:
    """``test(operation, base_url)`` for every operation; the failures, as text."""
    base_url = f"http://127.0.0.1:{gw.port}"
    failures = []
    for result in _schema(gw).get_all_operations():
        operation = result.ok()
        try:
            test(operation, base_url)
        except Exception as exc:  # one line per failing operation; the first failure of each
            failures.append(f"{operation.method.upper()} {operation.path}: {type(exc).__name__}: {str(exc)[:1500]}")
    return failures


AUTH = {"authorization", "x-api-key"}


def _keyed(case: Any, key: str = KEYS[0]) -> dict[str, str]:
    """The case's headers with our key instead of whatever credentials were generated."""
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in AUTH}
    return {"X-API-Key": key}


def _with_key(operation: Any, base_url: str) -> None:
    params = {"token": "fuzz-token"} if operation.path == "/v1/webhooks/comfydeploy" else None
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @FUZZ
        @given(case=operation.as_strategy(generation_mode=mode))
        def one(case: Any) -> None:
            extra = {"params": params} if params else {}
            case.call_and_validate(base_url=base_url, headers=_keyed(case), checks=CHECKS, timeout=20, **extra)

        one()


def _without_key(operation: Any, base_url: str) -> None:
    @settings(FUZZ, max_examples=NO_KEY_EXAMPLES)
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    def one(case: Any) -> None:
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in AUTH}
        response = case.call(base_url=base_url, timeout=20)
        assert response.status_code == 401, (case.method, case.formatted_path, response.status_code, response.text)

    one()


async def test_fuzzing_with_a_key_finds_no_server_error_and_no_reply_off_the_schema(gw: RunningGateway) -> None:
    start = time.monotonic()
    failures = await asyncio.to_thread(_run, gw, _with_key)
    assert not failures, "\n".join(failures)
    assert time.monotonic() - start < 50


async def test_fuzzing_without_a_key_finds_only_401(gw: RunningGateway) -> None:
    failures = await asyncio.to_thread(_run, gw, _without_key)
    assert not failures, "\n".join(failures)


async def test_stateful_fuzzing_follows_the_links(gw: RunningGateway) -> None:
    base_url = f"http://127.0.0.1:{gw.port}"
    machine = _schema(gw).as_state_machine()
    followed: list[str] = []

    class Machine(machine):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            extra = {"params": {"token": "fuzz-token"}} if case.path == "/v1/webhooks/comfydeploy" else {}
            return {"base_url": base_url, "headers": _keyed(case, KEYS[1]), "timeout": 20, **extra}

        def validate_response(self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any) -> None:
            followed.append(f"{case.method} {case.path} {response.status_code}")
            case.validate_response(response, checks=CHECKS)

    def run() -> None:
        schemathesis.generation.stateful.run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=STATEFUL_EXAMPLES,
                stateful_step_count=6,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            ),
        )

    await asyncio.to_thread(run)
    # Every call carried a valid key (the webhook's fuzzed token is the one thing refused as such).
    assert not any(line.endswith(" 401") and "/webhooks/" not in line for line in followed), followed
    # Links were followed from a reply into the next call.
    assert any(" 200" in line for line in followed), followed
