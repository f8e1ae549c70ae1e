"""The inference router's routing logic against small scripted trainer and cache servers
(real gRPC on port 0): hit / partial / miss / bypass, hops, coalescing, bounded write-back,
and the checks it makes before anything reaches the trainer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from prometheus_client import REGISTRY

from cache_service.client import CacheClient
from gateway.router import InferenceRouter
from onehop.channels import aio_channel
from onehop.errors import InvalidArgument, NotFound, OnehopError, Unavailable
from onehop.keys import prediction_keys
from onehop.server import GrpcServer
from onehop.settings import Settings
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc, trainer_pb2, trainer_pb2_grpc

pytestmark = pytest.mark.timeout(30)

MODEL = "risk"
DIGEST = "d" * 64
N_FEATURES = 3


def expected(rows: np.ndarray) -> dict[str, np.ndarray]:
    """What the scripted model answers: a [n, 1] and a [n, 2] output."""
    rows = np.asarray(rows, dtype=np.float32)
    return {
        "probability": rows.sum(axis=1, keepdims=True),
        "extremes": np.stack([rows.min(axis=1), rows.max(axis=1)], axis=1),
    }


@dataclass
class FakeTrainer(
    trainer_pb2_grpc.TrainerServicer, grpc_service_pb2_grpc.GRPCInferenceServiceServicer
):
    digest: str = DIGEST
    returned_digest: str | None = DIGEST
    infer_calls: list[np.ndarray] = field(default_factory=list)
    get_model_calls: int = 0
    gate: asyncio.Event | None = None
    get_model_gate: asyncio.Event | None = None  # GetModel waits for it (a frozen trainer)
    get_model_error: OnehopError | None = None

    async def GetModel(self, request, context):  # noqa: N802
        self.get_model_calls += 1
        if self.get_model_gate is not None:
            await self.get_model_gate.wait()
        if self.get_model_error is not None:
            raise self.get_model_error
        if request.name != MODEL:
            raise NotFound(f"no model {request.name!r}")
        return trainer_pb2.ModelInfo(
            name=MODEL, version=request.version or 2, weights_digest=self.digest, versions=[1, 2]
        )

    async def ModelMetadata(self, request, context):  # noqa: N802
        response = pb.ModelMetadataResponse(name=MODEL, versions=["1", "2"], platform="test")
        response.inputs.add(name="input", datatype="FP32", shape=[-1, N_FEATURES])
        response.outputs.add(name="probability", datatype="FP32", shape=[-1, 1])
        response.outputs.add(name="extremes", datatype="FP32", shape=[-1, 2])
        return response

    async def ModelReady(self, request, context):  # noqa: N802
        if request.name != MODEL:
            raise NotFound(f"no model {request.name!r}")
        return pb.ModelReadyResponse(ready=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request, context):  # noqa: N802
        assert request.model_version, "the router pins the resolved version"
        rows = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(
            list(request.inputs[0].shape)
        )
        self.infer_calls.append(rows)
        if self.gate is not None:
            await self.gate.wait()
        response = pb.ModelInferResponse(model_name=MODEL, model_version=request.model_version)
        for name, array in expected(rows).items():
            response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
            response.raw_output_contents.append(array.astype("<f4").tobytes())
        if self.returned_digest:
            response.parameters["onehop-weights-digest"].string_param = self.returned_digest
        return response


@dataclass
class FakeCache(cache_pb2_grpc.CacheServicer):
    data: dict[bytes, bytes] = field(default_factory=dict)
    lookups: int = 0
    stall: asyncio.Event | None = None  # lookups wait for it (a slow cache)
    put_gate: asyncio.Event | None = None

    async def BatchGet(self, request, context):  # noqa: N802
        self.lookups += 1
        if self.stall is not None:
            await self.stall.wait()
        values = [self.data.get(key) for key in request.keys]
        return cache_pb2.BatchGetResponse(
            found=[v is not None for v in values], values=[v or b"" for v in values]
        )

    async def BatchPut(self, request, context):  # noqa: N802
        if self.put_gate is not None:
            await self.put_gate.wait()
        for entry in request.entries:
            self.data[entry.key] = entry.value
        return cache_pb2.BatchPutResponse(written=len(request.entries))


@dataclass
class Mesh:
    trainer: FakeTrainer
    cache: FakeCache
    trainer_address: str
    cache_address: str
    settings: Settings


@pytest.fixture
async def mesh(settings: Settings) -> AsyncIterator[Mesh]:
    trainer, cache = FakeTrainer(), FakeCache()
    trainer_server = GrpcServer(settings, 0)
    trainer_server.add(trainer_pb2_grpc.add_TrainerServicer_to_server, trainer, "t")
    trainer_server.add(
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, trainer, "i"
    )
    cache_server = GrpcServer(settings, 0)
    cache_server.add(cache_pb2_grpc.add_CacheServicer_to_server, cache, "c")
    await trainer_server.start()
    await cache_server.start()
    tuned = settings.model_copy(update={"model_info_ttl_seconds": 60.0})
    yield Mesh(trainer, cache, trainer_server.address, cache_server.address, tuned)
    for event in (cache.stall, cache.put_gate, trainer.gate, trainer.get_model_gate):
        if event is not None:
            event.set()
    await trainer_server.server.stop(0)
    await cache_server.server.stop(0)


@pytest.fixture
async def router(mesh: Mesh) -> AsyncIterator[InferenceRouter]:
    async with _router(mesh) as r:
        yield r


class _router:
    """A router over the fake mesh, with its channels closed afterwards."""

    def __init__(self, mesh: Mesh, cache: bool = True, **settings: object):
        self.settings = mesh.settings.model_copy(update=settings)
        self.trainer = aio_channel(mesh.trainer_address, self.settings)
        self.cache = CacheClient([mesh.cache_address], self.settings) if cache else None

    async def __aenter__(self) -> InferenceRouter:
        self.router = InferenceRouter(self.settings, self.trainer, self.cache)
        return self.router

    async def __aexit__(self, *exc: object) -> None:
        await self.router.close()
        await self.trainer.close()
        if self.cache is not None:
            await self.cache.close()


ROWS = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)


def assert_outputs(outputs: dict[str, np.ndarray], rows: np.ndarray) -> None:
    want = expected(rows)
    assert list(outputs) == list(want)
    for name, array in want.items():
        assert outputs[name].dtype == np.float32
        np.testing.assert_array_equal(outputs[name], array)


async def test_miss_then_hit_then_partial(mesh: Mesh, router: InferenceRouter) -> None:
    first = await router.infer(MODEL, "", ROWS)
    assert (first.cache, first.model_version) == ("miss", "2")
    # GetModel + ModelMetadata (first sight of these weights), cache lookup, trainer call.
    assert first.hops == 4
    assert_outputs(first.outputs, ROWS)
    assert await router.drain(5)
    assert set(mesh.cache.data) == set(prediction_keys(MODEL, DIGEST, ROWS))

    second = await router.infer(MODEL, "", ROWS)
    assert (second.cache, second.hops) == ("hit", 1)
    assert len(mesh.trainer.infer_calls) == 1
    for name in first.outputs:
        np.testing.assert_array_equal(second.outputs[name], first.outputs[name])

    mixed = np.vstack([ROWS[:1], [[10, 11, 12]], ROWS[2:]]).astype(np.float32)
    third = await router.infer(MODEL, "", mixed)
    assert (third.cache, third.hops) == ("partial", 2)
    np.testing.assert_array_equal(mesh.trainer.infer_calls[-1], [[10, 11, 12]])
    assert_outputs(third.outputs, mixed)
    assert mesh.trainer.get_model_calls == 1  # resolved once within the TTL


async def test_repeated_rows_are_computed_once(mesh: Mesh, router: InferenceRouter) -> None:
    rows = np.array([[1, 1, 1], [2, 2, 2], [1, 1, 1], [2, 2, 2], [3, 3, 3]], dtype=np.float32)
    result = await router.infer(MODEL, "", rows)
    assert result.cache == "miss"
    np.testing.assert_array_equal(mesh.trainer.infer_calls[0], rows[[0, 1, 4]])
    assert_outputs(result.outputs, rows)


async def test_no_cache_is_a_bypass(mesh: Mesh) -> None:
    async with _router(mesh, cache=False) as router:
        for _ in range(2):
            result = await router.infer(MODEL, "", ROWS)
            assert result.cache == "bypass"
            assert_outputs(result.outputs, ROWS)
        assert len(mesh.trainer.infer_calls) == 2
        assert result.hops == 1


async def test_slow_cache_is_a_bypass_and_is_not_written(
    mesh: Mesh, router: InferenceRouter
) -> None:
    mesh.cache.stall = asyncio.Event()
    result = await router.infer(MODEL, "", ROWS)
    assert result.cache == "bypass"
    assert_outputs(result.outputs, ROWS)
    assert await router.drain(5)
    assert mesh.cache.data == {}


async def test_cache_down_is_a_bypass(mesh: Mesh) -> None:
    mesh.cache_address = "127.0.0.1:1"  # nobody listens there
    async with _router(mesh) as router:
        result = await router.infer(MODEL, "", ROWS)
        assert (result.cache, result.hops) == ("bypass", 4)
        assert_outputs(result.outputs, ROWS)


async def test_concurrent_identical_misses_share_one_trainer_call(
    mesh: Mesh, router: InferenceRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    await router.infer(MODEL, "", ROWS[:1])  # resolve the model first
    mesh.trainer.gate = asyncio.Event()
    joined = asyncio.Event()
    waiting = 0
    do = router._flights.do

    async def counting(key, call, deadline):  # type: ignore[no-untyped-def]
        nonlocal waiting
        if key[0] == "infer":
            waiting += 1
            if waiting == 2:
                joined.set()
        return await do(key, call, deadline)

    monkeypatch.setattr(router._flights, "do", counting)
    batch = ROWS[1:]
    first = asyncio.create_task(router.infer(MODEL, "", batch))
    second = asyncio.create_task(router.infer(MODEL, "", batch))
    await asyncio.wait_for(joined.wait(), 10)
    mesh.trainer.gate.set()
    results = await asyncio.gather(first, second)
    assert len(mesh.trainer.infer_calls) == 2  # the warm-up and ONE shared call
    for result in results:
        assert result.cache == "miss"
        assert_outputs(result.outputs, batch)


async def test_write_backs_beyond_the_bound_are_dropped(mesh: Mesh) -> None:
    async with _router(mesh, max_pending_writebacks=1) as router:
        mesh.cache.put_gate = asyncio.Event()
        await router.infer(MODEL, "", ROWS[:1])
        await router.infer(MODEL, "", ROWS[1:2])  # first write-back still pending: dropped
        assert router.writebacks_dropped == 1
        mesh.cache.put_gate.set()
        assert await router.drain(5)
        assert set(mesh.cache.data) == set(prediction_keys(MODEL, DIGEST, ROWS[:1]))


async def test_write_back_uses_the_digest_the_trainer_returned(
    mesh: Mesh, router: InferenceRouter
) -> None:
    mesh.trainer.returned_digest = "e" * 64
    await router.infer(MODEL, "", ROWS)
    assert await router.drain(5)
    assert set(mesh.cache.data) == set(prediction_keys(MODEL, "e" * 64, ROWS))


async def test_no_digest_from_the_trainer_means_no_write_back(
    mesh: Mesh, router: InferenceRouter
) -> None:
    mesh.trainer.returned_digest = None
    result = await router.infer(MODEL, "", ROWS)
    assert result.cache == "miss"
    assert await router.drain(5)
    assert mesh.cache.data == {}


async def test_a_corrupt_cached_row_is_recomputed(mesh: Mesh, router: InferenceRouter) -> None:
    keys = prediction_keys(MODEL, DIGEST, ROWS)
    mesh.cache.data[keys[0]] = b"\x00" * 5  # wrong length for 3 float32 values
    result = await router.infer(MODEL, "", ROWS)
    assert result.cache == "miss"
    assert_outputs(result.outputs, ROWS)


@pytest.mark.parametrize(
    ("model", "version", "rows", "match"),
    [
        (MODEL, "", np.zeros((0, 3), np.float32), "empty batch"),
        (MODEL, "", np.zeros(3, np.float32), "2-D"),
        (MODEL, "", np.zeros((2, 4), np.float32), "takes 3 features.*got 4"),
        (MODEL, "", np.array([[1, np.nan, 2]], np.float32), "NaN"),
        (MODEL, "", [["a", "b", "c"]], "FP32"),
        (MODEL, "x", ROWS, "positive integer"),
        (MODEL, "0", ROWS, "positive integer"),
        ("../etc", "", ROWS, "invalid model name"),
    ],
)
async def test_bad_requests_never_reach_the_trainer(
    mesh: Mesh, router: InferenceRouter, model: str, version: str, rows: object, match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        await router.infer(model, version, rows)  # type: ignore[arg-type]
    assert mesh.trainer.infer_calls == []


async def test_unknown_model_is_not_found(router: InferenceRouter) -> None:
    with pytest.raises(NotFound, match="no model 'ghost'"):
        await router.infer("ghost", "", ROWS)
    with pytest.raises(NotFound):
        await router.model_ready("ghost", "")


async def test_trainer_down_is_unavailable(settings: Settings) -> None:
    channel = aio_channel("127.0.0.1:1", settings)
    router = InferenceRouter(settings, channel, None)
    try:
        with pytest.raises(Unavailable):
            await router.infer(MODEL, "", ROWS)
        assert await router.server_ready() is False
    finally:
        await router.close()
        await channel.close()


async def test_metadata_and_readiness_are_forwarded(router: InferenceRouter) -> None:
    metadata = await router.model_metadata(MODEL, "")
    assert [o.name for o in metadata.outputs] == ["probability", "extremes"]
    assert metadata.inputs[0].shape == (-1, N_FEATURES)
    assert await router.model_ready(MODEL, "2") is True
    assert await router.server_ready() is True


# --- expired model info (stale-while-revalidate) ---------------------------------------------


def stale_lookups() -> float:
    return REGISTRY.get_sample_value("onehop_gateway_stale_model_info_total") or 0.0


def refreshes(result: str) -> float:
    sample = "onehop_gateway_model_info_refreshes_total"
    return REGISTRY.get_sample_value(sample, {"result": result}) or 0.0


async def until(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


async def test_expired_model_info_is_served_while_one_refresh_runs(mesh: Mesh) -> None:
    """Past the TTL requests keep the info they had while ONE refresh asks the trainer; the
    weights it names then key the rows (an old cached row is never served for them)."""
    async with _router(mesh, model_info_ttl_seconds=0.0) as router:
        first = await router.infer(MODEL, "", ROWS)  # nothing known: waits for the trainer
        assert (first.cache, first.digest) == ("miss", DIGEST)
        await router.drain()
        calls = mesh.trainer.get_model_calls
        mesh.trainer.get_model_gate = asyncio.Event()  # the trainer stops answering...
        mesh.trainer.digest = "e" * 64  # ...and names new weights once it answers again
        before = stale_lookups()
        results = await asyncio.gather(*(router.infer(MODEL, "", ROWS) for _ in range(8)))
        assert {(r.cache, r.digest, r.model_version) for r in results} == {("hit", DIGEST, "2")}
        assert_outputs(results[0].outputs, ROWS)
        assert stale_lookups() - before == 8
        await until(lambda: mesh.trainer.get_model_calls > calls, "the refresh reached it")
        assert mesh.trainer.get_model_calls == calls + 1  # one refresh for all of them

        mesh.trainer.get_model_gate.set()
        await until(lambda: router.resolved(MODEL, "") == ("2", "e" * 64), "the refresh")
        again = await router.infer(MODEL, "", ROWS)
        assert (again.cache, again.digest) == ("miss", "e" * 64)


async def test_a_failed_refresh_keeps_the_stale_info_for_the_grace(mesh: Mesh) -> None:
    async with _router(mesh, model_info_ttl_seconds=0.0) as router:
        await router.infer(MODEL, "", ROWS)
        await router.drain()
        mesh.trainer.get_model_error = Unavailable("the trainer is restarting")
        failed = refreshes("failed")
        await until(
            lambda: router.resolved(MODEL, "") is not None and refreshes("failed") > failed,
            "a failed refresh",
        )
        result = await router.infer(MODEL, "", ROWS)
        assert (result.cache, result.digest) == ("hit", DIGEST)
        assert_outputs(result.outputs, ROWS)


async def test_past_the_grace_requests_wait_for_the_trainer(mesh: Mesh) -> None:
    async with _router(mesh, model_info_ttl_seconds=0.0, model_info_stale_seconds=0.0) as router:
        await router.infer(MODEL, "", ROWS)
        await router.drain()
        mesh.trainer.get_model_error = Unavailable("the trainer is restarting")
        assert router.resolved(MODEL, "") is None
        with pytest.raises(Unavailable):
            await router.infer(MODEL, "", ROWS)


async def test_a_refresh_that_finds_the_model_gone_drops_its_info(mesh: Mesh) -> None:
    async with _router(mesh, model_info_ttl_seconds=0.0) as router:
        await router.infer(MODEL, "", ROWS)
        mesh.trainer.get_model_error = NotFound(f"no model {MODEL!r}")
        await until(lambda: router.resolved(MODEL, "") is None, "the info dropped")
        with pytest.raises(NotFound):
            await router.infer(MODEL, "", ROWS)
