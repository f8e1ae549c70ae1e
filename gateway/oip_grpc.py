"""inference.GRPCInferenceService at the gateway: a thin edge over the InferenceRouter.

Domain errors propagate; the server's ErrorInterceptor maps them to status codes.
"""

from __future__ import annotations

import time

import grpc

import onehop
from gateway import tensors
from gateway.memo import MAX_REQUEST_BYTES, Answer
from gateway.router import InferenceRouter
from onehop.errors import DeadlineExceeded
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc

SERVER_NAME = "onehop"
_PREBUILT_HIT = (("onehop-cache", "hit"), ("onehop-hops", "0"))
EXTENSIONS = ("binary_tensor_data",)


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, router: InferenceRouter):
        self.router = router

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.router.server_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=await self.router.model_ready(request.name, request.version)
        )

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=onehop.__version__, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        metadata = await self.router.model_metadata(request.name, request.version)
        return tensors.metadata_to_grpc(metadata)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        weights = self.router.resolved(request.model_name, request.model_version)
        key = None
        if weights is not None:
            data = request.SerializeToString()
            if len(data) <= MAX_REQUEST_BYTES:
                key = ("grpc", weights, data)
                answer = self.router.answers.get(key)
                if answer is not None:
                    self.router.count_prebuilt_hit(answer.rows, time.perf_counter() - started)
                    context.set_trailing_metadata(_PREBUILT_HIT)
                    return answer.body  # type: ignore[no-any-return]

        self.router.admission.check()
        parsed = tensors.grpc_to_request(request)
        # The tighter of the call's gRPC deadline and the request's own `timeout` parameter.
        limits = [t for t in (context.time_remaining(), parsed.timeout) if t is not None]
        remaining = min(limits) if limits else None
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before it could be served")
        result = await self.router.infer(parsed.model, parsed.version, parsed.rows, remaining)
        response = tensors.grpc_response(parsed, result.model_version, result.outputs)
        context.set_trailing_metadata(
            (("onehop-cache", result.cache), ("onehop-hops", str(result.hops)))
        )
        # Kept and sent again as is: nobody may change it after this.
        self.router.answers.keep_if_hit(
            key,
            weights,
            result,
            lambda: Answer(response, len(parsed.rows), len(data) + response.ByteSize()),
        )
        return response
