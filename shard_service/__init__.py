"""The shard service: datasets as versioned Parquet shards, served over Arrow Flight."""
