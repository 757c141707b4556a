"""A tiny raw-bytes gRPC service for testing the shared bootstrap without any contract."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

import grpc

from common.bootstrap import Probe, Service
from common.errors import FailedPrecondition, FieldViolation, InvalidArgument

TEST_SERVICE = "stationthis.test.v1.TestService"


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _sleep(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Sleeps for the number of seconds in the request (ASCII), then answers b"done"."""
    await asyncio.sleep(float(request.decode() or "0"))
    return b"done"


async def _invalid(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise InvalidArgument.for_fields(
        [FieldViolation("user_id", "must not be empty"), FieldViolation("amount", "must be positive")]
    )


async def _precondition(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise FailedPrecondition("not enough points", reason="INSUFFICIENT_POINTS", metadata={"needed": "100"})


async def _crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError("secret-internal-detail at /srv/app.py line 42")


def _unimplemented(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    # What a generated servicer base class does for an RPC nobody implemented.
    context.set_code(grpc.StatusCode.UNIMPLEMENTED)
    raise NotImplementedError("Method not implemented!")


async def _stream(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
    for i in range(3):
        yield str(i).encode()
    raise FailedPrecondition("stream ended badly", reason="STREAM_BROKEN")


def make_test_service(probes: Sequence[Probe] = ()) -> Service:
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Sleep": grpc.unary_unary_rpc_method_handler(_sleep),
        "Invalid": grpc.unary_unary_rpc_method_handler(_invalid),
        "Precondition": grpc.unary_unary_rpc_method_handler(_precondition),
        "Crash": grpc.unary_unary_rpc_method_handler(_crash),
        "Unimplemented": grpc.unary_unary_rpc_method_handler(_unimplemented),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }
    return Service(
        name="test",
        domain="test.stationthis.dev",
        service_names=[TEST_SERVICE],
        register=lambda server: server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(TEST_SERVICE, handlers)]
        ),
        probes=list(probes),
    )


def rpc_details(error: grpc.aio.AioRpcError) -> tuple[Any, Any]:
    """(ErrorInfo, BadRequest or None) from a failed call's google.rpc.Status; fails without ErrorInfo."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status in the trailers: {error.code()} {error.details()}"
    info, bad = None, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
    assert info is not None, "no ErrorInfo"
    return info, bad


async def expect_failure(call: Awaitable[Any], code: grpc.StatusCode, reason: str, domain: str) -> tuple[Any, Any]:
    """Await ``call``, expecting ``code`` with ErrorInfo ``reason`` in ``domain``; return the details."""
    import pytest

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == code, f"{error.code()} {error.details()}"
    info, bad = rpc_details(error)
    assert (info.reason, info.domain) == (reason, domain), f"{info} {error.details()}"
    return info, bad
