"""OIP v2 REST (`/v2/...`) at the gateway, with Triton's binary-tensor extension, so
`tritonclient.http` works with its default options. A thin edge over the InferenceRouter:
domain errors propagate to the app's OnehopError handler."""

from __future__ import annotations

import time
import zlib
from typing import Any

from fastapi import APIRouter, Request, Response

import onehop
from gateway import tensors
from gateway.memo import MAX_REQUEST_BYTES, Answer
from gateway.oip_grpc import EXTENSIONS, SERVER_NAME
from gateway.router import InferenceRouter
from gateway.tensors import HEADER_LENGTH
from onehop.errors import InvalidArgument, PayloadTooLarge, Unavailable

# The infer body for /docs: OIP JSON; with the binary-tensor extension the JSON header is
# followed by raw tensor bytes and its length is in Inference-Header-Content-Length.
_TENSOR: dict[str, Any] = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "example": "input"},
        "datatype": {"type": "string", "example": "FP32"},
        "shape": {"type": "array", "items": {"type": "integer"}, "example": [1, 3]},
        "data": {"type": "array", "items": {}, "example": [0.1, 0.2, 0.3]},
        "parameters": {"type": "object"},
    },
}
_INFER_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": _TENSOR},
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "parameters": {"type": "object"},
                            },
                        },
                    },
                },
            }
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
_INFER_PARAMETERS: list[dict[str, Any]] = [
    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}},
    {
        "name": HEADER_LENGTH,
        "in": "header",
        "required": False,
        "schema": {"type": "integer", "minimum": 0},
        "description": "binary-tensor extension: length of the leading JSON header",
    },
]

# Content-Encoding → zlib window bits (gzip framing, zlib framing).
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


INFER_PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")


def infer_openapi() -> dict[str, Any]:
    """OpenAPI path items of the infer routes (served as plain routes, so FastAPI cannot
    describe them itself)."""
    items = {}
    for path in INFER_PATHS:
        operation = {
            "tags": ["inference (OIP v2)"],
            "summary": "Infer" if "version" not in path else "Infer with one model version",
            "operationId": "infer" if "version" not in path else "infer_version",
            "parameters": [
                p for p in _INFER_PARAMETERS if p["in"] != "path" or f"{{{p['name']}}}" in path
            ],
            "requestBody": _INFER_BODY,
            "responses": {"200": {"description": "the outputs (JSON, or JSON + binary)"}},
        }
        items[path] = {"post": operation}
    return items


def oip_routes(router: InferenceRouter) -> APIRouter:
    api = APIRouter(tags=["inference (OIP v2)"])
    limit = router.settings.max_message_bytes

    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        name = request.path_params["name"]
        version = request.path_params.get("version", "")
        body = await _read_body(request, limit)
        header_length = request.headers.get(tensors.HEADER_LENGTH)
        weights = router.resolved(name, version)
        key = None
        if weights is not None and len(body) <= MAX_REQUEST_BYTES:
            key = ("http", name, version, weights, header_length, body)
            answer = router.answers.get(key)
            if answer is not None:
                router.count_prebuilt_hit(answer.rows, time.perf_counter() - started)
                content, headers = answer.body
                return Response(content=content, headers=headers)

        router.admission.check()
        parsed = tensors.http_to_request(name, version, body, header_length)
        result = await router.infer(parsed.model, parsed.version, parsed.rows, parsed.timeout)
        content, headers = tensors.http_response(parsed, result.model_version, result.outputs)
        headers["onehop-cache"] = result.cache
        headers["onehop-hops"] = str(result.hops)
        router.answers.keep_if_hit(
            key,
            weights,
            result,
            lambda: Answer(
                (content, {**headers, "onehop-hops": "0"}),
                len(parsed.rows),
                len(body) + len(content),
            ),
        )
        return Response(content=content, headers=headers)

    # The hot path as plain Starlette routes, first in the table: no dependency solving,
    # no response model, and matched before every other route. infer_openapi() documents them.
    for path in INFER_PATHS:
        api.add_route(path, infer, methods=["POST"], include_in_schema=False)

    @api.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": onehop.__version__, "extensions": list(EXTENSIONS)}

    @api.get("/v2/health/live")
    async def server_live() -> dict[str, Any]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def server_ready() -> dict[str, Any]:
        if not await router.server_ready():
            raise Unavailable("the model server is not ready")
        return {"ready": True}

    async def metadata(name: str, version: str) -> dict[str, Any]:
        return tensors.metadata_to_json(await router.model_metadata(name, version))

    async def ready(name: str, version: str) -> dict[str, Any]:
        if not await router.model_ready(name, version):
            # The trainer says "not ready" for models it does not know either: those are 404.
            await router.model_metadata(name, version)
            raise Unavailable(f"model {name!r} is not ready")
        return {"name": name, "ready": True}

    @api.get("/v2/models/{name}")
    async def model_metadata(name: str) -> dict[str, Any]:
        return await metadata(name, "")

    @api.get("/v2/models/{name}/versions/{version}")
    async def model_version_metadata(name: str, version: str) -> dict[str, Any]:
        return await metadata(name, version)

    @api.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> dict[str, Any]:
        return await ready(name, "")

    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_version_ready(name: str, version: str) -> dict[str, Any]:
        return await ready(name, version)

    return api


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed when the client sent Content-Encoding, never more than
    `limit` bytes (413 beyond it)."""
    too_large = PayloadTooLarge(f"request body larger than {limit} bytes; send smaller batches")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)

    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in _DECODERS:
        raise InvalidArgument(
            f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none"
        )
    decoder = zlib.decompressobj(_DECODERS[encoding])
    try:
        plain = decoder.decompress(body, limit + 1)
    except zlib.error:
        raise InvalidArgument(f"the request body is not valid {encoding} data") from None
    if len(plain) > limit or decoder.unconsumed_tail:
        raise too_large
    if not decoder.eof:
        raise InvalidArgument(f"the request body is truncated {encoding} data")
    return plain
