"""The gateway process: gRPC (OIP v2 + onehop.v1.Gateway + health), the HTTP bridge
(uvicorn) and the Arrow Flight front, on one event loop over one router and one control."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import grpc
import uvicorn

from cache_service.client import CacheClient
from gateway.control import GatewayControl, GatewayServicer
from gateway.flight import GatewayFlightServer
from gateway.http import create_app
from gateway.oip_grpc import InferenceServicer
from gateway.router import InferenceRouter
from onehop.channels import Replicas, aio_channel, split_addresses
from onehop.dataplane import DataClient
from onehop.server import GrpcServer, Running, uvicorn_tls_options
from onehop.settings import Settings
from protos.inference import grpc_service_pb2_grpc
from protos.onehop.v1 import gateway_pb2_grpc

log = logging.getLogger(__name__)

# How often to look whether uvicorn has bound its socket (it exposes no event for it).
_STARTUP_POLL_SECONDS = 0.01


class _HttpServer(uvicorn.Server):
    """uvicorn without its own SIGINT/SIGTERM handlers: signals belong to `serve_forever`,
    which stops every server of the process in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_http(server: uvicorn.Server) -> None:
    try:
        await server.serve()
    except SystemExit:
        # uvicorn exits the process when it cannot bind; here that is a startup error.
        raise OSError(f"HTTP server could not listen on port {server.config.port}") from None


class _Gateway:
    """What one gateway process holds, so `stop` can release whatever `start` got to."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.trainer: Replicas | None = None
        self.cache: CacheClient | None = None
        # The first cache node, for the control plane's stats.
        self.cache_channel: grpc.aio.Channel | None = None
        self.data: DataClient | None = None
        self.router: InferenceRouter | None = None
        self.grpc: GrpcServer | None = None
        self.http: uvicorn.Server | None = None
        self.http_task: asyncio.Task[None] | None = None
        self.flight: GatewayFlightServer | None = None

    async def start(self) -> dict[str, str]:
        s = self.settings
        if not s.trainer_address:
            raise ValueError("the gateway needs the trainer: set ONEHOP_TRAINER_ADDRESS")
        self.trainer = Replicas.connect(s.trainer_address, s, s.trainer_attempt_timeout_seconds)
        nodes = split_addresses(s.cache_address)
        if nodes:
            # Several nodes: keys placed by rendezvous hashing, the same for HTTP and gRPC.
            self.cache = CacheClient(nodes, s)
            self.cache_channel = aio_channel(nodes[0], s)
        self.data = await asyncio.to_thread(DataClient, s)
        self.router = InferenceRouter(s, self.trainer, self.cache)
        # Jobs are state on one trainer: the control plane talks to the first replica.
        control = GatewayControl(s, self.trainer.primary, self.data, self.cache_channel)

        self.grpc = GrpcServer(s, s.gateway_grpc_port)
        self.grpc.add(
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            InferenceServicer(self.router),
            "inference.GRPCInferenceService",
        )
        self.grpc.add(
            gateway_pb2_grpc.add_GatewayServicer_to_server,
            GatewayServicer(control),
            "onehop.v1.Gateway",
        )
        await self.grpc.start()

        config = uvicorn.Config(
            create_app(self.router, control),
            host=s.host,
            port=s.gateway_http_port,
            log_level="warning",
            # Our JSON log handler on the root logger formats uvicorn's records too.
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(1, round(s.grace_seconds)),
            **uvicorn_tls_options(s),
        )
        self.http = _HttpServer(config)
        self.http_task = asyncio.create_task(_serve_http(self.http), name="gateway-http")
        while not self.http.started:
            done, _ = await asyncio.wait({self.http_task}, timeout=_STARTUP_POLL_SECONDS)
            if done:
                self.http_task.result()  # raises why it stopped
                raise OSError("HTTP server stopped during startup")
        http_port = self.http.servers[0].sockets[0].getsockname()[1]

        # Flight listens from its constructor; binding is quick but blocking.
        self.flight = await asyncio.to_thread(GatewayFlightServer, s, self.data)

        await self.grpc.set_serving(True)
        return {
            "grpc": self.grpc.address,
            "http": f"{s.host}:{http_port}",
            "flight": f"{s.host}:{self.flight.port}",
        }

    async def stop(self) -> None:
        """NOT_SERVING first (load balancers stop sending), then drain the three fronts
        together, then release the router, channels and data client. Safe to call twice."""
        if self.grpc is not None:
            await self.grpc.set_serving(False)
        await asyncio.gather(self._stop_http(), self._stop_grpc(), self._stop_flight())
        router, self.router = self.router, None
        if router is not None:
            await router.close()
        if self.trainer is not None:
            await self.trainer.close()
        if self.cache is not None:
            await self.cache.close()
        if self.cache_channel is not None:
            await self.cache_channel.close()
        self.trainer = self.cache = self.cache_channel = None
        data, self.data = self.data, None
        if data is not None:
            await asyncio.to_thread(data.close)

    async def _stop_http(self) -> None:
        server, task, self.http, self.http_task = self.http, self.http_task, None, None
        if server is None or task is None:
            return
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task

    async def _stop_grpc(self) -> None:
        server, self.grpc = self.grpc, None
        if server is not None:
            await server.stop()

    async def _stop_flight(self) -> None:
        server, self.flight = self.flight, None
        if server is not None:
            # shutdown() blocks until in-flight calls finish: keep it off the event loop.
            await asyncio.to_thread(server.shutdown)


async def start(settings: Settings) -> Running:
    """Start the gateway; health turns SERVING once gRPC, HTTP and Flight all listen."""
    gateway = _Gateway(settings)
    try:
        endpoints = await gateway.start()
    except BaseException:
        # Release whatever did start; the startup error is the one worth seeing.
        with contextlib.suppress(Exception):
            await gateway.stop()
        raise
    log.info("gateway serving on %s", endpoints)
    return Running(endpoints, gateway.stop)
