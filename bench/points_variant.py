"""`python -m bench.points_variant MODE`: the points service with its ledger cut down or changed, to
take the ratio of bench/points apart. Benchmark code only; the product has no such switch.

The real service (same bootstrap, interceptors, servicer, validation and conversion) serves every
RPC, but ReserveHold and CaptureHold get replies recorded from one real reserve and capture made at
start-up, instead of running the ledger script:

- ``canned``: the reply comes from memory. No Redis at all: what the RPC costs without the ledger.
- ``echo``: the reply comes back through a real EVALSHA, with the same keys and arguments as the
  ledger's call and inside the same span, of a script that only reads the recorded reply from one
  key: what one Redis round trip through redis-py costs, with a script that does no work.

And two that are not cut down:

- ``glide``: the real ledger, with each script call made through valkey-glide (a client with a Rust
  core and automatic pipelining) instead of redis-py, inside the same span (docs/decisions/0011).
  Needs valkey-glide installed; the product does not use it.
- ``span``: no service. Prints, as JSON, the CPU that the ledger's span adds to one script call,
  in this process set up for tracing as the service is, under a sampled parent span.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from common.main import run
from services.points.config import PointsConfig
from services.points.ledger import RedisLedger
from services.points.server import PointsApp, build

MODES = ("canned", "echo", "glide", "span")
SPAN_CALLS = 20_000
CUT = ("reserve", "capture")  # the ledger operations whose script the variants replace
USER = "bench-variant"
Run = Callable[..., Awaitable[Any]]


async def cut_down(ledger: RedisLedger, mode: str) -> None:
    """Replace the script of ReserveHold and CaptureHold; record the replies they get with one real
    reserve and capture first (the script's own answers: the ledger parses them as usual)."""
    real: Run = ledger._run
    replies: dict[str, Any] = {}
    echo = ledger.redis.register_script("return redis.call('GET', ARGV[#ARGV])")

    async def _run(
        op: str,
        user_id: str,
        keys: Sequence[str] = (),
        args: Sequence[str | int] = (),
        request_id: str = "",
        fp: str = "",
    ) -> Any:
        if op not in CUT or op not in replies:  # the real script (for the CUT ops: the recording)
            reply = await real(op, user_id, keys, args, request_id, fp)
            if op in CUT:
                replies[op] = reply
                await ledger.redis.set(f"bench:variant:{op}", json.dumps(reply, separators=(",", ":")))
            return reply
        if mode == "canned":
            return replies[op]
        # The ledger's own call, with its span, keys and arguments; only the script differs.
        arguments = [*ledger._args(op, user_id, request_id, fp, args), f"bench:variant:{op}"]
        return json.loads(await ledger._eval(echo, op, ledger._keys(user_id, keys), arguments))

    ledger._run = _run  # type: ignore[method-assign]
    await ledger.credit(USER, uuid.uuid4().hex, "fp", qoints=10**6, reference=uuid.uuid4().hex, source="GRANT", memo="")
    reserved = await ledger.reserve(USER, uuid.uuid4().hex, "fp", run_id="", estimate=10, ttl_ms=600_000)
    await ledger.capture(USER, uuid.uuid4().hex, "fp", hold_id=reserved.hold.hold_id, cost=10)


async def use_glide(ledger: RedisLedger) -> None:
    """Make every script call of the ledger through valkey-glide, inside the ledger's own span."""
    glide: Any = importlib.import_module("glide")
    connection = ledger.redis.connection_pool.connection_kwargs
    address = glide.NodeAddress(connection.get("host", "127.0.0.1"), int(connection.get("port", 6379)))
    client = await glide.GlideClient.create(glide.GlideClientConfiguration([address], request_timeout=2000))

    class GlideScript:
        def __init__(self, text: str) -> None:
            self.script = glide.Script(text)

        def __call__(self, keys: Sequence[str], args: Sequence[str | int]) -> Awaitable[Any]:
            return client.invoke_script(self.script, keys=list(keys), args=[str(arg) for arg in args])

    for group, script in list(ledger._scripts.items()):
        ledger._scripts[group] = GlideScript(script.script)  # type: ignore[assignment]


def span_cost() -> None:
    """Print {"span_us", "bare_us", "calls"}: CPU per ledger script call with and without its span
    (the span's share: the difference), the script call itself an awaitable that is already done."""
    from opentelemetry import trace

    from common import redis_client, telemetry

    telemetry.setup("stationthis-points", {})  # as the service: a TracerProvider, no exporter
    ledger = RedisLedger(redis_client.connect("redis://127.0.0.1:1/0"))  # never connects

    async def done(keys: Sequence[str], args: Sequence[str | int]) -> bytes:
        return b"{}"

    async def timed(with_span: bool) -> float:
        keys, args = ledger._keys("bench", ["k4", "k5"]), ledger._args("reserve", "bench", "rid", "fp", ["h", "", 10])
        started = time.process_time()
        for _ in range(SPAN_CALLS):
            if with_span:
                await ledger._eval(done, "reserve", keys, args)
            else:
                await ledger._unavailable_guard(done(keys, args))
        return (time.process_time() - started) / SPAN_CALLS * 1e6

    async def measure() -> dict[str, float]:
        tracer = trace.get_tracer("bench")
        with tracer.start_as_current_span("rpc", kind=trace.SpanKind.SERVER):  # sampled, as a traced RPC
            bare = min([await timed(False) for _ in range(3)])
            spanned = min([await timed(True) for _ in range(3)])
        return {"span_us": spanned - bare, "bare_us": bare, "calls": SPAN_CALLS}

    print(json.dumps(asyncio.run(measure())))


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in MODES:
        raise SystemExit(f"usage: python -m bench.points_variant {{{'|'.join(MODES)}}}")
    if mode == "span":
        span_cost()
        return

    async def build_variant(config: PointsConfig) -> PointsApp:
        app = await build(config)
        if mode == "glide":
            await use_glide(app.ledger)
        else:
            await cut_down(app.ledger, mode)
        return app

    run("points", PointsConfig, build_variant)


if __name__ == "__main__":
    main()
