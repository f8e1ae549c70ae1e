"""Typed settings for every onehop process, read from ONEHOP_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
    # A plaintext grpc.health.v1 port for Kubernetes probes (which cannot speak TLS);
    # 0 = health only on the service's own port.
    health_port: int = Field(0, ge=0, le=65535)

    # Where the other services are (host:port); the launcher sets them.
    cache_address: str = ""
    cache_flight_address: str = ""
    shard_address: str = ""
    # The shard service's grpc.health.v1 (its Flight port cannot host other gRPC services).
    shard_health_address: str = ""
    # One trainer, or several replicas "host:port,host:port" (client-side round robin with
    # failover); a dns:/// name balances over every address it resolves to (headless service).
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
    # Past its TTL the gateway keeps serving that info while it refreshes it in the
    # background; when the trainer cannot answer, for at most this long (then requests wait).
    model_info_stale_seconds: float = Field(300.0, ge=0)
    # Pending write-backs to the cache beyond this many are dropped (off the critical path).
    max_pending_writebacks: int = Field(64, ge=1)
    # Server-side ingest ("ingest" action): local sources must lie under this directory
    # (empty = data_dir), and URIs may use only these pyarrow.fs schemes.
    source_root: str = ""
    source_schemes: str = "file,s3,gs"
    # Gateway admission control: predictions served at once, and waiting beyond those; more
    # are refused at once (RESOURCE_EXHAUSTED / 429 with Retry-After). A queued request
    # waits at most queue_timeout_seconds.
    max_concurrent_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(16, ge=0)
    queue_timeout_seconds: float = Field(0.02, gt=0)
    # Encoded answers of repeated identical full-hit requests the gateway keeps (0 = none).
    response_memo_bytes: int = Field(16 * MiB, ge=0)
    # Deadline of an HTTP prediction that names none (gRPC callers bring their own).
    request_timeout_seconds: float = Field(30.0, gt=0)
    # With several trainer replicas (trainer_address "a:1,b:2"): one attempt's deadline on
    # one replica before an idempotent call moves to the next (a stopped, hung replica).
    trainer_attempt_timeout_seconds: float = Field(5.0, gt=0)
    # The trainer process: "all" (jobs and inference), "train" (jobs only) or "serve"
    # (inference only: replicas that scale apart from training).
    trainer_role: Literal["all", "train", "serve"] = "all"
    # Training jobs run at once per trainer; more wait in order.
    trainer_job_workers: int = Field(1, ge=1, le=64)
    # Dynamic batcher of ModelInfer: rows per forward pass (1 = off), how long a batch waits
    # for more requests, requests queued per model before RESOURCE_EXHAUSTED.
    trainer_max_batch_size: int = Field(64, ge=1, le=65_536)
    trainer_max_queue_delay_ms: float = Field(2.0, ge=0)
    trainer_max_queue: int = Field(1024, ge=1)
    # Batches of one model computing at once (Triton's instance count).
    trainer_batch_instances: int = Field(1, ge=1, le=64)
    # How often an inference replica re-reads the shared model registry for versions and
    # promotions that other processes (a training Job, a role "train" trainer) wrote there.
    trainer_registry_refresh_seconds: float = Field(2.0, gt=0)
    # torch intra-op threads of the trainer; 0 = OMP_NUM_THREADS, else one per core but one.
    trainer_torch_threads: int = Field(0, ge=0, le=1024)

    # Security, for every service. A bearer token required on HTTP and gRPC calls (health
    # stays open for probes); clients of the mesh send it. Empty = no token.
    auth_token: str = Field("", repr=False)
    # TLS: this process's certificate chain and key (PEM) turn TLS on for its servers and are
    # its client certificate; tls_ca_file verifies peers; tls_client_auth requires client
    # certificates signed by that CA (mTLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    tls_client_auth: bool = False

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def service_dir(self, service: str) -> Path:
        path = self.data_dir / service
        path.mkdir(parents=True, exist_ok=True)
        return path
