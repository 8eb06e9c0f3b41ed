"""One blocking XREAD for every job stream an API process is waiting on.

A relay that blocks on its own `XREAD` costs one Redis command, one reply to parse
and one timeout per token per stream: at a thousand streams that was 40 % of the
API process's CPU. Here each waiting reader registers (stream, last id) and one
loop issues a single `XREAD BLOCK ... STREAMS k1 k2 ... id1 id2 ...` for all of
them, handing each reader the entries of its stream. Under load one command
serves hundreds of streams.

A reader that registers while that XREAD is blocked on other streams must not wait
for it to time out: the loop's connection is woken with `CLIENT UNBLOCK` (sent from
another connection), and the loop re-issues the read with the new stream in it.
Where the Redis user may not run CLIENT commands (a restricted ACL), the loop
blocks for SHORT_BLOCK_MS at a time instead, which bounds that wait.

Non-blocking reads (a relay's first read, the re-read after a job ended) do not
come here: they answer at once on the shared client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger(__name__)

#: (entry id, [field, value, field, value, ...]): XREAD's reply as Redis sends it.
#: redis-py's per-entry conversion to a dict was a fifth of the relay's CPU.
Entry = tuple[bytes, list[bytes]]


def id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class _Waiter:
    key: str
    last_id: str
    future: asyncio.Future[list[Entry]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ReadMux:
    """Multiplexes blocking stream reads onto one connection of its own."""

    #: How long one XREAD blocks when nothing arrives (readers time out on their own).
    BLOCK_MS = 1000
    #: Used instead when CLIENT UNBLOCK is not allowed: bounds a new reader's wait.
    SHORT_BLOCK_MS = 50

    def __init__(self, client: aioredis.Redis, *, count: int = 512) -> None:
        # A client of the same class and settings, on a single connection whose id
        # CLIENT UNBLOCK can name; `client` (the shared pool) sends the unblocks.
        self._client = client
        kwargs = dict(client.connection_pool.connection_kwargs)
        # The XREAD blocks up to BLOCK_MS: the read timeout must leave it that room.
        kwargs["socket_timeout"] = (kwargs.get("socket_timeout") or 5.0) + self.BLOCK_MS / 1000
        self._reader = type(client)(
            connection_pool=type(client.connection_pool)(**kwargs),
            single_connection_client=True,
        )
        self._reader.set_response_callback("XREAD", lambda response, **_: response)
        self._count = count
        self._waiters: dict[str, list[_Waiter]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reading: set[str] = set()  # the streams of the XREAD in flight
        self._cycle = 0
        self._reader_id: int | None = None
        self._can_unblock = True
        self._unblocking = False
        self._unblocker: asyncio.Task[None] | None = None

    @property
    def wakes_reads(self) -> bool:
        """False once CLIENT commands were refused: reads then block SHORT_BLOCK_MS."""
        return self._can_unblock

    async def read(self, key: str, last_id: str, block_ms: int) -> list[Entry]:
        """Entries of stream `key` after `last_id`, waiting up to `block_ms`; [] if none."""
        waiter = _Waiter(key, last_id)
        self._waiters.setdefault(key, []).append(waiter)
        self._start()
        self._nudge(key)
        try:
            async with asyncio.timeout(block_ms / 1000):
                return await waiter.future
        except TimeoutError:
            return []
        finally:
            self._forget(waiter)

    def interrupt(self) -> None:
        """Hand every waiting reader an empty read now (the process is stopping:
        each relay then sees it at once, instead of when its wait times out)."""
        for waiting in list(self._waiters.values()):
            for waiter in waiting:
                if not waiter.future.done():
                    waiter.future.set_result([])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._reader.close(close_connection_pool=True)

    # -- the loop --------------------------------------------------------------------

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="stream-read-mux")

    def _forget(self, waiter: _Waiter) -> None:
        waiting = self._waiters.get(waiter.key)
        if waiting is not None and waiter in waiting:
            waiting.remove(waiter)
            if not waiting:
                del self._waiters[waiter.key]

    def _nudge(self, key: str) -> None:
        """A reader arrived: start a read, or cut short one that does not include it."""
        self._wake.set()
        if key in self._reading or not self._reading or self._unblocking:
            return
        if self._can_unblock and self._reader_id is not None:
            self._unblocking = True
            self._unblocker = asyncio.create_task(self._unblock(self._cycle, self._reader_id))

    async def _unblock(self, cycle: int, reader_id: int) -> None:
        """Wake the loop's XREAD. Until it is actually blocked in Redis, CLIENT UNBLOCK
        finds nothing to wake, so retry briefly for as long as that read lasts."""
        try:
            for _ in range(50):
                if self._cycle != cycle or await self._client.client_unblock(reader_id):
                    return
                await asyncio.sleep(0.002)
        except ResponseError as exc:  # e.g. NOPERM: fall back to short blocks
            log.warning(
                "CLIENT UNBLOCK not allowed (%s); stream reads poll every %d ms",
                exc,
                self.SHORT_BLOCK_MS,
            )
            self._can_unblock = False
        except RedisError:
            pass  # the loop sees the outage itself
        finally:
            self._unblocking = False

    async def _run(self) -> None:
        while True:
            if not self._waiters:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if self._can_unblock and self._reader_id is None:
                    self._reader_id = await self._reader_client_id()
                # No await between choosing the streams and sending the read: a
                # reader arriving after this point is not in it, and unblocks it.
                self._wake.clear()
                streams = {key: _oldest(waiting) for key, waiting in self._waiters.items()}
                self._reading = set(streams)
                reply: Any = await self._reader.xread(
                    streams,  # type: ignore[arg-type]
                    count=self._count,
                    block=self.BLOCK_MS if self._can_unblock else self.SHORT_BLOCK_MS,
                )
            except RedisError as exc:
                self._reader_id = None  # a new connection gets a new id
                self._fail_all(exc)
                await asyncio.sleep(0.1)
                continue
            finally:
                self._reading = set()
                self._cycle += 1
            for raw_key, entries in reply or ():
                key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
                self._deliver(key, entries)

    async def _reader_client_id(self) -> int | None:
        try:
            return int(await self._reader.client_id())
        except ResponseError:
            self._can_unblock = False
            return None

    def _deliver(self, key: str, entries: list[Entry]) -> None:
        for waiter in list(self._waiters.get(key, ())):
            after = id_key(waiter.last_id)
            mine = [e for e in entries if id_key(e[0]) > after]
            if mine and not waiter.future.done():
                waiter.future.set_result(mine)
                self._forget(waiter)

    def _fail_all(self, exc: Exception) -> None:
        for waiting in list(self._waiters.values()):
            for waiter in waiting:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
        self._waiters.clear()


def _oldest(waiting: list[_Waiter]) -> str:
    return min((w.last_id for w in waiting), key=id_key)
