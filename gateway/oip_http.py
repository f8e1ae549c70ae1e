"""OIP v2 REST (`/v2/...`) at the gateway, with Triton's binary-tensor extension, so
`tritonclient.http` works with its default options. A thin edge over the InferenceRouter:
domain errors propagate to the app's OnehopError handler."""

from __future__ import annotations

import zlib
from typing import Any

from fastapi import APIRouter, Request, Response

import onehop
from gateway import tensors
from gateway.oip_grpc import EXTENSIONS, SERVER_NAME
from gateway.router import InferenceRouter
from onehop.errors import InvalidArgument, PayloadTooLarge, Unavailable

# Content-Encoding → zlib window bits (gzip framing, zlib framing).
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def oip_routes(router: InferenceRouter) -> APIRouter:
    api = APIRouter(tags=["inference (OIP v2)"])
    limit = router.settings.max_message_bytes

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
            raise Unavailable(f"model {name!r} is not ready")
        return {"name": name, "ready": True}

    async def infer(name: str, version: str, request: Request) -> Response:
        body = await _read_body(request, limit)
        parsed = tensors.http_to_request(
            name, version, body, request.headers.get(tensors.HEADER_LENGTH)
        )
        result = await router.infer(parsed.model, parsed.version, parsed.rows)
        content, headers = tensors.http_response(parsed, result.model_version, result.outputs)
        headers["onehop-cache"] = result.cache
        headers["onehop-hops"] = str(result.hops)
        return Response(content=content, headers=headers)

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

    @api.post("/v2/models/{name}/infer")
    async def model_infer(name: str, request: Request) -> Response:
        return await infer(name, "", request)

    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def model_version_infer(name: str, version: str, request: Request) -> Response:
        return await infer(name, version, request)

    return api


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed when the client sent Content-Encoding, never more than
    `limit` bytes (413 beyond it)."""
    too_large = PayloadTooLarge(f"request body larger than {limit} bytes; send smaller batches")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
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
