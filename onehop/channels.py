"""Client channels to onehop services: message limits sized for Arrow batches, keepalive, a
service config that retries idempotent reads (with throttling) on UNAVAILABLE, TLS / mTLS and
the bearer token from settings, and client-side round robin over a service's replicas."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from onehop.errors import DeadlineExceeded
from onehop.settings import Settings

# Methods that only read, so a retry can never apply a change twice.
IDEMPOTENT = {
    "onehop.v1.Cache": ["Get", "BatchGet", "Contains", "GetStats"],
    "onehop.v1.Trainer": ["GetJob", "ListJobs", "ListModels", "GetModel"],
    "inference.GRPCInferenceService": [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        # A prediction is a pure function of the weights and the row.
        "ModelInfer",
    ],
    "grpc.health.v1.Health": ["Check"],
}

# Retry throttling, as gRPC defines it: a failure costs a token, a success earns tokenRatio;
# retries stop while fewer than half the tokens are left (most recent calls failing).
_THROTTLE_TOKENS = 10
_THROTTLE_RATIO = 0.1

_SERVICE_CONFIG = json.dumps(
    {
        # A dns:/// name with several addresses (a headless service) is balanced per call.
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [
                    {"service": service, "method": method}
                    for service, methods in IDEMPOTENT.items()
                    for method in methods
                ],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": _THROTTLE_TOKENS, "tokenRatio": _THROTTLE_RATIO},
    }
)


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


def tls_enabled(settings: Settings) -> bool:
    """Clients speak TLS when there is a CA to verify servers with or a certificate to show."""
    return bool(settings.tls_ca_file or settings.tls_cert_file)


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials:
    """TLS credentials: the CA from settings (else the system roots) verifies the server; the
    process's own certificate and key are presented for mTLS."""
    has_pair = bool(settings.tls_cert_file and settings.tls_key_file)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.tls_ca_file),
        private_key=_read(settings.tls_key_file) if has_pair else None,
        certificate_chain=_read(settings.tls_cert_file) if has_pair else None,
    )


def auth_metadata(settings: Settings) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries the bearer token (none when no token is set)."""
    return (("authorization", f"Bearer {settings.auth_token}"),) if settings.auth_token else ()


class _AddMetadata(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the bearer token) to every call of a grpc.aio channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request_iterator)

    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request_iterator)


class _SyncAddMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
):
    """The same for synchronous channels (the CLI, the launcher's probes)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)


def aio_channel(address: str, settings: Settings) -> grpc.aio.Channel:
    options = channel_options(settings)
    metadata = auth_metadata(settings)
    interceptors = [_AddMetadata(metadata)] if metadata else None
    if tls_enabled(settings):
        return grpc.aio.secure_channel(
            address, channel_credentials(settings), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def sync_channel(address: str, settings: Settings) -> grpc.Channel:
    options = channel_options(settings)
    if tls_enabled(settings):
        channel = grpc.secure_channel(address, channel_credentials(settings), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    metadata = auth_metadata(settings)
    if metadata:
        channel = grpc.intercept_channel(channel, _SyncAddMetadata(metadata))
    return channel


def flight_location(address: str, settings: Settings | None = None) -> str:
    """A Flight URI for host:port; grpc+tls when `settings` turn TLS on."""
    scheme = "grpc+tls" if settings is not None and tls_enabled(settings) else "grpc+tcp"
    return f"{scheme}://{address}"


def flight_client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `pyarrow.flight.connect`: the CA and the client certificate
    (`onehop.dataplane.flight_client` adds the bearer token to every call)."""
    options: dict[str, Any] = {}
    if settings.tls_ca_file:
        options["tls_root_certs"] = _read(settings.tls_ca_file)
    if settings.tls_cert_file and settings.tls_key_file:
        options["cert_chain"] = _read(settings.tls_cert_file)
        options["private_key"] = _read(settings.tls_key_file)
    return options


# --- several replicas of one service ------------------------------------------------------


def split_addresses(addresses: str) -> list[str]:
    """ "a:1, b:2" → ["a:1", "b:2"]; a dns:/// target stays one entry (gRPC balances it)."""
    return [part.strip() for part in addresses.split(",") if part.strip()]


class RetryThrottle:
    """gRPC's retry throttling for retries made outside a channel (failover between
    replicas): retries stop while most recent calls fail, so a sick mesh is not hammered."""

    def __init__(self, max_tokens: float = _THROTTLE_TOKENS, ratio: float = _THROTTLE_RATIO):
        self.max_tokens = max_tokens
        self.ratio = ratio
        self.tokens = max_tokens

    def succeeded(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    def failed(self) -> None:
        self.tokens = max(0.0, self.tokens - 1)

    def allows_retry(self) -> bool:
        return self.tokens > self.max_tokens / 2


# A replica that failed is skipped this long (then tried again: it may be back).
_EJECT_SECONDS = 5.0
_DOWN_STATES = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)


class Replicas:
    """Client-side round robin over the replicas of one service, with failover.

    Each call goes to the next replica in turn, skipping those that failed recently or whose
    channel is down. An idempotent call that meets UNAVAILABLE, or outlives its per-attempt
    deadline on a replica (a hung or SIGSTOPped process), moves to the next replica within
    the caller's deadline, under retry throttling. Other calls get one attempt.
    """

    def __init__(self, channels: Sequence[grpc.aio.Channel], attempt_timeout: float):
        if not channels:
            raise ValueError("no replica channels")
        self.channels = list(channels)
        self.attempt_timeout = attempt_timeout
        self.throttle = RetryThrottle()
        self._next = 0
        self._ejected_until = [0.0] * len(self.channels)
        # Calls each replica answered, in channel order (what round robin spread).
        self.answered = [0] * len(self.channels)
        self._stubs: dict[tuple[type, int], Any] = {}

    @classmethod
    def connect(cls, addresses: str, settings: Settings, attempt_timeout: float) -> Replicas:
        """Channels to each of `addresses` ("a:1,b:2"); `close()` closes them."""
        listed = split_addresses(addresses)
        if not listed:
            raise ValueError("no replica addresses")
        return cls([aio_channel(address, settings) for address in listed], attempt_timeout)

    @property
    def primary(self) -> grpc.aio.Channel:
        """The first replica: the one that runs stateful work (training jobs)."""
        return self.channels[0]

    def _stub(self, stub_type: type, index: int) -> Any:
        stub = self._stubs.get((stub_type, index))
        if stub is None:
            stub = self._stubs[(stub_type, index)] = stub_type(self.channels[index])
        return stub

    def _order(self) -> list[int]:
        """Replica indices for one call: round robin start, healthy ones first."""
        count = len(self.channels)
        start, self._next = self._next, (self._next + 1) % count
        order = [(start + i) % count for i in range(count)]
        if count == 1:
            return order
        now = time.monotonic()

        def down(index: int) -> bool:
            if self._ejected_until[index] > now:
                return True
            return self.channels[index].get_state() in _DOWN_STATES

        return sorted(order, key=down)  # stable: keeps the round-robin order within each group

    async def call(
        self,
        stub_type: type,
        method: str,
        request: Any,
        timeout: float,
        idempotent: bool = True,
    ) -> Any:
        """`stub_type(channel).method(request)` on one replica; raises the last
        grpc.aio.AioRpcError, or DeadlineExceeded when `timeout` runs out between attempts."""
        deadline = time.monotonic() + timeout
        order = self._order() if idempotent else self._order()[:1]
        for attempt, index in enumerate(order):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("the request's deadline passed while replicas failed")
            last = attempt == len(order) - 1
            budget = remaining if last else min(remaining, self.attempt_timeout)
            try:
                result = await getattr(self._stub(stub_type, index), method)(
                    request, timeout=budget
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                moved = code == grpc.StatusCode.UNAVAILABLE or (
                    code == grpc.StatusCode.DEADLINE_EXCEEDED and budget < remaining
                )
                if not moved:
                    raise
                self._ejected_until[index] = time.monotonic() + _EJECT_SECONDS
                self.throttle.failed()
                if last or not self.throttle.allows_retry():
                    raise
                continue
            self.throttle.succeeded()
            self.answered[index] += 1
            return result
        raise AssertionError("unreachable: the last attempt returns or raises")

    def ejected(self) -> list[bool]:
        """Per replica: whether it failed recently and is skipped while others answer."""
        now = time.monotonic()
        return [until > now for until in self._ejected_until]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
