"""Client channels to onehop services: message limits sized for Arrow batches, keepalive,
and a service config that retries idempotent reads (with throttling) on UNAVAILABLE."""

from __future__ import annotations

import json
from typing import Any

import grpc

from onehop.settings import Settings

# Methods that only read, so a retry can never apply a change twice.
_IDEMPOTENT = {
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

_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": service, "method": method}
                    for service, methods in _IDEMPOTENT.items()
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
        # Stop retrying when more than half of recent calls failed.
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
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


def aio_channel(address: str, settings: Settings) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=channel_options(settings))


def sync_channel(address: str, settings: Settings) -> grpc.Channel:
    return grpc.insecure_channel(address, options=channel_options(settings))


def flight_location(address: str) -> str:
    return f"grpc+tcp://{address}"
