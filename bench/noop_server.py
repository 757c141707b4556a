"""A no-op Echo RPC served either bare (plain grpc.aio) or through the full shared bootstrap.

python -m bench.noop_server bare|full   -> prints "PORT <n>" and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc

from common.bootstrap import GrpcServer
from common.config import ServerConfig
from tests.support import TEST_SERVICE, make_test_service


async def main(mode: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if mode == "full":
        from common import logs, telemetry

        logs.configure("bench", "INFO")
        telemetry.setup("stationthis-bench", {})
        full = GrpcServer(make_test_service(), ServerConfig())
        port = await full.start("127.0.0.1:0")
        print(f"PORT {port}", flush=True)
        await stop.wait()
        await full.stop(0)
    else:
        bare = grpc.aio.server()

        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request

        bare.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(TEST_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})]
        )
        port = bare.add_insecure_port("127.0.0.1:0")
        await bare.start()
        print(f"PORT {port}", flush=True)
        await stop.wait()
        await bare.stop(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
