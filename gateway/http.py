"""The HTTP bridge: OIP REST under /v2 (the router), jobs/models/datasets under /v1 (the
control plane), /metrics and /docs — with the error table applied by one handler."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from google.protobuf.message import Message
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

from gateway.control import GatewayControl
from gateway.oip_http import oip_routes
from onehop import __version__
from onehop.errors import RETRY_AFTER_SECONDS, Internal, OnehopError
from protos.onehop.v1 import trainer_pb2

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


def to_json(message: Message) -> dict[str, Any]:
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

    @routes.get("/cluster", tags=["cluster"], summary="Health of every inner service")
    async def cluster() -> dict[str, Any]:
        services = await control.cluster_status()
        return {
            "services": [
                {"name": s.name, "address": s.address, "health": s.health} for s in services
            ]
        }

    return routes


def create_app(router: Any, control: GatewayControl) -> FastAPI:
    """The gateway's FastAPI app over the inference router and the control plane."""
    app = FastAPI(
        title="onehop gateway",
        version=__version__,
        description="Open Inference Protocol v2 (/v2), jobs, models and datasets (/v1).",
    )
    app.include_router(oip_routes(router))
    app.include_router(v1_routes(control))
    _install_metrics(app)
    _install_error_table(app)
    return app


# --- errors -------------------------------------------------------------------------------


def error_response(error: OnehopError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.http_status == 503 else None
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


def _install_metrics(app: FastAPI) -> None:
    """Per-app request metrics (an app's own registry, so several apps share a process) plus
    everything registered in the process-wide registry."""
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

    @app.middleware("http")
    async def measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # The route template, not the raw path: one series per route, not per id.
            route = getattr(request.scope.get("route"), "path", "unmatched")
            requests.labels(request.method, route, str(status)).inc()
            latency.labels(request.method, route).observe(time.perf_counter() - started)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body = generate_latest(REGISTRY) + generate_latest(registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
