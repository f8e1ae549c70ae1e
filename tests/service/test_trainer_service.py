"""The trainer in-process on port 0: training over a real shard service, then OIP inference;
and two trainer processes, one training and one serving, sharing a registry directory."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import onehop
from onehop.channels import aio_channel, flight_location
from onehop.settings import Settings
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc
from protos.onehop.v1 import data_pb2, trainer_pb2, trainer_pb2_grpc
from trainer_service.model import ModelSpec, Preprocessing
from trainer_service.registry import Registry
from trainer_service.server import start
from trainer_service.training import build_model

pytestmark = pytest.mark.timeout(60)

FEATURES = ["income", "debt", "age"]


def loans(rows: int = 400, seed: int = 0) -> pa.Table:
    """Raw features on very different scales; the label is a linear rule over them."""
    rng = np.random.default_rng(seed)
    income = rng.normal(50_000, 12_000, rows)
    debt = rng.normal(10_000, 4_000, rows)
    age = rng.integers(18, 90, rows)
    score = (income - 50_000) / 12_000 - (debt - 10_000) / 4_000 + (age - 54) / 21
    return pa.table(
        {
            "id": pa.array(np.arange(rows), pa.int64()),
            "income": income,
            "debt": pa.array(debt, pa.float32()),
            "age": pa.array(age, pa.int32()),
            "city": pa.array(rng.choice(["paris", "lima"], rows)),
            "default": pa.array((score > 0).astype(np.int8)),
        }
    )


def ingest(address: str, name: str, table: pa.Table) -> data_pb2.DatasetInfo:
    """Flight DoPut with the stock client, as any Arrow user would."""
    with flight.connect(flight_location(address)) as client:
        writer, results = client.do_put(flight.FlightDescriptor.for_path(name), table.schema)
        with writer:
            writer.write_table(table, max_chunksize=100)
            writer.done_writing()
            metadata = results.read()
    return data_pb2.DatasetInfo.FromString(metadata.to_pybytes())


@pytest.fixture
async def mesh(settings: Settings) -> AsyncIterator[Settings]:
    """A shard service and a trainer that reads from it (no cache: every read is origin)."""
    from shard_service.server import start as start_shard

    shard = await start_shard(settings.model_copy(update={"default_shards": 4}))
    trainer_settings = settings.model_copy(update={"shard_address": shard.endpoints["flight"]})
    trainer = await start(trainer_settings)
    try:
        yield trainer_settings.model_copy(update={"trainer_address": trainer.endpoints["grpc"]})
    finally:
        await trainer.stop()
        await shard.stop()


@pytest.fixture
async def trainer(settings: Settings) -> AsyncIterator[Settings]:
    """A trainer alone (no shard service): registry, OIP and job bookkeeping."""
    running = await start(settings.model_copy(update={"trainer_registry_refresh_seconds": 0.2}))
    try:
        yield settings.model_copy(update={"trainer_address": running.endpoints["grpc"]})
    finally:
        await running.stop()


def infer_request(x: np.ndarray, raw: bool, model: str = "risk") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="r1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return request


def probabilities(response: pb.ModelInferResponse, name: str = "probability") -> np.ndarray:
    (output,) = response.outputs
    assert output.name == name and output.datatype == "FP32"
    if response.raw_output_contents:
        values = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    else:
        values = np.asarray(output.contents.fp32_contents, dtype=np.float32)
    return values.reshape(list(output.shape))


async def test_train_over_the_data_plane_then_infer(mesh: Settings) -> None:
    table = loans()
    info = await asyncio.to_thread(ingest, mesh.shard_address, "loans", table)
    assert info.rows == 400

    async with aio_channel(mesh.trainer_address, mesh) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        trainer = trainer_pb2_grpc.TrainerStub(channel)
        job = await trainer.StartJob(
            trainer_pb2.StartJobRequest(
                dataset="loans",
                target="default",
                model_name="risk",
                features=FEATURES,
                hyperparameters=trainer_pb2.Hyperparameters(epochs=4, lr=1e-2),
            ),
            timeout=10,
        )
        updates = [
            status
            async for status in trainer.WatchJob(
                trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=30
            )
        ]
        final = updates[-1]
        assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.message
        assert final.model_version == 1 and final.epoch == final.epochs == 4
        assert final.step == final.total_steps > 0
        assert final.metrics["accuracy"] > 0.8 and final.metrics["auc"] > 0.9
        assert 0.0 <= final.data_wait_share <= 1.0 and final.samples_per_second > 0
        assert final.cpu_seconds > 0 and final.gpu_seconds == 0 and final.device == "cpu"
        assert final.bytes_read > 0 and [h.epoch for h in final.history] == [1, 2, 3, 4]

        model = await trainer.GetModel(trainer_pb2.GetModelRequest(name="risk"), timeout=5)
        assert list(model.features) == FEATURES and model.versions == [1]
        assert model.dataset == "loans" and model.dataset_version == info.version
        assert len(model.weights_digest) == 64

        oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        meta = await oip.ModelMetadata(pb.ModelMetadataRequest(name="risk"), timeout=5)
        assert meta.versions == ["1"] and meta.platform == "pytorch"
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("input", "FP32", [-1, 3])
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
            ("probability", "FP32", [-1, 1])
        ]

        # RAW feature values: the model standardises them with its stored statistics.
        x = np.column_stack([table.column(f).to_numpy() for f in FEATURES]).astype(np.float32)
        typed = await oip.ModelInfer(infer_request(x, raw=False), timeout=10)
        raw = await oip.ModelInfer(infer_request(x, raw=True), timeout=10)
        assert typed.model_version == raw.model_version == "1" and typed.id == "r1"
        digest = typed.parameters["onehop-weights-digest"].string_param
        assert digest == model.weights_digest
        assert not typed.raw_output_contents and len(raw.raw_output_contents) == 1
        p_typed, p_raw = probabilities(typed), probabilities(raw)
        assert p_typed.shape == (400, 1)
        np.testing.assert_array_equal(p_typed, p_raw)
        labels = table.column("default").to_numpy()
        assert ((p_raw[:, 0] >= 0.5) == (labels == 1)).mean() > 0.8

        with pytest.raises(grpc.aio.AioRpcError) as wrong_shape:
            await oip.ModelInfer(infer_request(x[:4, :2], raw=True), timeout=5)
        assert wrong_shape.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected [-1, 3] got [4, 2]" in wrong_shape.value.details()

        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await oip.ModelInfer(infer_request(x[:1], raw=True, model="nope"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        with pytest.raises(grpc.aio.AioRpcError) as bad_column:
            await trainer.StartJob(
                trainer_pb2.StartJobRequest(
                    dataset="loans", target="default", model_name="risk", features=["nope"]
                ),
                timeout=10,
            )
        assert bad_column.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "features" in bad_column.value.details()

        with pytest.raises(grpc.aio.AioRpcError) as no_dataset:
            await trainer.StartJob(
                trainer_pb2.StartJobRequest(dataset="ghost", target="default", model_name="r"),
                timeout=10,
            )
        assert no_dataset.value.code() == grpc.StatusCode.NOT_FOUND


def register(settings: Settings, name: str, seed: int) -> str:
    """A model straight into the trainer's registry, as a finished job would leave it."""
    registry = Registry(settings.service_dir("trainer") / "registry")
    pre = Preprocessing(("a", "b"), (1.0, -2.0), (2.0, 0.5))
    model = build_model(ModelSpec.resolve([8]), pre, seed)
    return registry.register(name, model, target="y").weights_digest


async def test_oip_surface_and_errors_without_a_data_plane(trainer: Settings) -> None:
    first = register(trainer, "risk", seed=0)
    async with aio_channel(trainer.trainer_address, trainer) as channel:
        oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert (await oip.ServerLive(pb.ServerLiveRequest(), timeout=5)).live
        assert (await oip.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
        server = await oip.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
        assert (server.name, server.version) == ("onehop-trainer", onehop.__version__)
        assert (await oip.ModelReady(pb.ModelReadyRequest(name="risk"), timeout=5)).ready
        assert not (await oip.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=5)).ready

        x = np.array([[1.0, -2.0], [3.0, 0.0]], np.float32)
        reply = await oip.ModelInfer(infer_request(x, raw=True), timeout=5)
        assert reply.parameters["onehop-weights-digest"].string_param == first
        # A version another writer registers serves by the next re-scan, with its digest;
        # asked for by number, at once.
        second = register(trainer, "risk", seed=1)
        explicit = infer_request(x, raw=True)
        explicit.model_version = "2"
        assert (await oip.ModelInfer(explicit, timeout=5)).model_version == "2"
        reply = await answering(oip, infer_request(x, raw=True), "2")
        assert reply.model_version == "2"
        assert reply.parameters["onehop-weights-digest"].string_param == second
        pinned = infer_request(x, raw=False)
        pinned.model_version = "1"
        assert (await oip.ModelInfer(pinned, timeout=5)).model_version == "1"

        registry = Registry(trainer.service_dir("trainer") / "registry")
        expected = registry.load_model(registry.record("risk", 2), torch.device("cpu"))
        with torch.inference_mode():
            direct = torch.sigmoid(expected(torch.from_numpy(x))).numpy()
        np.testing.assert_array_equal(probabilities(reply), direct)

        bad = infer_request(x, raw=True)
        bad.raw_input_contents[0] = bad.raw_input_contents[0][:-4]
        for request, words in [
            (bad, "bytes do not hold"),
            (pb.ModelInferRequest(model_name="risk"), "exactly one input"),
            (pb.ModelInferRequest(model_name="risk", model_version="x"), "integer"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await oip.ModelInfer(request, timeout=5)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in error.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await oip.ModelMetadata(pb.ModelMetadataRequest(name="risk", version="7"), timeout=5)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND

        trainer_stub = trainer_pb2_grpc.TrainerStub(channel)
        listed = await trainer_stub.ListModels(trainer_pb2.ListModelsRequest(), timeout=5)
        assert [(m.name, m.version, list(m.versions)) for m in listed.models] == [
            ("risk", 2, [1, 2])
        ]
        assert listed.models[0].spec.hidden == [8] and listed.models[0].spec.dropout == 0.5
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await trainer_stub.StartJob(
                trainer_pb2.StartJobRequest(
                    dataset="loans",
                    target="y",
                    model_name="risk",
                    hyperparameters=trainer_pb2.Hyperparameters(epochs=5000),
                ),
                timeout=5,
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hyperparameters.epochs" in error.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in trainer_stub.WatchJob(trainer_pb2.WatchJobRequest(job_id="x")):
                pass
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await trainer_stub.GetJob(trainer_pb2.GetJobRequest(job_id="x"), timeout=5)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_serve_replica_batches_promotes_and_refuses_jobs(settings: Settings) -> None:
    register(settings, "risk", seed=0)
    second = register(settings, "risk", seed=1)
    serve = settings.model_copy(
        update={"trainer_role": "serve", "trainer_max_queue_delay_ms": 20.0}
    )
    running = await start(serve)
    try:
        async with aio_channel(running.endpoints["grpc"], serve) as channel:
            oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            # Loaded and warmed before the server said SERVING.
            assert (await oip.ModelReady(pb.ModelReadyRequest(name="risk"), timeout=5)).ready
            rows = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
            replies = await asyncio.gather(
                *(
                    oip.ModelInfer(infer_request(rows[i : i + 1], raw=True), timeout=10)
                    for i in range(64)
                )
            )
            assert {r.parameters["onehop-weights-digest"].string_param for r in replies} == {second}
            registry = Registry(serve.service_dir("trainer") / "registry")
            expected = registry.load_model(registry.record("risk", 2), torch.device("cpu"))
            with torch.inference_mode():
                direct = torch.sigmoid(expected(torch.from_numpy(rows))).numpy()
            batched = np.concatenate([probabilities(r) for r in replies])
            np.testing.assert_allclose(batched, direct, rtol=1e-5, atol=1e-6)

            # Other tasks name their output by what it holds, at the width of the task.
            for name, spec, output in (
                ("price", ModelSpec.resolve([8], task="regression"), ("prediction", 1)),
                ("kind", ModelSpec.resolve([8], task="multiclass", classes=3), ("probability", 3)),
            ):
                pre = Preprocessing(("a", "b"), (1.0, -2.0), (2.0, 0.5), 100.0, 10.0)
                registry.register(name, build_model(spec, pre, 0), target="y")
                meta = await oip.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=5)
                assert [(t.name, list(t.shape)) for t in meta.outputs] == [
                    (output[0], [-1, output[1]])
                ]
                reply = await oip.ModelInfer(
                    infer_request(rows[:2], raw=True, model=name), timeout=5
                )
                assert probabilities(reply, output[0]).shape == (2, output[1])

            trainer = trainer_pb2_grpc.TrainerStub(channel)
            info = await trainer.PromoteModel(
                trainer_pb2.PromoteModelRequest(name="risk", version=1, pin=True), timeout=5
            )
            assert (info.serving_version, info.pinned) == (1, True)
            reply = await oip.ModelInfer(infer_request(rows[:1], raw=True), timeout=5)
            assert reply.model_version == "1"

            with pytest.raises(grpc.aio.AioRpcError) as error:
                await trainer.StartJob(
                    trainer_pb2.StartJobRequest(dataset="d", target="y", model_name="m"), timeout=5
                )
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "only serves" in error.value.details()
    finally:
        await running.stop()


ROOT = Path(__file__).resolve().parents[2]


def trainer_process(data_dir: Path, role: str, **env: str) -> subprocess.Popen:
    """`python -m trainer_service --role ROLE` on port 0, settings from ONEHOP_* variables."""
    variables = {f"ONEHOP_{key.upper()}": value for key, value in env.items()}
    return subprocess.Popen(
        [sys.executable, "-m", "trainer_service", "--role", role],
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "ONEHOP_DATA_DIR": str(data_dir),
            "ONEHOP_LOG_LEVEL": "WARNING",
            **variables,
        },
    )


def address_of(child: subprocess.Popen, data_dir: Path, timeout: float = 60.0) -> str:
    """The gRPC address the child announces once it is SERVING (its run file)."""
    path = data_dir / "run" / "trainer.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.poll() is None, f"the trainer exited with {child.returncode}"
        if path.exists():
            return str(json.loads(path.read_text())["endpoints"]["grpc"])
        time.sleep(0.05)
    raise AssertionError(f"no trainer announced itself in {data_dir}")


@pytest.fixture
def shared_registry(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two data directories whose trainer/registry is one directory, as a shared volume
    mounted into a training pod and a serving pod."""
    shared = tmp_path / "shared-registry"
    shared.mkdir()
    dirs = (tmp_path / "train-pod", tmp_path / "serve-pod")
    for data_dir in dirs:
        (data_dir / "trainer").mkdir(parents=True)
        (data_dir / "trainer" / "registry").symlink_to(shared, target_is_directory=True)
    yield dirs


async def answering(
    oip: grpc_service_pb2_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, want: str
) -> pb.ModelInferResponse:
    """Infer until the replica answers with version `want` (it re-reads the registry on an
    interval), or 30 s passed; the last answer."""
    deadline = time.monotonic() + 30
    while True:
        reply = await oip.ModelInfer(request, timeout=10)
        if reply.model_version == want or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.05)


async def answering_version(oip: grpc_service_pb2_grpc.GRPCInferenceServiceStub, want: str) -> str:
    rows = np.random.default_rng(1).normal(size=(1, len(FEATURES))).astype(np.float32)
    return (await answering(oip, infer_request(rows, raw=True), want)).model_version


@pytest.mark.timeout(120)
async def test_a_serve_process_follows_what_a_train_process_registers_and_promotes(
    settings: Settings, shared_registry: tuple[Path, Path]
) -> None:
    from shard_service.server import start as start_shard

    shard = await start_shard(settings.model_copy(update={"default_shards": 2}))
    train_dir, serve_dir = shared_registry
    children = [
        trainer_process(train_dir, "train", shard_address=shard.endpoints["flight"]),
        trainer_process(serve_dir, "serve", trainer_registry_refresh_seconds="0.2"),
    ]
    try:
        await asyncio.to_thread(ingest, shard.endpoints["flight"], "loans", loans())
        train_address, serve_address = await asyncio.gather(
            asyncio.to_thread(address_of, children[0], train_dir),
            asyncio.to_thread(address_of, children[1], serve_dir),
        )
        async with (
            aio_channel(train_address, settings) as train_channel,
            aio_channel(serve_address, settings) as serve_channel,
        ):
            trainer = trainer_pb2_grpc.TrainerStub(train_channel)
            oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(serve_channel)
            ready = await oip.ModelReady(pb.ModelReadyRequest(name="risk"), timeout=5)
            assert not ready.ready  # nothing registered yet

            async def train(seed: int) -> int:
                job = await trainer.StartJob(
                    trainer_pb2.StartJobRequest(
                        dataset="loans",
                        target="default",
                        model_name="risk",
                        features=FEATURES,
                        hyperparameters=trainer_pb2.Hyperparameters(epochs=1, seed=seed),
                    ),
                    timeout=10,
                )
                *_, final = [
                    status
                    async for status in trainer.WatchJob(
                        trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=60
                    )
                ]
                assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.message
                return int(final.model_version)

            # A model the serve replica has never seen: found on its first request.
            assert await train(seed=1) == 1
            assert (await oip.ModelReady(pb.ModelReadyRequest(name="risk"), timeout=5)).ready
            assert await answering_version(oip, "1") == "1"
            # A newer version, promoted by the other process, replaces it without a restart.
            assert await train(seed=2) == 2
            assert await answering_version(oip, "2") == "2"
            await trainer.PromoteModel(
                trainer_pb2.PromoteModelRequest(name="risk", version=1, pin=True), timeout=5
            )
            assert await answering_version(oip, "1") == "1"
            # The answer is version 1's own weights, whole (digest-checked on load).
            registry = Registry(serve_dir / "trainer" / "registry", clean_up=False)
            reply = await oip.ModelInfer(
                infer_request(np.zeros((1, 3), np.float32), raw=True), timeout=5
            )
            digest = reply.parameters["onehop-weights-digest"].string_param
            assert digest == registry.record("risk", 1).weights_digest
            assert all(child.poll() is None for child in children)  # neither restarted
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
        await shard.stop()
