"""Every Redis client textstream makes, built in one place with bounded times.

Two roles (config.py): REDIS_URL holds the queue (ModelQ), the registry, metrics,
limits and the response cache; the job streams and their state hashes live on
STREAMS_REDIS_URL, which may be a Redis Cluster. By default both are one Redis,
and one client serves both roles.

- `async_client`: the API process's shared asyncio pool; every command on it is
  answered or failed within REDIS_TIMEOUT. (The one blocking XREAD of a process
  runs on the stream multiplexer's own connection, whose read timeout leaves room
  for the block: transport/mux.py.)
- `sync_client`: a worker process's client (heartbeats, metrics), and with
  `blocking_reads` ModelQ's, whose claim blocks in BLMOVE for seconds at a time.
- `async_streams_client` / `sync_streams_client`: the streams role, for the API and
  for a worker's events: a `RedisCluster` client with STREAMS_REDIS_CLUSTER.

A call that cannot reach Redis fails within REDIS_TIMEOUT; callers decide what a
failure means (a 503 at the API, a retry within REDIS_GRACE_SECONDS in a worker).
"""

from __future__ import annotations

from typing import Any, TypeAlias

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import (
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from textstream.config import Settings

#: Read timeout of ModelQ's client: longer than its longest blocking claim.
BLOCKING_READ_SECONDS = 60.0

#: The streams role's clients: one Redis, or a Redis Cluster.
StreamsClient: TypeAlias = aioredis.Redis | AsyncRedisCluster
SyncStreamsClient: TypeAlias = redis.Redis | RedisCluster

#: What a Redis in trouble raises. A cluster client adds its own errors, and not all
#: of them are RedisErrors: `RedisClusterException` ("cannot be connected", a slot
#: not covered during a failover) is a plain Exception. `ClusterDownError`,
#: `TryAgainError`, `MovedError` and `AskError` are RedisErrors.
REDIS_ERRORS = (RedisError, RedisClusterException)
#: ... and a Redis that cannot be reached in time at all.
UNREACHABLE = (RedisError, RedisClusterException, OSError, TimeoutError)
#: ... of which those worth retrying (within REDIS_GRACE_SECONDS): Redis restarting,
#: a cluster failing over (CLUSTERDOWN, no reachable node, a slot not covered yet),
#: a slot being migrated (TRYAGAIN), a demoted master (READONLY). A worker's stream
#: writes retry these (worker/writer.py).
TRANSIENT = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    TryAgainError,
    ReadOnlyError,
    RedisClusterException,
)


def _options(settings: Settings, read_timeout: float | None = None) -> dict[str, Any]:
    return {
        "socket_connect_timeout": settings.redis_timeout,
        "socket_timeout": read_timeout or settings.redis_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }


def async_client(settings: Settings) -> aioredis.Redis:
    return aioredis.Redis.from_url(settings.redis_url, **_options(settings))


def sync_client(settings: Settings, *, blocking_reads: bool = False) -> redis.Redis:
    timeout = BLOCKING_READ_SECONDS if blocking_reads else None
    return redis.Redis.from_url(settings.redis_url, **_options(settings, timeout))


def async_streams_client(settings: Settings) -> StreamsClient:
    """A client of the streams role. Callers reuse the queue's client instead when
    `settings.streams_shared` (one Redis for both)."""
    if settings.streams_redis_cluster:
        return AsyncRedisCluster.from_url(settings.streams_url, **_options(settings))
    return aioredis.Redis.from_url(settings.streams_url, **_options(settings))


def sync_streams_client(settings: Settings) -> SyncStreamsClient:
    """A worker's client of the streams role. On a cluster, errors are not retried
    inside the client: a worker retries its writes itself, and first makes sure a
    failover did not lose its last acknowledged events (writer.py)."""
    if settings.streams_redis_cluster:
        return RedisCluster.from_url(
            settings.streams_url, cluster_error_retry_attempts=0, **_options(settings)
        )
    return redis.Redis.from_url(settings.streams_url, **_options(settings))
