"""`python -m bench.points_variant MODE`: the points service with its ledger cut down, to take the
ratio of bench/points apart. Benchmark code only; the product has no such switch.

The real service (same bootstrap, interceptors, servicer, validation and conversion) serves every
RPC, but ReserveHold and CaptureHold get replies recorded from one real reserve and capture made at
start-up, instead of running the ledger script:

- ``canned``: the reply comes from memory. No Redis at all: what the RPC costs without the ledger.
- ``echo``: the reply comes back through a real EVALSHA, with the same keys and arguments as the
  ledger's call and inside the same span, of a script that only reads the recorded reply from one
  key: what one Redis round trip through redis-py costs, with a script that does no work.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from common.main import run
from services.points.config import PointsConfig
from services.points.ledger import RedisLedger
from services.points.server import PointsApp, build

MODES = ("canned", "echo")
CUT = ("reserve", "capture")  # the ledger operations whose script the variants replace
USER = "bench-variant"
Run = Callable[..., Awaitable[Any]]


async def cut_down(ledger: RedisLedger, mode: str) -> None:
    """Replace the script of ReserveHold and CaptureHold; record the replies they get with one real
    reserve and capture first (the script's own answers: the ledger parses them as usual)."""
    real: Run = ledger._run
    replies: dict[str, Any] = {}
    echo = ledger.redis.register_script("return redis.call('GET', ARGV[3])")

    async def _run(user_id: str, request: dict[str, Any], rpc: str = "", request_id: str = "") -> Any:
        op = request.get("op")
        if op not in CUT or op not in replies:  # the real script (for the CUT ops: the recording)
            reply = await real(user_id, request, rpc, request_id)
            if op in CUT:
                replies[op] = reply
                await ledger.redis.set(f"bench:variant:{op}", json.dumps(reply))
            return reply
        if mode == "canned":
            return replies[op]
        # The ledger's own call, with its span, keys and arguments; only the script differs.
        keys = ledger._keys(user_id, rpc, request_id)
        args = [ledger._params(user_id), json.dumps(request), f"bench:variant:{op}"]
        return json.loads(await ledger._eval(echo, op, keys, args))

    ledger._run = _run  # type: ignore[method-assign]
    await ledger.credit(USER, uuid.uuid4().hex, "fp", qoints=10**6, reference=uuid.uuid4().hex, source="GRANT", memo="")
    reserved = await ledger.reserve(USER, uuid.uuid4().hex, "fp", run_id="", estimate=10, ttl_ms=600_000)
    await ledger.capture(USER, uuid.uuid4().hex, "fp", hold_id=reserved.hold.hold_id, cost=10)


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in MODES:
        raise SystemExit(f"usage: python -m bench.points_variant {{{'|'.join(MODES)}}}")

    async def build_variant(config: PointsConfig) -> PointsApp:
        app = await build(config)
        await cut_down(app.ledger, mode)
        return app

    run("points", PointsConfig, build_variant)


if __name__ == "__main__":
    main()
