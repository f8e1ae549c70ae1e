"""Several cache nodes as one key space (`cache_service.client`): three real cache servers
in-process on port 0, rendezvous placement, and a stopped node read as misses."""

from __future__ import annotations

from collections import Counter

import pytest

from cache_service.client import CacheClient, node_for, rank_nodes
from cache_service.server import start
from onehop.channels import aio_channel
from onehop.errors import InvalidArgument, ResourceExhausted
from onehop.settings import Settings
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc

pytestmark = pytest.mark.timeout(60)


def test_rendezvous_placement_is_stable_and_moves_only_a_removed_nodes_keys() -> None:
    nodes = ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"]
    keys = [f"pred/m/{i}".encode() for i in range(3000)]
    placed = {key: node_for(key, nodes) for key in keys}
    assert placed == {key: node_for(key, list(reversed(nodes))) for key in keys}  # order-free
    share = Counter(placed.values())
    assert all(800 < share[node] < 1200 for node in nodes), share

    survivors = nodes[:2]
    for key in keys:
        moved = node_for(key, survivors)
        if placed[key] in survivors:
            assert moved == placed[key]  # keys of the surviving nodes stay put
        assert rank_nodes(key, nodes)[0] == placed[key]
        assert [n for n in rank_nodes(key, nodes) if n in survivors][0] == moved


@pytest.fixture
async def nodes(settings: Settings, tmp_path):
    running = []
    try:
        for i in range(3):
            own = settings.model_copy(
                update={"data_dir": tmp_path / f"node{i}", "cache_size_bytes": 16 << 20}
            )
            running.append(await start(own))
        yield running
    finally:
        for node in running:
            await node.stop()


async def test_keys_spread_over_nodes_and_a_stopped_node_is_a_miss(
    nodes, settings: Settings
) -> None:
    addresses = [node.endpoints["grpc"] for node in nodes]
    client = CacheClient(addresses, settings, timeout=10, down_seconds=30)
    try:
        items = [(f"pred/m/{i}".encode(), f"v{i}".encode()) for i in range(60)]
        assert await client.put_many(items) == 60
        keys = [key for key, _ in items]
        assert await client.get_many(keys) == [value for _, value in items]

        # Each key lives on exactly the node the shared function names.
        for address in addresses:
            async with aio_channel(address, settings) as channel:
                found = await cache_pb2_grpc.CacheStub(channel).Contains(
                    cache_pb2.ContainsRequest(keys=keys)
                )
            assert list(found.found) == [node_for(key, addresses) == address for key in keys]

        stopped = addresses[1]
        await nodes[1].stop()
        on_stopped = [node_for(key, addresses) == stopped for key in keys]
        assert 0 < sum(on_stopped) < len(keys)

        values = await client.get_many(keys)
        assert values == [
            None if lost else value for (_, value), lost in zip(items, on_stopped, strict=True)
        ]
        assert client.is_down(stopped)
        assert await client.contains_many(keys) == [not lost for lost in on_stopped]
        # Writes skip the down node; the live nodes take theirs.
        assert await client.put_many(items) == len(keys) - sum(on_stopped)
        assert await client.delete_many(keys[:10]) == 10 - sum(on_stopped[:10])
        assert await client.get_many(keys[:10]) == [None] * 10
    finally:
        await client.close()


async def test_request_errors_are_raised_not_taken_for_a_down_node(
    nodes, settings: Settings
) -> None:
    client = CacheClient([node.endpoints["grpc"] for node in nodes], settings, timeout=30)
    try:
        with pytest.raises(InvalidArgument, match="1-511 bytes"):
            await client.get_many([b"pred/ok", b""])
        with pytest.raises(ResourceExhausted, match="budget of 16777216 bytes"):
            await client.put_many([(b"shard/d/huge", bytes(17 << 20))])
        assert not any(client.is_down(node.endpoints["grpc"]) for node in nodes)
    finally:
        await client.close()
