"""The HTTP bridge: OIP REST under /v2 (the router), jobs/models/datasets/cache under /v1
(the control plane), /metrics and /docs (OpenAPI) — with the error table applied by one
handler, and one pure-ASGI edge in front of every route for the bearer token, the body-size
limit (413 before anything parses) and request metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from google.protobuf import json_format
from google.protobuf.message import Message as ProtoMessage
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.control import GatewayControl
from gateway.flight import upload_dataset
from gateway.oip_http import infer_openapi, oip_routes
from onehop import __version__
from onehop.errors import Internal, OnehopError, PayloadTooLarge, Unauthenticated, retry_after
from onehop.server import token_matches
from onehop.settings import Settings
from protos.onehop.v1 import data_pb2, trainer_pb2

log = logging.getLogger(__name__)

UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1


class StartJobBody(BaseModel):
    """POST /v1/jobs. Zero (or empty) fields take the trainer's defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dataset: str = Field(description="dataset name")
    dataset_version: int = Field(0, ge=0, le=UINT32_MAX, description="0 = the newest")
    target: str = Field(description="the label column")
    model: str = Field(description="name the trained model is registered under")
    epochs: int = Field(0, ge=0, le=100_000)
    batch_size: int = Field(0, ge=0, le=1 << 20)
    hidden: list[Annotated[int, Field(ge=1, le=1 << 16)]] = Field(
        default_factory=list, max_length=64, description="hidden layer widths; [] = [64]"
    )
    dropout: float = Field(0.0, lt=1.0, description="0 = 0.5; negative = none")
    lr: float = Field(0.0, ge=0.0, le=10.0)
    val_split: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0, le=UINT64_MAX)
    features: list[str] = Field(
        default_factory=list, max_length=4096, description="[] = every numeric column"
    )

    def to_proto(self) -> trainer_pb2.StartJobRequest:
        return trainer_pb2.StartJobRequest(
            dataset=self.dataset,
            dataset_version=self.dataset_version,
            target=self.target,
            model_name=self.model,
            model=trainer_pb2.ModelSpec(hidden=self.hidden, dropout=self.dropout),
            hyperparameters=trainer_pb2.Hyperparameters(
                epochs=self.epochs,
                batch_size=self.batch_size,
                lr=self.lr,
                val_split=self.val_split,
                seed=self.seed,
            ),
            features=self.features,
        )


class PromoteBody(BaseModel):
    """POST /v1/models/{name}/promote."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=UINT32_MAX, description="the registered version to serve")
    pin: bool = Field(False, description="keep serving it when later jobs register versions")


def to_json(message: ProtoMessage) -> dict[str, Any]:
    """A onehop.v1 message as the /v1 JSON: proto field names, every field, 64-bit
    integers as numbers."""
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def v1_routes(control: GatewayControl) -> APIRouter:
    routes = APIRouter(prefix="/v1")

    @routes.get("/datasets", tags=["datasets"], summary="Every dataset, newest version")
    async def list_datasets() -> dict[str, Any]:
        return {"datasets": [to_json(info) for info in await control.list_datasets()]}

    @routes.post(
        "/datasets",
        tags=["datasets"],
        status_code=201,
        summary="Upload a CSV, Parquet or Arrow file (the body) as a new dataset version",
    )
    async def upload(
        request: Request,
        name: str = Query(description="dataset name"),
        format: Literal["csv", "parquet", "arrow"] = "csv",
        shards: int = Query(0, ge=0, le=4096, description="0 = the service's default"),
        key: str = Query("", description="place rows by hash of this column"),
        target: str = Query("", description="a two-class string target becomes 0/1"),
    ) -> dict[str, Any]:
        options = data_pb2.IngestRequest(
            dataset=name, format=format, shards=shards, key=key, target=target
        )
        # The data client is the control plane's: one Flight connection pool per gateway.
        info = await upload_dataset(control._data, request.stream(), options)
        return to_json(info)

    @routes.get("/models", tags=["models"], summary="Every registered model")
    async def list_models() -> dict[str, Any]:
        return {"models": [to_json(info) for info in await control.list_models()]}

    @routes.get("/models/{name}", tags=["models"], summary="One model; features in input order")
    async def get_model(
        name: str, version: int = Query(0, ge=0, le=UINT32_MAX, description="0 = serving")
    ) -> dict[str, Any]:
        return to_json(await control.get_model(name, version))

    @routes.post("/jobs", tags=["jobs"], status_code=202, summary="Start a training job")
    async def start_job(body: StartJobBody, response: Response) -> dict[str, Any]:
        job_id = await control.start_job(body.to_proto())
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return {"job_id": job_id}

    @routes.get("/jobs", tags=["jobs"], summary="Every job the trainer knows")
    async def list_jobs() -> dict[str, Any]:
        return {"jobs": [to_json(status) for status in await control.list_jobs()]}

    @routes.get("/jobs/{job_id}", tags=["jobs"], summary="One job's status and metrics")
    async def get_job(job_id: str) -> dict[str, Any]:
        return to_json(await control.get_job(job_id))

    @routes.post("/jobs/{job_id}/cancel", tags=["jobs"], summary="Stop a running job")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        return to_json(await control.cancel_job(job_id))

    @routes.get(
        "/jobs/{job_id}/events",
        tags=["jobs"],
        summary="A job's progress as server-sent events, until it ends",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def job_events(job_id: str) -> StreamingResponse:
        await control.get_job(job_id)  # unknown job → 404 before the stream starts
        return StreamingResponse(
            _job_events(control, job_id),
            media_type="text/event-stream",
            # Proxies must pass each event on at once.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @routes.get("/models/{name}/versions", tags=["models"], summary="A model's versions")
    async def model_versions(name: str) -> dict[str, Any]:
        info = await control.get_model(name)
        return {
            "name": info.name,
            "versions": list(info.versions),
            "serving_version": info.serving_version or info.version,
            "pinned": info.pinned,
        }

    @routes.post("/models/{name}/promote", tags=["models"], summary="Serve a registered version")
    async def promote_model(name: str, body: PromoteBody) -> dict[str, Any]:
        return to_json(await control.promote_model(name, body.version, body.pin))

    @routes.get("/cache/stats", tags=["cache"], summary="The cache's counters per namespace")
    async def cache_stats() -> dict[str, Any]:
        return to_json(await control.cache_stats())

    @routes.get("/cluster", tags=["cluster"], summary="Health of every inner service")
    async def cluster() -> dict[str, Any]:
        services = await control.cluster_status()
        return {
            "services": [
                {"name": s.name, "address": s.address, "health": s.health} for s in services
            ]
        }

    return routes


_TERMINAL_JOB_STATES = frozenset(
    {
        trainer_pb2.JOB_STATE_SUCCEEDED,
        trainer_pb2.JOB_STATE_FAILED,
        trainer_pb2.JOB_STATE_CANCELLED,
    }
)


async def _job_events(control: GatewayControl, job_id: str) -> AsyncIterator[bytes]:
    """WatchJob as server-sent events: one `progress` event per status, the last one named
    `end`; a failure mid-stream is an `error` event with the table's JSON shape."""
    try:
        async for status in control.watch_job(job_id):
            done = status.state in _TERMINAL_JOB_STATES
            yield _event("end" if done else "progress", to_json(status))
    except OnehopError as error:
        yield _event("error", {"error": error.message})


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def create_app(router: Any, control: GatewayControl) -> FastAPI:
    """The gateway's FastAPI app over the inference router and the control plane."""
    app = FastAPI(
        title="onehop gateway",
        version=__version__,
        description=(
            "Open Inference Protocol v2 (/v2, with Triton's binary-tensor extension), "
            'jobs, models, datasets and the cache (/v1). Errors are JSON: {"error": ...}.'
        ),
        # Metrics are Prometheus at /metrics; FastAPI's own OpenTelemetry hooks cost a
        # provider lookup on every request of the hit path.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.include_router(oip_routes(router))
    _document(app, infer_openapi())
    app.include_router(v1_routes(control))
    # The dashboard (gateway/ui/): static files that poll the routes above and /metrics.
    app.mount("/ui", StaticFiles(directory=Path(__file__).with_name("ui"), html=True), name="ui")
    _install_metrics(app, router.settings)
    _install_error_table(app)
    return app


def _document(app: FastAPI, paths: dict[str, Any]) -> None:
    """Add path items for routes FastAPI does not describe to the app's OpenAPI."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        schema["paths"].update(paths)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- errors -------------------------------------------------------------------------------


def error_response(error: OnehopError) -> JSONResponse:
    headers: dict[str, str] = {}
    seconds = retry_after(error)
    if seconds is not None:
        headers["Retry-After"] = seconds
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": error.message}, status_code=error.http_status, headers=headers)


def _install_error_table(app: FastAPI) -> None:
    """The HTTP twin of the gRPC ErrorInterceptor: one table, one response shape."""

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        # Unexpected exceptions are logged with a correlation id; their text stays here.
        error = exc if isinstance(exc, OnehopError) else Internal.wrap(exc)
        return error_response(error)

    async def on_invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"error": describe_validation(exc.errors())}, status_code=400)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    app.add_exception_handler(OnehopError, on_error)
    app.add_exception_handler(Exception, on_error)
    # FastAPI answers 422 with its own shape; the table says 400 with {"error": ...}.
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http)


def describe_validation(errors: Sequence[Any]) -> str:
    """A validation failure as one line a user can act on (never the input echoed back)."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "not valid JSON")
            return f"malformed JSON body: {reason}"
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg"))
    return "invalid request: " + "; ".join(str(part) for part in parts)


# --- metrics ------------------------------------------------------------------------------


# Bodies streamed through without being held (dataset uploads go to the shard service batch
# by batch): exempt from the body-size limit, which guards bodies read whole.
STREAMED_PATHS = frozenset({"/v1/datasets"})
# Paths a probe or a browser may reach without the bearer token.
OPEN_PATHS = frozenset(
    {"/v2/health/live", "/v2/health/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
)


class _Edge:
    """In front of every route, as plain ASGI (FastAPI's @app.middleware costs a task and
    a copy per request on the hit path): the bearer token, the body-size limit — a declared
    Content-Length over it is refused before the body is read, a streamed body as soon as
    it passes it — and the request metrics."""

    def __init__(self, app: ASGIApp, settings: Settings, requests: Counter, latency: Histogram):
        self.app = app
        self.settings = settings
        self.limit = settings.max_message_bytes
        self.requests = requests
        self.latency = latency
        # Bound metric children per (method, route, status): `labels()` is slow for a hot path.
        self._series: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_status)
                return
            streamed = scope.get("path") in STREAMED_PATHS
            await self.app(scope, receive if streamed else self._limited(receive), send_status)
        finally:
            # The route template, not the raw path: one series per route, not per id.
            route = getattr(scope.get("route"), "path", "unmatched")
            key = (scope.get("method", ""), route, str(status))
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = (
                    self.requests.labels(*key),
                    self.latency.labels(key[0], route),
                )
            series[0].inc()
            series[1].observe(time.perf_counter() - started)

    def _refusal(self, scope: Scope) -> OnehopError | None:
        headers = dict(scope.get("headers") or ())
        path = scope.get("path", "")
        # The dashboard's static files are open (they hold no data); its calls carry the token.
        if (
            self.settings.auth_token
            and path not in OPEN_PATHS
            and not (path == "/ui" or path.startswith("/ui/"))
        ):
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            if not token_matches(self.settings, authorization):
                return Unauthenticated("missing or invalid bearer token (Authorization: Bearer)")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit and path not in STREAMED_PATHS:
            return self._too_large()
        return None

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body larger than {self.limit} bytes; send less")

    def _limited(self, receive: Receive) -> Receive:
        size = 0

        async def limited() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.limit:
                    raise self._too_large()
            return message

        return limited


def _install_metrics(app: FastAPI, settings: Settings) -> None:
    """Per-app request metrics (an app's own registry, so several apps share a process) plus
    everything registered in the process-wide registry, and the edge that records them."""
    registry = CollectorRegistry()
    requests = Counter(
        "onehop_gateway_http_requests",
        "HTTP requests by route and status.",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "onehop_gateway_http_request_seconds",
        "HTTP request latency by route.",
        ["method", "route"],
        registry=registry,
    )
    app.add_middleware(_Edge, settings=settings, requests=requests, latency=latency)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body = generate_latest(REGISTRY) + generate_latest(registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
