"""Which slot of a Redis Cluster a new job's stream goes to.

A job's keys carry the first 4 characters of its id as their hash tag
(keys.job_tag), so the id decides the slot. On one Redis any id will do: a new job
gets a random one. On a cluster, the API chooses the id: a master at random (so
the streams spread evenly over the masters), then that master's *home tag*, the
tag of the lowest slot it owns, followed by 28 random hex digits (112 random bits).

Why not a random tag: a cluster runs a multi-key command only when all its keys
share one slot (CROSSSLOT otherwise), and each blocking XREAD holds a connection.
With random tags, an API process relaying a thousand streams would need about a
thousand blocking reads and connections. With home tags, every API process puts
all of one master's new streams in one slot, and reads them with one XREAD
(mux.py). When slots move (a reshard, a new master) the home tags are
recomputed from the client's slot map; streams already placed stay readable, on
a read of their own slot.
"""

from __future__ import annotations

import logging
import random
import secrets
import uuid
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from textstream import keys

log = logging.getLogger(__name__)

TAG_LENGTH = 4


@lru_cache(maxsize=1)
def tag_of_slot() -> dict[int, str]:
    """The smallest 4-hex-digit tag that hashes to each slot (13,152 of the 16,384
    slots have one; a master owning none of those is given no new streams)."""
    table: dict[int, str] = {}
    for number in range(16**TAG_LENGTH):
        tag = f"{number:0{TAG_LENGTH}x}"
        table.setdefault(key_slot(tag.encode()), tag)
    return table


def home_tags(slots: Mapping[int, Sequence[Any]]) -> dict[str, str]:
    """Node name -> the tag of the lowest slot it owns, from a slot map (slot ->
    [primary, replicas...], as redis-py's cluster client keeps it)."""
    tags = tag_of_slot()
    homes: dict[str, str] = {}
    for slot in range(REDIS_CLUSTER_HASH_SLOTS):
        nodes = slots.get(slot)
        if nodes and slot in tags:
            homes.setdefault(nodes[0].name, tags[slot])
    return homes


class Placement:
    """New job ids for one streams client (a single Redis, or a cluster)."""

    def __init__(self, client: aioredis.Redis | AsyncRedisCluster) -> None:
        self._cluster = client if isinstance(client, AsyncRedisCluster) else None
        self._homes: dict[str, str] = {}
        self._map_seen: object = None

    async def new_job_id(self) -> str:
        if self._cluster is None:
            return uuid.uuid4().hex
        tag = await self._home_tag()
        return tag + secrets.token_hex(16 - TAG_LENGTH // 2)

    async def _home_tag(self) -> str:
        cluster = self._cluster
        assert cluster is not None
        await cluster.initialize()  # a no-op once connected; re-reads the map after errors
        slots = cluster.nodes_manager.slots_cache
        if slots is not self._map_seen or not self._homes:
            self._homes, self._map_seen = home_tags(slots), slots
            log.info("stream slots per master: %s", self._homes)
        node, tag = random.choice(list(self._homes.items()))
        owner = cluster.get_node_from_key(keys.job_events(tag))
        if owner is None or owner.name != node:  # a slot moved in place (MOVED): re-read
            self._homes = home_tags(slots)
            node, tag = random.choice(list(self._homes.items()))
        return tag
