"""Every Redis client textstream makes, built in one place with bounded times.

- `async_client`: the API process's shared asyncio pool; every command on it is
  answered or failed within REDIS_TIMEOUT. (The one blocking XREAD of a process
  runs on the stream multiplexer's own connection, whose read timeout leaves room
  for the block: transport/mux.py.)
- `sync_client`: a worker process's client (events, heartbeats, metrics), and with
  `blocking_reads` ModelQ's, whose claim blocks in BLMOVE for seconds at a time.

A call that cannot reach Redis fails within REDIS_TIMEOUT; callers decide what a
failure means (a 503 at the API, a retry within REDIS_GRACE_SECONDS in a worker).
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from textstream.config import Settings

#: Read timeout of ModelQ's client: longer than its longest blocking claim.
BLOCKING_READ_SECONDS = 60.0


def async_client(settings: Settings) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        socket_keepalive=True,
        health_check_interval=30,
    )


def sync_client(settings: Settings, *, blocking_reads: bool = False) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=BLOCKING_READ_SECONDS if blocking_reads else settings.redis_timeout,
        socket_keepalive=True,
        health_check_interval=30,
    )
