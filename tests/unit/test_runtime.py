"""The shared runtime: the error table on gRPC and Flight, names and keys, settings."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pyarrow.flight as flight
import pytest

from onehop import errors
from onehop.keys import prediction_keys, shard_key, validate_name
from onehop.server import GrpcServer
from onehop.settings import Settings
from protos.onehop.v1 import data_pb2


def _raise(exc: BaseException):
    async def behavior(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise exc

    return behavior


@pytest.mark.timeout(30)
async def test_error_interceptor_maps_the_table_and_hides_unexpected_text(
    settings: Settings,
) -> None:
    server = GrpcServer(settings, port=0)
    handlers = {
        "Invalid": grpc.unary_unary_rpc_method_handler(_raise(errors.InvalidArgument("bad x"))),
        "Missing": grpc.unary_unary_rpc_method_handler(_raise(errors.NotFound("no model m"))),
        "Down": grpc.unary_unary_rpc_method_handler(_raise(errors.Unavailable("cache down"))),
        "Boom": grpc.unary_unary_rpc_method_handler(_raise(RuntimeError("secret path /etc"))),
    }
    server.server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Errors", handlers),)
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            seen = {}
            for method in handlers:
                call = channel.unary_unary(f"/test.Errors/{method}")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(b"", timeout=5)
                seen[method] = (info.value.code(), info.value.details())
    finally:
        await server.stop()
    assert seen["Invalid"] == (grpc.StatusCode.INVALID_ARGUMENT, "bad x")
    assert seen["Missing"] == (grpc.StatusCode.NOT_FOUND, "no model m")
    assert seen["Down"] == (grpc.StatusCode.UNAVAILABLE, "cache down")
    code, details = seen["Boom"]
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in details and "correlation id" in details


@pytest.mark.timeout(30)
async def test_health_is_not_serving_until_ready(settings: Settings) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = GrpcServer(settings, port=0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            before = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            await server.set_serving(True)
            after = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await server.stop()
    assert before.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert after.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.timeout(30)
async def test_health_watch_and_list_answer_through_the_error_interceptor(
    settings: Settings,
) -> None:
    """grpc's aio health Watch writes with context.write (a coroutine, not an async
    generator) and List is not implemented: neither may come out as INTERNAL."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = GrpcServer(settings, port=0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            first = await watch.read()
            await server.set_serving(True)
            second = await watch.read()
            watch.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.List(health_pb2.HealthListRequest(), timeout=5)
    finally:
        await server.stop()
    assert first.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert second.status == health_pb2.HealthCheckResponse.SERVING
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Error" not in info.value.details()


async def _count_requests(requests, context: grpc.aio.ServicerContext) -> bytes:
    return str(len([request async for request in requests])).encode()


async def _echo_requests(requests, context: grpc.aio.ServicerContext):
    async for request in requests:
        yield request


def _must_be_digits(data: bytes) -> bytes:
    if not data.isdigit():
        raise ValueError("not a number")
    return data


@pytest.mark.timeout(30)
async def test_an_unreadable_message_in_a_request_stream_is_invalid_argument(
    settings: Settings,
) -> None:
    server = GrpcServer(settings, port=0)
    handlers = {
        "Count": grpc.stream_unary_rpc_method_handler(_count_requests, _must_be_digits),
        "Echo": grpc.stream_stream_rpc_method_handler(_echo_requests, _must_be_digits),
    }
    server.server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Streams", handlers),)
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            count = channel.stream_unary("/test.Streams/Count")
            echo = channel.stream_stream("/test.Streams/Echo")
            assert await count(iter([b"1", b"2"]), timeout=5) == b"2"
            assert [answer async for answer in echo(iter([b"3", b"4"]), timeout=5)] == [
                b"3",
                b"4",
            ]
            codes = []
            for call in (count(iter([b"1", b"x"]), timeout=5), echo(iter([b"x"]), timeout=5)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _finish(call)
                codes.append(info.value.code())
    finally:
        await server.stop()
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 2


async def _finish(call) -> list:  # type: ignore[no-untyped-def]
    if hasattr(call, "__aiter__"):
        return [answer async for answer in call]
    return await call


class _Failing(flight.FlightServerBase):
    def do_get(self, context, ticket):
        with errors.flight_errors():
            if ticket.ticket == b"missing":
                raise errors.NotFound("no dataset 'x'")
            if ticket.ticket == b"bad":
                raise errors.InvalidArgument("column 'y' is not numeric")
            raise KeyError("secret internals")


@pytest.mark.timeout(30)
def test_flight_errors_round_trip_without_tracebacks() -> None:
    server = _Failing("grpc+tcp://127.0.0.1:0")
    client = flight.connect(f"grpc+tcp://127.0.0.1:{server.port}")
    try:
        mapped = {}
        for ticket in (b"missing", b"bad", b"boom"):
            with pytest.raises(flight.FlightError) as info:
                client.do_get(flight.Ticket(ticket)).read_all()
            assert "Traceback" not in str(info.value)
            mapped[ticket] = errors.from_flight_error(info.value)
    finally:
        client.close()
        server.shutdown()
    assert isinstance(mapped[b"missing"], errors.NotFound)
    assert mapped[b"missing"].message == "no dataset 'x'"
    assert isinstance(mapped[b"bad"], errors.InvalidArgument)
    assert isinstance(mapped[b"boom"], errors.Internal)
    assert "secret" not in mapped[b"boom"].message


@pytest.mark.parametrize("name", ["", "/abs", "..", "a/b", "a..b", "x" * 129, "-lead", "a b"])
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="invalid dataset name"):
        validate_name("dataset", name)


def test_good_names_pass() -> None:
    assert validate_name("model", "default-risk_v2.1") == "default-risk_v2.1"


def test_prediction_keys_are_per_row_256_bit_and_carry_the_digest() -> None:
    rows = np.array([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0]], dtype=np.float64)
    keys = prediction_keys("m", "abc", rows)
    assert keys[0] == keys[1] != keys[2]
    assert all(k.startswith(b"pred/m/abc/") and len(k.rsplit(b"/", 1)[1]) == 64 for k in keys)
    assert prediction_keys("m", "abd", rows)[0] != keys[0]
    # float64 and float32 inputs of the same values share a key (canonical float32 bytes)
    assert prediction_keys("m", "abc", rows.astype(np.float32)) == keys


def test_shard_key_ignores_order_and_offset_but_not_preprocessing() -> None:
    base = data_pb2.ShardTicket(dataset="d", version=1, shard=3)
    moved = data_pb2.ShardTicket(
        dataset="d", version=1, shard=3, offset=10, epoch=2, seed=5, shuffle=True
    )
    scaled = data_pb2.ShardTicket(
        dataset="d", version=1, shard=3, preprocess=data_pb2.Preprocessing(scaling=1)
    )
    assert shard_key(base) == shard_key(moved)
    assert shard_key(base) != shard_key(scaled)


def test_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ONEHOP_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("ONEHOP_GATEWAY_HTTP_PORT", "9100")
    settings = Settings()
    assert settings.data_dir == (tmp_path / "d").resolve()
    assert settings.gateway_http_port == 9100
    monkeypatch.setenv("ONEHOP_GATEWAY_HTTP_PORT", "70000")
    with pytest.raises(ValueError):
        Settings()


def test_http_statuses_map_back_to_the_tables_errors() -> None:
    assert isinstance(errors.from_http_status(400, "bad"), errors.InvalidArgument)
    assert isinstance(errors.from_http_status(404, "gone"), errors.NotFound)
    assert isinstance(errors.from_http_status(413, "big"), errors.PayloadTooLarge)
    assert isinstance(errors.from_http_status(429, "full"), errors.ResourceExhausted)
    assert type(errors.from_http_status(429, "full")) is errors.ResourceExhausted
    assert isinstance(errors.from_http_status(503, "down"), errors.Unavailable)
    assert isinstance(errors.from_http_status(500, "boom"), errors.Internal)
    assert errors.from_http_status(404, "no model m").message == "no model m"
