"""The shared bootstrap's cost: a no-op RPC through all our interceptors vs a bare grpc.aio server.

Both servers run as separate processes at the same time; rounds alternate so drift hits both alike.
"""

from __future__ import annotations

import asyncio
import signal

import grpc

from tests.support import TEST_SERVICE

from .common_load import rate, spawn

CONCURRENCY = 32
ROUND_SECONDS = 2.0
ROUNDS = 3


async def measure() -> dict[str, float]:
    servers = {mode: spawn("bench.noop_server", mode) for mode in ("bare", "full")}
    totals = dict.fromkeys(servers, 0.0)
    try:
        channels = {mode: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for mode, (_, port) in servers.items()}
        calls = {mode: ch.unary_unary(f"/{TEST_SERVICE}/Echo") for mode, ch in channels.items()}
        for mode in servers:  # warm up
            await rate(lambda m=mode: calls[m](b"x", timeout=5), CONCURRENCY, 0.5)
        for _ in range(ROUNDS):
            for mode in servers:
                totals[mode] += await rate(lambda m=mode: calls[m](b"x", timeout=5), CONCURRENCY, ROUND_SECONDS)
        for channel in channels.values():
            await channel.close()
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait(10)
    return {mode: total / ROUNDS for mode, total in totals.items()}


def main() -> None:
    result = asyncio.run(measure())
    print(f"rpc_overhead: concurrency {CONCURRENCY}, {ROUNDS} alternating rounds of {ROUND_SECONDS}s")
    print(f"  bare grpc.aio no-op RPC:          {result['bare']:9.0f} calls/s")
    print(f"  bootstrap no-op RPC (tracing, logging, errors): {result['full']:9.0f} calls/s")
    print(f"  ratio bootstrap/bare:             {result['full'] / result['bare']:9.2f}")


if __name__ == "__main__":
    main()
