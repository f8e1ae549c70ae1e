"""Typed settings for every onehop process, read from ONEHOP_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20
GiB = 1 << 30


class Settings(BaseSettings):
    """One flat settings object shared by all services; each reads the fields it needs.

    Inner services default to port 0 (any free port): they announce the bound ports in
    their run file under ``data_dir/run/`` and the launcher passes them on.
    """

    model_config = SettingsConfigDict(env_prefix="ONEHOP_", extra="ignore")

    data_dir: Path = Path(".onehop")
    host: str = "127.0.0.1"
    log_level: str = "INFO"
    # Expose grpc.reflection (off by default on the public port).
    reflection: bool = False
    grace_seconds: float = Field(5.0, ge=0)
    # Large enough for Arrow record batches and OIP tensors in one message.
    max_message_bytes: int = Field(64 * MiB, ge=MiB)

    gateway_http_port: int = Field(8000, ge=0, le=65535)
    gateway_grpc_port: int = Field(8001, ge=0, le=65535)
    gateway_flight_port: int = Field(8815, ge=0, le=65535)
    cache_grpc_port: int = Field(0, ge=0, le=65535)
    cache_flight_port: int = Field(0, ge=0, le=65535)
    shard_grpc_port: int = Field(0, ge=0, le=65535)
    shard_flight_port: int = Field(0, ge=0, le=65535)
    trainer_grpc_port: int = Field(0, ge=0, le=65535)

    # Where the other services are (host:port); the launcher sets them.
    cache_address: str = ""
    cache_flight_address: str = ""
    shard_address: str = ""
    # The shard service's grpc.health.v1 (its Flight port cannot host other gRPC services).
    shard_health_address: str = ""
    trainer_address: str = ""
    # LMDB directory of a cache replica on this host: the gateway then reads hits from its
    # memory map (zero hops). Empty = every lookup goes to cache_address.
    cache_path: str = ""

    cache_size_bytes: int = Field(1 * GiB, ge=16 * MiB)
    default_shards: int = Field(8, ge=1, le=4096)
    # Downstream deadline for a cache lookup on the predict path; slower = bypass.
    cache_timeout_seconds: float = Field(0.25, gt=0)
    # How long the gateway trusts a model's resolved version and weights digest.
    model_info_ttl_seconds: float = Field(2.0, ge=0)
    # Pending write-backs to the cache beyond this many are dropped (off the critical path).
    max_pending_writebacks: int = Field(64, ge=1)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def service_dir(self, service: str) -> Path:
        path = self.data_dir / service
        path.mkdir(parents=True, exist_ok=True)
        return path
