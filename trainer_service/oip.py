"""inference.GRPCInferenceService (Open Inference Protocol v2) over the predictor.

Tensors arrive typed (`contents.fp32_contents`) or as raw little-endian bytes
(`raw_input_contents`, what tritonclient sends); the answer comes back the same way.
ModelInfer goes through the dynamic batcher, with the caller's deadline. Every
response names the version that answered and its weights digest
(`parameters["onehop-weights-digest"]`), which the gateway puts in its cache keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import numpy as np

import onehop
from onehop.errors import FailedPrecondition, InvalidArgument, NotFound
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc
from trainer_service.inference import Batcher, Predictor, output_tensor

SERVER_NAME = "onehop-trainer"
INPUT = "input"
DIGEST_PARAMETER = "onehop-weights-digest"
PLATFORM = "pytorch"


def parse_version(version: str) -> int:
    """OIP versions are strings; ours are integers and "" means the serving version."""
    if not version:
        return 0
    if not version.isdigit():
        raise InvalidArgument(f"model version must be an integer, got {version!r}")
    return int(version)


def decode_input(request: pb.ModelInferRequest) -> tuple[np.ndarray, bool]:
    """The request's one FP32 [rows, features] tensor, and whether it came as raw bytes."""
    if len(request.inputs) != 1:
        raise InvalidArgument(
            f"expected exactly one input tensor {INPUT!r}, got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.name != INPUT:
        raise InvalidArgument(f"unexpected input {tensor.name!r}; the model takes {INPUT!r}")
    if tensor.datatype != "FP32":
        raise InvalidArgument(
            f"input {INPUT!r} must be FP32, got {tensor.datatype or 'no datatype'}"
        )
    shape = list(tensor.shape)
    if len(shape) != 2 or min(shape) < 0:
        raise InvalidArgument(f"input {INPUT!r} shape must be [rows, features], got {shape}")
    count = shape[0] * shape[1]
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise InvalidArgument(f"expected one raw_input_contents entry, got {len(raw)}")
        if len(tensor.contents.fp32_contents):
            raise InvalidArgument("send the input in contents or in raw_input_contents, not both")
        if len(raw[0]) != 4 * count:
            raise InvalidArgument(
                f"input {INPUT!r}: {len(raw[0])} bytes do not hold FP32 {shape} ({4 * count} bytes)"
            )
        # A read-only view of the request's bytes: the batcher's stacking is the one copy.
        return np.frombuffer(raw[0], dtype="<f4").reshape(shape), True
    values = tensor.contents.fp32_contents
    if len(values) != count:
        raise InvalidArgument(
            f"input {INPUT!r}: {len(values)} fp32_contents values do not fill shape {shape}"
        )
    return np.asarray(values, dtype=np.float32).reshape(shape), False


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, batcher: Batcher, ready: Callable[[], bool]):
        self._batcher = batcher
        self._predictor: Predictor = batcher.predictor
        self._registry = self._predictor.registry
        self._ready = ready

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=onehop.__version__)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        version = parse_version(request.version)
        try:
            await asyncio.to_thread(self._predictor.get, request.name, version)
        except (NotFound, FailedPrecondition, InvalidArgument):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._ready())

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return await asyncio.to_thread(self._metadata, request.name, parse_version(request.version))

    def _metadata(self, name: str, version: int) -> pb.ModelMetadataResponse:
        record = self._registry.record(name, version)
        output, width = output_tensor(record.spec)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=name,
            versions=[str(v) for v in self._registry.versions(name)],
            platform=PLATFORM,
            inputs=[tensor(name=INPUT, datatype="FP32", shape=[-1, len(record.features)])],
            outputs=[tensor(name=output, datatype="FP32", shape=[-1, width])],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        version = parse_version(request.model_version)
        x, raw = decode_input(request)
        out, model = await self._batcher.predict(
            request.model_name, version, x, context.time_remaining()
        )
        output_name, width = model.output
        for requested in request.outputs:
            if requested.name != output_name:
                raise InvalidArgument(
                    f"unknown output {requested.name!r}; the model has {output_name!r}"
                )
        served, digest = model.identity
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(served), id=request.id
        )
        response.parameters[DIGEST_PARAMETER].string_param = digest
        output = response.outputs.add(name=output_name, datatype="FP32", shape=[len(out), width])
        if raw:
            response.raw_output_contents.append(np.ascontiguousarray(out, "<f4").tobytes())
        else:
            output.contents.fp32_contents.extend(out.reshape(-1).tolist())
        return response
