"""The onehop cache: LMDB-backed shard payloads and prediction rows (DESIGN §3).

`cache_service.store` is the core (`CacheStore`, and `CacheReader` for zero-hop reads from
another process on the host); `server.start` runs it behind gRPC and Arrow Flight.
"""
